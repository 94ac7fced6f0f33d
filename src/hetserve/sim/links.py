"""Network links in the simulator: concurrent transfers share a link's bandwidth equally."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Transfer:
    key: int
    remaining: float  # bytes
    payload: object


@dataclass
class SharedLink:
    """Processor sharing: n active transfers each progress at bandwidth / n."""

    bandwidth: float  # bytes/s
    latency: float  # s, added once per transfer by the caller
    active: list[Transfer] = field(default_factory=list)
    updated: float = 0.0
    version: int = 0  # bumps on every change; completion events carry it to detect staleness
    bytes_moved: float = 0.0

    def _advance(self, now: float) -> None:
        if self.active and now > self.updated:
            share = (now - self.updated) * self.bandwidth / len(self.active)
            for tr in self.active:
                tr.remaining -= share
        self.updated = now

    def add(self, now: float, key: int, nbytes: float, payload) -> None:
        self._advance(now)
        self.active.append(Transfer(key, nbytes, payload))
        self.bytes_moved += nbytes
        self.version += 1

    def next_completion(self) -> float | None:
        if not self.active:
            return None
        least = min(tr.remaining for tr in self.active)
        return self.updated + max(least, 0.0) * len(self.active) / self.bandwidth

    def pop_done(self, now: float) -> list[Transfer]:
        self._advance(now)
        # what is left after rounding of the clock counts as sent: one nanosecond of the link's
        # bandwidth (far above the resolution of a float clock at any simulated time)
        eps = self.bandwidth * 1e-9 + 1.0
        done = [tr for tr in self.active if tr.remaining <= eps]
        if done:
            self.active = [tr for tr in self.active if tr.remaining > eps]
            self.version += 1
        return done

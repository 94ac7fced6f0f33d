"""Sliding-window attention: how much KV a sequence holds and reads when some layers see only the
last ``window`` tokens (Gemma 2 alternates sliding and global layers; Gemma 3 has five sliding layers
per global one).

A *KV slot* is one token's K and V across every layer of the model. A sequence of ``n`` tokens holds
``n`` slots in a model without windows; with ``sliding`` of its ``layers`` limited to ``window``
tokens it holds ``(global_layers * n + sliding * min(n, window)) / layers`` slots, rounded up: the
engine frees a sliding layer's blocks once they fall out of the window (vLLM's hybrid KV cache
manager does this per layer group). Attention pairs and KV reads are averaged over the layers the
same way. Pure integer arithmetic, so the scheduler's block counts stay exact.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class KVWindow:
    window: int  # tokens a sliding layer attends to (itself included)
    sliding: int  # layers with the window
    layers: int  # all layers

    def __post_init__(self) -> None:
        if not (self.window >= 1 and 1 <= self.sliding <= self.layers):
            raise ValueError("a KV window needs window >= 1 and 1 <= sliding <= layers")

    @property
    def global_layers(self) -> int:
        return self.layers - self.sliding

    def held(self, tokens: int) -> int:
        """KV slots a sequence of ``tokens`` tokens holds."""
        full = self.global_layers * tokens + self.sliding * min(tokens, self.window)
        return -(-full // self.layers)

    def tokens_within(self, slots: int) -> int:
        """The longest sequence whose KV fits in ``slots`` slots (``held`` inverted)."""
        if slots <= self.window:
            return max(0, slots)
        if not self.global_layers:
            return sys.maxsize  # every layer slides: the cache never holds more than the window
        return (slots * self.layers - self.sliding * self.window) // self.global_layers

    def read(self, context: float) -> float:
        """KV slots one attention step over ``context`` tokens reads, averaged over the layers."""
        return (self.global_layers * context + self.sliding * min(context, self.window)) / self.layers

    def pairs(self, new: float, before: float) -> float:
        """(query, key) pairs of ``new`` tokens appended after ``before`` tokens, averaged over the
        layers: token ``k`` (1-based position) attends to ``k`` keys in a global layer and to
        ``min(k, window)`` in a sliding one."""
        full = new * before + new * (new + 1) / 2
        w, end = self.window, before + new
        if end <= w:
            windowed = full
        elif before >= w:
            windowed = new * w
        else:
            windowed = (w * (w + 1) - before * (before + 1)) / 2 + (end - w) * w
        return (self.global_layers * full + self.sliding * windowed) / self.layers

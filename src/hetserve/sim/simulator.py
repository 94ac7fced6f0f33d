"""The discrete-event simulator: replay requests against a deployment.

Events are processed in time order from one heap. Kinds:
- ARRIVAL: a request is routed to a prefill/mixed instance (or waits in the router's queue under JFFC),
  the serving stack's per-request time after it arrives;
- STAGE: a lane's batch reaches stage ``s`` of its chain and queues on that server (FIFO, or waits
  for the next batched step of a server shared by several instances);
- SERVED: a shared server's batched step ends (each batch in it moves to its next stage), or its next
  step starts with every batch waiting on it;
- DONE: a lane's step (or a run of decode steps) ends; the shared scheduler advances its sequences;
- XFER: a KV transfer on a link may have completed (stale versions are ignored);
- KV_READY: a transferred KV cache (plus the first token's state) arrives at a decode instance;
- HOSTED: a step of a server whose devices share a host's cores (``sim.hosts``) ends, unless it was
  re-timed since (stale versions are ignored).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from .. import clock
from ..costmodel.links import kv_transfer_time
from ..errors import OutOfTime
from ..plan import Deployment
from ..scheduling.instance import share_kv_pools
from ..scheduling.routing import make_policy, make_pool
from ..scheduling.sequence import Sequence
from ..specs.workloads import SLO, Requests
from .hosts import CoreSharing, HostedStep
from .instance import Lane, SimInstance, SimServer
from .links import SharedLink
from .metrics import DROP_TOO_LONG, DROP_UNFINISHED, Records, SimSummary, summarise

ARRIVAL, STAGE, DONE, XFER, KV_READY, SERVED, HOSTED = range(7)
#: Events between two looks at the clock (work charged, and the deadline checked when there is one).
DEADLINE_EVERY = 512


#: Bytes of KV converted per second when formats differ (a device-side copy kernel; conservative).
KV_CONVERSION_BYTES_PER_S = 100e9


@dataclass
class SimResult:
    summary: SimSummary
    records: Records
    servers: dict[str, SimServer]
    bin_width: float


class Simulator:
    def __init__(
        self,
        dep: Deployment,
        requests: Requests,
        slo: SLO,
        *,
        seed: int = 0,
        drain_s: float | None = None,
        progress=None,
        util_bins: int = 120,
        deadline: float | None = None,
    ):
        self.dep, self.req, self.slo = dep, requests, slo
        #: Seconds from a request's arrival to the router's seeing it (the serving stack's per-request
        #: cost); its TTFT counts from the arrival.
        self.request_overhead = dep.request_overhead_s
        #: ``clock.now()`` value after which ``run`` raises ``OutOfTime`` (None: no limit).
        self.deadline = deadline
        n = len(requests)
        horizon = float(requests.arrival_s[-1]) if n else 0.0
        self.limit = horizon + (drain_s if drain_s is not None else max(600.0, horizon))
        self.bin_width = max(self.limit / util_bins, 1e-3)
        self.servers = {
            name: SimServer(
                name,
                s.num_gpus,
                s.node.gpu.idle_watts,
                s.node.gpu.tdp_w,
                bin_width=self.bin_width,
                host=s.node.host.name if s.node.host else None,
                host_cores=s.num_gpus * s.node.host.threads_per_device if s.node.host else 0.0,
            )
            for name, s in dep.servers.items()
        }
        hosts = {s.node.host.name: s.node.host for s in dep.servers.values() if s.node.host}
        #: Devices that share a machine's cores (CPU workers): their steps are timed by processor sharing.
        self.sharing = CoreSharing(hosts, self._schedule_hosted) if hosts else None
        self.instances = {}
        for name, inst in dep.instances.items():  # a large plan takes a while to set up
            if deadline is not None and clock.now() > deadline:  # (an instance takes milliseconds)
                raise OutOfTime(f"setting up {len(dep.instances)} instances: out of time")
            self.instances[name] = SimInstance(inst, dep, self.servers)
            clock.charge(clock.SIM_INSTANCE_S)
        share_kv_pools(self.instances, dep.kv_pools())
        per_request = {i.name for i in self.instances.values() if i.per_request}
        for name, s in dep.servers.items():
            if len(s.instances) > 1 or per_request.intersection(s.instances):
                users = [dep.instances[i] for i in s.instances]
                srv = self.servers[name]
                srv.timer = dep.cost_model.timer(s.shape)
                srv.token_budget = max(u.plan.max_batch_tokens for u in users)
        self.entry = [i for i in self.instances.values() if i.role in ("prefill", "mixed")]
        self.decoders = [i for i in self.instances.values() if i.role == "decode"]
        self.prefillers = [i for i in self.entry if i.role == "prefill"]
        self.clock = [0.0]
        self.kv_window = dep.model.kv_window
        for inst in self.instances.values():
            inst.clock = self.clock
        # Routing pools, indexed by load. A request that fits every instance of a pool is routed over
        # the pool; one that does not (rare: a prompt longer than some instance holds) over the list of
        # those it fits. Prefill instances count the decode pool's least work as their own.
        self.entry_pool = make_pool(self.entry, self.clock)
        self.decode_pool = make_pool(self.decoders, self.clock)
        if self.decoders:
            for p in self.prefillers:
                p.downstream = self.decode_pool
        self._fits_all_mixed = min((i.fit_limit for i in self.entry if i.role == "mixed"), default=math.inf)
        self._fits_all_prefill = min((i.fit_limit for i in self.prefillers), default=math.inf)
        self._fits_all_decode = min((i.fit_limit for i in self.decoders), default=math.inf)
        self._fits_any_decode = max((i.fit_limit for i in self.decoders), default=math.inf)
        r = dep.spec.routing
        self.router = make_policy(r.policy, r.weights, seed)
        self.handoff_default = make_policy(r.handoff, None, seed + 1)
        self.handoff_by_prefill = {p: make_policy("weighted", w) for p, w in r.handoff_weights.items()}
        self.layerwise = r.layerwise_kv
        self.rec = Records(
            n,
            requests.arrival_s.astype(float),
            requests.prompt_tokens.astype(np.int64),
            requests.output_tokens.astype(np.int64),
        )
        self.heap: list = []
        self._counter = 0
        self.links: dict[tuple[str, str], SharedLink] = {}
        self.central: list[int] = []  # request ids waiting for a free chain (JFFC)
        self.iterations = 0
        self.items = 0  # sequences in the steps done
        self.events = 0  # events handled (set when the run ends)
        self.arrived = 0  # requests that have arrived
        #: (events, arrived, items, router's lane reads) when work was last charged
        self._charged = (0, 0, 0, 0)
        self.peak_kv = {name: 0.0 for name in self.instances}
        self.progress = progress
        self.hashes = requests.block_hashes

    # ---- heap ----------------------------------------------------------------------------------
    def push(self, t: float, kind: int, payload) -> None:
        self._counter += 1
        heapq.heappush(self.heap, (t, self._counter, kind, payload))

    def run(self) -> SimResult:
        if len(self.req):
            self.push(float(self.req.arrival_s[0]) + self.request_overhead, ARRIVAL, 0)
        now = 0.0
        events = next_look = 0
        while self.heap:
            if events == next_look:
                self._charge(events)
                if self.deadline is not None and clock.now() > self.deadline:
                    raise OutOfTime(f"simulation stopped at {now:.1f} s of simulated time: out of time")
                next_look += DEADLINE_EVERY
            events += 1
            t, _, kind, payload = heapq.heappop(self.heap)
            if t > self.limit:
                break
            now = t
            self.clock[0] = t
            if kind == DONE:
                lane, version = payload
                if version == lane.version:
                    self._on_done(lane, t)
            elif kind == STAGE:
                self._enter_stage(payload[0], payload[1], t)
            elif kind == SERVED:
                self._on_served(payload[0], payload[1], t)
            elif kind == ARRIVAL:
                self._on_arrival(payload, t)
            elif kind == XFER:
                self._on_transfer(payload[0], payload[1], t)
            elif kind == HOSTED:
                step, version = payload
                if version == step.version:
                    self._on_hosted_done(step, t)
            else:
                self._on_kv_ready(payload[0], payload[1], t)
        self._charge(events)
        self.events = events
        return self._result(now)

    def _charge(self, events: int) -> None:
        """Charge the work done since the last charge (``clock``), ``events`` events having been handled
        so far: the events, the requests that arrived, the sequences of the steps done, and the lanes the
        router looked at."""
        if not clock.counting():
            return
        reads = sum(i.lane_reads for i in self.instances.values())
        handled, arrived, items, read = self._charged
        clock.charge(
            (events - handled) * clock.SIM_EVENT_S
            + (self.arrived - arrived) * clock.SIM_REQUEST_S
            + (self.items - items) * clock.SIM_ITEM_S
            + (reads - read) * clock.SIM_LANE_READ_S
        )
        self._charged = (events, self.arrived, self.items, reads)

    # ---- arrivals and routing -----------------------------------------------------------------
    def _on_arrival(self, i: int, t: float) -> None:
        nxt = self.arrived = i + 1
        if nxt < len(self.req):
            self.push(float(self.req.arrival_s[nxt]) + self.request_overhead, ARRIVAL, nxt)
        if self.progress is not None:
            self.progress(1)
        p, o = int(self.rec.prompt[i]), int(self.rec.output[i])
        cands = self._entry_candidates(p, o)
        if self.decoders and p + o > self._fits_any_decode:
            cands = []
        if not cands:
            self.rec.dropped[i] = True
            self.rec.drop_reason[i] = DROP_TOO_LONG
            return
        if self.router.queues:
            self.central.append(i)
            self._dispatch_central(t)
            return
        self._admit(self.router.choose(cands), i, t)

    def _entry_candidates(self, p: int, o: int):
        """The entry instances a request of ``p`` prompt and ``o`` output tokens fits (a prefill
        instance computes one output token): the whole pool when it fits them all."""
        if p + o <= self._fits_all_mixed and p + 1 <= self._fits_all_prefill:
            return self.entry_pool
        return [c for c in self.entry if c.fits(p, o if c.role == "mixed" else 1)]

    def _dispatch_central(self, t: float) -> None:
        while self.central:
            i = self.central[0]
            p, o = int(self.rec.prompt[i]), int(self.rec.output[i])
            cands = self._entry_candidates(p, o)
            inst = self.router.choose(cands)
            if inst is None:
                return
            self.central.pop(0)
            self._admit(inst, i, t)

    def _admit(self, inst: SimInstance, i: int, t: float) -> None:
        o = int(self.rec.output[i]) if inst.role == "mixed" else 1
        seq = Sequence(seq_id=i, prompt_len=int(self.rec.prompt[i]), max_tokens=o, arrival_time=t)
        self._attach_keys(seq, i)
        self.rec.entry[i] = inst.name
        self._enqueue(inst, seq, t)

    def _enqueue(self, inst: SimInstance, seq: Sequence, t: float) -> None:
        for lane in inst.add(seq):
            if not lane.busy:
                self._start_step(lane, t)
            else:
                self._cut_run(lane, t)

    def _attach_keys(self, seq: Sequence, i: int) -> None:
        if self.hashes is not None and self.hashes[i]:
            seq.block_keys = self.hashes[i]
            seq.block_key_tokens = 512
        else:
            seq.cacheable = False

    # ---- stepping ----------------------------------------------------------------------------------
    def _start_step(self, lane: Lane, t: float) -> None:
        sched = lane.scheduler
        batch = lane.instance.schedule(lane)
        for seq in batch.preempted:
            self.rec.preemptions[seq.seq_id] += 1
        if not batch.items and batch.group is None:
            lane.busy = False
            return
        lane.busy = True
        lane.batch = batch
        inst = lane.instance
        new = seqs = 0
        pairs = kv = growth = 0.0
        window = self.kv_window
        for it in batch.items:
            n, start = it.num_tokens, it.start
            new += n
            if window is None:
                pairs += n * start + n * (n + 1) / 2
                kv += start + n
            else:  # sliding layers attend to, and read, at most their window
                pairs += window.pairs(n, start)
                kv += window.read(start + n)
                growth += window.read(start + n + 1) - window.read(start + n)
            if it.is_prefill and math.isnan(self.rec.prefill_start[it.seq.seq_id]):
                self.rec.prefill_start[it.seq.seq_id] = t
        seqs = len(batch.items)
        if batch.group is not None:  # decoding sequences advanced together: one token each
            g = batch.group
            new += g.seqs
            seqs += g.seqs
            pairs += g.kv
            kv += g.kv
        used = sched.blocks.num_used_blocks / sched.blocks.num_blocks
        if used > self.peak_kv[inst.name]:
            self.peak_kv[inst.name] = used
        lane.shape = (new, seqs, pairs, kv)
        lane.t0 = t
        lane.steps = 1
        if not inst.exclusive:
            self._enter_stage(lane, 0, t)
            return
        # Servers of its own: the step's time is known now. A pure-decode batch runs as many steps as
        # nothing could change; an arrival to this lane cuts the run short (_cut_run).
        # with several lanes, as many share the chain's servers as are in flight now (this one among
        # them): a lone lane's step takes the chain's latency, all of them busy the steady cycle
        busy = inst.busy_lanes() if inst.chain.lanes > 1 else 1
        lane.shares = inst.chain.stage_shares(new, seqs, pairs, kv, busy)
        steps = sched.decode_steps_available(batch) if new == seqs else 1
        if steps > 1:
            lane.a, lane.b = inst.chain.decode_affine(seqs, kv, busy)
            lane.kv0, lane.n, lane.steps = kv, seqs, steps
            if window is not None and growth > 0:
                # a run's KV reads grow by `growth` per step, not one per sequence: the same times
                # with b scaled by growth / n and the reads counted in those units
                scale = growth / seqs
                lane.b, lane.kv0 = lane.b * scale, kv / scale
        else:
            lane.duration = inst.chain.cycle_time(new, seqs, pairs, kv, busy)
        self.push(t + lane.total(lane.steps), DONE, (lane, lane.version))
        if steps > 1:
            inst.load_changed()  # its work now falls as the run's steps end (work_valid_until)

    def _cut_run(self, lane: Lane, t: float) -> None:
        """A sequence joined ``lane``'s queue at ``t`` during a run of decode steps: end the run at the
        first step boundary at or after ``t``, where a step-by-step scheduler would first see it."""
        if not lane.busy or lane.steps <= 1:
            return
        done = lane.steps_done_by(t)
        k = done if done >= 1 and lane.t0 + lane.total(done) >= t else done + 1
        if k < lane.steps:
            lane.steps = max(k, 1)
            lane.version += 1
            self.push(lane.t0 + lane.total(lane.steps), DONE, (lane, lane.version))

    def _enter_stage(self, lane: Lane, s: int, t: float) -> None:
        inst = lane.instance
        srv = inst.servers[s]
        if srv.batching:
            srv.waiting.append((lane, s))
            if not srv.running:
                self._start_soon(srv, t)
            return
        dt = inst.chain.timers[s].time(*lane.shape)
        if srv.host is not None:  # its devices share a host's cores: one step at a time, in order
            if srv.running:
                srv.waiting.append((lane, s))
            else:
                self._start_hosted(srv, [(lane, s)], dt, t)
            return
        start = t if t > srv.free_at else srv.free_at
        srv.occupy(start, dt)
        self._leave_stage(lane, s, start + dt)

    def _leave_stage(self, lane: Lane, s: int, end: float) -> None:
        inst = lane.instance
        if s + 1 < len(inst.servers):
            self.push(end + inst.chain.hop_time(s, lane.shape[0]), STAGE, (lane, s + 1))
        else:
            self.push(end, DONE, (lane, lane.version))

    def _start_soon(self, srv: SimServer, t: float) -> None:
        """A shared server starts its next step at ``t`` once every event of that instant has been seen,
        so that batches arriving together (or handed back by the step that just ended) run together."""
        srv.running = True
        self.push(t, SERVED, (srv, None))

    def _on_served(self, srv: SimServer, taken: list | None, t: float) -> None:
        if taken is not None:  # a step ended: its batches move on
            for lane, s in taken:
                self._leave_stage(lane, s, t)
            self._start_soon(srv, t)
            return
        if not srv.waiting:
            srv.running = False
            return
        taken, shape = srv.take_step()
        dt = srv.timer.time(*shape)
        if srv.host is not None:
            self._start_hosted(srv, taken, dt, t)
            return
        srv.occupy(t, dt)
        self.push(t + dt, SERVED, (srv, taken))

    def _start_hosted(self, srv: SimServer, taken: list, work: float, t: float) -> None:
        """A step of ``work`` seconds (on an idle host) starts on ``srv``, whose devices share a host's
        cores: it and the host's other running steps are timed by ``sim.hosts``."""
        srv.running = True
        self.sharing.start(HostedStep(srv, taken, work, t), t)

    def _schedule_hosted(self, step: HostedStep, t: float) -> None:
        self.push(t, HOSTED, (step, step.version))

    def _on_hosted_done(self, step: HostedStep, t: float) -> None:
        self.sharing.end(step, t)
        srv = step.server
        srv.occupy(step.start, t - step.start)
        if srv.batching:
            self._on_served(srv, step.taken, t)
            return
        srv.running = False
        for lane, s in step.taken:
            self._leave_stage(lane, s, t)
        if srv.waiting:
            lane, s = srv.waiting.popleft()
            self._enter_stage(lane, s, t)

    def _on_done(self, lane: Lane, t: float) -> None:
        self.iterations += lane.steps
        self.items += len(lane.batch.items)
        inst = lane.instance
        if inst.exclusive:
            offset, total = lane.t0, t - lane.t0
            for srv, share in zip(inst.servers, lane.shares):
                srv.occupy(offset, total * share)  # a lane's stages run one after another
                offset += total * share
        batch = lane.batch
        finished = inst.complete(lane, batch, steps=lane.steps)
        for it in batch.items:
            seq = it.seq
            sid = seq.seq_id
            if it.samples:
                if (
                    it.is_prefill
                    and seq.num_computed_tokens >= seq.prompt_len
                    and math.isnan(self.rec.prefill_end[sid])
                ):
                    self.rec.prefill_end[sid] = t
                if math.isnan(self.rec.first_token[sid]):
                    self.rec.first_token[sid] = t
        for seq in finished:
            if inst.role == "prefill":
                self._hand_off(inst, seq, t)
            else:
                self.rec.finish[seq.seq_id] = t
        lane.batch = None
        lane.busy = False
        self._start_step(lane, t)
        if finished and inst.per_request:
            for owner in (inst, *inst.pool_neighbours):  # the pools have room again
                for ln in owner.admit_queued():
                    if not ln.busy:
                        self._start_step(ln, t)
        if finished and self.central:
            self._dispatch_central(t)

    # ---- prefill -> decode ---------------------------------------------------------------------------
    def _hand_off(self, inst: SimInstance, seq: Sequence, t: float) -> None:
        i = seq.seq_id
        out = int(self.rec.output[i])
        if out <= 1:
            self.rec.finish[i] = t
            return
        p = int(self.rec.prompt[i])
        if p + out <= self._fits_all_decode:
            cands = self.decode_pool
        else:
            cands = [d for d in self.decoders if d.fits(p, out)]
        policy = self.handoff_by_prefill.get(inst.name, self.handoff_default)
        dec = policy.choose(cands)
        self.rec.decode[i] = dec.name
        nbytes = self.dep.model.kv_slots(p) * inst.kv_bytes_per_token  # a sliding layer hands its window
        self.rec.kv_bytes[i] = nbytes
        self.rec.transfer_start[i] = t
        link_spec = self.dep.kv_link(inst.name, dec.name)
        conv = (
            nbytes / KV_CONVERSION_BYTES_PER_S if self.dep.kv_conversion_needed(inst.name, dec.name) else 0.0
        )
        prefill_time = t - self.rec.prefill_start[i]
        exposed = (
            kv_transfer_time(
                nbytes,
                link_spec,
                prefill_time=prefill_time,
                layers=self.dep.model.num_layers,
                layerwise=self.layerwise,
            )
            - link_spec.latency
        )
        delay = link_spec.latency + conv
        if math.isinf(link_spec.bandwidth) or exposed <= 0:
            self.push(t + delay, KV_READY, (dec, seq))
            return
        key = (inst.servers[-1].name, dec.servers[0].name)
        link = self.links.get(key)
        if link is None:
            link = self.links[key] = SharedLink(link_spec.bandwidth, link_spec.latency, updated=t)
        link.add(t, i, exposed * link_spec.bandwidth, (dec, seq, delay))
        link.bytes_moved += nbytes - exposed * link_spec.bandwidth  # streamed behind prefill
        self.push(link.next_completion(), XFER, (key, link.version))

    def _on_transfer(self, key, version: int, t: float) -> None:
        link = self.links[key]
        if version != link.version:
            return
        for tr in link.pop_done(t):
            dec, seq, delay = tr.payload
            self.push(t + delay, KV_READY, (dec, seq))
        nxt = link.next_completion()
        if nxt is not None:
            self.push(nxt, XFER, (key, link.version))

    def _on_kv_ready(self, dec: SimInstance, seq: Sequence, t: float) -> None:
        i = seq.seq_id
        self.rec.transfer_end[i] = t
        d = Sequence(seq_id=i, prompt_len=seq.prompt_len, max_tokens=int(self.rec.output[i]), arrival_time=t)
        d.num_output_tokens = 1
        d.num_transferred_tokens = seq.prompt_len
        d.cacheable = False
        self._enqueue(dec, d, t)

    # ---- results -------------------------------------------------------------------------------------
    def _result(self, now: float) -> SimResult:
        rec = self.rec
        unfinished = np.isnan(rec.finish) & ~rec.dropped
        for i in np.flatnonzero(unfinished):
            rec.drop_reason[i] = DROP_UNFINISHED
        rec.dropped |= unfinished
        done = ~np.isnan(rec.finish)
        first = float(rec.arrival[0]) if rec.n else 0.0
        last = float(np.nanmax(rec.finish)) if done.any() else now
        makespan = max(last - first, 1e-9)
        util = {name: min(1.0, s.busy / makespan) for name, s in self.servers.items()}
        energy = sum(
            s.gpus * (s.idle_w * makespan + (s.busy_w - s.idle_w) * min(s.busy, makespan))
            for s in self.servers.values()
        )
        summary = summarise(
            rec,
            self.slo,
            cost_per_hour=self.dep.cost_per_hour(),
            energy_j=energy,
            makespan=makespan,
            server_util=util,
            peak_kv=dict(self.peak_kv),
            bytes_transferred=float(np.nansum(rec.kv_bytes)),
            gpus=self.dep.gpus_used(),
            iterations=self.iterations,
        )
        return SimResult(summary, rec, self.servers, self.bin_width)


def simulate(
    dep: Deployment,
    requests: Requests,
    slo: SLO,
    *,
    seed: int = 0,
    drain_s: float | None = None,
    progress=None,
    deadline: float | None = None,
) -> SimResult:
    """Replay ``requests`` against ``dep``; with a ``deadline`` (a ``clock.now()`` value: wall time, or
    work when work is counted) a run still going at that moment raises ``OutOfTime``."""
    return Simulator(
        dep, requests, slo, seed=seed, drain_s=drain_s, progress=progress, deadline=deadline
    ).run()

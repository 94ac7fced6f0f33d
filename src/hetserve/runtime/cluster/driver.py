"""The driver: a plan's instances behind the ``LLMEngine`` interface the API server drives.

Rank 0 holds the router, one scheduler per micro-batch lane of every instance (each lane owns a
disjoint range of the instance's KV blocks, so lanes are independent batches in flight through the
chain; pipelining per request, every request is a lane over one shared pool, and the ready requests'
steps go together as one micro-batch while fewer than the chain's stages are in flight), sampling and
stop conditions. Workers hold the weights and KV and run what they are sent.

A step: route waiting requests; give every idle lane of every live instance its next batch (its KV
hand-offs and installs first); wait for at least one lane's logits; sample, hand prefilled requests to
a decode instance, and report the tokens. A worker that dies takes its instances down: their requests
go back to the router and are prefilled again elsewhere (the tokens already sent are kept). Workers
started here are started again (``recovery``); when they have rejoined, every process forms the next
generation's groups and the instances whose workers are all back take requests again.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from dataclasses import dataclass

import torch

from ...scheduling import Sequence
from ...scheduling.instance import KVPool
from ...scheduling.routing import make_policy
from ..model_runner import prepare_batch
from ..request import RequestOutput, RequestState, accept_tokens
from ..sampling import SamplingParams, sample
from ..serving import ClusterStats, EngineLoad, InstanceStats, WorkerStats
from .channel import KVDrop, KVFree, KVInstall, Shutdown, Step
from .handoff import KVHandoffs
from .instance import InstanceRunner, _Flight, _Lane
from .recovery import Recovery, stop_instance, struck_instances
from .topology import Topology
from .transport import Transport

log = logging.getLogger("hetserve.driver")


@dataclass
class _ClusterRequest:
    state: RequestState  # prompt, params, random stream, decoder, tokens and text so far
    instance: str | None = None
    install: tuple[int, str] | None = None  # (KV key, decode instance) waiting to be installed
    waiting_since: float | None = None  # when it was queued with no instance up (workers restarting)

    @property
    def id(self) -> int:
        return self.state.request_id


class ClusterEngine:
    """Serve a plan's instances over worker processes (a ``ServingEngine``, as ``LLMEngine`` is)."""

    def __init__(
        self,
        topo: Topology,
        config,
        tokenizer,
        kv_cache_gb: float,
        *,
        prefix_caching: bool = True,
        max_model_len: int | None = None,
        seed: int = 0,
        processes: dict[int, object] | None = None,
        transport: Transport | None = None,
        launcher=None,
    ):
        from .sizing import instance_blocks, pool_blocks

        self.topo, self.config, self.tokenizer = topo, config, tokenizer
        self.max_model_len = max_model_len or config.max_position_embeddings
        self.eos_token_ids = set(config.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        blocks = instance_blocks(topo, config, kv_cache_gb)
        self._results: queue.Queue = queue.Queue()
        if transport is None:
            raise ValueError("a ClusterEngine needs a transport (start_cluster makes one)")
        self.transport: Transport = transport
        self._blocks, self._prefix_caching = blocks, prefix_caching
        #: One KV pool per server whose instances pool it (``kv_pool: server``), in tokens.
        self._kv_pools = {
            server: KVPool(server, size.blocks * size.block_size)
            for server, size in pool_blocks(topo, config, kv_cache_gb).items()
        }
        self.instances = {name: self._runner(name) for name in topo.instances}
        self._index_instances()
        self.router = make_policy(topo.routing_policy, topo.routing_weights, seed)
        self.kv = KVHandoffs(topo, config, seed)
        self.processes = processes if processes is not None else {}  # rank -> local worker process
        self.recovery = Recovery(self, launcher)
        self._generator = torch.Generator().manual_seed(seed)
        self._requests: dict[int, _ClusterRequest] = {}
        self._by_seq: dict[int, _ClusterRequest] = {}
        self._queued: list[_ClusterRequest] = []  # waiting for the router (JFFC, or after a failure)
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self.instance_steps: dict[str, int] = {name: 0 for name in self.instances}

    def _runner(self, name: str) -> InstanceRunner:
        spec = self.topo.instances[name]
        runner = InstanceRunner(
            spec,
            self._blocks[name],
            self.config.vocab_size,
            self._results,
            self._prefix_caching,
            self.transport,
        )
        runner.strided = any(self.topo.workers[r].kv_layout == "head-major" for r in spec.ranks)
        if spec.scheduling.kv_pool:
            runner.join([self._kv_pools[s] for s in spec.servers])
        return runner

    def _free_released(self, inst: InstanceRunner) -> None:
        """Tell the workers of an instance pooling their KV which of its blocks its requests gave back."""
        blocks = inst.take_released()
        if blocks:
            self.transport.send(KVFree(inst.name, blocks), inst.spec.ranks)

    def _index_instances(self) -> None:
        self.entry = [i for i in self.instances.values() if i.spec.role != "decode"]
        self.decoders = [i for i in self.instances.values() if i.spec.role == "decode"]

    # ---- requests (the ServingEngine interface) ---------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def kv_bytes_moved(self) -> int:
        return self.kv.bytes_moved

    @property
    def handoffs(self) -> int:
        return self.kv.count

    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        state = RequestState.create(
            next(self._ids),
            prompt,
            params,
            tokenizer=self.tokenizer,
            vocab_size=self.config.vocab_size,
            max_model_len=self.max_model_len,
            generator=self._generator,
        )
        if not any(i.up for i in self.entry) and not self.recovery.may_recover():
            raise RuntimeError(f"no instance is up to serve the request ({self.down_summary()})")
        req = _ClusterRequest(state)
        self._requests[req.id] = req
        self._route(req)
        return req.id

    def abort_request(self, request_id: int) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if req in self._queued:
            self._queued.remove(req)
        self._detach(req)

    def has_unfinished_requests(self) -> bool:
        """Requests to serve, or workers to bring back (the caller keeps stepping until they are)."""
        return bool(self._requests) or self.recovery.due()

    def down_summary(self) -> str:
        """Which instances are down and which of their workers are restarting, in words."""
        down = [name for name, inst in self.instances.items() if not inst.up]
        if not down:
            return "every instance is up"
        text = f"instance(s) down: {', '.join(down)}"
        if self.recovery.pending:
            text += f"; worker rank(s) {sorted(self.recovery.pending)} restarting"
        return text

    @staticmethod
    def _load_of(lanes: list[_Lane], queued: int = 0, steps: int | None = None) -> EngineLoad:
        scheds = [ln.scheduler for ln in lanes]
        return EngineLoad(
            sum(len(s.waiting) for s in scheds) + queued,
            sum(len(s.running) for s in scheds),
            sum(s.blocks.num_used_blocks for s in scheds),
            sum(s.blocks.num_blocks for s in scheds),
            sum(s.stats.steps for s in scheds) if steps is None else steps,
            sum(s.stats.prefix_hit_tokens for s in scheds),
        )

    def load(self) -> EngineLoad:
        return self._load_of(
            [ln for i in self.instances.values() if i.up for ln in i.lanes], len(self._queued)
        )

    _NO_LOAD = EngineLoad(0, 0, 0, 0, 0, 0)

    def cluster_stats(self) -> ClusterStats:
        """Per instance (up, load, micro-batches run) and per worker (up, micro-batches through it)."""
        instances = tuple(
            InstanceStats(
                name,
                inst.spec.role,
                inst.up,
                self._load_of(inst.lanes, steps=self.instance_steps[name])
                if inst.up
                else self._NO_LOAD,  # a down instance holds nothing (its requests went elsewhere)
            )
            for name, inst in self.instances.items()
        )
        workers = []
        for rank, w in self.topo.workers.items():
            proc = self.processes.get(rank)
            of = self.topo.instances_of(rank)
            up = all(self.instances[i.name].up for i in of) and (proc is None or proc.poll() is None)
            workers.append(
                WorkerStats(rank, w.server, w.tp_rank, up, sum(self.instance_steps[i.name] for i in of))
            )
        return ClusterStats(instances, tuple(workers), self.kv.bytes_moved)

    def wake(self) -> None:
        """Return from a ``step`` waiting on the workers (a request arrived that an idle lane may take)."""
        self._results.put(None)

    # ---- one step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        self._check_processes(outputs)
        self.recovery.run(outputs)
        self._route_queued(outputs)
        self._dispatch()
        if not any(ln.flight for i in self.instances.values() for ln in i.lanes):
            if self.recovery.pending or self._queued:  # waiting for workers: do not spin
                try:
                    self._handle(self._results.get(timeout=0.2), outputs)
                except queue.Empty:
                    pass
            return outputs
        while True:
            try:
                item = self._results.get(timeout=0.5)
                break
            except queue.Empty:
                if self._check_processes(outputs):
                    return outputs
        self._handle(item, outputs)
        while True:  # everything else that is already back
            try:
                self._handle(self._results.get_nowait(), outputs)
            except queue.Empty:
                break
        self.transport.flush()
        return outputs

    # ---- routing ----------------------------------------------------------------------------------
    def _route(self, req: _ClusterRequest, outputs: list | None = None) -> None:
        live = [i for i in self.entry if i.up]
        if not live:
            now = time.monotonic()
            if req.waiting_since is None:
                req.waiting_since = now
            if now - req.waiting_since < self.recovery.wait_limit and self.recovery.may_recover():
                self._queued.append(req)  # its instance's workers are coming back
            else:
                self._fail(req, f"no instance is up to serve the request ({self.down_summary()})", outputs)
            return
        req.waiting_since = None
        target = self.router.choose(live)
        if target is None:  # JFFC: every chain busy; wait in the central queue
            self._queued.append(req)
            return
        self._place(req, target, self._new_seq(req, target))

    def _route_queued(self, outputs: list) -> None:
        queued, self._queued = self._queued, []
        for req in queued:
            self._route(req, outputs)

    def _new_seq(self, req: _ClusterRequest, inst: InstanceRunner, transferred: int = 0) -> Sequence:
        """A sequence for ``req`` on ``inst``: its prompt is everything known so far (prompt + outputs)."""
        state = req.state
        tokens = state.prompt_token_ids + state.output_token_ids
        remaining = (
            1 if inst.spec.role == "prefill" else state.params.max_tokens - len(state.output_token_ids)
        )
        return Sequence(
            next(self._seq_ids),
            len(tokens),
            max(1, remaining),
            token_ids=tokens,
            num_transferred_tokens=transferred,
        )

    def _place(self, req: _ClusterRequest, inst: InstanceRunner, seq: Sequence) -> None:
        req.state.seq = seq
        req.instance = inst.name
        inst.add(seq)  # pipelining per request, a lane it starts joins ``ready`` (admit_queued)
        self._by_seq[seq.seq_id] = req

    # ---- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        for inst in self.instances.values():
            if not inst.up:
                continue
            if inst.per_request:
                inst.admit_queued()
                self._dispatch_requests(inst)
                continue
            for lane in inst.lanes:
                if lane.flight is None and lane.scheduler.has_unfinished():
                    batch = inst.schedule(lane)
                    if batch.items:
                        self._send(inst, [(lane, batch)])

    def _dispatch_requests(self, inst: InstanceRunner) -> None:
        """Pipelining per request: while fewer micro-batches than stages are in the chain, send the next
        step of every ready request, in the order they became ready, as one micro-batch of at most
        ``max_batch_tokens`` tokens (at least one step). The workers run micro-batches one after another,
        so the steps batched together are those that wait for the first stage, as the simulator's
        servers batch the steps waiting on them."""
        budget = inst.config.max_batch_tokens
        while inst.ready and inst.in_flight < len(inst.spec.stages):
            parts, tokens = [], 0
            while inst.ready:
                lane = inst.ready[0]
                if lane.flight is not None or not lane.scheduler.has_unfinished():
                    inst.ready.popleft()  # aborted, or already queued again
                    continue
                if parts and tokens + inst.next_step_tokens(lane) > budget:
                    break
                inst.ready.popleft()
                batch = inst.schedule(lane)
                if batch.items:
                    parts.append((lane, batch))
                    tokens += batch.num_tokens
            if not parts:
                return
            self._send(inst, parts)

    def _send(self, inst: InstanceRunner, parts: list[tuple[_Lane, object]]) -> None:
        """Send the lanes' batches as one micro-batch through ``inst``'s chain (KV installs first)."""
        items = [it for _, batch in parts for it in batch.items]
        offset = parts[0][0].offset  # lanes sharing a micro-batch share one pool (offset 0)
        table = lambda seq: [b + offset for b in seq.block_table]
        for it in items:
            req = self._by_seq[it.seq.seq_id]
            if req.install is not None:
                key, _ = req.install
                req.install = None
                if it.seq.num_transferred_tokens:
                    self.transport.send(KVInstall(inst.name, key, table(it.seq)), inst.spec.ranks)
                else:  # preempted before it ran: it recomputes instead
                    self.transport.send(KVDrop(key), inst.spec.ranks)
        ids, positions, meta, rows = prepare_batch(
            items, inst.spec.block_size, "cpu", offset, strided=inst.strided
        )
        sampling = [it for it in items if it.samples]
        handoffs = []
        if inst.spec.role == "prefill":
            for it in sampling:
                dec = self.kv.choose(inst, self.decoders)
                if dec is not None:
                    handoffs.append(
                        (it.seq.seq_id, self.kv.start(inst.spec, dec.spec, table(it.seq), it.end))
                    )
        self.transport.send(
            Step(inst.name, ids, positions, meta, rows, [h.out for _, h in handoffs]), inst.spec.ranks
        )
        for _, h in handoffs:
            self.transport.send(h.recv, h.decoder.ranks)
        by_seq = {seq_id: (h.decoder.name, h.key) for seq_id, h in handoffs}
        flight = _Flight(parts, sampling, by_seq, time.perf_counter())
        for lane, _ in parts:
            lane.flight = flight
        inst.expect(flight)
        self.instance_steps[inst.name] += 1
        inst.in_flight += 1
        inst.max_in_flight = max(inst.max_in_flight, inst.in_flight)

    # ---- results ----------------------------------------------------------------------------------
    def _handle(self, item, outputs: list) -> None:
        if item is None:  # wake()
            return
        inst, flight, logits = item
        if isinstance(logits, BaseException):
            log.error("instance %s failed: %s", inst.name, logits)
            self._take_down(inst, outputs)
            return
        for lane, _ in flight.parts:
            lane.flight = None
        if not inst.up:
            return
        inst.in_flight -= 1
        for seq_id, (dec, key) in flight.handoffs.items():
            if seq_id not in self._by_seq:  # aborted while its prefill ran: free the staged KV
                self.transport.send(KVDrop(key), self.instances[dec].spec.ranks)
        live = [it for it in flight.sampling if it.seq.seq_id in self._by_seq]
        rows = [flight.sampling.index(it) for it in live]
        reqs = [self._by_seq[it.seq.seq_id] for it in live]
        states = [r.state for r in reqs]
        tokens = (
            sample(logits[rows], [s.params for s in states], [s.generator for s in states]) if rows else []
        )
        deltas, stopped = accept_tokens(states, tokens, self.eos_token_ids)
        token_ids = {s.seq.seq_id: t for s, t in zip(states, tokens)}
        for lane, batch in flight.parts:
            inst.complete(lane, batch, token_ids, stopped)
            if inst.per_request and lane.scheduler.has_unfinished():
                inst.ready.append(lane)
        self._free_released(inst)
        for req, token, delta in zip(reqs, tokens, deltas):
            seq = req.state.seq
            handoff = flight.handoffs.get(seq.seq_id)
            if seq.is_finished:
                del self._by_seq[seq.seq_id]
            if req.state.done:
                delta += req.state.finish()
                if handoff is not None:
                    self.transport.send(KVDrop(handoff[1]), self.instances[handoff[0]].spec.ranks)
                del self._requests[req.id]
            elif handoff is not None:
                dec = self.instances[handoff[0]]
                if dec.up:
                    self._place(req, dec, self._new_seq(req, dec, transferred=seq.num_tokens - 1))
                    req.install = (handoff[1], dec.name)
                else:
                    self._route(req, outputs)  # its decode instance died meanwhile: prefill again
            elif seq.is_finished:  # a prefill instance without a decode instance to go to
                self._route(req, outputs)
            outputs.append(req.state.output(token, delta))

    # ---- failures (recovery.py) -------------------------------------------------------------------
    def _check_processes(self, outputs: list) -> bool:
        """Take down the instances of local workers that exited (and start those again); True if any."""
        hit = struck_instances(self.instances.values(), self.recovery.exited())
        for inst in hit:
            self._take_down(inst, outputs)
        return bool(hit)

    def _take_down(self, inst: InstanceRunner, outputs: list) -> None:
        """Mark ``inst`` down and send its requests back to the router (they are prefilled again)."""
        if not inst.up:
            return
        for command, ranks in stop_instance(inst, self.instances):
            self.transport.send(command, ranks)
        if inst.kv_pools:  # its requests are served elsewhere: what they held in the pools is free
            inst.leave_pools()
            self.transport.send(KVFree(inst.name, None), inst.spec.ranks)
        orphans = [r for r in self._requests.values() if r.instance == inst.name]
        for req in orphans:
            if req.state.seq is not None:
                self._by_seq.pop(req.state.seq.seq_id, None)
            req.install = None
            req.instance = None
        for req in orphans:
            self._route(req, outputs)

    def _reprefill_handoffs(self, outputs: list) -> None:
        """Requests whose KV was handed to a decode instance but not yet installed go back to the router
        (the workers forget staged KV when they regroup)."""
        for req in list(self._requests.values()):
            if req.install is None:
                continue
            self._detach(req)
            req.install = None
            req.instance = None
            self._route(req, outputs)

    def _detach(self, req: _ClusterRequest) -> None:
        """Remove an aborted request from its instance."""
        if req.instance is None or req.state.seq is None:
            return
        inst = self.instances[req.instance]
        seq_id = req.state.seq.seq_id
        self._by_seq.pop(seq_id, None)
        if inst.up:
            inst.abort(seq_id)
            self._free_released(inst)
            if req.install is not None:
                self.transport.send(KVDrop(req.install[0]), inst.spec.ranks)

    def _fail(self, req: _ClusterRequest, why: str, outputs: list | None) -> None:
        self._requests.pop(req.id, None)
        if outputs is None:
            raise RuntimeError(why)
        outputs.append(req.state.failed(why))

    # ---- shutdown ---------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the workers (those this launcher started are waited for, then terminated if stuck),
        leave the groups and remove the workers' log directory. Safe to call twice."""
        if self.recovery.stopped:
            return
        self.recovery.stopped = True
        for inst in self.instances.values():
            inst.stop()
        try:
            self.transport.send(Shutdown(), sorted(self.topo.workers))
        except Exception:  # noqa: BLE001 - a worker that is gone cannot be told
            pass
        self.transport.close()
        self.recovery.close()

"""The driver: a plan's instances behind the ``LLMEngine`` interface the API server drives.

Rank 0 holds the router, one scheduler per micro-batch lane of every instance (each lane owns a
disjoint range of the instance's KV blocks, so lanes are independent batches in flight through the
chain), sampling and stop conditions. Workers hold the weights and KV and run what they are sent.

A step: route waiting requests; give every idle lane of every live instance its next batch (its KV
hand-offs and installs first); wait for at least one lane's logits; sample, hand prefilled requests to
a decode instance, and report the tokens. A worker that dies takes its instances down: their requests
go back to the router and are prefilled again elsewhere (the tokens already sent are kept).
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from dataclasses import dataclass, field

import torch

from ...scheduling import Sequence
from ...scheduling.routing import make_policy
from ...vocabulary import TORCH_DTYPE_BYTES
from ..detokenizer import IncrementalDecoder
from ..engine import EngineLoad, RequestOutput, _Request, prompt_token_ids
from ..model_runner import prepare_batch
from ..sampling import SamplingParams, sample
from .channel import (
    KVDrop,
    KVInstall,
    KVOut,
    KVRecv,
    Shutdown,
    Step,
)
from .instance import InstanceRunner, _Flight, _Lane
from .topology import Topology
from .transport import ProcessGroupTransport, Transport

log = logging.getLogger("hetserve.driver")


@dataclass
class _ClusterRequest:
    id: int
    state: _Request  # prompt, params, generator, decoder, text, finish reason
    outputs: list[int] = field(default_factory=list)
    instance: str | None = None
    lane: int = 0
    install: tuple[int, str] | None = None  # (KV key, decode instance) waiting to be installed


class ClusterEngine:
    """Serve a plan's instances over worker processes; the same interface as ``LLMEngine``."""

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
    ):
        from .sizing import instance_blocks

        self.topo, self.config, self.tokenizer = topo, config, tokenizer
        self.max_model_len = max_model_len or config.max_position_embeddings
        self.eos_token_ids = set(config.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        blocks = instance_blocks(topo, config, kv_cache_gb)
        self._results: queue.Queue = queue.Queue()
        self.transport: Transport = transport or ProcessGroupTransport()
        self.instances = {
            name: InstanceRunner(
                spec, blocks[name], config.vocab_size, self._results, prefix_caching, self.transport
            )
            for name, spec in topo.instances.items()
        }
        for inst in self.instances.values():
            inst.strided = any(topo.workers[r].kv_layout == "head-major" for r in inst.spec.ranks)
        self.entry = [i for i in self.instances.values() if i.spec.role != "decode"]
        self.decoders = [i for i in self.instances.values() if i.spec.role == "decode"]
        self.router = make_policy(topo.routing_policy, topo.routing_weights, seed)
        self.handoff = {
            p.name: make_policy(topo.handoff_policy, topo.handoff_weights.get(p.name), seed)
            for p in self.entry
            if p.spec.role == "prefill"
        }
        self.processes = processes or {}  # rank -> a process handle with poll() (local workers)
        self._generator = torch.Generator().manual_seed(seed)
        self._requests: dict[int, _ClusterRequest] = {}
        self._by_seq: dict[int, _ClusterRequest] = {}
        self._queued: list[_ClusterRequest] = []  # waiting for the router (JFFC, or after a failure)
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._keys = itertools.count()
        self._routes: dict[tuple[str, str], list] = {}
        self.instance_steps: dict[str, int] = {name: 0 for name in self.instances}
        self.kv_bytes_moved = 0  # KV bytes handed from prefill to decode workers
        self.handoffs = 0

    # ---- requests (the LLMEngine interface) -----------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        ids = prompt_token_ids(prompt, self.tokenizer, self.config.vocab_size, self.max_model_len)
        if not any(i.up for i in self.entry):
            raise RuntimeError("no instance is up to serve the request")
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        if max_tokens != params.max_tokens:
            from dataclasses import replace

            params = replace(params, max_tokens=max_tokens)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else self._generator
        decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer else None
        rid = next(self._ids)
        req = _ClusterRequest(rid, _Request(None, ids, params, gen, decoder))
        self._requests[rid] = req
        self._route(req)
        return rid

    def abort_request(self, request_id: int) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if req in self._queued:
            self._queued.remove(req)
        self._detach(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

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

    def instance_loads(self) -> dict[str, tuple[bool, EngineLoad]]:
        """Per instance: whether it is up, and its load (for /metrics)."""
        return {
            name: (inst.up, self._load_of(inst.lanes, steps=self.instance_steps[name]))
            for name, inst in self.instances.items()
        }

    def wake(self) -> None:
        """Return from a ``step`` waiting on the workers (a request arrived that an idle lane may take)."""
        self._results.put(None)

    # ---- one step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        self._check_processes(outputs)
        self._route_queued(outputs)
        self._dispatch()
        if not any(ln.flight for i in self.instances.values() for ln in i.lanes):
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
            self._fail(req, "no instance is up to serve the request", outputs)
            return
        target = self.router.choose(live)
        if target is None:  # JFFC: every chain busy; wait in the central queue
            self._queued.append(req)
            return
        self._place(req, target, self._new_seq(req, target))

    def _route_queued(self, outputs: list) -> None:
        queued, self._queued = self._queued, []
        for req in queued:
            self._route(req, outputs)

    def _new_seq(
        self, req: _ClusterRequest, inst: InstanceRunner, first_token: int | None = None, transferred: int = 0
    ) -> Sequence:
        """A sequence for ``req`` on ``inst``: its prompt is everything known so far (prompt + outputs)."""
        tokens = req.state.prompt_token_ids + req.outputs
        remaining = req.state.params.max_tokens - len(req.outputs)
        if inst.spec.role == "prefill":
            remaining = 1
        seq = Sequence(
            next(self._seq_ids),
            len(tokens),
            max(1, remaining + (first_token is not None)),
            token_ids=tokens,
            num_transferred_tokens=transferred,
        )
        if first_token is not None:
            seq.append_token(first_token)
        return seq

    def _place(self, req: _ClusterRequest, inst: InstanceRunner, seq: Sequence) -> None:
        req.state.seq = seq
        req.instance = inst.name
        req.lane = inst.add(seq).index
        self._by_seq[seq.seq_id] = req

    # ---- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        for inst in self.instances.values():
            if not inst.up:
                continue
            for lane in inst.lanes:
                if lane.flight is None and lane.scheduler.has_unfinished():
                    self._dispatch_lane(inst, lane)

    def _send(self, command, ranks) -> None:
        self.transport.send(command, ranks)

    def _dispatch_lane(self, inst: InstanceRunner, lane: _Lane) -> None:
        batch = inst.schedule(lane)
        if not batch.items:
            return
        table = lambda seq: [b + lane.offset for b in seq.block_table]
        for it in batch.items:
            req = self._by_seq[it.seq.seq_id]
            if req.install is not None:
                key, _ = req.install
                req.install = None
                if it.seq.num_transferred_tokens:
                    self._send(KVInstall(inst.name, key, table(it.seq)), inst.spec.ranks)
                else:  # preempted before it ran: it recomputes instead
                    self._send(KVDrop(key), inst.spec.ranks)
        ids, positions, meta, rows = prepare_batch(
            batch.items, inst.spec.block_size, "cpu", lane.offset, strided=inst.strided
        )
        sampling = [it for it in batch.items if it.samples]
        handoffs: dict[int, tuple[str, int]] = {}
        kv_out: list[KVOut] = []
        receives: list[tuple[InstanceRunner, KVRecv]] = []
        if inst.spec.role == "prefill":
            for it in sampling:
                dec = self._choose_decoder(inst)
                if dec is None:
                    continue
                key = next(self._keys)
                routes = self._kv_routes(inst, dec)
                handoffs[it.seq.seq_id] = (dec.name, key)
                kv_out.append(KVOut(key, table(it.seq), it.end, routes))
                self.kv_bytes_moved += self._kv_bytes(inst, routes, it.end)
                self.handoffs += 1
                receives.append(
                    (dec, KVRecv(dec.name, key, it.end, routes, self.topo.workers[inst.spec.last].dtype))
                )
        self._send(Step(inst.name, ids, positions, meta, rows, kv_out), inst.spec.ranks)
        for dec, cmd in receives:
            self._send(cmd, dec.spec.ranks)
        lane.flight = _Flight(lane, batch, sampling, handoffs, time.perf_counter())
        inst.expect(lane.flight)
        self.instance_steps[inst.name] += 1
        inst.max_in_flight = max(inst.max_in_flight, sum(ln.flight is not None for ln in inst.lanes))

    def _choose_decoder(self, inst: InstanceRunner) -> InstanceRunner | None:
        live = [d for d in self.decoders if d.up]
        return self.handoff[inst.name].choose(live) if live else None

    def _kv_routes(self, src: InstanceRunner, dst: InstanceRunner) -> list:
        key = (src.name, dst.name)
        if key not in self._routes:
            from ..kvcache import KVShard, plan_kv_transfer
            from .sizing import local_kv_head_range

            def shards(inst):
                out = []
                for r in inst.spec.ranks:
                    w = self.topo.workers[r]
                    heads = local_kv_head_range(
                        self.config.num_heads, self.config.num_kv_heads, w.tp_size, w.tp_rank
                    )
                    out.append(KVShard(r, w.layers, heads))
                return out

            self._routes[key] = [
                (r.src.rank, r.dst.rank, tuple(r.layers), tuple(r.kv_heads))
                for r in plan_kv_transfer(shards(src), shards(dst))
            ]
        return self._routes[key]

    def _kv_bytes(self, src: InstanceRunner, routes: list, num_tokens: int) -> int:
        """Bytes on the wire for one hand-off: K and V of every routed (layer, head) in the sender's dtype."""
        c = self.config
        return sum(
            2
            * (l1 - l0)
            * (h1 - h0)
            * num_tokens
            * c.head_dim
            * TORCH_DTYPE_BYTES[self.topo.workers[a].dtype]
            for a, _, (l0, l1), (h0, h1) in routes
        )

    # ---- results ----------------------------------------------------------------------------------
    def _handle(self, item, outputs: list) -> None:
        if item is None:  # wake()
            return
        inst, flight, logits = item
        if isinstance(logits, BaseException):
            log.error("instance %s failed: %s", inst.name, logits)
            self._take_down(inst, outputs)
            return
        lane = flight.lane
        lane.flight = None
        if not inst.up:
            return
        for seq_id, (dec, key) in flight.handoffs.items():
            if seq_id not in self._by_seq:  # aborted while its prefill ran: free the staged KV
                self._send(KVDrop(key), self.instances[dec].spec.ranks)
        live = [it for it in flight.sampling if it.seq.seq_id in self._by_seq]
        rows = [flight.sampling.index(it) for it in live]
        reqs = [self._by_seq[it.seq.seq_id] for it in live]
        tokens = (
            sample(logits[rows], [r.state.params for r in reqs], [r.state.generator for r in reqs])
            if rows
            else []
        )
        stopped: set[int] = set()
        deltas = {}
        for req, token in zip(reqs, tokens):
            deltas[req.id] = req.state.accept(token, self.eos_token_ids)
            req.outputs.append(token)
            if req.state.finish_reason == "stop":
                stopped.add(req.state.seq.seq_id)
        inst.complete(lane, flight.batch, {r.state.seq.seq_id: t for r, t in zip(reqs, tokens)}, stopped)
        for req, token in zip(reqs, tokens):
            seq = req.state.seq
            done = req.state.finish_reason == "stop" or len(req.outputs) >= req.state.params.max_tokens
            handoff = flight.handoffs.get(seq.seq_id)
            if seq.is_finished:
                del self._by_seq[seq.seq_id]
            if done:
                if req.state.finish_reason is None:
                    req.state.finish_reason = "length"
                    deltas[req.id] += req.state.finish_text()
                if handoff is not None:
                    self._send(KVDrop(handoff[1]), self.instances[handoff[0]].spec.ranks)
                del self._requests[req.id]
            elif handoff is not None:
                dec = self.instances[handoff[0]]
                if dec.up:
                    self._place(
                        req, dec, self._new_seq(req, dec, first_token=None, transferred=seq.num_tokens - 1)
                    )
                    req.install = (handoff[1], dec.name)
                else:
                    self._route(req, outputs)  # its decode instance died meanwhile: prefill again
            elif seq.is_finished:  # a prefill instance without a decode instance to go to
                self._route(req, outputs)
            outputs.append(
                RequestOutput(
                    req.id,
                    req.state.prompt_token_ids,
                    list(req.outputs),
                    req.state.text,
                    [token],
                    deltas[req.id],
                    done,
                    req.state.finish_reason if done else None,
                )
            )

    # ---- failures ---------------------------------------------------------------------------------
    def _check_processes(self, outputs: list) -> bool:
        """Take down the instances of local workers that exited; True if any did."""
        dead = {r for r, p in self.processes.items() if p.poll() is not None}
        hit = False
        for inst in self.instances.values():
            if inst.up and dead & set(inst.spec.ranks):
                log.error("instance %s lost worker(s) %s", inst.name, sorted(dead & set(inst.spec.ranks)))
                self._take_down(inst, outputs)
                hit = True
        return hit

    def _take_down(self, inst: InstanceRunner, outputs: list) -> None:
        """Mark ``inst`` down and send its requests back to the router (they are prefilled again)."""
        if not inst.up:
            return
        inst.up = False
        inst.stop()
        orphans = [r for r in self._requests.values() if r.instance == inst.name]
        for req in orphans:
            if req.state.seq is not None:
                self._by_seq.pop(req.state.seq.seq_id, None)
            req.install = None
            req.instance = None
        for lane in inst.lanes:
            for dec, key in lane.flight.handoffs.values() if lane.flight else ():
                if self.instances[dec].up:  # KV that will never come: drop the receives
                    self._send(KVDrop(key), self.instances[dec].spec.ranks)
            lane.flight = None
        for req in orphans:
            self._route(req, outputs)

    def _detach(self, req: _ClusterRequest) -> None:
        """Remove an aborted request from its instance."""
        if req.instance is None or req.state.seq is None:
            return
        inst = self.instances[req.instance]
        seq_id = req.state.seq.seq_id
        self._by_seq.pop(seq_id, None)
        if inst.up:
            inst.abort(inst.lanes[req.lane], seq_id)
            if req.install is not None:
                self._send(KVDrop(req.install[0]), inst.spec.ranks)

    def _fail(self, req: _ClusterRequest, why: str, outputs: list | None) -> None:
        self._requests.pop(req.id, None)
        if outputs is None:
            raise RuntimeError(why)
        outputs.append(
            RequestOutput(
                req.id,
                req.state.prompt_token_ids,
                list(req.outputs),
                req.state.text,
                [],
                "",
                True,
                None,
                error=why,
            )
        )

    # ---- metrics ----------------------------------------------------------------------------------
    def cluster_gauges(self) -> list:
        """/metrics per instance and per worker."""
        from ..api.metrics import LabelledGauge

        loads = self.instance_loads()
        per_inst = {
            name: ((("instance", name), ("role", self.instances[name].spec.role)), up, load)
            for name, (up, load) in loads.items()
        }

        def by_instance(read) -> dict:
            return {labels: read(up, load) for labels, up, load in per_inst.values()}

        workers = {}
        for rank, w in self.topo.workers.items():
            proc = self.processes.get(rank)
            up = all(self.instances[i.name].up for i in self.topo.instances_of(rank))
            if proc is not None:
                up = up and proc.poll() is None
            workers[(("rank", str(rank)), ("server", w.server), ("tp_rank", str(w.tp_rank)))] = (
                up,
                sum(self.instance_steps[i.name] for i in self.topo.instances_of(rank)),
            )
        return [
            LabelledGauge(
                "hetserve_instance_up",
                "1 while every worker of the instance is alive",
                by_instance(lambda up, _: float(up)),
            ),
            LabelledGauge(
                "hetserve_instance_requests_waiting",
                "Requests queued at the instance",
                by_instance(lambda _, ld: ld.waiting),
            ),
            LabelledGauge(
                "hetserve_instance_requests_running",
                "Requests in the instance's batches",
                by_instance(lambda _, ld: ld.running),
            ),
            LabelledGauge(
                "hetserve_instance_kv_blocks_used",
                "KV blocks the instance's requests hold",
                by_instance(lambda _, ld: ld.blocks_used),
            ),
            LabelledGauge(
                "hetserve_instance_kv_blocks_total",
                "KV blocks of the instance",
                by_instance(lambda _, ld: ld.blocks_total),
            ),
            LabelledGauge(
                "hetserve_instance_steps",
                "Micro-batches the instance has run",
                by_instance(lambda _, ld: ld.steps),
            ),
            LabelledGauge(
                "hetserve_worker_up",
                "1 while the worker process serves",
                {k: float(v[0]) for k, v in workers.items()},
            ),
            LabelledGauge(
                "hetserve_worker_steps",
                "Micro-batches that passed through the worker",
                {k: v[1] for k, v in workers.items()},
            ),
            LabelledGauge(
                "hetserve_kv_handoff_bytes",
                "KV bytes handed from prefill to decode workers",
                {(): self.kv_bytes_moved},
            ),
        ]

    # ---- shutdown ---------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the workers (those this launcher started are waited for, then killed if stuck) and leave
        the process group."""
        for inst in self.instances.values():
            inst.stop()
        live = sorted({r for inst in self.instances.values() if inst.up for r in inst.spec.ranks})
        try:
            self._send(Shutdown(), live)
        except Exception:  # noqa: BLE001 - a worker that is gone cannot be told
            pass
        self.transport.close()
        deadline = time.monotonic() + 30
        for p in self.processes.values():
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            p.kill()

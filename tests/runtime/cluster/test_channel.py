"""The command frame format: every command round-trips exactly; a frame that is tampered with, replayed,
signed with another key, or names anything but the registered commands and dtypes is refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from hetserve.runtime.cluster import channel
from hetserve.runtime.cluster.channel import (
    ChannelError,
    CommandCodec,
    KVDrop,
    KVInstall,
    KVOut,
    KVRecv,
    Ping,
    Regroup,
    Shutdown,
    Step,
)
from hetserve.runtime.kvcache import KVRoute, KVShard
from hetserve.runtime.model.attention import AttentionMetadata, PrefillSpan, causal_mask

KEY = bytes(range(32))


def _step() -> Step:
    route = KVRoute(KVShard(1, (0, 30), (0, 3)), KVShard(3, (0, 15), (0, 3)), (0, 15), (0, 3))
    meta = AttentionMetadata(
        torch.tensor([4, 5, 6, 17], dtype=torch.long),
        1,
        torch.tensor([[1, 0]], dtype=torch.long),
        torch.tensor([[[[True, True, False, False]]]]),
        (PrefillSpan(1, 4, 5, torch.tensor([1, 2]), causal_mask(3, 5)),),
        slot_blocks=torch.tensor([1, 1, 1, 4]),
        slot_offsets=torch.tensor([0, 1, 2, 1]),
    )
    return Step(
        "chain",
        torch.tensor([5, 17, 99, 3]),
        torch.tensor([7, 2, 3, 4]),
        meta,
        [0, 3],
        [KVOut(7, [1, 2], 5, [route])],
    )


def _same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b)
        for name in a.__dataclass_fields__:
            _same(getattr(a, name), getattr(b, name))
    else:
        assert a == b


@pytest.mark.parametrize(
    "command",
    [
        _step(),
        KVRecv("decode", 3, 11, [], "bfloat16"),
        KVInstall("decode", 3, [4, 5, 6]),
        KVDrop(9),
        Ping(),
        Regroup(2),
        Shutdown(),
    ],
    ids=lambda c: type(c).__name__,
)
def test_commands_round_trip(command):
    sender, receiver = CommandCodec(KEY), CommandCodec(KEY)
    sizes, frame = sender.encode(command)
    _same(command, receiver.decode(sizes, frame))


def test_tensors_of_every_dtype_round_trip():
    sender, receiver = CommandCodec(KEY), CommandCodec(KEY)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.bool, torch.uint8):
        t = (torch.arange(12) % 3).to(dtype).reshape(3, 4)
        got = receiver.decode(*sender.encode(Step("i", t, t[:0], AttentionMetadata(t), [])))
        _same(t, got.ids)
        assert got.positions.shape == (0, 4)


def test_a_frame_signed_with_another_key_is_refused():
    sizes, frame = CommandCodec(b"x" * 32).encode(KVDrop(1))
    with pytest.raises(ChannelError, match="not signed with this job's secret"):
        CommandCodec(KEY).decode(sizes, frame)


def test_a_changed_byte_is_refused():
    sizes, frame = CommandCodec(KEY).encode(_step())
    for i in (0, len(frame) // 2, len(frame) - 1):
        bad = frame.clone()
        bad[i] ^= 1
        with pytest.raises(ChannelError, match="not signed"):
            CommandCodec(KEY).decode(sizes, bad)


def test_a_replayed_frame_is_refused():
    sender, receiver = CommandCodec(KEY), CommandCodec(KEY)
    first = sender.encode(KVDrop(1))
    second = sender.encode(KVDrop(2))
    assert receiver.decode(*second).key == 2
    with pytest.raises(ChannelError, match="replay"):
        receiver.decode(*first)


def _signed(header: dict, payload: bytes = b"") -> tuple[torch.Tensor, torch.Tensor]:
    """A frame with any header, properly signed (what a peer holding the key could send)."""
    codec = CommandCodec(KEY)
    raw = json.dumps(header).encode()
    mac = codec._mac(struct.pack("<qq", len(raw), len(payload)), raw, payload)
    return (
        torch.tensor([len(raw), len(payload)], dtype=torch.int64),
        torch.frombuffer(bytearray(raw + payload + mac), dtype=torch.uint8),
    )


@pytest.mark.parametrize(
    "header,payload,message",
    [
        ({"seq": 1, "tensors": [], "command": {"$d": "Popen", "f": {}}}, b"", "unknown value"),
        ({"seq": 1, "tensors": [], "command": {"$d": "KVDrop", "f": {"key": 1, "x": 2}}}, b"", "fields"),
        ({"seq": 1, "tensors": [["object", [1], 0]], "command": None}, b"", "tensor described"),
        ({"seq": 1, "tensors": [["int64", [4], 0]], "command": None}, b"\0" * 8, "run past"),
        ({"seq": 1, "tensors": [["int64", [1], 0]], "command": None}, b"\0" * 16, "payload bytes"),
        ({"seq": 1, "tensors": [["int64", [-1], 0]], "command": None}, b"", "tensor described"),
        ({"seq": 1, "tensors": [], "command": {"$t": 0}}, b"", "unknown value"),
        ({"seq": 0, "tensors": [], "command": None}, b"", "replay"),
        ({"seq": 1, "command": None}, b"", "without seq"),
    ],
)
def test_malformed_signed_frames_give_one_error(header, payload, message):
    with pytest.raises(ChannelError, match=message):
        CommandCodec(KEY).decode(*_signed(header, payload))


def test_sizes_are_checked_before_anything_is_allocated():
    for h, p in ((0, 0), (-1, 5), (channel.MAX_HEADER_BYTES + 1, 0), (10, channel.MAX_PAYLOAD_BYTES + 1)):
        with pytest.raises(ChannelError, match="announced"):
            CommandCodec.check_sizes(torch.tensor([h, p]))


def test_only_registered_types_can_be_sent():
    with pytest.raises(ChannelError, match="cannot carry a set"):
        CommandCodec(KEY).encode(KVInstall("x", 1, {1, 2}))
    with pytest.raises(ChannelError, match="non-finite"):
        CommandCodec(KEY).encode(Regroup(float("nan")))


def test_no_pickle_on_the_wire():
    source = Path(channel.__file__).read_text() + Path(channel.__file__).with_name("worker.py").read_text()
    assert "pickle" not in source.replace("no pickle", "")

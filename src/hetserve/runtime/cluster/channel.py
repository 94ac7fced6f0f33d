"""Messages between the driver and the workers, over gloo point-to-point sends (``mesh.Mesh``).

Commands (driver -> worker) have a fixed format, no pickle: a frame is two messages on
``TAG_COMMAND``, first two int64 (header length, payload length), then one byte buffer holding

* the header: UTF-8 JSON of the command, built only from the dataclasses registered below
  (``{"$d": name, "f": {field: value}}``), tuples (``{"$u": [...]}``), numbers, strings, booleans,
  null, lists and tensor references (``{"$t": index}``); its ``seq`` numbers the driver's frames;
* the payload: the raw bytes of the tensors the header refers to, back to back, each described in the
  header's ``tensors`` list by dtype (from a fixed set) and shape;
* an HMAC-SHA256 of the two lengths, header and payload under the job's session key (``mesh``): a
  frame that does not carry it, or whose ``seq`` is not above the last one, is refused before its
  header is parsed.

Tensors between workers (activations, KV) and logits back to the driver are sent raw, both ends
knowing the shape from the command. Each kind of traffic (and each instance's logits, and each KV
hand-off) has its own tag, so streams between the same two ranks never interleave. Tensors on an
accelerator are staged through host memory (gloo moves CPU tensors).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import queue
import struct
import threading
import time
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch
from torch import Tensor

from ..kvcache import KVRoute, KVShard
from ..model.attention import AttentionMetadata, PrefillSpan

TAG_COMMAND, TAG_HIDDEN = 1, 2
DRIVER = 0
MAX_HEADER_BYTES = 64 << 20
MAX_PAYLOAD_BYTES = 8 << 30
MAC_BYTES = 32


_LOGITS_TAGS, _KV_TAGS = 16, 1 << 20


def logits_tag(instance_index: int) -> int:
    """Each instance's logits have a tag of their own: instances whose last stage is the same worker
    return theirs to the driver's collecting thread of each, which receive independently."""
    return _LOGITS_TAGS + instance_index


def kv_tag(key: int) -> int:
    """Each hand-off's KV has a tag of its own: one prefill step streams several requests' layers
    interleaved, and the decode side posts its receives per request."""
    return _KV_TAGS + key


class ChannelError(RuntimeError):
    """A frame that is not a well-formed, authenticated command."""


# ---- commands ------------------------------------------------------------------------------------
@dataclass
class KVOut:
    """After a prefill step: send the KV of one sequence's first ``num_tokens`` tokens to decode ranks."""

    key: int
    block_table: list[int]  # physical blocks on the sender
    num_tokens: int
    routes: list[KVRoute]  # which rank sends which layers and KV heads to which


@dataclass
class Step:
    """Run one micro-batch of ``instance`` through this worker's layers."""

    instance: str
    ids: Tensor  # [T] token ids (the first stage embeds them)
    positions: Tensor  # [T]
    meta: AttentionMetadata  # physical block ids
    sample_rows: list[int]
    kv_out: list[KVOut] = field(default_factory=list)


@dataclass
class KVRecv:
    """Post receives for a hand-off's KV (layer by layer, from each source rank)."""

    instance: str
    key: int
    num_tokens: int
    routes: list[KVRoute]
    src_dtype: str


@dataclass
class KVInstall:
    """Write a received hand-off into this worker's cache blocks (waits for the KV to arrive)."""

    instance: str
    key: int
    block_table: list[int]


@dataclass
class KVDrop:
    key: int


@dataclass
class KVFree:
    """An instance pooling this worker's KV (``kv_pool: server``) no longer holds these of its blocks
    (None: any), so their physical blocks go back to the pool."""

    instance: str
    blocks: list[int] | None


@dataclass
class Ping:
    """Nothing to do: the driver is alive (a worker that hears nothing for the group timeout leaves)."""


@dataclass
class Regroup:
    """Leave the current groups and form those of ``generation`` (a restarted worker rejoins)."""

    generation: int


@dataclass
class Shutdown:
    pass


_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (
        Step,
        KVOut,
        KVRecv,
        KVInstall,
        KVDrop,
        KVFree,
        Ping,
        Regroup,
        Shutdown,
        KVRoute,
        KVShard,
        AttentionMetadata,
        PrefillSpan,
    )
}
_FIELDS = {name: {f.name for f in fields(t)} for name, t in _TYPES.items()}
_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


def _to_json(value: Any, tensors: list[Tensor]) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ChannelError(f"a command holds the non-finite number {value}")
        return value
    if isinstance(value, Tensor):
        t = value.detach()
        if str(t.dtype).removeprefix("torch.") not in _DTYPES:
            raise ChannelError(f"a command holds a tensor of dtype {t.dtype}")
        tensors.append(t.cpu().contiguous())
        return {"$t": len(tensors) - 1}
    if isinstance(value, tuple):
        return {"$u": [_to_json(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_to_json(v, tensors) for v in value]
    if is_dataclass(value) and type(value).__name__ in _TYPES and _TYPES[type(value).__name__] is type(value):
        return {
            "$d": type(value).__name__,
            "f": {f.name: _to_json(getattr(value, f.name), tensors) for f in fields(value)},
        }
    raise ChannelError(f"a command cannot carry a {type(value).__name__}")


def _from_json(value: Any, tensors: list[Tensor]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    if isinstance(value, dict):
        if value.keys() == {"$t"} and type(value["$t"]) is int and 0 <= value["$t"] < len(tensors):
            return tensors[value["$t"]]
        if value.keys() == {"$u"} and isinstance(value["$u"], list):
            return tuple(_from_json(v, tensors) for v in value["$u"])
        if value.keys() == {"$d", "f"} and value["$d"] in _TYPES and isinstance(value["f"], dict):
            name = value["$d"]
            if set(value["f"]) != _FIELDS[name]:
                raise ChannelError(f"a {name} with fields {sorted(value['f'])}")
            return _TYPES[name](**{k: _from_json(v, tensors) for k, v in value["f"].items()})
    raise ChannelError(f"an unknown value in a command header: {str(value)[:80]}")


class CommandCodec:
    """Frames commands with the session key: ``encode`` numbers and signs them, ``decode`` checks the
    signature and the number before it reads anything."""

    def __init__(self, key: bytes):
        self.key = key
        self.seq = 0  # the last frame encoded
        self.last_seen = 0  # the last frame decoded

    def _mac(self, sizes: bytes, header: bytes, payload) -> bytes:
        mac = hmac.new(self.key, sizes, hashlib.sha256)
        mac.update(header)
        mac.update(payload)
        return mac.digest()

    def encode(self, command: Any) -> tuple[Tensor, Tensor]:
        """(sizes, body) to send to any number of workers."""
        tensors: list[Tensor] = []
        body = _to_json(command, tensors)
        self.seq += 1
        specs, offset = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            specs.append([str(t.dtype).removeprefix("torch."), list(t.shape), offset])
            offset += nbytes
        header = json.dumps({"seq": self.seq, "tensors": specs, "command": body}, allow_nan=False).encode()
        payload = b"".join(_tensor_bytes(t) for t in tensors)
        sizes = struct.pack("<qq", len(header), len(payload))
        frame = header + payload + self._mac(sizes, header, payload)
        return (
            torch.tensor([len(header), len(payload)], dtype=torch.int64),
            torch.frombuffer(bytearray(frame), dtype=torch.uint8),
        )

    @staticmethod
    def check_sizes(sizes: Tensor) -> tuple[int, int]:
        h, p = (int(x) for x in sizes.tolist())
        if not (0 < h <= MAX_HEADER_BYTES and 0 <= p <= MAX_PAYLOAD_BYTES):
            raise ChannelError(f"a command frame announced {h} header and {p} payload bytes")
        return h, p

    def decode(self, sizes: Tensor, frame: Tensor) -> Any:
        h, p = self.check_sizes(sizes)
        raw = frame.numpy().tobytes()
        if len(raw) != h + p + MAC_BYTES:
            raise ChannelError("a command frame of the wrong length")
        header, payload, mac = raw[:h], raw[h : h + p], raw[h + p :]
        if not hmac.compare_digest(mac, self._mac(struct.pack("<qq", h, p), header, payload)):
            raise ChannelError("a command frame that is not signed with this job's secret")
        try:
            doc = json.loads(header)
        except ValueError as exc:
            raise ChannelError(f"a command header that is not JSON: {exc}") from None
        if not (isinstance(doc, dict) and doc.keys() == {"seq", "tensors", "command"}):
            raise ChannelError("a command header without seq, tensors and command")
        seq = doc["seq"]
        if type(seq) is not int or seq <= self.last_seen:
            raise ChannelError(f"command {seq} arrived after command {self.last_seen} (a replay?)")
        self.last_seen = seq
        tensors, end = [], 0
        for spec in doc["tensors"]:
            tensors.append(_tensor_from(spec, payload, end))
            end += tensors[-1].numel() * tensors[-1].element_size()
        if end != p:
            raise ChannelError(f"a command's tensors take {end} of its {p} payload bytes")
        return _from_json(doc["command"], tensors)


def _tensor_bytes(t: Tensor) -> bytes:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the same 2 bytes as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _tensor_from(spec: Any, payload: bytes, offset: int) -> Tensor:
    ok = (
        isinstance(spec, list)
        and len(spec) == 3
        and spec[0] in _DTYPES
        and isinstance(spec[1], list)
        and all(type(d) is int and d >= 0 for d in spec[1])
        and spec[2] == offset
    )
    if not ok:
        raise ChannelError(f"a command tensor described as {str(spec)[:80]}")
    dtype, shape = _DTYPES[spec[0]], spec[1]
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offset + nbytes > len(payload):
        raise ChannelError("a command's tensors run past its payload")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(payload[offset : offset + nbytes]), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


# ---- tensors -------------------------------------------------------------------------------------
class Sends:
    """Sends in flight and the buffers they read. A gloo send reports itself complete only once it is
    waited for (and that wait lasts until the receiver takes it), so a thread waits for each in turn
    and then lets its buffers go; a send whose receiver died ends with an error, which is dropped."""

    def __init__(self, name: str = "hetserve-sends"):
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def add(self, work: Any, keep: Any = None) -> None:
        with self._cond:
            self._pending += 1
        self._queue.put((work, keep))

    def __len__(self) -> int:
        return self._pending

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                item[0].wait()
            except Exception:  # noqa: BLE001 - the receiver is gone: nothing to free but the buffer
                pass
            del item
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) for every send so far; True if they all ended."""
        deadline = time.monotonic() + timeout
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self._queue.put(None)


def send_tensor(mesh, x: Tensor, dst: int, tag: int) -> Any:
    """Non-blocking send of a tensor (staged to host memory first when it lives on an accelerator)."""
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.contiguous()
    return mesh.send(x, dst, tag), x


def recv_tensor(
    mesh, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int, device: torch.device | str = "cpu"
) -> Tensor:
    buf = torch.empty(shape, dtype=dtype)
    mesh.recv(buf, src, tag).wait()
    return buf if torch.device(device).type == "cpu" else buf.to(device)

"""Messages between the driver and the workers, over torch.distributed point-to-point (gloo).

Commands (driver -> worker) are pickled dataclasses sent as a length then a byte tensor; tensors
between workers (activations, KV) and logits back to the driver are sent raw, both ends knowing the
shape from the command. Each kind of traffic (and each KV hand-off)
has its own tag, so streams between the same two ranks never interleave. Tensors on an accelerator
are staged through host memory (gloo moves CPU tensors).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..kvcache import KVRoute

TAG_COMMAND, TAG_HIDDEN, TAG_LOGITS = 1, 2, 4
DRIVER = 0


def kv_tag(key: int) -> int:
    """Each hand-off's KV has a tag of its own: one prefill step streams several requests' layers
    interleaved, and the decode side posts its receives per request."""
    return 1000 + key


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
    meta: Any  # AttentionMetadata (physical block ids)
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
class Shutdown:
    pass


def encode_command(command: Any) -> tuple[Tensor, Tensor]:
    """Pickle once for many receivers: (size, payload) to pass to ``send_encoded``."""
    payload = torch.frombuffer(
        bytearray(pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8
    )
    return torch.tensor([payload.numel()], dtype=torch.int64), payload


def send_encoded(encoded: tuple[Tensor, Tensor], dst: int) -> list:
    size, payload = encoded
    return [dist.isend(size, dst, tag=TAG_COMMAND), dist.isend(payload, dst, tag=TAG_COMMAND)]


def recv_command(src: int = DRIVER) -> Any:
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, tag=TAG_COMMAND)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(payload, src, tag=TAG_COMMAND)
    return pickle.loads(payload.numpy().tobytes())


# ---- tensors -------------------------------------------------------------------------------------
def send_tensor(x: Tensor, dst: int, tag: int) -> Any:
    """Non-blocking send of a tensor (staged to host memory first when it lives on an accelerator)."""
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    return dist.isend(x.contiguous(), dst, tag=tag), x


def recv_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int, device: torch.device | str = "cpu"
) -> Tensor:
    buf = torch.empty(shape, dtype=dtype)
    dist.recv(buf, src, tag=tag)
    return buf if torch.device(device).type == "cpu" else buf.to(device)

"""Sampling parameters and the batched sampler (greedy, temperature, top-k, top-p, per-request seed)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None  # per-request random stream; None = the engine's
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row of fp32 ``logits`` [N, vocab], row i drawn with ``params[i]`` and ``generators[i]``."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        sub = logits[rows]
        temps = torch.tensor([params[i].temperature for i in rows], dtype=sub.dtype, device=sub.device)
        sub = _filter_top_k_top_p(
            sub / temps[:, None], [params[i].top_k for i in rows], [params[i].top_p for i in rows]
        )
        probs = torch.softmax(sub, dim=-1)
        # argmax(p / E) with E ~ Exp(1) i.i.d. draws index i with probability p_i.
        noise = torch.stack(
            [
                torch.empty(sub.shape[-1], device=sub.device).exponential_(generator=generators[i])
                for i in rows
            ]
        )
        tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens.tolist()


def _filter_top_k_top_p(logits: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
    """Set to -inf the logits outside each row's top-k and its top-p nucleus (always keeps the best)."""
    vocab = logits.shape[-1]
    if all(k == 0 or k >= vocab for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
    drop = torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.tensor(top_p, dtype=probs.dtype, device=logits.device)
    drop |= mass_before > p[:, None]
    return logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))

"""A request as an engine serves it: its prompt, sampling parameters and random stream, the tokens and
text it has produced, and why it finished.

Both engines (``LLMEngine`` on one model, ``ClusterEngine`` over a plan's workers) take each sampled
token through ``RequestState.accept`` (stop tokens, end of sequence, stop strings, incremental
detokenisation) and end a request with ``finish``, so a request behaves the same whichever engine
serves it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from ..scheduling import Sequence
from .detokenizer import IncrementalDecoder
from .sampling import SamplingParams

FinishReason = Literal["stop", "length"]


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]  # shared with the engine: do not modify
    token_ids: list[int]  # everything generated so far
    text: str
    new_token_ids: list[int] = field(default_factory=list)  # produced by this step
    new_text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None  # the request failed (no instance could serve it)


def prompt_token_ids(prompt: str | Seq[int], tokenizer, vocab_size: int, max_model_len: int) -> list[int]:
    """The prompt's token ids (text is encoded with ``tokenizer``), checked: not empty, within the
    vocabulary, and leaving room for at least one new token in ``max_model_len``. ValueError otherwise."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass token ids")
        ids = tokenizer.encode(prompt)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model takes at most {max_model_len - 1}")
    return ids


@dataclass
class RequestState:
    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams  # max_tokens already capped to the context
    generator: torch.Generator
    decoder: IncrementalDecoder | None
    seq: Sequence | None = None  # where the scheduler tracks it now
    output_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    #: Characters of ``text`` already returned as deltas (the rest may still turn into a stop string).
    sent: int = 0

    @classmethod
    def create(
        cls,
        request_id: int,
        prompt: str | Seq[int],
        params: SamplingParams | None,
        *,
        tokenizer,
        vocab_size: int,
        max_model_len: int,
        generator: torch.Generator,
    ) -> RequestState:
        """A new request: the prompt checked and tokenised, ``max_tokens`` capped so the request fits in
        ``max_model_len``, its own random stream when it has a seed (else ``generator``, the engine's)."""
        params = params or SamplingParams()
        ids = prompt_token_ids(prompt, tokenizer, vocab_size, max_model_len)
        max_tokens = min(params.max_tokens, max_model_len - len(ids))
        if max_tokens != params.max_tokens:
            params = replace(params, max_tokens=max_tokens)
        if params.seed is not None:
            if not -(2**63) <= params.seed < 2**64:
                raise ValueError(f"seed must be a 64-bit integer, in [-2**63, 2**64); got {params.seed}")
            generator = torch.Generator().manual_seed(params.seed)
        decoder = IncrementalDecoder(tokenizer) if tokenizer else None
        return cls(request_id, ids, params, generator, decoder)

    @property
    def done(self) -> bool:
        return self.finish_reason == "stop" or len(self.output_token_ids) >= self.params.max_tokens

    def accept(self, token: int, eos_token_ids: set[int]) -> str:
        """Take a sampled token: set ``finish_reason`` to "stop" when the request ends here (a stop token,
        end of sequence unless ignored, a stop string); return the text it adds. With stop strings, the
        last characters that could still begin one are held back until they cannot (or the request
        ends), so the deltas never show a stop string or a part of one."""
        self.output_token_ids.append(token)
        p = self.params
        if (token in p.stop_token_ids) or (not p.ignore_eos and token in eos_token_ids):
            self.finish_reason = "stop"
            return ""
        if self.decoder is None:
            return ""
        delta = self.decoder.add(token)
        if not delta:
            return ""
        before = len(self.text)
        self.text += delta
        if not p.stop:
            return self._release(len(self.text))
        longest = max(len(s) for s in p.stop)
        search_from = max(0, before - longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in p.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"
            return self._release(len(self.text))
        return self._release(len(self.text) - (longest - 1))

    def finish(self) -> str:
        """End a request that is ``done``: one that did not stop ended by length; the text still held
        back (by the decoder, or as a possible stop string) is released (returned, to add to the last
        delta)."""
        if self.finish_reason is None:
            self.finish_reason = "length"
            self.text += self.decoder.flush() if self.decoder is not None else ""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        """The text from what was already sent up to ``upto``."""
        upto = max(upto, self.sent)
        delta, self.sent = self.text[self.sent : upto], upto
        return delta

    def output(self, token: int, delta: str) -> RequestOutput:
        """What a step reports for this request after it produced ``token``."""
        done = self.done
        return RequestOutput(
            self.request_id,
            self.prompt_token_ids,
            list(self.output_token_ids),
            self.text,
            [token],
            delta,
            done,
            self.finish_reason if done else None,
        )

    def failed(self, why: str) -> RequestOutput:
        """The last output of a request no instance can serve."""
        return RequestOutput(
            self.request_id,
            self.prompt_token_ids,
            list(self.output_token_ids),
            self.text,
            [],
            "",
            True,
            None,
            error=why,
        )


def accept_tokens(
    requests: list[RequestState], tokens: list[int], eos_token_ids: set[int]
) -> tuple[list[str], set[int]]:
    """Take each request's sampled token: the text deltas, and the sequence ids that stop here (for the
    scheduler's ``postprocess``)."""
    deltas = [r.accept(t, eos_token_ids) for r, t in zip(requests, tokens)]
    stopped = {r.seq.seq_id for r in requests if r.finish_reason == "stop" and r.seq is not None}
    return deltas, stopped

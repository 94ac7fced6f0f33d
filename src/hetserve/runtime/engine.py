"""The inference engine: requests in, tokens out, one scheduler step at a time.

``LLMEngine`` owns the model (through a ``ModelRunner`` holding the paged KV cache), the shared
``Scheduler`` and the tokenizer. ``step()`` = schedule a batch, run it, sample one token for every
sequence that reached the end of its known tokens, apply stop conditions, advance the scheduler.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..scheduling import BlockManager, Scheduler, SchedulerConfig, Sequence
from ..vocabulary import DEFAULT_KV_CACHE_GB, SchedulePolicy
from .detokenizer import IncrementalDecoder
from .model.llama import LlamaModel
from .model.source import load_model, parse_dtype
from .model.tokenizer import Tokenizer
from .model_runner import ModelRunner
from .sampling import SamplingParams, sample

FinishReason = Literal["stop", "length"]


@dataclass
class EngineConfig:
    dtype: str = "float32"  # used when the engine loads the model itself
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: as many as kv_cache_gb holds
    kv_cache_gb: float = DEFAULT_KV_CACHE_GB
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None  # None: 2048 with chunked prefill, else max_model_len
    prefill_chunk_size: int | None = None  # None: whole prompts
    policy: SchedulePolicy = "decode-first"
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's max positions
    seed: int = 0  # random stream for requests without their own seed


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


@dataclass
class EngineLoad:
    """What /metrics reports about an engine (one instance, or all of a plan's together)."""

    waiting: int
    running: int
    blocks_used: int
    blocks_total: int
    steps: int
    prefix_hit_tokens: int


@dataclass
class _Request:
    seq: Sequence
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    decoder: IncrementalDecoder | None
    text: str = ""
    finish_reason: FinishReason | None = None

    def accept(self, token: int, eos_token_ids: set[int]) -> str:
        """Apply stop tokens and stop strings to a new token: set ``finish_reason`` to "stop" when the
        request ends here; return the token's text delta (cut at a stop string)."""
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
        if p.stop:
            longest = max(len(s) for s in p.stop)
            search_from = max(0, before - longest + 1)
            hits = [i for i in (self.text.find(s, search_from) for s in p.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.text = self.text[:cut]
                self.finish_reason = "stop"
                return self.text[before:] if cut > before else ""
        return delta

    def finish_text(self) -> str:
        """The text still held back by the decoder when the request ends by length."""
        tail = self.decoder.flush() if self.decoder is not None else ""
        self.text += tail
        return tail


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


class LLMEngine:
    def __init__(
        self, model: LlamaModel, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None
    ):
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        num_blocks = config.num_kv_blocks or max(
            1, int(config.kv_cache_gb * 2**30) // ModelRunner.kv_bytes_per_block(model, config.block_size)
        )
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        budget = config.max_num_batched_tokens or (2048 if config.prefill_chunk_size else self.max_model_len)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=budget,
                prefill_chunk_size=config.prefill_chunk_size,
                policy=config.policy,
            ),
            BlockManager(num_blocks, config.block_size, config.enable_prefix_caching),
        )
        self.eos_token_ids = set(model.config.eos_token_ids) | set(
            tokenizer.eos_token_ids if tokenizer else ()
        )
        self._generator = torch.Generator().manual_seed(config.seed)
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()

    @classmethod
    def from_model(cls, model: str, config: EngineConfig | None = None) -> LLMEngine:
        """Load ``model`` (a GGUF file, a Hugging Face directory or a known name) and wrap it."""
        config = config or EngineConfig()
        net, tokenizer = load_model(model, dtype=parse_dtype(config.dtype))
        return cls(net, tokenizer, config)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt (text or token ids); returns the request id. ``max_tokens`` is capped so the
        request fits in ``max_model_len``."""
        params = params or SamplingParams()
        ids = prompt_token_ids(prompt, self.tokenizer, self.model.config.vocab_size, self.max_model_len)
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        request_id = next(self._ids)
        seq = Sequence(request_id, len(ids), max_tokens, token_ids=ids)
        self.scheduler.add(seq)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else self._generator
        decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer else None
        self._requests[request_id] = _Request(seq, ids, params, generator, decoder)
        return request_id

    def abort_request(self, request_id: int) -> None:
        if self.scheduler.abort(request_id) is not None:
            del self._requests[request_id]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def load(self) -> EngineLoad:
        s = self.scheduler
        return EngineLoad(
            len(s.waiting),
            len(s.running),
            s.blocks.num_used_blocks,
            s.blocks.num_blocks,
            s.stats.steps,
            s.stats.prefix_hit_tokens,
        )

    # ---- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for each request that produced a token this step."""
        batch = self.scheduler.schedule()
        if not batch.items:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler could not schedule any pending request")
            return []
        logits = self.runner.run(batch.items)
        sampling = [it for it in batch.items if it.samples]
        reqs = [self._requests[it.seq.seq_id] for it in sampling]
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        stopped: set[int] = set()
        deltas: dict[int, str] = {}
        for req, token in zip(reqs, tokens):
            deltas[req.seq.seq_id] = req.accept(token, self.eos_token_ids)
            if req.finish_reason == "stop":
                stopped.add(req.seq.seq_id)
        self.scheduler.postprocess(batch, {r.seq.seq_id: t for r, t in zip(reqs, tokens)}, stopped)
        outputs = []
        for req, token in zip(reqs, tokens):
            seq = req.seq
            if seq.is_finished:
                req.finish_reason = req.finish_reason or "length"
                if req.finish_reason == "length":
                    deltas[seq.seq_id] += req.finish_text()
                del self._requests[seq.seq_id]
            outputs.append(
                RequestOutput(
                    seq.seq_id,
                    req.prompt_token_ids,
                    seq.output_token_ids,
                    req.text,
                    [token],
                    deltas[seq.seq_id],
                    seq.is_finished,
                    req.finish_reason,
                )
            )
        return outputs

    # ---- convenience --------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Seq[int] | Seq[str | Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run ``prompts`` (a prompt, or a list of text / token-id prompts) to completion, together."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        done: dict[int, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

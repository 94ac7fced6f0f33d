"""The inference engine: requests in, tokens out, one scheduler step at a time.

``LLMEngine`` owns the model (through a ``ModelRunner`` holding the paged KV cache), the shared
``Scheduler`` and the tokenizer. ``step()`` = schedule a batch, run it, sample one token for every
sequence that reached the end of its known tokens, apply stop conditions, advance the scheduler.
A step that fails (an exception in the model, the sampler or the scheduler) ends every request it
touched with a failed output and leaves the engine ready for the others.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ..scheduling import BlockManager, Scheduler, SchedulerConfig, Sequence
from ..vocabulary import DEFAULT_KV_CACHE_GB, SchedulePolicy
from .model.llama import LlamaModel
from .model.source import load_model, parse_dtype
from .model.tokenizer import Tokenizer
from .model_runner import ModelRunner
from .request import RequestOutput, RequestState, accept_tokens
from .sampling import SamplingParams, sample
from .serving import ClusterStats, EngineLoad

log = logging.getLogger("hetserve.engine")

#: ``RequestOutput.error`` of a request whose step failed (the exception goes to the log).
STEP_FAILED = "the engine failed while generating this request (the server log has the details)"


@dataclass
class EngineConfig:
    dtype: str = "float32"  # used when the engine loads the model itself
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: as many as kv_cache_gb holds
    kv_cache_gb: float = DEFAULT_KV_CACHE_GB
    max_batch_size: int = 32
    max_batch_tokens: int | None = None  # None: 2048 with chunked prefill, else max_model_len
    chunk_size: int | None = None  # None: whole prompts
    policy: SchedulePolicy = "decode-first"
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's max positions
    seed: int = 0  # random stream for requests without their own seed


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
        budget = config.max_batch_tokens or (2048 if config.chunk_size else self.max_model_len)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_size=config.max_batch_size,
                max_batch_tokens=budget,
                chunk_size=config.chunk_size,
                policy=config.policy,
            ),
            BlockManager(num_blocks, config.block_size, config.enable_prefix_caching),
        )
        self.eos_token_ids = set(model.config.eos_token_ids) | set(
            tokenizer.eos_token_ids if tokenizer else ()
        )
        self._generator = torch.Generator().manual_seed(config.seed)
        self._requests: dict[int, RequestState] = {}
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
        request_id = next(self._ids)
        req = RequestState.create(
            request_id,
            prompt,
            params,
            tokenizer=self.tokenizer,
            vocab_size=self.model.config.vocab_size,
            max_model_len=self.max_model_len,
            generator=self._generator,
        )
        req.seq = Sequence(
            request_id, len(req.prompt_token_ids), req.params.max_tokens, token_ids=req.prompt_token_ids
        )
        self.scheduler.add(req.seq)
        self._requests[request_id] = req
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
        """Run one batch; return an output for each request that produced a token this step, or failed."""
        try:
            batch = self.scheduler.schedule()
        except Exception:
            log.exception("scheduling failed; failing every request")
            return self._fail(list(self._requests), STEP_FAILED)
        if not batch.items:
            if self.scheduler.has_unfinished():
                log.error("the scheduler could not schedule any of %d pending requests", len(self._requests))
                return self._fail(list(self._requests), "the request could not be scheduled")
            return []
        touched = [it.seq.seq_id for it in batch.items]
        states = {i: self._requests[i] for i in touched if i in self._requests}
        try:
            return self._run(batch)
        except Exception:
            log.exception("an engine step failed; failing its %d requests", len(touched))
            for request_id, state in states.items():  # those it finished are failed as well
                self._requests.setdefault(request_id, state)
            return self._fail(touched, STEP_FAILED)

    def _fail(self, request_ids: list[int], why: str) -> list[RequestOutput]:
        """End ``request_ids`` with a failed output each, their sequences and KV blocks freed."""
        outputs = []
        for request_id in request_ids:
            self.scheduler.abort(request_id)
            req = self._requests.pop(request_id, None)
            if req is not None:
                outputs.append(req.failed(why))
        return outputs

    def _run(self, batch) -> list[RequestOutput]:
        logits = self.runner.run(batch.items)
        sampling = [it for it in batch.items if it.samples]
        reqs = [self._requests[it.seq.seq_id] for it in sampling]
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        deltas, stopped = accept_tokens(reqs, tokens, self.eos_token_ids)
        self.scheduler.postprocess(batch, {r.request_id: t for r, t in zip(reqs, tokens)}, stopped)
        outputs = []
        for req, token, delta in zip(reqs, tokens, deltas):
            if req.done:
                delta += req.finish()
                del self._requests[req.request_id]
            outputs.append(req.output(token, delta))
        return outputs

    def wake(self) -> None:
        """Nothing to do: ``step`` never waits."""

    def cluster_stats(self) -> ClusterStats | None:
        return None

    def shutdown(self) -> None:
        """Nothing to stop: the model lives in this process."""

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

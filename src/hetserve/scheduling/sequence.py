"""A request as the scheduler sees it: token counts, optional token ids and its KV block table.

The same class serves the real engine (which fills ``token_ids``) and the simulator (which only has
counts, and optionally per-block prefix keys from a trace). Pure Python: no torch, no numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its KV blocks were taken; it will recompute them
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    """One request. ``num_tokens`` = prompt + generated; the last generated token has no KV yet."""

    seq_id: int
    prompt_len: int
    max_tokens: int
    token_ids: list[int] | None = None
    arrival_time: float = 0.0
    #: Prefix-cache keys supplied instead of token ids: key ``j`` names the content of prompt tokens
    #: ``[0, (j + 1) * block_key_tokens)`` (e.g. a trace's ``hash_ids``, one per 512-token block).
    block_keys: list[int] | None = None
    block_key_tokens: int | None = None
    #: False opts this sequence out of the prefix cache (it neither reuses nor publishes blocks).
    cacheable: bool = True
    #: KV of the first N tokens arrives from another instance (a prefill -> decode hand-off): blocks
    #: are allocated for it at admission without computing it. Lost on preemption (then recomputed).
    num_transferred_tokens: int = 0

    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    #: Tokens served from the prefix cache at the most recent admission.
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    block_table: list[int] = field(default_factory=list)
    #: Chained content hash of each full block, filled lazily by the block manager.
    block_hashes: list[int] = field(default_factory=list)
    #: Leading blocks of ``block_table`` already published to the prefix cache.
    num_registered_blocks: int = 0
    #: In a decode group (``decode_group.GroupScheduler``): the group's step count when the counters
    #: above were last brought up to date (the group advances them in aggregate); -1 outside a group.
    group_anchor: int = -1

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"sequence {self.seq_id}: the prompt must have at least one token")
        if self.max_tokens < 1:
            raise ValueError(f"sequence {self.seq_id}: max_tokens must be at least 1")
        if self.token_ids is not None:
            self.token_ids = list(self.token_ids)
            if len(self.token_ids) != self.prompt_len:
                raise ValueError(
                    f"sequence {self.seq_id}: prompt_len {self.prompt_len} but "
                    f"{len(self.token_ids)} token ids"
                )
        if self.block_keys is not None and (self.block_key_tokens or 0) < 1:
            raise ValueError(f"sequence {self.seq_id}: block_keys need block_key_tokens >= 1")

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.num_output_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV still has to be computed before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_total_tokens(self) -> int:
        """Most KV slots this sequence can ever need (the final sampled token is never fed back)."""
        return self.prompt_len + self.max_tokens - 1

    @property
    def output_token_ids(self) -> list[int]:
        return [] if self.token_ids is None else self.token_ids[self.prompt_len :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int | None) -> None:
        self.num_output_tokens += 1
        if self.token_ids is not None:
            if token_id is None:
                raise ValueError(f"sequence {self.seq_id} tracks token ids; a sampled id is required")
            self.token_ids.append(token_id)

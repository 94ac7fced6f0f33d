"""The serving engine's settings a plan's instances run with, and the grid every plan is tuned over.

Four knobs of a plan's instances are engine settings rather than placement: ``chunk_size`` (prompt
tokens per step under chunked prefill), ``max_batch_tokens`` (tokens per step) and, for a chain,
``pipelining`` and ``micro_batches`` (lanes moving through its stages together, or every request on
its own). Which values serve a plan best depends on the plan: a long chain of small GPUs whose lanes
move in lockstep stalls every decode behind a 2,048-token chunk at every stage, while one large GPU
amortises its weight reads over large steps. A comparison that gave every strategy one fixed setting
would measure the setting, not the plan, so the same grid is searched for every strategy's plan with
the same budget (``hetserve compare``), and by the planner for its own plans (``Planner``): the plan
as its strategy wrote it, then each setting of ``TOKEN_GRID`` on every instance that prefills, then,
for plans with chains, one lane per stage with each of those step budgets (the budget that suits lanes
need not be the one that suits the plan as written: chain composition on chain-bloom176b-latency does
best with 2,048/8,192 without lanes and with 128/256 in lanes), then per-request pipelining (the
schedule of Petals and Helix, every server's KV one pool shared by the chains through it) with the best
so far.

A setting is judged by simulation like the plan itself; one that refuses more requests as too long
for a lane's KV share than the plan as written is not taken (``refused``), since a throughput figure
would otherwise rise by dropping the longest requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..plan import MAX_MICRO_BATCHES, PlanFile
from ..sim.metrics import DROP_TOO_LONG


@dataclass(frozen=True)
class EngineSetting:
    """One point of the grid: ``None`` keeps what the plan says."""

    name: str
    chunk_size: int | None = None  # prompt tokens per step of an instance that prefills
    max_batch_tokens: int | None = None  # tokens per step of an instance that prefills
    lane_per_stage: bool = False  # a chain runs one micro-batch lane per stage
    source: str = ""
    per_request: bool = False  # a chain pipelines every request on its own

    @property
    def short(self) -> str:
        """A few characters for a table: ``as planned``, ``128/256``, ``128/256 +lanes``,
        ``128/256 +per-request``."""
        steps = (
            "as planned" if self.max_batch_tokens is None else f"{self.chunk_size}/{self.max_batch_tokens}"
        )
        return (
            steps + (" +lanes" if self.lane_per_stage else "") + (" +per-request" if self.per_request else "")
        )


AS_WRITTEN = EngineSetting("as planned", source="the strategy's own settings")
#: For goodput a setting is searched only if it holds the SLOs at this multiple of the rate the plan as
#: written holds: about the goodput search's precision (5 geometric bisections of a factor 2: 2^(1/32)).
GOODPUT_STEP = 1.03
#: Step budgets of instances that prefill, smallest first.
TOKEN_GRID = (
    EngineSetting(
        "chunks of 128, 256 tokens per step",
        128,
        256,
        source="Helix's prototype schedules each node with step budgets of 1-3 prompts and 300-480 "
        "decode tokens (Helix-ASPLOS25 artifact)",
    ),
    EngineSetting(
        "chunks of 512, 2,048 tokens per step",
        512,
        2048,
        source="the token budgets Sarathi-Serve evaluates (512 and 2,048 tokens per step; OSDI'24)",
    ),
    EngineSetting(
        "chunks of 2,048, 8,192 tokens per step",
        2048,
        8192,
        source="vLLM V1's API-server step budget on large GPUs (max_num_batched_tokens 8,192, "
        "vllm/engine/arg_utils.py)",
    ),
)


def with_setting(plan: PlanFile, setting: EngineSetting) -> PlanFile:
    """``plan`` with ``setting`` applied to its instances (decode instances keep their step budget: they
    never prefill)."""
    instances = []
    for inst in plan.instances:
        update: dict = {}
        if setting.max_batch_tokens is not None and inst.role != "decode":
            tokens = setting.max_batch_tokens
            update["max_batch_tokens"] = tokens
            update["chunk_size"] = min(setting.chunk_size or tokens, tokens)
        if setting.lane_per_stage and len(inst.chain) > 1:
            update["micro_batches"] = min(len(inst.chain), MAX_MICRO_BATCHES)
            update["pipelining"] = "lanes"
            update["kv_pool"] = "own"
        if setting.per_request and len(inst.chain) > 1:
            update["micro_batches"] = 1
            update["pipelining"] = "per-request"
            # a prefill or decode instance hands KV over in blocks of its own cache
            update["kv_pool"] = "server" if inst.role == "mixed" else "own"
        instances.append(inst.model_copy(update=update) if update else inst)
    return plan.model_copy(update={"instances": instances})


def has_chains(plan: PlanFile) -> bool:
    """Whether a lane per stage would change ``plan`` (an instance of several stages with fewer lanes, or
    pipelining per request)."""
    return any(
        len(i.chain) > 1 and (i.micro_batches < len(i.chain) or i.pipelining == "per-request")
        for i in plan.instances
    )


def has_lanes(plan: PlanFile) -> bool:
    """Whether pipelining per request would change ``plan`` (an instance of several stages in lanes)."""
    return any(len(i.chain) > 1 and i.pipelining == "lanes" for i in plan.instances)


def token_variants(plan: PlanFile) -> Iterator[tuple[EngineSetting, PlanFile]]:
    """The plan under each step budget of ``TOKEN_GRID`` (the plan as written is not among them)."""
    for setting in TOKEN_GRID:
        yield setting, with_setting(plan, setting)


def lane_variant(setting: EngineSetting, plan: PlanFile) -> tuple[EngineSetting, PlanFile] | None:
    """``setting`` plus one lane per stage, applied to ``plan`` as written; None when it changes nothing."""
    if not has_chains(plan):
        return None
    name = "one lane per stage" if setting is AS_WRITTEN else f"{setting.name}, one lane per stage"
    laned = EngineSetting(name, setting.chunk_size, setting.max_batch_tokens, True, setting.source)
    return laned, with_setting(plan, laned)


def request_variant(setting: EngineSetting, plan: PlanFile) -> tuple[EngineSetting, PlanFile] | None:
    """``setting``'s step budget with per-request pipelining, applied to ``plan`` as written; None when
    it changes nothing."""
    if not has_lanes(plan):
        return None
    steps = "" if setting.max_batch_tokens is None else setting.name.split(", one lane")[0] + ", "
    single = EngineSetting(
        steps + "per-request pipelining",
        setting.chunk_size,
        setting.max_batch_tokens,
        source=setting.source or "Petals and Helix move each request through the chain on its own",
        per_request=True,
    )
    return single, with_setting(plan, single)


def per_request_allowed(max_seqs: int | None) -> bool:
    """Whether chains may pipeline per request under an engine that runs at most ``max_seqs`` sequences
    in a batch (None: no cap): not under a cap, since a server pipelining per request batches every step
    waiting on it, whatever the cap (HexGen's one-at-a-time engine in hexgen-70b)."""
    return max_seqs is None


def grid(
    plan: PlanFile, best: Callable[[], EngineSetting], *, per_request: bool = True
) -> Iterator[tuple[EngineSetting, PlanFile]]:
    """The settings to try on ``plan`` after the plan as written, in order: each step budget of
    ``TOKEN_GRID``, then one lane per stage with the plan's own step budget and with each of
    ``TOKEN_GRID`` where that changes the plan, then per-request pipelining with the step budget of
    ``best()`` (the best setting so far, read once the others are tried) where that changes the plan.
    The one order the comparison and the planner share. Without ``per_request``
    (``per_request_allowed``) the last is left out."""
    yield from token_variants(plan)
    for setting in (AS_WRITTEN, *TOKEN_GRID):
        laned = lane_variant(setting, plan)
        if laned is None:
            break  # no chain to put in lanes: none of them changes the plan
        yield laned
    single = request_variant(best(), plan) if per_request else None
    if single is not None:
        yield single


def refused(result) -> int:
    """Requests a simulation dropped as longer than any instance's KV share holds."""
    return sum(1 for r in result.records.drop_reason if r == DROP_TOO_LONG)

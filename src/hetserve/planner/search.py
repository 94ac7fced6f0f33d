"""The planner: templates -> MILP allocations -> concrete plans -> simulator confirmation.

1. Candidate instances (templates.py) over every pool and asymmetric cross-pool chain, each with a
   queueing-aware capacity for the workload (capacity.py).
2. Allocations (allocate.py) by MILP for the objective, over all roles and also restricted to colocated
   (mixed) and to disaggregated (prefill + decode) instances, so both designs are compared; plus the
   runner-up and the optimum without every-server chains when the joint one uses them.
3. Each allocation becomes a plan (build.py) with request weights from the LP flows or least-work
   routing, and is simulated on the workload; the best simulated one wins. The first plan is ready
   after the first MILP (anytime); the search stops at the time limit.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Protocol

from .. import clock
from ..errors import HetserveError, OutOfTime
from ..plan import Deployment
from ..specs.clusters import Cluster
from ..specs.models import ModelSpec
from ..specs.workloads import SLO, Workload
from .allocate import Allocation, solve
from .build import PlacementError, build_plan
from .candidate import Alternative, Analytic, Candidate, Carrying, PlanResult, Searched
from .engine_settings import AS_WRITTEN, GOODPUT_STEP, grid, per_request_allowed, refused
from .evaluate import (
    OBJECTIVES,
    Run,
    SteadyCheck,
    arrival_window_s,
    max_rate_within_slo,
    simulate_at_rate,
    simulate_requests,
    steady_rate,
    steady_window_s,
)
from .explain import (
    explain_choice,
    how_to_carry,
    slo_reached,
    why_nothing_fits,
    why_rate_unreachable,
    why_slo_unreachable,
)
from .pools import pools_of
from .quality import BIT_STEPS
from .strategy import StrategyContext
from .templates import Template, TemplateFactory


class PlanTarget(Protocol):
    """An engine the plan must run on unchanged (``hetserve plan --target``; ``deploy.targets``)."""

    label: str

    def template_ok(self, template: Template) -> bool: ...

    def gaps(self, dep: Deployment) -> list[str]: ...


#: Shared-server chain designs confirmed alongside the allocations when the cluster calls for them.
CHAIN_DESIGNS = ("chain", "helix")


def chain_designs(objective: str) -> tuple[str, ...]:
    """The chain placements in the order they are confirmed (each gets a quarter of the time left): for
    mean response time first the placement made for it (server chain composition), otherwise first the
    one made for throughput (Helix's max flow)."""
    return CHAIN_DESIGNS if objective == "latency" else CHAIN_DESIGNS[::-1]


#: Requests a confirmation simulation aims for (its duration follows from the rate).
CONFIRM_REQUESTS = 1200
CONFIRM_PER_INSTANCE = 15
#: Geometric bisections of the goodput search once it has bracketed the SLO boundary (goodput objective).
GOODPUT_BISECTIONS = 3
#: Allocations (best simulated first) also confirmed with weighted routing (goodput: the best only).
WEIGHTED_LEADS = 2
#: Cost and power: allocations made again for a higher analytic rate when the cheapest failed in simulation.
RESIZE_ROUNDS = 4
#: The sustained rate a plan reports is checked over a steady window (``evaluate.steady_rate``); the
#: check has its own ``STEADY_SHARE`` of the time limit after the search.
STEADY_SHARE = 0.5
STEADY_MAX_REQUESTS = 20_000
#: Largest workload (requests) a throughput confirmation replays as given; larger ones are sampled.
MAX_REPLAY = 4 * CONFIRM_REQUESTS
#: Shares of the time limit: candidate instances are generated until this share has passed; one
#: allocation MILP takes at most this share of the time left (and at most a sixth of the limit).
TEMPLATE_SHARE = 0.3
MILP_SHARE = 0.25
#: Shortest time a MILP is given (HiGHS returns its best solution so far when it runs out).
MIN_MILP_SECONDS = 0.05
#: Until a plan is confirmed, a confirmation runs full-size until this share of the time limit; if it has
#: not finished by then, a quick one of ``QUICK_REQUESTS`` (its window not widened to the SLO's
#: deadlines) takes the time left, so that a short limit still gives a simulated plan.
FIRST_SHARE = 0.7
#: Engine settings of the chosen plan (``engine_settings``) are confirmed until this share of the limit.
TUNE_SHARE = 0.9
QUICK_REQUESTS = 300


class Planner:
    def __init__(
        self,
        cluster: Cluster,
        model: ModelSpec,
        workload: Workload,
        objective: str,
        *,
        cluster_ref: str,
        model_ref: str,
        budget: float | None = None,
        quality: float = 0.0,
        weight_bits: int | None = None,
        headroom: float = 0.0,
        seed: int = 0,
        time_limit: float = 60.0,
        progress=None,
        max_seqs: int | None = None,
        target: PlanTarget | None = None,
    ):
        self._t0 = clock.now()  # the time limit covers reading the workload's lengths too
        self._wall0 = time.perf_counter()  # the search's wall time, reported whatever the limit counts
        if objective not in OBJECTIVES:
            raise HetserveError(f"--objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        if budget is not None and budget <= 0:
            raise HetserveError(f"--budget={budget} must be > 0 (USD per hour)")
        if not (math.isfinite(time_limit) and time_limit > 0):
            raise HetserveError(f"--time-limit={time_limit} must be a positive, finite number of seconds")
        if not (math.isfinite(headroom) and 0 <= headroom <= 10):
            raise HetserveError(f"--headroom={headroom} must be between 0 and 10 (0.2 = plan for 20% more)")
        if weight_bits is not None and weight_bits not in BIT_STEPS:
            raise HetserveError(
                f"--weight-bits={weight_bits}: use one of {', '.join(map(str, BIT_STEPS))} (every layer)"
            )
        if max_seqs is not None and max_seqs < 1:
            raise HetserveError(f"--max-batch-size={max_seqs} must be at least 1 (sequences per batch)")
        #: Most sequences the engine runs in one batch, per micro-batch lane (None: the planner's defaults).
        self.max_seqs = max_seqs
        self.cluster, self.model, self.workload = cluster, model, workload
        self.objective, self.budget, self.quality, self.seed = objective, budget, quality, seed
        self.time_limit, self.progress = time_limit, progress
        self.cluster_ref, self.model_ref = cluster_ref, model_ref
        self.slo: SLO = workload.slo
        self.prompt, self.output, self.output_q = workload.length_stats(self.slo.percentile, seed)
        self.rate = workload.mean_rate
        #: Every layer's bits: as the user fixed them (``--weight-bits``), else, lossless, the checkpoint's
        #: own when it is quantised (FP8 releases); None: the quality budget decides.
        self.bits_asked = weight_bits is not None
        if weight_bits is None and quality == 0 and model.checkpoint_bits < 16:
            weight_bits = model.checkpoint_bits
        self.weight_bits = weight_bits
        #: Share above the workload's rate a cost or power plan is sized for (``--headroom``).
        self.headroom = headroom
        #: The rate cost and power plans must carry within the SLOs: the workload's, plus the headroom.
        self.target_rate = self.rate * (1 + headroom)
        #: ``clock.now()`` at which every phase stops: simulations raise ``OutOfTime`` past it. Counting
        #: work (``clock.counting_work``), the limit is in reference seconds of work, not wall time.
        self.deadline = self._t0 + time_limit
        #: Whether a candidate has been confirmed (until then confirmations may fall back to quick ones).
        self._confirmed = False
        #: Simulations run so far (confirmations, rate searches, steady-state checks), for the progress bar.
        self.simulations = 0
        #: The engine every plan must run on as built (None: hetserve's own runtime, which runs them all),
        #: and why built plans were set aside for it.
        self.target = target
        self.off_target: list[str] = []

    def _elapsed(self) -> float:
        return clock.now() - self._t0

    def _left(self) -> float:
        return self.deadline - clock.now()

    def _milp_seconds(self) -> float:
        """Time for one MILP: a share of what is left, at most a sixth of the limit."""
        return max(MIN_MILP_SECONDS, min(self.time_limit / 6, self._left() * MILP_SHARE))

    def _out_of_time(self, what: str) -> HetserveError:
        return HetserveError(
            f"--time-limit {self.time_limit:g} s ran out {what} ({self.cluster.total_gpus} GPUs in "
            f"{len(self.cluster.nodes)} nodes); raise --time-limit"
        )

    def _tick(self, what: str) -> None:
        """Report the phase, with the simulations run so far and the seconds left, to the progress bar."""
        if self.progress:
            left = max(self._left(), 0.0)
            self.progress(
                f"{what} ({self.simulations} simulations, {left:.0f} s left)",
                min(self._elapsed() / self.time_limit, 1.0),
            )

    # ---- the search --------------------------------------------------------------------------------------
    def run(self) -> PlanResult:
        self._tick("candidate instances")
        slo = None if self.objective == "throughput" else self.slo
        long = self.workload.long_request(self.seed) if self.max_seqs is not None else None
        factory = TemplateFactory(
            self.cluster,
            self.model,
            self.prompt,
            self.output,
            slo,
            self.quality,
            lane_tokens=self.prompt + self.output,
            precisions=("fit", "spread", "deep"),
            weight_bits=self.weight_bits,
            output_q=self.output_q,
            max_seqs=self.max_seqs,
            long_tokens=long,
            deadline=self._t0 + self.time_limit * TEMPLATE_SHARE,
        )
        templates = factory.all()
        pools = {p.key: p.total for p in pools_of(self.cluster)}
        if not templates:
            if factory.cut_short:
                raise self._out_of_time("while candidate instances were made")
            raise HetserveError(
                why_nothing_fits(self.cluster, self.model, self.quality, self.weight_bits, self.bits_asked)
            )
        if self.target is not None:
            templates = [t for t in templates if self.target.template_ok(t)]
            if not templates:
                raise HetserveError(
                    f"--target: no instance of {self.model.name} on {self.cluster.name} is one "
                    f"{self.target.label} runs (one TP degree for all stages, one weight format of 16 or "
                    "8 bits, NVIDIA or AMD GPUs); plan without --target and serve with hetserve"
                )
        usable = [t for t in templates if (t.cap_free if self.objective == "throughput" else t.cap).rate > 0]
        roles = {t.role for t in usable}
        if "mixed" not in roles and not {"prefill", "decode"} <= roles:
            raise HetserveError(
                why_slo_unreachable(templates, self.slo, self.model, self.prompt, self.output, self.output_q)
            )
        if self.budget is not None and min(t.price for t in usable) > self.budget:
            cheapest = min(usable, key=lambda t: t.price)
            raise HetserveError(
                f"--budget ${self.budget:.2f}/h is below the cheapest deployment that fits and meets "
                f"the SLOs: {cheapest.describe()} at ${cheapest.price:.2f}/h"
            )
        self._tick("allocating")
        variants = [("joint", None), ("colocated", {"mixed"}), ("disaggregated", {"prefill", "decode"})]
        allocs: list[tuple[str, Allocation]] = []
        seen = set()

        def allocate(label: str, **restrict) -> None:
            """Solve the allocation MILP under ``restrict`` (roles= or exclude=); keep a new allocation.
            Past the deadline only the first is solved (the search has nothing without one)."""
            if allocs and self._left() <= 0:
                return
            a = solve(
                templates,
                pools,
                self.objective,
                rate=self.target_rate,
                budget=self.budget,
                time_limit=self._milp_seconds(),
                **restrict,
            )
            key = None if a is None else tuple(sorted(a.counts.items()))
            if key is not None and key not in seen:
                seen.add(key)
                allocs.append((label, a))

        for label, roles in variants:
            allocate(label, roles=roles)
        if not allocs:
            if self._left() <= 0:
                raise self._out_of_time("before an allocation was found")
            raise HetserveError(
                why_rate_unreachable(
                    templates, pools, self.rate, self.headroom, self.budget, self._milp_seconds()
                )
            )
        # Two more designs for the simulation to judge, where the analytic capacities are least sure: the
        # runner-up (the best allocation without the joint optimum's templates: near-equal designs, e.g. two
        # instances against one longer chain, differ by less than the capacity model's accuracy) and, if
        # the joint optimum uses chains that make every server of several pools a stage, the optimum
        # without them (long chains over slow links can simulate below their analytic rate).
        first = allocs[0][1]
        extra = [("runner-up", set(first.counts))]
        spread = {j for j, t in enumerate(templates) if t.layout == "every-server"}
        if spread & set(first.counts):
            extra.append(("short-chains", spread))
        for label, exclude in extra:
            allocate(label, exclude=exclude)
        candidates: list[Candidate] = []
        for label, alloc in allocs:  # every design once, least-work routing
            if candidates and self._elapsed() > self.time_limit * 0.5:
                break
            self._tick(f"confirming {label}")
            cand = self._candidate(f"{label}/least-work", alloc, templates, "least-work")
            if cand is not None:
                candidates.append(cand)
                self._confirmed = True
        if self.target is None and self._chains_called_for(templates):  # engines do not share servers
            for name in chain_designs(self.objective):  # shared-server chains over small or far servers
                if self._elapsed() > self.time_limit * 0.5:
                    break
                self._tick(f"confirming {name} placement")
                cand = self._strategy_candidate(name, allocs[0][1] if allocs else None)
                if cand is not None:
                    candidates.append(cand)
                    self._confirmed = True
        if not candidates:
            if self._left() <= 0:
                raise self._out_of_time("before a plan's confirming simulation finished")
            if self.off_target:
                raise HetserveError(
                    f"--target: every plan found needs what {self.target.label} cannot express, e.g. "
                    f"{self.off_target[0]}; plan without --target and serve with hetserve"
                )
            raise HetserveError("no allocation could be placed on the cluster's nodes; check the node sizes")
        if self.objective in ("cost", "power"):
            self._resize(candidates, templates, pools)
        if self.objective == "goodput":
            # The rate search for the two allocations of highest analytic goodput, and for a chain placement
            # if it simulated best: one simulation at 0.8x the analytic rate ranks plans whose SLOs failed
            # there (scored at half their goodput) below plans that passed at a lower rate, so it is not the
            # ranking to trust between allocations.
            searched = sorted((c for c in candidates if c.alloc.counts), key=lambda c: -c.alloc.rate)[:2]
            top = max(candidates, key=lambda c: c.score)
            if top not in searched:
                searched.append(top)
            for cand in searched:
                if self._elapsed() > self.time_limit * 0.8:
                    break
                self._tick(f"highest rate within the SLOs: {cand.label}")
                self._goodput_search(cand)
        # The flows' weights instead of least-work, for the two best allocations (routing can reorder them);
        # for goodput, where each confirmation is a rate search of several simulations, for the best only.
        leads = sorted((c for c in candidates if c.alloc.counts), key=lambda c: -c.score)[
            : 1 if self.objective == "goodput" else WEIGHTED_LEADS
        ]
        for lead in leads:
            if self._elapsed() >= self.time_limit * 0.8:
                break
            self._tick("confirming weighted routing")
            alt = self._candidate(lead.label.split("/")[0] + "/weighted", lead.alloc, templates, "weighted")
            if alt is not None:
                if self.objective == "goodput" and self._elapsed() < self.time_limit * 0.9:
                    self._goodput_search(alt)
                candidates.append(alt)
        objective = OBJECTIVES[self.objective]
        best = self._best(candidates)
        # Engine settings: the chosen plan's, and (but for cost and power) also the runner-up design's and
        # the best of each chain placement's (long chains of small GPUs gain most from small steps, so the
        # settings can reorder designs); the best-scoring result is the plan.
        leads = [best]
        if self.objective not in ("cost", "power"):
            design = lambda c: c.label.split("/")[0]
            ranked = sorted((c for c in candidates if design(c) != design(best)), key=lambda c: -c.score)
            leads += ranked[:1]  # the runner-up design: the settings can reorder two close designs
            for name in chain_designs(self.objective):
                leads += [c for c in ranked if design(c) == name and c not in leads][:1]
        tuned = self._tuned_all(leads, candidates)
        best, setting = max(tuned, key=lambda t: t[0].score)
        carrying = self._carrying(best, templates, pools)
        alloc = best.alloc
        predicted = Analytic(
            requests_per_s=round(alloc.rate, 4),
            output_tok_s=round(alloc.rate * self.output, 2),
            cost_per_hour=round(alloc.price, 4),
            power_w=round(alloc.power_w, 1),
        )
        simulated = {
            k: getattr(best.summary, k)
            for k in (
                "throughput_tok_s",
                "goodput_rps",
                "ttft_p90_ms",
                "tpot_p90_ms",
                "slo_attainment",
                "cost_per_hour",
            )
        }
        figures = {
            **{f"analytic_{k}": v for k, v in asdict(predicted).items()},
            **{f"simulated_{k}": round(v, 4) for k, v in simulated.items() if v is not None},
            "objective": self.objective,
        }
        reasons = explain_choice(
            best,
            candidates,
            templates,
            objective,
            self.cluster,
            self.budget,
            self.quality,
            self.weight_bits,
            self.bits_asked,
        )
        if setting is not AS_WRITTEN:
            reasons.append(
                f"Its instances run {setting.name} (of the engine settings tried on it; "
                "docs/planner.md, 'Engine settings')."
            )
        plan = best.plan.model_copy(update={"predicted": figures, "notes": " ".join(reasons)})
        searched = Searched(len(templates), len(allocs), len(candidates), len(pools))
        alts = [
            Alternative(
                c.label, objective.value(c.searched or c.run), c.dep.gpus_used(), c.summary.cost_per_hour
            )
            for c in candidates
        ]
        return PlanResult(
            plan,
            best.dep,
            self.objective,
            objective.sense,
            objective.value(best.run),
            best.summary,
            predicted,
            reasons,
            searched,
            time.perf_counter() - self._wall0,
            alts,
            carrying,
            objective.unit,
            best.run.offered_rps,
        )

    def _resize(self, candidates: list[Candidate], templates: list[Template], pools: dict[str, int]) -> None:
        """Cost and power: while the cheapest allocations failed their simulation at the target rate (the
        capacity model is optimistic for them) and no cheaper plan carried it, allocate again for a
        higher analytic rate, scaled by the share of the target the failed plan served within the SLOs,
        and confirm that plan (``RESIZE_ROUNDS`` at most)."""
        rate = self.target_rate
        for _ in range(RESIZE_ROUNDS):
            served = [c for c in candidates if self._carries(c)]
            failed = [c for c in candidates if not self._carries(c) and c.alloc.counts]
            cheapest = min(served, key=lambda c: c.summary.cost_per_hour, default=None)
            if not failed or self._elapsed() > self.time_limit * 0.6:
                return
            worst = max(failed, key=lambda c: c.summary.goodput_rps)
            if cheapest is not None and cheapest.summary.cost_per_hour <= worst.summary.cost_per_hour:
                return
            share = worst.summary.goodput_rps / self.target_rate
            rate *= min(2.0, max(1.1, 1 / max(share, 1e-9)))
            self._tick(f"allocating for {rate:.3g} req/s")
            alloc = solve(
                templates,
                pools,
                self.objective,
                rate=rate,
                budget=self.budget,
                time_limit=self._milp_seconds(),
            )
            if alloc is None or (cheapest is not None and alloc.price >= cheapest.summary.cost_per_hour):
                return
            cand = self._candidate(
                f"resized x{rate / self.target_rate:.2f}/least-work", alloc, templates, "least-work"
            )
            if cand is None:
                return
            candidates.append(cand)

    def _tuned_all(self, leads: list[Candidate], candidates: list[Candidate]) -> list[tuple]:
        """Each lead under the engine settings of the grid (``_tuned``), breadth first: every lead's
        first setting, then every lead's second, and so on, so that the time limit cuts the last settings
        of every lead rather than every setting of the last leads; (best candidate, its setting) per lead."""
        steppers = [self._tuned(lead, candidates) for lead in leads]
        results = [next(s) for s in steppers]
        live = list(range(len(steppers)))
        while live:
            for i in list(live):
                try:
                    results[i] = next(steppers[i])
                except StopIteration:
                    live.remove(i)
        return results

    def _tuned(self, best: Candidate, candidates: list[Candidate]):
        """The chosen plan under the engine settings of the grid (``engine_settings``: each step budget,
        then one lane per stage and per-request pipelining with the best of them), each confirmed as the
        plan was, while ``TUNE_SHARE`` of the limit lasts. A generator: it yields (the best candidate, its
        setting) before the first setting and after each. For goodput a setting is searched only if it
        holds the SLOs at ``GOODPUT_STEP`` times the plan's rate. A setting that refuses more requests as
        too long than the plan as written is not taken. Tried settings join ``candidates`` (the plan's
        alternatives)."""
        objective = OBJECTIVES[self.objective]
        most_refused = refused(best.run.result)
        chosen, setting_of = best, AS_WRITTEN

        def confirm(setting, plan) -> None:
            nonlocal chosen, setting_of
            if self._elapsed() > self.time_limit * TUNE_SHARE:
                return
            try:
                dep = Deployment(
                    plan, self.cluster, self.model, source="planned plan", deadline=self.deadline
                )
                if self.objective == "throughput":
                    rate = best.alloc.rate
                    run = self._simulate_throughput(dep, rate)
                else:
                    rate = (
                        chosen.run.offered_rps * GOODPUT_STEP
                        if self.objective == "goodput"
                        else self.target_rate
                    )
                    run = self._simulate(dep, rate)
            except (HetserveError, OutOfTime):
                return
            if run is None or refused(run.result) > most_refused:
                return
            cand = Candidate(
                f"{best.label}, {setting.name}", best.alloc, plan, dep, run, objective.score(run, rate)
            )
            if self.objective == "goodput":
                if not run.slo_met or not chosen.run.slo_met:
                    return
                self._goodput_search(cand, start=rate)
            candidates.append(cand)
            if cand.score > chosen.score:
                chosen, setting_of = cand, setting

        yield chosen, setting_of
        for setting, plan in grid(
            best.plan, lambda: setting_of, per_request=per_request_allowed(self.max_seqs)
        ):
            confirm(setting, plan)
            yield chosen, setting_of

    def _best(self, candidates: list[Candidate]) -> Candidate:
        """The candidate of highest score; for cost and power, when none carried the target rate within
        the SLOs (every score penalised), the one that served the most requests within them."""
        best = max(candidates, key=lambda c: c.score)
        if OBJECTIVES[self.objective].sense == "min" and not self._carries(best):
            best = max(candidates, key=lambda c: (c.run.slo_met, c.summary.goodput_rps))
        return best

    def _carries(self, cand: Candidate) -> bool:
        """Whether a cost or power candidate's confirmation carried the target rate within the SLOs."""
        return OBJECTIVES[self.objective].carries(cand.run, self.target_rate)

    def _carrying(self, best: Candidate, templates: list[Template], pools: dict[str, int]) -> Carrying | None:
        """What the workload asks of ``best`` and the highest rate ``best`` holds its SLOs at (None for the
        throughput objective, which ignores the SLOs, or a workload without a rate). For goodput that
        rate is the search's figure; for cost and power a rate search from the simulated target rate."""
        if self.objective == "throughput" or not self.rate:
            return None
        lower_bound = False
        if self.objective == "goodput":
            sustained = best.run.offered_rps if best.run.slo_met else 0.0
        else:
            start = self.target_rate  # the nominal rate it was confirmed at (its sample's rate varies)
            sustained = start if best.run.slo_met else 0.0
            lower_bound = best.run.slo_met
            self._tick("highest rate within the SLOs")
            try:
                search = max_rate_within_slo(
                    lambda rate: self._simulate(best.dep, rate),
                    start,
                    best.run.slo_met,
                    bisection_steps=2,
                )
                sustained, lower_bound = search.rate, False
            except OutOfTime:
                pass
        check = self._steady(best, sustained)
        if check is not None:
            sustained, lower_bound = check.rate, lower_bound and check.rate == sustained
            if self.objective == "goodput" and check.run is not None:
                # the figures reported are the steady run's, and the goodput is the rate its requests
                # arrived at (as the search reports it), so the verdict and the objective agree
                best.searched, best.run = best.run, check.run
                sustained = check.run.offered_rps
        window = check.window_s if check is not None else None
        carrying = Carrying(self.rate, self.target_rate, self.headroom, sustained, lower_bound, [], window)
        if not carrying.carries:
            carrying.fixes.extend(self._fixes(best, templates, pools))
        return carrying

    @staticmethod
    def _wanted(dep: Deployment) -> int:
        """Requests a confirmation replays: enough for every instance to see a dozen or more."""
        return max(CONFIRM_REQUESTS, CONFIRM_PER_INSTANCE * len(dep.instances))

    def _steady_window(self, rate: float, wanted: int) -> float:
        """Seconds of arrivals a steady-state simulation at ``rate`` spans: the steady window
        (``steady_window_s``), at least ``wanted`` requests (a p90 over a few hundred requests is noisy),
        and the workload's own duration when that is at most ``STEADY_MAX_REQUESTS`` requests (what
        ``hetserve simulate --rate`` replays by default)."""
        window = max(
            steady_window_s(self.workload, self.output_q), arrival_window_s(self.workload, rate, wanted)
        )
        own = self.workload.spec.duration_s
        return max(window, own) if rate * own <= STEADY_MAX_REQUESTS else window

    def _steady(self, best: Candidate, rate: float) -> SteadyCheck | None:
        """The highest of ``rate`` and a few steps below it at which ``best`` holds its SLOs over a steady
        window (``steady_window_s``: the search's short windows can hold them at a rate whose decode
        batches and KV caches have not filled yet). Its own allowance of ``STEADY_SHARE`` of the time
        limit from now; None when that runs out (or there is no rate to check)."""
        if rate <= 0:
            return None
        window = self._steady_window(rate, self._wanted(best.dep))
        deadline = clock.now() + STEADY_SHARE * self.time_limit
        self._tick(f"checking {rate:.3g} req/s over {window:.0f} s of arrivals")
        try:
            check = steady_rate(best.dep, self.workload, rate, window, seed=self.seed, deadline=deadline)
        except OutOfTime:
            return None
        self.simulations += check.simulations
        return check

    def _fixes(self, best: Candidate, templates: list[Template], pools: dict[str, int]) -> list[str]:
        """The nearest changes that would let a plan carry the workload: a higher budget, more GPUs (among
        the candidate instances the search used), or the SLO this plan reaches at the workload's rate."""
        fixes = how_to_carry(
            templates,
            pools,
            self.rate,
            self.budget,
            self._milp_seconds(),
        )
        try:  # the SLO this plan would need at the workload's rate (the search's deadline, plus a little)
            run = simulate_at_rate(
                best.dep,
                self.workload,
                self.rate,
                seed=self.seed,
                requests=QUICK_REQUESTS,
                deadline=max(self.deadline, clock.now() + min(10.0, self.time_limit * 0.2)),
            )
        except OutOfTime:
            run = None
        if run is not None and not run.slo_met:
            fixes.append(slo_reached(run.summary, self.slo, self.rate))
        return fixes

    def _candidate(
        self, label: str, alloc: Allocation, templates: list[Template], policy: str
    ) -> Candidate | None:
        if self._left() <= 0:
            return None
        try:
            plan = build_plan(
                self.cluster,
                self.cluster_ref,
                self.model,
                templates,
                alloc,
                self.prompt,
                f"{self.model.name}-{self.objective}",
                policy,
                self.model_ref,
                deadline=self.deadline,
            )
            dep = Deployment(plan, self.cluster, self.model, source="planned plan", deadline=self.deadline)
            if self._off_target(dep):
                return None
            if self.objective == "throughput":
                rate = alloc.rate  # the workload as given if it saturates the plan, else 1.2 x
                run = self._simulate_throughput(dep, rate)
            else:
                rate = (
                    alloc.rate * 0.8 if self.objective == "goodput" else self.target_rate
                )  # goodput: with a margin
                run = self._simulate(dep, rate)
        except (PlacementError, OutOfTime):
            return None
        if run is None:
            return None
        return Candidate(label, alloc, plan, dep, run, OBJECTIVES[self.objective].score(run, rate))

    def _off_target(self, dep: Deployment) -> bool:
        """Whether the target engine cannot run ``dep`` as built (the reasons are kept for the error)."""
        if self.target is None:
            return False
        gaps = self.target.gaps(dep)
        self.off_target.extend(gaps)
        return bool(gaps)

    def _chains_called_for(self, templates: list[Template]) -> bool:
        """Shared-server chains are worth confirming when no single node holds the model, the cluster
        spans zones (servers far apart), or the objective is what the whole cluster serves (throughput,
        goodput, latency: a placement over every server competes there; for cost and power it is rarely
        the cheapest)."""
        no_single_node = not any(len(t.stages) == 1 for t in templates)
        zones = {n.zone for n in self.cluster.nodes.values()}
        whole_cluster = self.objective in ("throughput", "goodput", "latency")
        return no_single_node or len(zones) > 1 or whole_cluster

    def _strategy_candidate(self, name: str, ref: Allocation | None) -> Candidate | None:
        """A plan from a chain-placement design (server chain composition, Helix's max-flow placement),
        confirmed by the same simulation as the allocations."""
        from .placement.chain import ChainComposition
        from .placement.helix import Helix

        left = self._left()
        if left <= 0:
            return None
        ctx = StrategyContext(
            self.cluster,
            self.model,
            self.workload,
            self.objective,
            model_ref=self.model_ref,
            cluster_ref=self.cluster_ref,
            budget=self.budget,
            quality=self.quality,
            seed=self.seed,
            time_limit=left * 0.25,
            max_seqs=self.max_seqs,
            deadline=self.deadline,
        )
        try:
            placed = {"chain": ChainComposition(), "helix": Helix()}[name].plan(ctx)
            plan = placed.model_copy(update={"name": f"{self.model.name}-{self.objective}"})
            dep = Deployment(
                plan, self.cluster, self.model, source=f"{name} placement", deadline=self.deadline
            )
        except (HetserveError, OutOfTime):
            return None
        if self.budget is not None and dep.cost_per_hour() > self.budget * (1 + 1e-9):
            return None  # a placement over the whole cluster knows no budget
        rate = ref.rate if ref is not None else self.target_rate
        alloc = Allocation({}, {}, rate, dep.cost_per_hour(), 0.0, 0.0)
        try:
            if self.objective == "throughput":
                run = self._simulate_throughput(dep, rate)
            else:
                rate = rate * 0.8 if self.objective == "goodput" else self.target_rate
                run = self._simulate(dep, rate)
        except OutOfTime:
            return None
        if run is None:
            return None
        return Candidate(
            f"{name}/{plan.routing.policy}",
            alloc,
            plan,
            dep,
            run,
            OBJECTIVES[self.objective].score(run, rate),
        )

    def _simulate(self, dep: Deployment, rate: float) -> Run | None:
        """Simulate ``dep`` at ``rate`` with enough requests for every instance to see a dozen or more
        (before the first plan is confirmed, a quick simulation if that takes too long: ``FIRST_SHARE``)."""
        self.simulations += 1
        wanted = self._wanted(dep)
        judge_slo = OBJECTIVES[self.objective].judges_slo
        # Cost and power plans must carry the workload's rate in steady state (``_steady_window``).
        window = self._steady_window(rate, wanted) if OBJECTIVES[self.objective].sense == "min" else None
        return self._first_or_quick(
            lambda deadline: simulate_at_rate(
                dep,
                self.workload,
                rate,
                seed=self.seed,
                requests=wanted,
                judge_slo=judge_slo,
                deadline=deadline,
                window_s=window,
            ),
            lambda: simulate_at_rate(
                dep,
                self.workload,
                rate,
                seed=self.seed,
                requests=QUICK_REQUESTS,
                judge_slo=False,
                deadline=self.deadline,
            ),
        )

    def _first_or_quick(self, full, quick):
        """``full(deadline)`` by the planner's deadline once a plan is confirmed; before that by
        ``FIRST_SHARE`` of the time limit, falling back to ``quick()`` (by the deadline) if it runs out."""
        if self._confirmed:
            return full(self.deadline)
        try:
            return full(min(self.deadline, self._t0 + self.time_limit * FIRST_SHARE))
        except OutOfTime:
            return quick()

    def _simulate_throughput(self, dep: Deployment, capacity: float) -> Run | None:
        """Throughput is output tokens/s at the workload's offered load, every request drained. When the
        workload arrives faster than the plan's analytic ``capacity`` and is small enough to replay (e.g.
        an offline batch), that is the workload as given: how many requests arrive together decides how
        full the last batches are. Otherwise the plan is saturated at 1.2 x ``capacity``."""
        n = self.rate * self.workload.spec.duration_s
        if self.rate >= capacity and n <= MAX_REPLAY:
            reqs = self.workload.sample(seed=self.seed)
            if len(reqs):
                duration = self.workload.spec.duration_s
                return self._first_or_quick(
                    lambda deadline: simulate_requests(
                        dep, self.workload, reqs, duration, seed=self.seed, deadline=deadline
                    ),
                    lambda: simulate_at_rate(
                        dep,
                        self.workload,
                        capacity * 1.2,
                        seed=self.seed,
                        requests=QUICK_REQUESTS,
                        judge_slo=False,
                        deadline=self.deadline,
                    ),
                )
        return self._simulate(dep, capacity * 1.2)

    def _goodput_search(self, cand: Candidate, start: float | None = None) -> None:
        """Goodput = the highest offered rate at which the SLO percentiles hold (``max_rate_within_slo``
        from the candidate's confirmation: at ``start``, by default 0.8 x the analytic rate); the candidate
        keeps the simulation at that rate."""
        try:
            search = max_rate_within_slo(
                lambda rate: self._simulate(cand.dep, rate),
                cand.alloc.rate * 0.8 if start is None else start,
                cand.run.slo_met,
                bisection_steps=GOODPUT_BISECTIONS,
            )
        except OutOfTime:  # the candidate keeps its confirmation and the score it gave
            return
        if search.run is not None:
            cand.run = search.run
        cand.score = cand.run.offered_rps if search.rate > 0 and cand.run.slo_met else 0.0

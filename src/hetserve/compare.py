"""``hetserve compare``: every strategy on one scenario, on the same cost model and the same simulator.

A *scenario* (``examples/scenarios/*.yaml``) names a cluster, a model, a workload, an objective (and
optionally a budget and a quality budget), the strategy whose paper it reproduces (``baseline``) and
the one that paper compared against (``reference``). ``run_compare`` plans with each strategy, then
simulates each plan on the same requests (same seed) and scores it the same way:

- ``throughput``: output tokens/s at the scenario's offered load (sense max);
- ``goodput``: the highest offered rate (requests/s) at which the workload's SLO percentiles hold
  (TTFT, TPOT and E2E targets, nothing dropped), found by the planner's goodput search
  (``planner.evaluate.max_rate_within_slo``) from the scenario's rate with ``BISECTION_STEPS`` geometric
  bisection steps; every probe replays the scenario's number of requests (``simulate_at_rate``: over at
  least ``MIN_WINDOW_S`` seconds of arrivals and at least ``DEADLINE_WINDOWS`` times the longer of the
  TTFT and E2E targets) (sense max);
- ``cost`` / ``power``: $/hour / average watts of the plan if it carries the scenario's offered load
  within the SLOs (percentiles hold, nothing dropped), else infeasible (``objective_value`` null; sense
  min).

A plan that costs more than the scenario's budget is infeasible whatever its objective.

The other columns (throughput, goodput, TTFT/TPOT p90, $/h, $/Mtok, J/token) come from the simulation at
the scenario's offered rate. ``--out DIR`` writes ``compare.json``, each strategy's plan (and the
cluster files they refer to) and PNG plots: the objective per strategy, latency CDFs, cost vs throughput.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from . import clock
from .errors import HetserveError, allowed, seed_value, suggest

if TYPE_CHECKING:
    from .plan import Deployment, PlanFile
    from .planner.engine_settings import EngineSetting
    from .planner.evaluate import Objective, Run

# numpy, pydantic, the specs, the planner and the simulator are imported where they are used: building
# the CLI parser (``add_compare_parser``) must stay as light as the other verbs.

#: Probes of the goodput search after the SLO boundary is bracketed.
BISECTION_STEPS = 5
#: Fewest requests a simulation replays.
MIN_REQUESTS = 50
#: Quality of a scenario that names none: every strategy keeps the model's 16-bit weights.
SCENARIO_QUALITY = "lossless"
#: hetserve's planner as a strategy, and its quantised row (labelled, never the headline).
HETSERVE, QUANTISED = "hetserve", "hetserve-q"
OURS = (HETSERVE, QUANTISED)


@cache
def scenario_schema():
    """The scenario file's schema (pydantic), built on first use: registering the CLI verb must stay as
    light as the other verbs."""
    from pydantic import Field

    from .specs.clusters import ClusterFile
    from .specs.gpus import Strict
    from .specs.workloads import WorkloadFile

    class Scenario(Strict):
        name: str
        description: str = ""
        cluster: str | ClusterFile = Field(description="cluster file (relative to the scenario) or inline")
        reference_cluster: str | ClusterFile | None = Field(
            default=None,
            description="the reference strategy plans on this cluster instead (e.g. a homogeneous "
            "fleet of equal hourly cost)",
        )
        model: str
        workload: str | WorkloadFile
        objective: Literal["throughput", "goodput", "cost", "power", "latency"]
        budget: float | None = Field(default=None, gt=0, description="USD per hour")
        quality: float | str | None = None
        baseline: str
        reference: str
        strategies: list[str] | None = None
        duration_s: float | None = Field(
            default=None, gt=0, description="seconds of arrivals at the offered rate"
        )
        time_limit_s: float = Field(
            default=30.0,
            gt=0,
            description="planning seconds per strategy (of work, unless --no-deterministic)",
        )
        max_batch_size: int | None = Field(
            default=None,
            ge=1,
            description="the serving engine's most sequences in one batch (per micro-batch "
            "lane), for every strategy",
        )
        headline: str = ""
        notes: str

    return Scenario


class LoadedScenario:
    """A scenario with its files resolved and loaded."""

    def __init__(self, path: str | Path, calibration: str | None = None):
        from .baselines import STRATEGIES
        from .planner.quality import parse_quality
        from .specs.loading import load_yaml_model
        from .specs.models import load_model
        from .specs.workloads import Workload

        self.path = Path(path)
        self.calibration = calibration
        self.spec = load_yaml_model(scenario_schema(), self.path, "scenario file")
        src = str(self.path)
        base = self.path.parent
        for field in ("baseline", "reference"):
            name = getattr(self.spec, field)
            if name not in STRATEGIES:
                raise HetserveError(
                    f"{field}: unknown strategy '{name}'{suggest(name, STRATEGIES)}; known: "
                    f"{allowed(STRATEGIES)}",
                    source=src,
                )
        for i, name in enumerate(self.spec.strategies or []):
            if name not in STRATEGIES:
                raise HetserveError(
                    f"strategies[{i}]: unknown strategy '{name}'{suggest(name, STRATEGIES)}; "
                    f"known: {allowed(STRATEGIES)}",
                    source=src,
                )
        self.cluster, self.cluster_ref = self._cluster(self.spec.cluster, base, "cluster")
        self.reference_cluster = None
        if self.spec.reference_cluster is not None:
            self.reference_cluster = self._cluster(self.spec.reference_cluster, base, "reference_cluster")
        model_path = base / self.spec.model
        try:
            self.model = load_model(
                str(model_path) if model_path.suffix == ".json" and model_path.exists() else self.spec.model
            )
        except HetserveError as exc:
            raise HetserveError(f"model: {exc}", source=src) from None
        if isinstance(self.spec.workload, str):
            wpath = base / self.spec.workload
            if not wpath.exists():
                raise HetserveError(
                    f"workload: file {wpath} not found (paths are relative to the scenario file)", source=src
                )
            self.workload = Workload.load(wpath)
        else:
            self.workload = Workload(self.spec.workload, base, source=f"{src}: workload")
        try:  # equal quality for every strategy; 16-bit weights unless the scenario says otherwise
            self.quality = parse_quality(SCENARIO_QUALITY if self.spec.quality is None else self.spec.quality)
        except HetserveError as exc:
            raise HetserveError(f"quality: {exc}", source=src) from None

    def _cluster(self, value, base: Path, field: str):
        from .specs.clusters import Cluster

        if not isinstance(value, str):
            cluster = Cluster(value, source=f"{self.path}: {field}", calibration=self.calibration)
            return cluster, f"{self.spec.name}-{field}.yaml"
        path = base / value
        if not path.exists():
            raise HetserveError(
                f"{field}: file {path} not found (paths are relative to the scenario file)",
                source=str(self.path),
            )
        return Cluster.load(path, calibration=self.calibration), str(path.resolve())

    def context(self, strategy: str, seed: int, time_limit: float | None):
        from .baselines import StrategyContext

        cluster, ref = self.cluster, self.cluster_ref
        if strategy == self.spec.reference and self.reference_cluster is not None:
            cluster, ref = self.reference_cluster
        return StrategyContext(
            cluster,
            self.model,
            self.workload,
            planning_objective(strategy, self.spec.objective),
            model_ref=self.spec.model,
            cluster_ref=ref,
            budget=self.spec.budget,
            quality=self.quality,
            seed=seed,
            time_limit=time_limit or self.spec.time_limit_s,
            max_seqs=self.spec.max_batch_size,
        )

    def strategies(self, chosen: list[str] | None) -> list[str]:
        from .baselines import STRATEGIES, get_strategy
        from .baselines.ours import QUANTISED_QUALITY

        names = chosen or self.spec.strategies
        if not names:  # every strategy that plans for this model and cluster (not a layout made for another)
            ctx = self.context(HETSERVE, 0, None)
            names = [n for n, s in STRATEGIES.items() if s.applies(ctx)]
        for n in names:
            get_strategy(n)  # a clear error for a misspelt name
        if not chosen and self.quality >= QUANTISED_QUALITY:
            names = [n for n in names if n != QUANTISED]  # the scenario's own budget: the same plan
        ours = [n for n in OURS if n in names]  # ours last: the others' planning does not eat its time
        return list(dict.fromkeys([n for n in names if n not in OURS] + ours))


def planning_objective(strategy: str, objective: str) -> str:
    """The objective ``strategy`` plans for in a scenario scored on ``objective``: its own, except that
    strategies without a latency objective of their own plan a ``latency`` scenario as ``goodput`` (the
    most capacity within the SLOs and the budget, what lowers queueing). hetserve's planner minimises
    mean response itself; chain composition chooses its reservation by simulated mean response whatever
    it is told."""
    return "goodput" if objective == "latency" and strategy not in OURS else objective


# ---- scoring ---------------------------------------------------------------------------------------------
class Evaluator:
    """Simulates plans on one workload with one seed, the same way for every strategy."""

    #: The scenario's engine cap on sequences per batch (None: no cap).
    max_seqs: int | None = None

    def __init__(self, workload, seed: int, duration: float, max_seqs: int | None = None):
        self.workload, self.seed, self.max_seqs = workload, seed, max_seqs
        self.base = workload.sample(seed=seed, duration_s=duration)
        if len(self.base) == 0:
            raise HetserveError(
                f"workload {workload.name}: no request arrives within {duration:g} s; raise duration_s"
            )
        self.duration = duration
        self.n = max(len(self.base), MIN_REQUESTS)
        self.rate = len(self.base) / duration

    @cached_property
    def steady_s(self) -> float:
        """The steady window of every goodput check (``steady``), the same for every strategy."""
        from .planner.evaluate import steady_window_s

        _, _, output_q = self.workload.length_stats(self.workload.slo.percentile, self.seed)
        return steady_window_s(self.workload, output_q)

    def run(self, dep, rate: float | None = None) -> Run:
        """The base simulation (``rate`` None: the scenario's requests, drained until all finish or the
        simulator's default limit) or a probe at ``rate`` with the scenario's number of requests."""
        from .planner.evaluate import simulate_at_rate, simulate_requests

        if rate is None:
            return simulate_requests(dep, self.workload, self.base, self.duration, seed=self.seed)
        return simulate_at_rate(dep, self.workload, rate, seed=self.seed, requests=self.n)

    def search_rate(self, dep, start: float, holds_at_start: bool | None) -> tuple[float, int]:
        """The goodput search's highest rate within the SLOs from ``start``; (rate, simulations run)."""
        from .planner.evaluate import max_rate_within_slo

        search = max_rate_within_slo(
            lambda rate: self.run(dep, rate), start, holds_at_start, bisection_steps=BISECTION_STEPS
        )
        return search.rate, search.simulations

    def steady(self, dep, rate: float) -> tuple[float, int]:
        """``rate`` checked over a steady window on two request samples, lowered until it holds there (as
        the planner checks the rate it reports: ``Planner._steady``); (rate, simulations run)."""
        from .planner.evaluate import arrival_window_s, steady_rate

        if rate <= 0:
            return rate, 0
        window = max(self.steady_s, arrival_window_s(self.workload, rate, self.n))
        check = steady_rate(dep, self.workload, rate, window, seed=self.seed)
        return check.rate, check.simulations

    def max_rate(self, dep, base_holds: bool) -> tuple[float, int]:
        """The highest offered rate at which the SLOs hold, from the scenario's rate, checked over a steady
        window; (rate, simulations run)."""
        rate, sims = self.search_rate(dep, self.rate, base_holds)
        rate, more = self.steady(dep, rate)
        return rate, sims + more

    def tune(self, objective: Objective, plan: PlanFile, deploy) -> Tuned:
        """``plan`` at the best engine setting of the grid (``planner.engine_settings.grid``), the same
        search for every strategy: the plan as written, each step budget, then one lane per stage with
        each of them and per-request pipelining with the best (plans with chains). Throughput, cost,
        power and latency compare the base simulations; goodput searches the plan as written, probes
        each setting once just above that rate (``GOODPUT_STEP``) and searches on only from settings
        that hold there. A setting that refuses more requests as too long than the plan as written is
        not taken. ``deploy(plan)`` makes the deployment (raising ``HetserveError`` for a setting the
        memory check rejects)."""
        from .planner.engine_settings import AS_WRITTEN, GOODPUT_STEP, grid, per_request_allowed, refused

        dep = deploy(plan)
        base = self.run(dep)
        best = Tuned(AS_WRITTEN, plan, dep, base, 0.0, 1, 1)
        sims, tried = 1, 1
        if objective.name == "goodput":
            best.rate, n = self.search_rate(dep, self.rate, base.slo_met)
            sims += n
        most_refused = refused(base.result)

        def best_setting():  # read when the lane variant is made: the best step budget by then
            return best.setting

        for setting, candidate in grid(plan, best_setting, per_request=per_request_allowed(self.max_seqs)):
            tried += 1
            try:
                d = deploy(candidate)
            except HetserveError:
                continue
            b = self.run(d)
            sims += 1
            if refused(b.result) > most_refused:
                continue
            rate = 0.0
            if objective.name == "goodput":
                start, holds = self.rate, b.slo_met
                if best.rate > 0:  # worth a search only if it holds just above the best rate so far
                    start, holds = best.rate * GOODPUT_STEP, self.run(d, best.rate * GOODPUT_STEP).slo_met
                    sims += 1
                if holds or best.rate <= 0:
                    rate, n = self.search_rate(d, start, holds)
                    sims += n
                better = rate > best.rate
            elif objective.name == "throughput":
                better = b.summary.completed > 0 and objective.value(b) > objective.value(best.base)
            else:  # cost, power, latency: carry the offered load within the SLOs, then the lower figure
                better = b.slo_met and (
                    not best.base.slo_met or objective.value(b) < objective.value(best.base)
                )
            if better:
                best = Tuned(setting, candidate, d, b, rate, 0, 0)
        if objective.name == "goodput":
            best.rate, n = self.steady(best.dep, best.rate)
            sims += n
        best.simulations, best.tried = sims, tried
        return best


@dataclass
class Tuned:
    """A strategy's plan at the engine setting the comparison chose for it (``Evaluator.tune``)."""

    setting: EngineSetting
    plan: PlanFile
    dep: Deployment
    base: Run  # its simulation at the scenario's offered load
    rate: float  # goodput: the highest rate within the SLOs (else unused)
    simulations: int
    tried: int  # settings tried, the plan as written included


def _metrics(dep, result, offered: float) -> dict:
    import numpy as np

    s = result.summary
    rec = result.records
    e2e = rec.e2e()[rec.completed]
    e2e = e2e[~np.isnan(e2e)]
    return {
        "offered_rps": offered,
        "requests": s.requests,
        "completed": s.completed,
        "dropped": s.dropped,
        "throughput_tok_s": s.throughput_tok_s,
        "throughput_rps": s.throughput_rps,
        "goodput_rps": s.goodput_rps,
        "slo_attainment": s.slo_attainment,
        "slo_met": s.slo_met,
        "ttft_p90_ms": s.ttft_p90_ms,
        "tpot_p90_ms": s.tpot_p90_ms,
        "e2e_p90_ms": s.e2e_p90_ms,
        "e2e_mean_ms": float(np.mean(e2e)) * 1e3 if len(e2e) else None,
        "cost_per_hour": s.cost_per_hour,
        "cost_per_mtok": s.cost_per_mtok,
        "joules_per_token": s.joules_per_token,
        "power_w": s.power_w,
        "provisioned_w": sum(srv.node.gpu.tdp_w * srv.num_gpus for srv in dep.servers.values()),
        "weight_bits": weight_bits(dep),
        "gpus": dep.gpus_used(),
        "gpus_by_type": dep.gpu_counts(),
        "instances": len(dep.instances),
        "roles": sorted({i.role for i in dep.instances.values()}),
    }


def weight_bits(dep) -> str:
    """The plan's weight bits in a few characters: ``16``, ``8``, or ``4-16`` when layers differ."""
    bits = {b for srv in dep.servers.values() for b in srv.shape.layer_bits}
    lo, hi = min(bits), max(bits)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _judge(objective: Objective, tuned: Tuned) -> tuple[float | None, bool]:
    """(objective value or None, feasible) of a tuned plan: throughput as simulated (feasible when a
    request finished); goodput the highest rate within the SLOs (feasible when above 0); cost, power and
    latency as simulated when the plan carried the offered load within the SLOs, nothing dropped (else
    infeasible)."""
    base = tuned.base
    if objective.name == "goodput":
        return tuned.rate, tuned.rate > 0
    if objective.name == "throughput":
        return objective.value(base), base.summary.completed > 0
    return (objective.value(base) if base.slo_met else None), base.slo_met


def ratio(a: float | None, b: float | None, sense: str) -> float | None:
    """How many times better ``a`` is than ``b`` (> 1: better), or None when undefined (a value missing
    or zero)."""
    if a is None or b is None:
        return None
    if sense == "max":
        return a / b if b > 0 else None
    return b / a if a > 0 else None


def _planned(sc: LoadedScenario, name: str, seed: int, time_limit: float | None, deterministic: bool):
    """(context, plan, None) of strategy ``name`` on the scenario, its time limit counting work when
    ``deterministic``; (context, None, the error) when it cannot plan or its plan is not deployable."""
    from .baselines import get_strategy
    from .plan import Deployment

    with clock.counting_work_if(deterministic):
        ctx = sc.context(name, seed, time_limit)
        try:
            plan = get_strategy(name).plan(ctx)
            Deployment(plan, ctx.cluster, ctx.model, source=f"{name} plan")
        except HetserveError as exc:
            return ctx, None, exc
    return ctx, plan, None


def run_compare(
    scenario_path: str | Path,
    strategies: list[str] | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    *,
    requests: int | None = None,
    time_limit: float | None = None,
    progress=None,
    calibration: str | None = None,
    deterministic: bool = True,
) -> dict:
    """Plan with each strategy and simulate each plan on the scenario's workload (same requests).

    ``progress(name, i, n)`` is told of each strategy before it runs (the i-th of n). ``requests``
    overrides how many requests each simulation replays (scaling the scenario's duration);
    ``time_limit`` overrides the planning seconds per strategy, seconds of work as ``clock`` counts them
    unless ``deterministic`` is False (then of wall time, so that the plans depend on the machine and its
    load); ``calibration`` times every cluster with a calibration file's factors. Returns the comparison
    as a dict: ``strategies`` maps each strategy to its metrics (with ``objective_value`` and ``objective_sense``).
    """
    from .plan import Deployment
    from .planner.evaluate import OBJECTIVES

    sc = LoadedScenario(scenario_path, calibration)
    spec = sc.spec
    if requests is not None and requests < 1:
        raise HetserveError(f"--requests={requests} must be >= 1")
    if time_limit is not None and time_limit <= 0:
        raise HetserveError(f"--time-limit={time_limit} must be > 0 seconds")
    names = sc.strategies(strategies)
    duration = spec.duration_s or sc.workload.spec.duration_s
    if requests is not None:
        duration = requests / sc.workload.mean_rate
    ev = Evaluator(sc.workload, seed, duration, spec.max_batch_size)
    objective = spec.objective
    sense = OBJECTIVES[objective].sense
    results: dict[str, dict] = {}
    sims: dict[str, object] = {}
    plans: dict[str, tuple[dict, object]] = {}
    for i, name in enumerate(names, 1):
        if progress:
            progress(name, i, len(names))
        t0 = time.perf_counter()
        ctx, plan, exc = _planned(sc, name, seed, time_limit, deterministic)
        if exc is not None:
            results[name] = {
                "error": str(exc),
                "objective_value": None,
                "objective_sense": sense,
                "objective_unit": OBJECTIVES[objective].unit,
                "feasible": False,
                "plan_seconds": time.perf_counter() - t0,
                "cluster": ctx.cluster.name,
            }
            continue
        planned = time.perf_counter() - t0
        t1 = time.perf_counter()

        def deploy(plan, ctx=ctx, name=name):
            return Deployment(plan, ctx.cluster, ctx.model, source=f"{name} plan")

        tuned = ev.tune(OBJECTIVES[objective], plan, deploy)
        plan, dep, base = tuned.plan, tuned.dep, tuned.base
        judged, feasible = _judge(OBJECTIVES[objective], tuned)
        within_budget = spec.budget is None or base.summary.cost_per_hour <= spec.budget + 1e-6
        value = judged if within_budget else None  # over the scenario's budget: not comparable
        m = {
            **_metrics(dep, base.result, ev.rate),
            **({"max_rate_within_slo": judged} if objective == "goodput" else {}),
            "within_budget": within_budget,
            "objective_value": value,
            "objective_sense": sense,
            "objective_unit": OBJECTIVES[objective].unit,
            "feasible": feasible and within_budget,
            "plan_seconds": planned,
            "sim_seconds": time.perf_counter() - t1,
            "simulations": tuned.simulations,
            "engine_setting": tuned.setting.short,
            "engine_settings_tried": tuned.tried,
            "cluster": ctx.cluster.name,
            "notes": plan.notes,
        }
        results[name] = m
        sims[name] = base.result
        plans[name] = (plan, ctx)
    out = {
        "scenario": spec.name,
        "description": spec.description,
        "model": sc.model.name,
        "cluster": sc.cluster.name,
        "objective": objective,
        "objective_sense": sense,
        "objective_unit": OBJECTIVES[objective].unit,
        "objective_label": OBJECTIVES[objective].label,
        "budget": spec.budget,
        "quality": sc.quality,
        "max_batch_size": spec.max_batch_size,
        "seed": seed,
        "time_limit_counts": "work" if deterministic else "wall time",
        "baseline": spec.baseline,
        "reference": spec.reference,
        "offered_rps": ev.rate,
        "slo": sc.workload.slo.model_dump(),
        "requests": len(ev.base),
        "headline": spec.headline,
        "strategies": results,
        "ratios": _ratios(results, spec, sense),
    }
    if out_dir is not None:
        from .report.comparison import write_comparison

        out["files"] = write_comparison(Path(out_dir), out, sims, plans)
    return out


def _ratios(results: dict, spec, sense: str) -> dict:
    val = {n: r.get("objective_value") for n, r in results.items()}
    out = {"baseline_vs_reference": ratio(val.get(spec.baseline), val.get(spec.reference), sense)}
    for ours, key in ((HETSERVE, "hetserve_vs"), (QUANTISED, "hetserve_q_vs")):
        if ours in val:
            out[key] = {n: ratio(val[ours], v, sense) for n, v in val.items() if n not in OURS}
    return out


# ---- output ----------------------------------------------------------------------------------------------
TABLE_COLUMNS = (
    "strategy",
    "weight bits",
    "objective",
    "tok/s",
    "req/s in SLO",
    "TTFT p90 ms",
    "TPOT p90 ms",
    "$/h",
    "$/Mtok",
    "J/token",
    "engine (chunk/step)",
    "plan s",
)


def table_rows(report: dict) -> list[list]:
    rows = []
    for name, r in report["strategies"].items():
        if "error" in r:
            rows.append([name, None, "failed: " + r["error"][:80]] + [None] * 8 + [r.get("plan_seconds")])
            continue
        value = r["objective_value"]
        if value is None:
            value = "infeasible"
        elif not r.get("completed"):
            value = f"{value:g} (no request finished)"
        rows.append(
            [
                name,
                r["weight_bits"],
                value,
                r["throughput_tok_s"],
                r["goodput_rps"],
                r["ttft_p90_ms"],
                r["tpot_p90_ms"],
                r["cost_per_hour"],
                r["cost_per_mtok"],
                r["joules_per_token"],
                r.get("engine_setting"),
                r["plan_seconds"],
            ]
        )
    return rows


def cmd_compare(args) -> int:
    from .report.tables import err_console, print_json, table

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else None

    def progress(name: str, i: int, n: int) -> None:
        if not args.json:
            err_console.print(f"[{i}/{n}] {name}: planning and simulating", highlight=False)

    report = run_compare(
        args.scenario,
        strategies,
        args.out,
        args.seed,
        requests=args.requests,
        time_limit=args.time_limit,
        progress=progress,
        calibration=args.calibration,
        deterministic=args.deterministic,
    )
    if args.json:
        print_json(report["strategies"])
        return 0
    title = (
        f"{report['scenario']}: {report['model']} on {report['cluster']}, objective {report['objective']} "
        f"({report['objective_unit']}, {report['objective_sense']}), {report['requests']} requests at "
        f"{report['offered_rps']:.3g} req/s, seed {report['seed']}"
        + (f", at most {report['max_batch_size']} sequences per batch" if report["max_batch_size"] else "")
    )
    columns = list(TABLE_COLUMNS)
    columns[2] = f"{report['objective']} ({report['objective_unit']})"
    table(title, columns, table_rows(report))
    print(
        f"{columns[2]}: each strategy's own figure for the objective ({report['objective_label']}); the other "
        f"columns are its simulation at the scenario's {report['offered_rps']:.3g} req/s"
    )
    r = report["ratios"]
    if r.get("baseline_vs_reference") is not None:
        print(f"{report['baseline']} vs {report['reference']}: {r['baseline_vs_reference']:.2f}x")
    q = report["quality"]
    print(
        "every strategy planned at the scenario's quality: "
        + ("lossless (16-bit weights)" if q == 0 else f"quality budget {q:g} (may quantise)")
    )
    for name, x in (r.get("hetserve_vs") or {}).items():
        print(f"hetserve vs {name}: " + ("-" if x is None else f"{x:.2f}x"))
    q = report["strategies"].get(QUANTISED, {})
    if q.get("weight_bits"):
        print(f"hetserve-q ({q['weight_bits']}-bit weights, quantised; not comparable with 16-bit rows):")
        for name, x in (r.get("hetserve_q_vs") or {}).items():
            print(f"  hetserve-q vs {name}: " + ("-" if x is None else f"{x:.2f}x"))
    if report.get("files"):
        print("wrote: " + ", ".join(report["files"]))
    return 0


def add_compare_parser(subparsers) -> None:
    c = subparsers.add_parser(
        "compare", help="plan and simulate every strategy (ours and the baselines) on a scenario"
    )
    c.add_argument(
        "scenario", metavar="SCENARIO", help="scenario YAML (see docs/baselines.md and examples/scenarios)"
    )
    c.add_argument(
        "--strategies",
        help="comma-separated subset of the strategies (default: the scenario's, or "
        "all; names in docs/baselines.md)",
    )
    c.add_argument("--json", action="store_true", help="print {strategy: metrics} as JSON")
    c.add_argument("--out", help="directory for compare.json, the plans and PNG plots")
    c.add_argument("--seed", type=seed_value, default=0)
    c.add_argument("--requests", type=int, help="requests per simulation (default: the scenario's duration)")
    c.add_argument("--time-limit", type=float, help="planning seconds per strategy (default: the scenario's)")
    c.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count each strategy's planning work instead of wall time, so that the comparison is the same "
        "on any machine and under any load (default; --no-deterministic: wall time)",
    )
    c.add_argument(
        "--calibration", metavar="FILE", help="calibration file (hetserve calibrate) applied to every cluster"
    )
    c.set_defaults(func=cmd_compare)

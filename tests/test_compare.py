"""`hetserve compare`: every strategy planned and simulated the same way on a scenario; the JSON a user
scripts against; clear errors for a wrong scenario file; and, on every shipped scenario, hetserve's plan
at least as good as the baseline of that scenario's paper and the reference that paper compared with."""

import argparse
import json
from pathlib import Path

import pytest
import yaml

from hetserve.compare import (
    LoadedScenario,
    add_compare_parser,
    planning_objective,
    ratio,
    run_compare,
    table_rows,
)
from hetserve.errors import HetserveError
from hetserve.plan import load_plan

SCENARIOS = sorted((Path(__file__).resolve().parents[1] / "examples" / "scenarios").glob("*.yaml"))

TINY = {
    "name": "tiny",
    "description": "Llama-3.1-8B on one A100 and four L4s",
    "cluster": {
        "name": "tiny-cluster",
        "nodes": [
            {"name": "a100", "gpu": "a100-80gb", "count": 1},
            {"name": "l4", "gpu": "l4", "count": 2, "replicas": 2},
        ],
    },
    "model": "llama-3.1-8b",
    "workload": {
        "arrivals": {"kind": "poisson", "rate": 2.0},
        "prompt": {"kind": "lognormal", "mean": 600, "cv": 0.5, "max": 2000},
        "output": {"kind": "lognormal", "mean": 100, "cv": 0.5, "max": 400},
        "slo": {"ttft_ms": 2000, "tpot_ms": 100},
        "duration_s": 30,
    },
    "objective": "goodput",
    "baseline": "hexgen",
    "reference": "homogeneous",
    "strategies": ["homogeneous", "hexgen", "hetserve"],
    "time_limit_s": 4,
    "notes": "a test scenario",
}
METRICS = (
    "objective_value",
    "objective_sense",
    "objective_unit",
    "feasible",
    "throughput_tok_s",
    "goodput_rps",
    "ttft_p90_ms",
    "tpot_p90_ms",
    "cost_per_hour",
    "cost_per_mtok",
    "joules_per_token",
    "plan_seconds",
    "gpus_by_type",
    "max_rate_within_slo",
)


@pytest.fixture
def tiny(write):
    return write("tiny.yaml", yaml.safe_dump(TINY))


@pytest.mark.slow
def test_compare_reports_every_strategy_and_writes_plans_and_plots(tiny, tmp_path):
    out = tmp_path / "out"
    report = run_compare(tiny, out_dir=out, seed=0, requests=40)
    assert list(report["strategies"]) == ["homogeneous", "hexgen", "hetserve"]  # ours planned last
    for name, m in report["strategies"].items():
        for key in METRICS:
            assert key in m, (name, key)
        assert m["objective_sense"] == "max" and m["objective_unit"] == "req/s"
        assert m["objective_value"] == m["max_rate_within_slo"] and m["objective_value"] > 0
    assert report["requests"] > 20 and report["offered_rps"] == pytest.approx(2.0, rel=0.5)
    assert set(report["ratios"]["hetserve_vs"]) == {"homogeneous", "hexgen"}
    assert report["ratios"]["baseline_vs_reference"] == pytest.approx(
        report["strategies"]["hexgen"]["objective_value"]
        / report["strategies"]["homogeneous"]["objective_value"]
    )
    for name in report["strategies"]:
        dep = load_plan(out / "plans" / f"{name}.yaml")  # plans stand alone (inline cluster written)
        assert dep.gpus_used() == report["strategies"][name]["gpus"]
    for f in ("compare.json", "objective.png", "latency_cdf.png", "cost_objective.png"):
        assert (out / f).stat().st_size > 0
    saved = json.loads((out / "compare.json").read_text())
    assert (
        saved["strategies"]["hetserve"]["objective_value"]
        == report["strategies"]["hetserve"]["objective_value"]
    )


def test_every_strategy_runs_at_16_bits_unless_the_scenario_allows_quantising(write):
    """Equal quality: a scenario without `quality` keeps every strategy's weights at 16 bits, hetserve
    included; hetserve's quantised plan is the separate `hetserve-q` row, planned with a quality budget,
    and never part of hetserve's ratios."""
    spec = {**TINY, "strategies": None, "workload": {**TINY["workload"], "duration_s": 10}}
    spec.pop("strategies")
    sc = LoadedScenario(write("lossless.yaml", yaml.safe_dump(spec)))
    assert sc.quality == 0.0
    names = sc.strategies(None)
    assert names[-2:] == ["hetserve", "hetserve-q"]
    report = run_compare(
        write("pair.yaml", yaml.safe_dump({**spec, "strategies": ["homogeneous", "hetserve-q", "hetserve"]})),
        requests=30,
    )
    res = report["strategies"]
    assert res["hetserve"]["weight_bits"] == "16" and res["homogeneous"]["weight_bits"] == "16"
    assert set(report["ratios"]["hetserve_vs"]) == {"homogeneous"}
    assert set(report["ratios"]["hetserve_q_vs"]) == {"homogeneous"}
    rows = {row[0]: row for row in table_rows(report)}
    assert rows["hetserve"][1] == "16"  # every row states its weight bits


def test_a_scenario_that_allows_quantising_runs_everyone_at_its_budget_and_no_second_hetserve(write):
    spec = {**TINY, "quality": 0.5}
    spec.pop("strategies")
    sc = LoadedScenario(write("q.yaml", yaml.safe_dump(spec)))
    assert sc.quality == 0.5
    assert "hetserve-q" not in sc.strategies(None)  # the same budget: the same plan as hetserve
    assert sc.strategies(["hetserve-q", "hexgen"]) == ["hexgen", "hetserve-q"]  # asked for: run


def test_the_same_seed_gives_the_same_comparison(tiny):
    a = run_compare(tiny, ["homogeneous"], seed=3, requests=40)["strategies"]["homogeneous"]
    b = run_compare(tiny, ["homogeneous"], seed=3, requests=40)["strategies"]["homogeneous"]
    assert a["objective_value"] == b["objective_value"] and a["ttft_p90_ms"] == b["ttft_p90_ms"]


def test_cli_json_prints_metrics_by_strategy(tiny, capsys):
    parser = argparse.ArgumentParser(prog="hetserve")
    add_compare_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["compare", str(tiny), "--strategies", "homogeneous,uniform", "--json", "--requests", "40"]
    )
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"homogeneous", "uniform"}
    for m in data.values():
        assert m["objective_sense"] == "max" and isinstance(m["objective_value"], float)


def test_cli_table(tiny, capsys):
    parser = argparse.ArgumentParser(prog="hetserve")
    add_compare_parser(parser.add_subparsers())
    args = parser.parse_args(["compare", str(tiny), "--strategies", "uniform", "--requests", "40"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "uniform" in out and "TTFT p90 ms" in out and "req/s, max" in out


def test_a_scenarios_engine_batch_limit_holds_for_every_strategys_plan(write, tmp_path, capsys):
    path = write("engine.yaml", yaml.safe_dump(dict(TINY, max_batch_size=2)))
    report = run_compare(path, ["homogeneous", "hexgen"], out_dir=tmp_path / "out", requests=40)
    assert report["max_batch_size"] == 2
    for name in ("homogeneous", "hexgen"):
        dep = load_plan(tmp_path / "out" / "plans" / f"{name}.yaml")
        assert all(i.plan.max_batch_size <= 2 * i.plan.micro_batches for i in dep.instances.values()), name
    parser = argparse.ArgumentParser(prog="hetserve")
    add_compare_parser(parser.add_subparsers())
    args = parser.parse_args(["compare", str(path), "--strategies", "uniform", "--requests", "40"])
    assert args.func(args) == 0
    assert "at most 2 sequences per batch" in " ".join(capsys.readouterr().out.split())  # the title wraps


def test_a_strategy_that_cannot_plan_is_reported_not_fatal(write):
    spec = dict(TINY, model="llama-2-70b", strategies=["hexgen", "homogeneous"])
    spec["cluster"] = {"nodes": [{"name": "l4", "gpu": "l4", "count": 2}]}  # 48 GB: 70B never fits at 16 bits
    report = run_compare(write("big.yaml", yaml.safe_dump(spec)), requests=20)
    for m in report["strategies"].values():
        assert "error" in m and m["objective_value"] is None and not m["feasible"]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"baseline": "hexgn"}, "baseline: unknown strategy 'hexgn' (did you mean 'hexgen'?)"),
        ({"strategies": ["petal"]}, "strategies[0]: unknown strategy 'petal' (did you mean 'petals'?)"),
        ({"cluster": "nope.yaml"}, "cluster: file"),
        ({"objective": "speed"}, "objective"),
        ({"quality": "best"}, "quality: --quality='best'"),
        ({"notes": None}, "notes"),
        ({"max_batch_size": 0}, "max_batch_size"),
    ],
)
def test_scenario_mistakes_are_clear_errors(write, change, message):
    spec = {k: v for k, v in {**TINY, **change}.items() if v is not None}
    with pytest.raises(HetserveError) as exc:
        LoadedScenario(write("bad.yaml", yaml.safe_dump(spec)))
    assert message in str(exc.value) and "bad.yaml" in str(exc.value)


def test_run_compare_rejects_a_misspelt_strategy(tiny):
    with pytest.raises(HetserveError, match="did you mean 'splitwise'"):
        run_compare(tiny, ["splitwse"])


def test_a_latency_scenario_plans_baselines_for_goodput_and_hetserve_for_latency():
    """Strategies without a latency objective of their own plan a latency scenario as goodput (the most
    capacity within the SLOs); hetserve's planner minimises mean response itself."""
    assert planning_objective("hexgen", "latency") == "goodput"
    assert (
        planning_objective("hetserve", "latency") == planning_objective("hetserve-q", "latency") == "latency"
    )
    assert planning_objective("hexgen", "cost") == "cost"
    path = next(p for p in SCENARIOS if p.stem == "chain-bloom176b-latency")
    assert LoadedScenario(path).context("petals", 0, None).objective == "goodput"


def test_ratio_says_how_many_times_better():
    assert ratio(10, 5, "max") == 2 and ratio(5, 10, "min") == 2
    assert ratio(1, 0, "max") is None and ratio(None, 3, "min") is None


def test_every_scenario_names_its_papers_and_says_what_was_chosen():
    assert {p.stem for p in SCENARIOS} >= {
        "pd-cross-vendor",
        "hexgen-70b",
        "llmpq-opt66b",
        "llmpq-bloom176b",
        "splitwise-70b",
        "chain-bloom176b",
        "helix-24",
        "helix-24-geo",
    }
    for path in SCENARIOS:
        sc = LoadedScenario(path)
        assert sc.spec.notes.strip() and sc.spec.headline and sc.spec.description
        assert sc.spec.baseline != "hetserve" and sc.spec.reference != "hetserve"


#: Scenarios where hetserve's planner does not beat the scenario's baseline (docs/baselines.md): the
#: baseline, the least fraction of its objective hetserve still reaches (asserted: a regression beyond the
#: documented loss fails), and why. The reference is still beaten.
PLANNER_LOSES: dict[str, tuple[str, float, str]] = {
    "hexgen-70b": (
        "hexgen",
        0.95,
        "one sequence per batch: HexGen's search (300 generations on its schedule) reaches 0.642 req/s "
        "with four replicas, mostly TP2 chains, and hetserve 0.642, with 8 s of work as with the "
        "scenario's 20 s: a tie",
    ),
}
#: Scenarios whose comparison gets more than the test's 8 s of work per strategy, and why: on helix-24 the
#: planner needs the scenario's 20 s to confirm Helix's placement beside its own allocations (its MILP
#: and a replay of the workload over 23 machines); with 8 s its plan is its own A100 + T4 pipeline,
#: 463 tok/s against Helix's 483 (0.96x), and with 20 s it is Helix's placement: a tie (docs/baselines.md).
WORK_SECONDS: dict[str, float] = {"helix-24": 20}
#: Strategies a scenario's comparison also checks hetserve against, besides its baseline and reference:
#: those that once beat it there (pd-hetero's all-H100 split on splitwise-70b-sweep: 192.0 against 178.6
#: req/s before the planner's goodput search told rates apart to within 9%; pd-hetero on splitwise-70b:
#: 31.41 against 30.98 before a pipeline's lone lane was timed at the chain's latency).
ALSO_AGAINST: dict[str, list[str]] = {"splitwise-70b-sweep": ["pd-hetero"], "splitwise-70b": ["pd-hetero"]}
#: Scenarios whose comparison takes more than a few seconds: run by CI, left out of ``-m "not slow"``.
SLOW_SCENARIOS = {
    "hexgen-70b-batched",
    "hexgen-70b-16bit",
    "hexgen-70b",
    "pd-cross-vendor",
    "helix-24-geo",
    "helix-24",
    "splitwise-70b",
    "splitwise-70b-sweep",
}


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(
            p,
            id=p.stem,
            marks=[pytest.mark.slow] if p.stem in SLOW_SCENARIOS else [],
        )
        for p in SCENARIOS
    ],
)
def test_hetserve_is_at_least_as_good_as_the_scenarios_baseline_and_reference(path):
    """With 8 s of work each (``WORK_SECONDS``: more where the scenario needs it), so the same plans on
    any machine and under any load."""
    sc = LoadedScenario(path).spec
    others = [sc.baseline, sc.reference, *ALSO_AGAINST.get(path.stem, [])]
    report = run_compare(path, [*others, "hetserve"], time_limit=WORK_SECONDS.get(path.stem, 8))
    res = report["strategies"]
    ours = res["hetserve"]
    assert "error" not in ours and ours["feasible"], ours
    lost_to, share, why = PLANNER_LOSES.get(path.stem, (None, 1.0, ""))
    for name in others:
        other = res[name]
        if other.get("objective_value") is None:  # failed or infeasible: nothing to beat
            continue
        margin, known = (share, why) if name == lost_to else (1.0, "")
        if report["objective_sense"] == "max":
            assert ours["objective_value"] >= margin * other["objective_value"], (
                name,
                ours["objective_value"],
                other["objective_value"],
                known,
            )
        else:
            assert margin * ours["objective_value"] <= other["objective_value"], (
                name,
                ours["objective_value"],
                other["objective_value"],
                known,
            )


@pytest.mark.slow
def test_hexgen_beats_the_homogeneous_fleet_of_equal_cost_on_its_own_engine():
    """HexGen's headline direction in its own setting (scenario hexgen-70b: an engine that runs one
    sequence per batch): its plan on the mixed 48 GB / 24 GB fleet sustains a higher request rate within
    the deadline than the A100 fleet of the same hourly cost (by 1.85x, 0.642 against 0.348 req/s, at
    commit 2dc7fdb; asserted with a margin)."""
    path = next(p for p in SCENARIOS if p.stem == "hexgen-70b")
    res = run_compare(path, ["hexgen", "homogeneous"], time_limit=8)["strategies"]
    assert res["hexgen"]["objective_value"] >= 1.5 * res["homogeneous"]["objective_value"], res


@pytest.mark.slow
def test_splitwise_splits_ten_machines_unevenly_and_beats_the_best_single_machine_type(tmp_path):
    """splitwise-70b-sweep, Splitwise's iso-cost comparison at a budget of ten DGX-H100: its grid splits
    the machines into pools at a ratio other than 1:1, and its plan sustains more within the SLOs than
    the best single machine type at the same budget (Baseline-H100), the paper's direction (1.39x
    measured: 155.8 against 111.9 req/s; asserted with a margin). The time limit leaves every one of
    Splitwise's trial simulations to run, whatever the machine's speed."""
    path = next(p for p in SCENARIOS if p.stem == "splitwise-70b-sweep")
    report = run_compare(path, ["splitwise", "homogeneous"], tmp_path, time_limit=120)
    res = report["strategies"]
    dep = load_plan(tmp_path / "plans" / "splitwise.yaml")
    roles = [i.role for i in dep.instances.values()]
    assert len(roles) >= 10 and roles.count("prefill") != roles.count("decode"), roles
    assert all(s.plan.tp == s.node.count == 8 for s in dep.servers.values())  # whole DGX machines
    assert res["splitwise"]["cost_per_hour"] <= report["budget"] + 1e-6
    assert res["splitwise"]["objective_value"] >= 1.2 * res["homogeneous"]["objective_value"], res


#: Scenarios cheap enough to plan and simulate with every strategy in a test (a few seconds each), and the
#: strategies that beat hetserve's planner there (docs/baselines.md, "Where hetserve loses"): the least
#: fraction of their objective hetserve still reaches, and why.
EVERY_STRATEGY: dict[str, dict[str, tuple[float, str]]] = {
    "llmpq-bloom176b": {},
    "llmpq-opt66b": {},
    "chain-bloom176b": {},
    "chain-bloom176b-latency": {},
}


@pytest.mark.parametrize("name", list(EVERY_STRATEGY))
def test_hetserve_is_at_least_as_good_as_every_strategy_on_the_small_scenarios(name):
    path = next(p for p in SCENARIOS if p.stem == name)
    report = run_compare(path, time_limit=8)
    sense = report["objective_sense"]
    ours = report["strategies"]["hetserve"]["objective_value"]
    for other, m in report["strategies"].items():
        theirs = m.get("objective_value")
        if other in ("hetserve", "hetserve-q") or theirs is None:
            continue
        share, why = EVERY_STRATEGY[name].get(other, (1.0, ""))
        if sense == "max":
            assert ours >= share * theirs, (other, ours, theirs, why)
        else:
            assert share * ours <= theirs, (other, ours, theirs, why)


def test_chain_composition_answers_sooner_than_petals_on_average_as_its_paper_reports():
    """chain-bloom176b on the chain-composition paper's own metric, mean response time at the offered
    rate: chain composition below Petals (the paper: 8-83% lower; measured here 40%). Petals serves
    every request its caches hold (it had refused all of them with 8-bit blocks and four lanes)."""
    path = next(p for p in SCENARIOS if p.stem == "chain-bloom176b")
    res = run_compare(path, ["chain", "petals"], time_limit=8)["strategies"]
    chain, petals = res["chain"], res["petals"]
    assert petals["completed"] > 0.9 * petals["requests"], petals
    assert chain["e2e_mean_ms"] < petals["e2e_mean_ms"], (chain["e2e_mean_ms"], petals["e2e_mean_ms"])


def test_the_table_says_when_a_plan_finished_no_request_and_when_it_is_infeasible():
    row = dict(
        weight_bits="16",
        throughput_tok_s=0.0,
        goodput_rps=0.0,
        ttft_p90_ms=None,
        tpot_p90_ms=None,
        cost_per_hour=10.2,
        cost_per_mtok=None,
        joules_per_token=None,
        plan_seconds=0.1,
    )
    report = {
        "strategies": {
            "stuck": {**row, "objective_value": 0.0, "completed": 0},
            "slow": {**row, "objective_value": 0.0, "completed": 3},
            "over": {**row, "objective_value": None, "completed": 5},
        }
    }
    cells = {r[0]: r[2] for r in table_rows(report)}
    assert cells == {"stuck": "0 (no request finished)", "slow": 0.0, "over": "infeasible"}


def test_compare_tells_of_each_strategy_before_it_runs():
    path = next(p for p in SCENARIOS if p.stem == "llmpq-opt66b")
    seen = []
    report = run_compare(path, ["uniform", "llm-pq"], time_limit=2, progress=lambda *a: seen.append(a))
    assert seen == [("uniform", 1, 2), ("llm-pq", 2, 2)]
    assert list(report["strategies"]) == ["uniform", "llm-pq"]

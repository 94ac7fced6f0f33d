"""`slo_met` holds every percentile target the workload sets: TTFT, TPOT and end to end; a rate probe
spans enough TTFT or E2E deadlines to tell an overload."""

import numpy as np
import pytest

from hetserve.sim import simulate
from hetserve.sim.metrics import DEADLINE_WINDOWS, probe_window_s
from hetserve.specs.workloads import SLO
from tests.sim.conftest import requests


def test_an_e2e_target_alone_can_fail_the_slo(one_server):
    # requests one at a time (no queueing): TTFT and TPOT are the same for all, E2E grows with the output
    outputs = [20] * 8 + [400] * 2
    reqs = requests([30.0 * k for k in range(len(outputs))], 256, outputs)
    base = simulate(one_server, reqs, SLO(percentile=90)).summary
    ttft_ms, tpot_ms, e2e_ms = base.ttft_p90_ms, base.tpot_p90_ms, base.e2e_p90_ms
    assert e2e_ms > 2 * base.e2e_p50_ms

    per_token = SLO(ttft_ms=ttft_ms * 1.1, tpot_ms=tpot_ms * 1.1, percentile=90)
    assert simulate(one_server, reqs, per_token).summary.slo_met
    tight = SLO(ttft_ms=ttft_ms * 1.1, tpot_ms=tpot_ms * 1.1, e2e_ms=e2e_ms * 0.9, percentile=90)
    s = simulate(one_server, reqs, tight).summary
    assert s.ttft_p90_ms <= tight.ttft_ms and s.tpot_p90_ms <= tight.tpot_ms
    assert not s.slo_met
    loose = SLO(ttft_ms=ttft_ms * 1.1, tpot_ms=tpot_ms * 1.1, e2e_ms=e2e_ms * 1.1, percentile=90)
    assert simulate(one_server, reqs, loose).summary.slo_met


@pytest.mark.parametrize("target", ["e2e_ms", "ttft_ms"])
def test_a_probe_over_ten_deadlines_exposes_an_overload_a_short_burst_hides(one_server, target):
    # one request at a time; offered 1.3x what the server completes: the queue, and with it both TTFT and
    # E2E, grows with the length of the burst
    alone = simulate(one_server, requests([0.0], 256, 20), SLO()).summary.e2e_p50_ms / 1e3
    deadline_s = alone * 20
    slo = SLO(**{target: deadline_s * 1e3}, percentile=90)
    rate = 1.3 / alone

    def met(window):
        n = int(rate * window)
        return simulate(one_server, requests([k / rate for k in range(n)], 256, 20), slo).summary.slo_met

    assert probe_window_s(slo) == pytest.approx(DEADLINE_WINDOWS * deadline_s)
    assert met(deadline_s)
    assert not met(probe_window_s(slo))


def test_the_probe_window_follows_the_longer_queueing_target():
    assert probe_window_s(SLO(ttft_ms=1000, e2e_ms=30000)) == pytest.approx(DEADLINE_WINDOWS * 30)
    assert probe_window_s(SLO(ttft_ms=2000, tpot_ms=100)) == pytest.approx(DEADLINE_WINDOWS * 2)
    assert probe_window_s(SLO(tpot_ms=100)) == 0


def test_the_summary_judges_the_slo_at_its_percentile_and_names_it_in_json(one_server):
    outputs = [20] * 7 + [100, 200, 400]
    reqs = requests([30.0 * k for k in range(len(outputs))], 256, outputs)
    s = simulate(one_server, reqs, SLO(percentile=95)).summary
    assert s.slo_percentile == 95 and s.e2e_p90_ms < s.e2e_q_ms <= s.e2e_p99_ms
    d = s.as_dict()
    assert d["e2e_p95_ms"] == s.e2e_q_ms and d["e2e_p90_ms"] == s.e2e_p90_ms and d["slo_met"] is s.slo_met
    assert "e2e_q_ms" not in d and "slo_percentile" not in d
    # a target between the p90 and the p95 end-to-end latency fails at p95 and holds at p90
    target = (s.e2e_p90_ms + s.e2e_q_ms) / 2
    assert not simulate(one_server, reqs, SLO(e2e_ms=target, percentile=95)).summary.slo_met
    assert simulate(one_server, reqs, SLO(e2e_ms=target, percentile=90)).summary.slo_met


def test_simulate_says_why_each_request_was_dropped(run_cli, write):
    """Requests too long for every instance's KV cache are dropped at arrival, and `simulate` says so,
    with their ids; the records file carries the reason per request."""
    from pathlib import Path

    plan = Path(__file__).resolve().parents[2] / "examples" / "serve" / "smollm2-replicas.yaml"
    work = write(
        "long.yaml",
        "arrivals: {kind: poisson, rate: 2}\n"
        "prompt: {kind: lognormal, mean: 400000, cv: 0.5, max: 1000000}\n"
        "output: {kind: lognormal, mean: 100, cv: 0.5, max: 500}\n"
        "slo: {ttft_ms: 2000, tpot_ms: 100}\nduration_s: 60\n",
    )
    code, out, err = run_cli(
        "simulate", "--plan", plan, "--workload", work, "--json", "--out", work.parent / "o"
    )
    assert code == 0, err
    import json

    d = json.loads(out)
    reasons = d["drop_reasons"]
    assert d["dropped"] > 0 and sum(r["count"] for r in reasons.values()) == d["dropped"]
    reason = next(r for r in reasons if "KV cache" in r)  # (others never finished their long prefill)
    info = reasons[reason]
    assert 1 <= len(info["first_ids"]) <= 5
    rows = (work.parent / "o" / "requests.csv").read_text().splitlines()
    header = rows[0].split(",")
    first = rows[1 + info["first_ids"][0]].split(",")
    assert first[header.index("dropped")] in ("True", "1") and "KV cache" in ",".join(first)
    # the table shows bytes in units
    code, out, err = run_cli("simulate", "--plan", plan, "--workload", work)
    assert "Dropped requests" in out and "bytes_transferred │ 0 B" in out


def test_human_bytes():
    from hetserve.report.tables import human_bytes

    assert [human_bytes(x) for x in (0, 512, 12_345_678, 4.56e9, 2e13)] == [
        "0 B",
        "512 B",
        "12.3 MB",
        "4.56 GB",
        "20 TB",
    ]


def test_cdf_panels_mark_the_slo_targets():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hetserve.sim.metrics import Records
    from hetserve.sim.plots import cdf_panels
    from hetserve.specs.workloads import SLO

    n = 50
    rec = Records(n, np.zeros(n), np.full(n, 100), np.full(n, 10))
    rec.first_token = np.linspace(0.1, 1.0, n)
    rec.finish = rec.first_token + 9 * 0.05
    fig, axes = plt.subplots(1, 3)
    cdf_panels(axes, {"a": rec}, SLO(ttft_ms=2000, tpot_ms=100, percentile=95), {"a": "red"}, log=True)
    ttft_lines = [line for line in axes[0].get_lines() if line.get_label().startswith("SLO")]
    assert [line.get_xdata()[0] for line in ttft_lines] == [2.0]  # seconds on the TTFT panel
    tpot_lines = [line for line in axes[1].get_lines() if line.get_label().startswith("SLO")]
    assert [line.get_xdata()[0] for line in tpot_lines] == [100.0]  # milliseconds on the TPOT panel
    assert not [line for line in axes[2].get_lines() if line.get_label().startswith("SLO")]  # no E2E target
    assert axes[0].get_lines()[0].get_color() == "red"
    plt.close(fig)


def test_every_strategy_has_its_own_colour():
    from hetserve.baselines import STRATEGIES
    from hetserve.report.comparison import strategy_colour

    colours = [strategy_colour(n) for n in STRATEGIES]
    assert len(set(colours)) == len(colours)

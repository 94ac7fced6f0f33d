"""Checks that would catch a wrong simulator: queueing formulas, conservation, capacity, pipelines,
transfers and determinism."""

import numpy as np
import pytest

from hetserve.costmodel.roofline import BatchShape
from hetserve.plan import deployment_from_dict
from hetserve.sim import simulate
from hetserve.specs.clusters import MAX_GBIT_PER_S
from hetserve.specs.models import load_model
from tests.sim.conftest import NO_SLO, make_cluster, make_deployment, poisson, requests


def service_time(dep, prompt, outputs=1):
    inst = dep.instances["i"]
    timer = dep.cost_model.timer(inst.servers[0].shape)
    t = timer.batch_time(BatchShape.prefill([prompt]))
    for k in range(1, outputs):
        t += timer.batch_time(BatchShape.decode(1, prompt + k - 1))
    return t


def test_md1_mean_waiting_time(one_server):
    """Fixed service time, Poisson arrivals: mean wait = rho * S / (2 (1 - rho))."""
    s = service_time(one_server, 512)
    lam = 0.6 / s
    n = 60_000
    r = simulate(one_server, requests(poisson(lam, n, seed=3), 512, 1), NO_SLO)
    rec = r.records
    wait = np.mean(rec.prefill_start - rec.arrival)
    rho = lam * s
    assert wait == pytest.approx(rho * s / (2 * (1 - rho)), rel=0.03)
    assert np.mean(rec.finish - rec.prefill_start) == pytest.approx(s, rel=1e-9)


def test_mm1_mean_sojourn_time(one_server):
    """Exponential service (geometric output lengths of mean 200 decode steps): W = 1 / (mu - lambda)."""
    rng = np.random.default_rng(11)
    n = 30_000
    outputs = rng.geometric(1 / 200, n)
    step = service_time(one_server, 1, 2) - service_time(one_server, 1, 1)  # one decode step at tiny context
    prefill = service_time(one_server, 1, 1)
    mean_s = prefill + (np.mean(outputs) - 1) * step
    lam = 0.5 / mean_s
    r = simulate(one_server, requests(poisson(lam, n, seed=5), 1, outputs), NO_SLO)
    sojourn = np.mean(r.records.finish - r.records.arrival)
    assert sojourn == pytest.approx(1 / (1 / mean_s - lam), rel=0.03)


def test_conservation_and_kv_capacity_under_preemption():
    """Tiny KV room forces preemptions: everything still finishes, tokens in = tokens out, and the
    KV cache never holds more blocks than it has."""
    dep = make_deployment(
        [{"name": "s", "node": "n", "gpus": [0], "layers": [0, 32]}],
        [{"name": "i", "role": "mixed", "chain": ["s"], "max_batch_size": 64, "kv_share": 0.04}],
    )
    cap = dep.instances["i"].kv_capacity_tokens
    rng = np.random.default_rng(0)
    n = 400
    prompts = rng.integers(100, 900, n)
    outputs = rng.integers(50, 400, n)
    result = simulate(dep, requests(poisson(30, n), prompts, outputs), NO_SLO)
    rec, s = result.records, result.summary
    assert cap < 20_000
    assert s.completed + s.dropped == n
    assert s.dropped == 0
    assert s.preemptions > 0
    assert s.peak_kv_fraction["i"] <= 1.0
    assert int(rec.output[rec.completed].sum()) == int(outputs.sum())
    assert (rec.first_token >= rec.prefill_start).all() and (rec.finish >= rec.first_token).all()


def test_requests_that_can_never_fit_are_dropped(one_server):
    cap = one_server.instances["i"].kv_capacity_tokens
    r = simulate(one_server, requests([0.0, 0.1], [100, cap + 10], [10, 10]), NO_SLO)
    assert r.summary.completed == 1 and r.summary.dropped == 1 and r.records.dropped[1]


def _pipeline(stages, lanes, batch):
    per = 32 // stages
    servers = [
        {"name": f"s{k}", "node": "n", "gpus": [k], "layers": [k * per, (k + 1) * per]} for k in range(stages)
    ]
    inst = {
        "name": "i",
        "role": "mixed",
        "chain": [s["name"] for s in servers],
        "micro_batches": lanes,
        "max_batch_size": batch * lanes,
        "max_batch_tokens": 512 * batch,
    }
    return make_deployment(servers, [inst])


@pytest.mark.parametrize("stages", [2, 4])
def test_pipeline_of_k_equal_stages_reaches_k_times_throughput(stages):
    reqs = requests(np.zeros(800), 512, 1)  # everything at t=0: saturation
    one = simulate(_pipeline(stages, 1, 4), reqs, NO_SLO).summary.throughput_rps
    full = simulate(_pipeline(stages, stages, 4), reqs, NO_SLO).summary.throughput_rps
    assert full / one == pytest.approx(stages, rel=0.05)


def test_a_lone_request_in_a_pipeline_of_lanes_takes_the_chains_latency():
    """A request alone in a 4-stage pipeline with 4 lanes is timed like one in a pipeline of one lane (the
    runtime sends a lane's batch into the chain as soon as it has one): its steps take the chain's
    latency, not the 4 x slowest stage of four lanes in flight."""
    prompt, out = 300, 40
    alone = simulate(_pipeline(4, 4, 1), requests([0.0], prompt, out), NO_SLO).records
    one_lane = simulate(_pipeline(4, 1, 1), requests([0.0], prompt, out), NO_SLO).records
    assert float(alone.finish[0]) == pytest.approx(float(one_lane.finish[0]), rel=1e-9)
    # four requests on the four lanes at once: their decode steps take the cycle of four lanes in flight,
    # 4 x the slowest stage (the last, with the LM head), longer than the latency
    dep = _pipeline(4, 4, 1)
    four = simulate(dep, requests(np.zeros(4), prompt, out), NO_SLO).records
    chain = dep.chain_timer("i")
    step = chain.cycle_time(1, 1, prompt + 20, prompt + 20, busy=4)
    assert step > 1.02 * chain.step_time(1, 1, prompt + 20, prompt + 20)
    tpot = (four.finish - four.first_token) / (out - 1)
    assert tpot == pytest.approx(np.full(4, step), rel=0.02)


def _per_request(stages, batch, tokens=4096):
    dep = _pipeline(stages, 1, batch)
    spec = dep.spec.model_copy(deep=True)
    spec.instances[0] = spec.instances[0].model_copy(
        update={"pipelining": "per-request", "max_batch_size": batch, "max_batch_tokens": tokens}
    )
    return make_deployment(
        [s.model_dump() for s in spec.servers], [spec.instances[0].model_dump(exclude_unset=True)]
    )


def test_per_request_pipelining_batches_the_steps_waiting_on_each_server():
    """Each request moves through the stages on its own, a step per request; a server runs whatever waits
    on it as one step, so 8 requests decoding together on 4 stages take far less than 8 times one request,
    and less than the twice that 4 stages running one request's step at a time would give."""
    dep = _per_request(4, 8)
    prompt, out = 300, 40
    alone = simulate(dep, requests([0.0], prompt, out), NO_SLO)
    eight = simulate(dep, requests(np.zeros(8), prompt, out), NO_SLO)
    assert eight.summary.completed == 8 and not eight.records.preemptions.any()
    one_time = float(alone.records.finish[0])
    assert one_time < float(np.max(eight.records.finish)) < 1.5 * one_time
    # every request's steps were counted on their own: its prompt (one chunk) and a step per later token
    assert eight.summary.iterations == 8 * (1 + out - 1)
    # a single request is timed as the chain's stages one after another, hops included
    lanes = simulate(_pipeline(4, 1, 1), requests([0.0], prompt, out), NO_SLO)
    assert one_time == pytest.approx(float(lanes.records.finish[0]), rel=1e-9)


def test_per_request_admits_no_more_requests_than_its_batch_size():
    dep = _per_request(2, 3)
    r = simulate(dep, requests(np.zeros(6), 200, 20), NO_SLO).records
    order = np.argsort(r.prefill_start, kind="stable")
    first, later = order[:3], order[3:]
    assert np.max(r.prefill_start[first]) < np.min(r.finish[first]) <= np.min(r.prefill_start[later])


def _pd(gbit):
    nodes = [{"name": "p", "gpu": "h100-sxm", "count": 1}, {"name": "d", "gpu": "a100-80gb", "count": 1}]
    servers = [
        {"name": "ps", "node": "p", "gpus": [0], "layers": [0, 32]},
        {"name": "ds", "node": "d", "gpus": [0], "layers": [0, 32]},
    ]
    inst = [
        {"name": "pre", "role": "prefill", "chain": ["ps"]},
        {"name": "dec", "role": "decode", "chain": ["ds"]},
    ]
    return make_deployment(
        servers,
        inst,
        nodes=nodes,
        network={"gbit_per_s": gbit, "latency_ms": 0.0},
        routing={"layerwise_kv": False},
    )


def test_disaggregation_over_the_fastest_link_equals_stages_without_transfer():
    dep = _pd(MAX_GBIT_PER_S)  # the fastest link a cluster file may give: 1 Pbit/s
    prompt, out = 1500, 50
    kv = prompt * dep.model.kv_bytes_per_token(2)
    r = simulate(dep, requests([0.0], prompt, out), NO_SLO).records
    pre = dep.cost_model.timer(dep.instances["pre"].servers[0].shape)
    dec = dep.cost_model.timer(dep.instances["dec"].servers[0].shape)
    expect_prefill = pre.batch_time(BatchShape.prefill([prompt]))
    expect_decode = sum(dec.batch_time(BatchShape.decode(1, prompt + k - 1)) for k in range(1, out))
    assert r.first_token[0] == pytest.approx(expect_prefill, rel=1e-9)
    fastest = kv / (MAX_GBIT_PER_S * 1e9 / 8)  # its transfer: under 2 microseconds
    assert (
        expect_prefill + expect_decode <= r.finish[0] <= expect_prefill + expect_decode + fastest * (1 + 1e-6)
    )
    # a real link adds exactly the transfer of the prompt's KV cache
    slow = simulate(_pd(100), requests([0.0], prompt, out), NO_SLO)
    assert slow.records.finish[0] - r.finish[0] == pytest.approx(kv / 12.5e9 - fastest, rel=1e-6)
    assert slow.summary.bytes_transferred == pytest.approx(kv)


def test_concurrent_transfers_share_the_link():
    dep = _pd(8)  # 1 GB/s
    prompt = 2000
    kv = prompt * dep.model.kv_bytes_per_token(2)
    alone = simulate(dep, requests([0.0], prompt, 2), NO_SLO).records
    both = simulate(dep, requests([0.0, 0.0], prompt, 2), NO_SLO).records
    t_alone = alone.transfer_end[0] - alone.transfer_start[0]
    assert t_alone == pytest.approx(kv / 1e9, rel=1e-6)
    # the second prefill ends later; while they overlap each transfer gets half the bandwidth
    assert both.transfer_end.max() - both.transfer_start.min() >= 2 * kv / 1e9 * (1 - 1e-6)


def test_same_seed_same_result_and_records_are_complete(one_server, tmp_path):
    from hetserve.specs.workloads import Workload

    path = tmp_path / "w.yaml"
    path.write_text(
        "arrivals: {kind: gamma, rate: 3, cv: 2}\nprompt: {kind: lognormal, mean: 400}\n"
        "output: {kind: lognormal, mean: 60}\nduration_s: 120\nslo: {ttft_ms: 500, tpot_ms: 40}\n"
    )
    wl = Workload.load(path)
    dep = make_deployment(
        [{"name": "s", "node": "n", "gpus": [0], "layers": [0, 32]}],
        [{"name": "i", "role": "mixed", "chain": ["s"]}],
        routing={"policy": "power-of-two"},
    )
    a = simulate(dep, wl.sample(seed=4), wl.slo, seed=4).summary
    b = simulate(dep, wl.sample(seed=4), wl.slo, seed=4).summary
    c = simulate(dep, wl.sample(seed=5), wl.slo, seed=5).summary
    assert a == b and a != c
    for key in (
        "completed",
        "dropped",
        "ttft_p50_ms",
        "ttft_p90_ms",
        "ttft_p99_ms",
        "tpot_p50_ms",
        "tpot_p90_ms",
        "e2e_p90_ms",
        "throughput_tok_s",
        "goodput_rps",
        "slo_attainment",
        "cost_per_hour",
        "cost_per_mtok",
        "joules_per_token",
    ):
        assert getattr(a, key) is not None, key
    assert 0 < a.slo_attainment <= 1 and a.goodput_rps <= a.throughput_rps + 1e-12


def test_shared_server_time_shares_compute():
    """Two chains through one server: together they run no faster than the server alone allows."""
    servers = [
        {"name": "a", "node": "n", "gpus": [0], "layers": [0, 16]},
        {"name": "b1", "node": "n", "gpus": [1], "layers": [16, 32]},
        {"name": "b2", "node": "n", "gpus": [2], "layers": [16, 32]},
    ]
    inst = [
        {"name": "c1", "role": "mixed", "chain": ["a", "b1"], "kv_share": 0.5},
        {"name": "c2", "role": "mixed", "chain": ["a", "b2"], "kv_share": 0.5},
    ]
    dep = make_deployment(servers, inst, routing={"policy": "round-robin"})
    r = simulate(dep, requests(np.zeros(400), 512, 1), NO_SLO)
    util = r.summary.utilisation
    assert util["a"] > 0.9  # the shared server is the bottleneck
    assert util["b1"] < 0.6 and util["b2"] < 0.6
    # both chains together are capped by server a alone: 16 prompts of 512 per 8,192-token batch
    t_a = dep.cost_model.timer(dep.servers["a"].shape).batch_time(BatchShape.prefill([512] * 16))
    assert r.summary.throughput_rps <= 16 / t_a * 1.001
    assert (
        dep.instances["c1"].kv_capacity_tokens
        < make_deployment(servers[:2], [dict(inst[0], kv_share=1.0)]).instances["c1"].kv_capacity_tokens
    )


def test_shared_server_batches_the_chains_waiting_on_it():
    """Two chains through one decode-bound server: it reads its weights once per step for both, so
    together they decode as fast as one instance with the same requests, and much faster than two
    batches run one after the other."""
    server = [{"name": "a", "node": "n", "gpus": [0], "layers": [0, 32]}]
    alone = make_deployment(server, [{"name": "c", "role": "mixed", "chain": ["a"]}])
    two = make_deployment(
        server,
        [
            {"name": "c1", "role": "mixed", "chain": ["a"], "kv_share": 0.5},
            {"name": "c2", "role": "mixed", "chain": ["a"], "kv_share": 0.5},
        ],
        routing={"policy": "round-robin"},
    )
    reqs = lambda: requests(np.zeros(32), 64, 256)
    one = simulate(alone, reqs(), NO_SLO).summary
    both = simulate(two, reqs(), NO_SLO).summary
    assert both.completed == one.completed == 32
    assert both.makespan_s == pytest.approx(one.makespan_s, rel=0.05)
    # the same steps run separately would read the weights twice per token
    timer = alone.cost_model.timer(alone.servers["a"].shape)
    merged, split = (
        timer.batch_time(BatchShape.decode(32, 320)),
        2 * timer.batch_time(BatchShape.decode(16, 320)),
    )
    assert split > 1.5 * merged
    assert both.makespan_s < 0.8 * 255 * split


def test_jffc_prefers_the_fastest_free_chain_and_queues_when_all_are_busy():
    nodes = [{"name": "fast", "gpu": "h100-sxm", "count": 1}, {"name": "slow", "gpu": "l40s", "count": 1}]
    servers = [
        {"name": "f", "node": "fast", "gpus": [0], "layers": [0, 32]},
        {"name": "s", "node": "slow", "gpus": [0], "layers": [0, 32]},
    ]
    inst = [
        {"name": "F", "role": "mixed", "chain": ["f"], "max_batch_size": 2},
        {"name": "S", "role": "mixed", "chain": ["s"], "max_batch_size": 2},
    ]
    dep = make_deployment(servers, inst, nodes=nodes, routing={"policy": "jffc"})
    r = simulate(dep, requests(np.zeros(6), 200, 100), NO_SLO).records
    assert r.entry[:2] == ["F", "F"] and r.entry[2:4] == ["S", "S"]
    assert r.completed.all()
    # the last two waited in the central queue for a free slot
    assert (r.prefill_start[4:] > 0).all()


def test_transfers_complete_late_in_a_long_simulation():
    """Far into simulated time the clock's float resolution is coarse; overlapping transfers must still
    finish (a leftover fraction of a byte once rescheduled itself at the same instant forever)."""
    import signal

    def hang(*_):
        raise TimeoutError("the simulation stopped advancing")

    dep = _pd(200)
    rng = np.random.default_rng(1)
    arrivals = 17_000 + np.cumsum(rng.exponential(0.01, 300))
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        r = simulate(dep, requests(arrivals, rng.integers(200, 3000, 300), 3), NO_SLO)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert r.summary.completed == 300
    assert np.all(r.records.transfer_end >= r.records.transfer_start)


def _gemma3(windows: bool):
    """Gemma 3 27B as built in, or the same model with every layer global."""
    import json
    from importlib import resources

    from hetserve.specs.models import model_from_hf_config

    cfg = json.loads(resources.files("hetserve.specs").joinpath("data/models/gemma-3-27b.json").read_text())
    if not windows:
        cfg["text_config"]["layer_types"] = ["full_attention"] * cfg["text_config"]["num_hidden_layers"]
    return model_from_hf_config(cfg, "gemma-3-27b")


def test_sliding_window_layers_let_an_instance_hold_more_long_requests():
    """Gemma 3 keeps 1,024 tokens in 52 of its 62 layers: 8,000-token prompts take a quarter of the KV
    they would with global layers only, so one instance runs about 3.7x as many at once, finishes a
    burst sooner and takes a request that the all-global cache could never hold."""
    from hetserve.plan import deployment_from_dict

    results = {}
    for windows in (True, False):
        model = _gemma3(windows)
        plan = {
            "name": "g",
            "model": "gemma-3-27b",
            "cluster": "-",
            "servers": [{"name": "s", "node": "n", "gpus": [0], "layers": [0, 62]}],
            "instances": [
                {
                    "name": "i",
                    "role": "mixed",
                    "chain": ["s"],
                    "max_batch_size": 64,
                    "chunk_size": 2048,
                    "max_batch_tokens": 2048,
                    "kv_share": 0.25,
                }
            ],
        }
        from tests.sim.conftest import make_cluster

        dep = deployment_from_dict(plan, make_cluster([{"name": "n", "gpu": "a100-80gb", "count": 1}]), model)
        slots = dep.instances["i"].kv_capacity_tokens
        long = slots + 100  # longer than the cache's slots
        reqs = requests([0.0] * 24 + [1.0], [8000] * 24 + [long - 20], [64] * 24 + [20])
        results[windows] = (slots, simulate(dep, reqs, NO_SLO))
    (slots_w, win), (slots_p, plain) = results[True], results[False]
    assert slots_w == slots_p  # the same memory: the window changes what a sequence holds, not the room
    assert win.summary.completed == 25 and win.summary.dropped == 0
    assert plain.summary.dropped == 1 and plain.records.dropped[24]
    burst = slice(0, 24)
    assert win.records.finish[burst].max() < 0.7 * plain.records.finish[burst].max()
    assert win.summary.preemptions <= plain.summary.preemptions


def _two_chains_through_a(kv_pool, routing):
    """Chains a -> b1 and a -> b2 pipelining per request, each with 1% of a's KV room and 2% of its own
    second server's (about 2,450 tokens each on a, 4,900 on b1 and b2)."""
    servers = [
        {"name": "a", "node": "n", "gpus": [0], "layers": [0, 16]},
        {"name": "b1", "node": "n", "gpus": [1], "layers": [16, 32]},
        {"name": "b2", "node": "n", "gpus": [2], "layers": [16, 32]},
    ]
    inst = [
        {
            "name": f"c{i}",
            "role": "mixed",
            "chain": ["a", f"b{i}"],
            "kv_share": {"a": 0.01, f"b{i}": 0.02},
            "pipelining": "per-request",
            "kv_pool": kv_pool,
        }
        for i in (1, 2)
    ]
    return make_deployment(servers, inst, routing=routing)


def test_a_busy_chain_uses_the_kv_an_idle_chain_leaves_on_a_pooled_server():
    """Every request goes to c1. With its own share of a it holds two 1,200-token requests at a time;
    drawing on a's one pool (both chains' shares), four, and it serves the same requests in about half
    the time."""
    only_c1 = {"policy": "weighted", "weights": {"c1": 1, "c2": 0}}
    own, pooled = (_two_chains_through_a(p, only_c1) for p in ("own", "server"))
    assert pooled.servers["a"].kv_pool_tokens == pytest.approx(
        2 * own.instances["c1"].kv_capacity_tokens, abs=2
    )
    reqs = lambda: requests(np.zeros(40), 1000, 200)
    r_own, r_pooled = simulate(own, reqs(), NO_SLO), simulate(pooled, reqs(), NO_SLO)
    assert r_own.summary.completed == r_pooled.summary.completed == 40
    in_flight = lambda r: max(
        int(np.sum((r.records.prefill_start <= t) & (r.records.finish > t))) for t in r.records.prefill_start
    )
    assert (in_flight(r_own), in_flight(r_pooled)) == (2, 4)
    assert r_pooled.summary.makespan_s < 0.6 * r_own.summary.makespan_s


def test_a_request_waiting_for_pool_room_starts_when_another_chain_frees_it():
    """Round robin: c1 gets the short requests 0, 2, 4 and c2 the long ones 1, 3, 5. The pool on a
    holds four at once, so 5 waits; it starts the moment c1's request 4 leaves, not when one of c2's
    own requests does (as with c2's own share of a, which holds one long request at a time)."""
    out = np.array([40, 400, 40, 400, 40, 400])
    pooled = simulate(
        _two_chains_through_a("server", {"policy": "round-robin"}), requests(np.zeros(6), 1000, out), NO_SLO
    )
    r = pooled.records
    assert r.prefill_start[5] == r.finish[4] < min(r.finish[1], r.finish[3])
    own = simulate(
        _two_chains_through_a("own", {"policy": "round-robin"}), requests(np.zeros(6), 1000, out), NO_SLO
    )
    assert own.records.prefill_start[5] == own.records.finish[3]  # its own share holds one at a time


def test_a_request_reaches_the_router_the_serving_stacks_request_time_after_it_arrives():
    """request_overhead_ms delays every request's routing by that much and counts in its TTFT and E2E;
    the steps themselves are unchanged."""
    server = [{"name": "s", "node": "n", "gpus": [0], "layers": [0, 32]}]
    inst = [{"name": "i", "role": "mixed", "chain": ["s"]}]
    plain = make_deployment(server, inst)
    cluster = make_cluster(
        [{"name": "n", "gpu": "a100-80gb", "count": 1}],
        gpus={"a100-80gb": {"efficiency": {"request_overhead_ms": 40.0}}},
    )
    plan = {"name": "test", "model": "llama-2-7b", "cluster": "-", "servers": server, "instances": inst}
    slowed = deployment_from_dict(plan, cluster, load_model("llama-2-7b"))
    assert (plain.request_overhead_s, slowed.request_overhead_s) == (0.0, 0.04)
    reqs = lambda: requests([0.0, 5.0], 500, 20)
    a, b = simulate(plain, reqs(), NO_SLO).records, simulate(slowed, reqs(), NO_SLO).records
    assert b.ttft() == pytest.approx(a.ttft() + 0.04, rel=1e-9)
    assert b.finish - b.first_token == pytest.approx(a.finish - a.first_token, rel=1e-9)

"""hetserve's own placements (planner/placement/): Helix's max-flow placement and server chain
composition, each a plan the loader accepts with the properties that define it."""

import pytest

from hetserve.plan import Deployment
from hetserve.planner.placement.blocks import block_servers, blocks_that_fit, chain_parts, fastest_chain
from hetserve.planner.placement.chain import ChainComposition
from hetserve.planner.placement.helix import Helix, decompose
from tests.contexts import WORKLOAD, context, helix_machines, plan_of

HELIX_NODES = helix_machines(2, 3, 4)


def test_helix_max_flow_is_positive_and_covers_every_layer():
    ctx = context(HELIX_NODES, model="llama-2-13b", objective="throughput")
    strategy = Helix()
    plan = strategy.plan(ctx)
    dep = Deployment(plan, ctx.cluster, ctx.model)
    placement = strategy.last
    assert placement.max_flow > 0
    covered = set()
    for start, end in placement.ranges.values():
        covered |= set(range(start, end))
    assert covered == set(range(ctx.model.num_layers))
    out_of_source = sum(f for (a, _), f in placement.flows.items() if a == "source")
    assert out_of_source == pytest.approx(placement.max_flow, rel=1e-6)
    assert plan.routing.policy == "weighted" and all(w > 0 for w in plan.routing.weights.values())
    assert sum(plan.routing.weights.values()) == pytest.approx(placement.max_flow, rel=1e-3)
    assert all(
        len(i.servers) > 1 for i in dep.instances.values()
    )  # 26 GB of weights, half of 40 GB per machine
    on = {}
    for inst in dep.instances.values():
        for srv in inst.servers:
            on[srv.name] = on.get(srv.name, 0.0) + inst.plan.share_on(srv.name)
    assert len(dep.instances) == 1 or max(on.values()) <= 1 + 1e-9


def test_flow_decomposition_conserves_flow():
    flows = {("source", "a"): 3.0, ("a", "b"): 1.0, ("a", "c"): 2.0, ("b", "sink"): 1.0, ("c", "sink"): 2.0}
    paths = decompose(flows)
    assert sorted(paths) == [(["a", "b"], 1.0), (["a", "c"], 2.0)]


def test_chain_composition_allocates_cache_to_composed_chains_that_share_servers():
    """GCA: the fastest composed chain takes every job slot its scarcest server has left (not capped by
    the reservation c), so the servers it leaves slots on compose with other chains' servers."""
    nodes = [
        {"name": "big", "gpu": "a100-80gb", "count": 1},
        {"name": "mid", "gpu": "a100-40gb", "count": 1},
        {"name": "a10", "gpu": "a10", "count": 1, "replicas": 2},
    ]
    ctx = context(nodes, model="llama-2-13b")
    servers = {s.node: s for s in block_servers(ctx, 16)}
    placed = {"big": (0, 20), "mid": (20, 40), "a10-0": (0, 20), "a10-1": (20, 40)}
    alloc = ChainComposition().gca(ctx, servers, placed, 16, c=3)
    chains = [tuple(ch) for ch, _, _ in alloc]
    capacity = ChainComposition._slots(ctx, servers, placed, 16)
    left = dict(capacity)
    share: dict[str, float] = {}
    for ch, slots, shares in alloc:
        assert slots == min(left[n] for n in ch) and slots > 3  # the scarcest server's slots, above c
        for n, x in zip(ch, shares):
            assert x * capacity[n] == pytest.approx(slots)  # every server holds the chain's job slots
            share[n] = share.get(n, 0.0) + x
            left[n] -= slots
    assert max(share.values()) <= 1 + 1e-9
    # the big server keeps slots after the fastest chain exhausts the mid one, and composes with an A10
    assert chains[0] == ("big", "mid") and ("big", "a10-1") in chains


def test_gbp_cr_shifts_a_chains_last_server_back_and_keeps_an_unfinished_chain():
    """GBP-CR as its paper has it: the server that completes a chain ends at the last block with all the
    blocks it can hold (overlapping the server before it, not trimmed to the blocks left), and the servers
    of an unfinished chain stay placed; GCA's chains then run part of the shifted server."""
    nodes = [
        {"name": "a10", "gpu": "a10", "count": 1, "replicas": 3},
        {"name": "t4", "gpu": "t4", "count": 1, "replicas": 2},
    ]
    ctx = context(nodes, model="llama-2-13b")
    L = ctx.model.num_layers
    servers = {s.node: s for s in block_servers(ctx, 16)}
    placed = ChainComposition().gbp_cr(ctx, servers, 16, 4, 0.0)
    tokens = 4 * (ctx.prompt + ctx.output)
    assert set(placed) == set(servers)  # every server placed, the unfinished chain's too
    ends = [n for n, (_, e) in placed.items() if e == L]
    assert len(ends) == 2
    for n in ends:
        start, end = placed[n]
        full = blocks_that_fit(ctx, servers[n], 16, tokens, first=start == 0, last=True)
        assert end - start == min(full, L)  # its whole span, shifted back
    alloc = ChainComposition().gca(ctx, servers, placed, 16, 4)
    assert alloc
    overlapping = 0
    for ch, _, _ in alloc:
        parts = chain_parts(placed, ch)
        assert parts[0][0] == 0 and parts[-1][1] == L
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # every layer once, in order
        overlapping += sum(part != placed[n] for n, part in zip(ch, parts))
    assert overlapping > 0  # a chain runs part of a shifted-back server


def test_fastest_chain_takes_part_of_a_server_only_with_partial_inference():
    ctx = context([{"name": "a10", "gpu": "a10", "count": 1, "replicas": 3}], model="llama-2-13b")
    servers = {s.node: s for s in block_servers(ctx, 16)}
    placed = {"a10-0": (0, 25), "a10-1": (15, 40), "a10-2": (25, 40)}
    assert fastest_chain(ctx, placed, servers) == ["a10-0", "a10-2"]
    without = {n: r for n, r in placed.items() if n != "a10-2"}
    assert fastest_chain(ctx, without, servers) is None
    assert fastest_chain(ctx, without, servers, partial=True) == ["a10-0", "a10-1"]
    assert chain_parts(without, ["a10-0", "a10-1"]) == [(0, 25), (25, 40)]


def test_chain_plans_jffc_over_chains_with_slots():
    nodes = [
        {"name": "a10", "gpu": "a10", "count": 1, "replicas": 2},
        {"name": "t4", "gpu": "t4", "count": 1, "replicas": 4},
    ]
    ctx = context(
        nodes, model="llama-2-13b", workload={**WORKLOAD, "arrivals": {"kind": "poisson", "rate": 3}}
    )
    plan, dep = plan_of("chain", ctx)
    assert plan.routing.policy == "jffc"
    for inst in dep.instances.values():  # a chain's slots are its batch; its KV holds a long request
        assert inst.plan.max_batch_size >= 1 and len(inst.servers) > 1
        assert inst.kv_capacity_tokens >= ctx.long_request
        for srv, (start, end) in zip(inst.servers, inst.layers):  # spans: the part of a server it runs
            assert srv.plan.layers[0] <= start < end == srv.plan.layers[1]
            assert (srv.name in inst.plan.spans) == (start != srv.plan.layers[0])


def test_helix_stops_at_its_node_budget_with_the_same_placement_every_time(monkeypatch):
    """The MILP's budget is branch-and-bound nodes, not seconds: with a budget too small to prove the
    optimum it still returns its best placement, says so, and returns the same one on every run."""
    import hetserve.planner.placement.helix as helix

    monkeypatch.setattr(helix, "MILP_NODES", 2)
    runs = []
    for _ in range(2):
        ctx = context(HELIX_NODES, model="llama-2-13b", objective="throughput", time_limit=60.0)
        strategy = Helix()
        plan = strategy.plan(ctx)
        runs.append((strategy.last.ranges, strategy.last.max_flow, plan.notes))
    (ranges, flow, notes), again = runs[0], runs[1]
    assert flow > 0 and (ranges, flow, notes) == again
    assert strategy.last.stopped_by == "nodes" and "after its 2 nodes" in notes
    assert strategy.last.nodes <= 2


def test_helix_milp_returns_the_same_placement_on_two_runs_at_its_full_budget():
    """One thread and a fixed seed: the whole branch-and-bound (its nodes, gap and flows) repeats."""
    runs = []
    for _ in range(2):
        ctx = context(HELIX_NODES, model="llama-2-13b", objective="throughput", time_limit=120.0)
        strategy = Helix()
        strategy.plan(ctx)
        p = strategy.last
        assert p.stopped_by != "time"
        runs.append((p.ranges, p.flows, p.max_flow, p.gap, p.nodes, p.start_flow))
    assert runs[0] == runs[1]


def test_helix_milp_starts_from_the_petals_layout_and_ends_at_least_as_good(monkeypatch):
    """The starting solution is handed to HiGHS, HiGHS takes it as its first incumbent (the improving
    solutions it reports start there, where highspy reports them), and the placement's flow is at least
    the start's."""
    import highspy

    handed, incumbents = [], []
    reports = hasattr(highspy.Highs, "cbMipImprovingSolution")  # highspy's callbacks, in later versions

    class Recording(highspy.Highs):
        def __init__(self):
            super().__init__()
            if reports:
                self.cbMipImprovingSolution.subscribe(
                    lambda e: incumbents.append(e.data_out.objective_function_value)
                )

        def setSolution(self, *args):
            handed.append(args)
            return super().setSolution(*args)

    monkeypatch.setattr(highspy, "Highs", Recording)
    ctx = context(HELIX_NODES, model="llama-2-13b", objective="throughput")
    strategy = Helix()
    plan = strategy.plan(ctx)
    p = strategy.last
    assert p.start_flow is not None and p.start_flow > 0 and len(handed) == 1
    # one zone, so no crossings: the objective is -flow plus 1e-6 per machine
    if reports:
        assert incumbents and incumbents[0] == pytest.approx(-p.start_flow, abs=1e-4)
    assert p.max_flow >= p.start_flow * (1 - 1e-6)
    assert p.nodes is not None and p.nodes <= 100
    assert f"started from Petals' layout at {p.start_flow:.3f} req/s" in plan.notes


def test_helix_petals_layout_holds_spans_the_milp_offers_and_forms_a_chain():
    """Every machine of the starting layout holds a span the MILP offers (its grid, its shortest and
    longest span), and the spans meet end to start from the first layer to the last."""
    ctx = context(HELIX_NODES, model="llama-2-13b", objective="throughput")
    strategy = Helix()
    machines = strategy.machines(ctx)
    L = ctx.model.num_layers
    model = strategy._model(ctx, machines, (ctx.prompt + ctx.output) * ctx.model.hidden_size * 2.0)
    counts = strategy._petals_layout(model, L)
    assert counts and all(("y", t, s, e) in model.col for t, s, e in counts)
    assert sum(counts.values()) <= len(machines)
    reached, frontier = {0}, [0]
    while frontier:
        at = frontier.pop()
        for _, s, e in counts:
            if s == at and e not in reached:
                reached.add(e)
                frontier.append(e)
    assert L in reached


def test_helix_milp_starts_from_nothing_when_the_layout_carries_no_flow(monkeypatch):
    """A starting layout with no chain from the first layer to the last is no start: the MILP runs from
    nothing and still finds a flow, and the notes say so."""
    monkeypatch.setattr(Helix, "_petals_layout", lambda self, model, L: {})
    ctx = context(HELIX_NODES, model="llama-2-13b", objective="throughput")
    strategy = Helix()
    plan = strategy.plan(ctx)
    assert strategy.last.start_flow is None and strategy.last.max_flow > 0
    assert "started from no layout" in plan.notes


def test_highs_writes_nothing_to_standard_output(capfd):
    """HiGHS prints some MIP messages from C++ even with its output off; they would break `--json`."""
    import os

    from hetserve.planner.placement.helix import _stdout_silenced

    print("before", flush=True)
    with _stdout_silenced():
        os.write(1, b"from the solver\n")
    print("after", flush=True)
    assert capfd.readouterr().out == "before\nafter\n"

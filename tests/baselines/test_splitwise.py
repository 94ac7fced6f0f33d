"""Splitwise's mixed pool as a design option (docs/baselines.md, "splitwise"): machines of the prompt or
the token type that run mixed batching beside the two pools, priced as whole machines, chosen only when
they simulate better than every prompt/token split."""

from types import SimpleNamespace

import pytest

from hetserve.baselines.splitwise import Splitwise
from hetserve.plan import Deployment
from tests.contexts import context, plan_of

#: Two machine types of two GPUs each (TP 2 per machine for Llama-3.1-8B).
MACHINES = [
    {"name": "h100", "gpu": "h100-sxm", "count": 2, "replicas": 3},
    {"name": "a100", "gpu": "a100-80gb", "count": 2, "replicas": 4},
]


def machine_price(ctx, gpu: str) -> float:
    node = next(n for n in ctx.cluster.nodes.values() if n.gpu.name == gpu)
    return node.gpu.price_per_hour * node.count


def grid_points(ctx):
    sw = Splitwise()
    machines = {m.name: m for m in sw.machines(ctx)}
    return sw, machines, {(p, d): sw.grid(ctx, machines[p], machines[d]) for p in machines for d in machines}


def test_a_mixed_pool_point_is_whole_machines_of_the_designs_types_within_budget_and_inventory():
    budget = 4 * 2 * 4.76 + 1.0  # four H100 machines' worth
    ctx = context(MACHINES, budget=budget, time_limit=60)
    sw, machines, points = grid_points(ctx)
    assert set(machines) == {"h100-sxm", "a100-80gb"}
    for (p, d), (plain, pooled) in points.items():
        assert plain is not None and pooled is not None, (p, d)
        assert plain.n_mixed == 0 and plain.mixed is None and plain.mixed_rate == 0
        assert pooled.n_prompt >= 1 and pooled.n_token >= 1 and pooled.n_mixed >= 1
        assert pooled.mixed.name in (p, d)  # a machine of the prompt or the token type
        assert pooled.rate == pytest.approx(pooled.pair_rate + pooled.mixed_rate)
        used = {p: pooled.n_prompt}
        used[d] = used.get(d, 0) + pooled.n_token
        used[pooled.mixed.name] = used.get(pooled.mixed.name, 0) + pooled.n_mixed
        assert used.get("h100-sxm", 0) <= 3 and used.get("a100-80gb", 0) <= 4  # the inventory
        price = sum(n * machine_price(ctx, g) for g, n in used.items())
        assert price <= budget
        # goodput: the most mixed machines the budget and the inventory leave beside the split
        left = budget - price
        more = pooled.mixed.name
        assert left < machine_price(ctx, more) or used[more] == (3 if more == "h100-sxm" else 4)

        plan = sw.build(ctx, pooled)
        dep = Deployment(plan, ctx.cluster, ctx.model, source="splitwise plan")
        roles = {}
        for inst in dep.instances.values():
            (srv,) = inst.servers  # one server per instance: the whole machine, tensor parallel
            assert srv.plan.tp == srv.node.count == 2
            roles.setdefault(inst.role, []).append(srv.node.gpu.name)
        assert sorted(roles) == ["decode", "mixed", "prefill"]
        assert roles["prefill"] == [p] * pooled.n_prompt and roles["decode"] == [d] * pooled.n_token
        assert roles["mixed"] == [pooled.mixed.name] * pooled.n_mixed
        nodes = [s.node.name for s in dep.servers.values()]
        assert len(nodes) == len(set(nodes))  # no machine holds two instances
        assert dep.cost_per_hour() == pytest.approx(price)  # priced as whole machines
        assert plan.routing.policy == "least-work" and plan.routing.handoff == "least-work"


def test_for_cost_a_mixed_pool_point_adds_the_fewest_mixed_machines_that_carry_the_rate():
    ctx = context(MACHINES, objective="cost", time_limit=60)
    _, _, points = grid_points(ctx)
    for plain, pooled in points.values():
        if pooled is None:
            continue
        assert pooled.rate >= ctx.rate * (1 - 1e-9)
        one_fewer = pooled.pair_rate + (pooled.n_mixed - 1) * pooled.mixed_rate / pooled.n_mixed
        assert pooled.n_mixed == 1 or one_fewer < ctx.rate
        if plain is not None:  # the split alone carries the rate: one mixed machine is only extra cost
            assert -pooled.score > -plain.score


def fake_trials(monkeypatch, goodput_of):
    """Trials that score a plan by ``goodput_of(has mixed instances)`` (a simulated Run's fields)."""
    seen = []

    def trial(ctx, plan, rate, requests=300):
        mixed = any(i.role == "mixed" for i in plan.instances)
        seen.append(mixed)
        return SimpleNamespace(summary=SimpleNamespace(goodput_rps=goodput_of(mixed)), slo_met=True)

    monkeypatch.setattr("hetserve.planner.strategy.trial", trial)
    return seen


@pytest.mark.parametrize(
    "mixed_scores, chosen_mixed",
    [(5.0, False), (10.0, False), (11.0, True)],
    ids=["mixed-lower", "tie", "mixed-higher"],
)
def test_the_mixed_pool_is_chosen_only_when_it_simulates_higher(monkeypatch, mixed_scores, chosen_mixed):
    seen = fake_trials(monkeypatch, lambda mixed: mixed_scores if mixed else 10.0)
    ctx = context(MACHINES, budget=4 * 2 * 4.76 + 1.0, time_limit=60)
    plan, dep = plan_of("splitwise", ctx)
    assert True in seen and False in seen
    assert seen.index(True) > len(seen) - 1 - seen[::-1].index(False)  # every split is tried first
    roles = {i.role for i in dep.instances.values()}
    assert ("mixed" in roles) is chosen_mixed
    assert {"prefill", "decode"} <= roles
    assert ("in the mixed pool" in plan.notes) is chosen_mixed


def test_without_room_for_a_mixed_machine_there_is_no_mixed_pool_point():
    nodes = [{"name": "h100", "gpu": "h100-sxm", "count": 2, "replicas": 2}]
    ctx = context(nodes, time_limit=60)
    _, _, points = grid_points(ctx)
    ((plain, pooled),) = points.values()
    assert (plain.n_prompt, plain.n_token) == (1, 1) and pooled is None

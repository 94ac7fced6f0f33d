"""``hexgen``: replicas of asymmetric TP/PP pipelines found by evolutionary search (HexGen, ICML 2024).

HexGen's scheduler has two levels, and so does this strategy:

1. **Grouping (evolutionary search, seeded).** The cluster's GPUs are cut into *units* (a node, or
   half of a node with four or more GPUs). A genome assigns every unit to a replica group or leaves it
   unused. The first genomes are one group per node, per zone, per vendor, all in one, every unit
   alone; the rest are random. Mutations move a unit to another group (or a new one, or out), rejoin
   a node's units, merge two groups, split one, or swap two units; tournament selection with elitism
   keeps the best genomes, until the generations or the search time run out or the best stalls.
   Fitness is what HexGen maximises: the request rate the whole fleet serves within the deadline,
   i.e. the sum of the groups' analytic capacities (requests/s within the SLOs for goodput, without
   them for throughput), since requests are dispatched to the groups in proportion to those
   capacities; genomes over the budget drop units (a seeded choice) until they fit; for cost and
   power, the cheapest grouping that carries the workload's rate.
2. **Asymmetric parallelism per group.** A group's nodes are ordered by zone (so slow cross-zone links
   are crossed as few times as possible) and speed; every node's GPUs form one or more pipeline
   stages of one TP degree (each node may pick its own degree). Layers go to stages so that the slowest
   stage is as fast as possible, within each stage's memory at 16 bits (HexGen's cost model; the
   bottleneck split is found exactly by bisection on the stage time). Each TP combination (fewest
   stages first, at most ``MAX_TP_COMBOS``) is priced with the planner's capacity model over the real
   links, and the best one is the group's pipeline.

16-bit weights only; every replica is a colocated (mixed) instance: no prefill/decode disaggregation.
A group never spans vendors. Requests are routed to the replicas with weights equal to their capacities
(HexGen's dispatch in proportion to each group's serving capacity).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from ..costmodel.roofline import ServerShape
from ..errors import HetserveError
from ..plan import PlanFile, RoutingPlan
from ..planner.evaluate import OBJECTIVES
from ..planner.pools import tp_choices, weight_room
from ..planner.strategy import PlanWriter, Spot, Strategy, StrategyContext, estimate, spot

POPULATION = 24
GENERATIONS = 200
STALL = 40  # generations without a better genome before the search stops
TOURNAMENT = 3
ELITE = 2
MAX_TP_COMBOS = 24
SEARCH_SHARE = 0.6  # of the time limit spent evolving


@dataclass(frozen=True)
class Unit:
    node: str
    gpus: tuple[int, ...]


@dataclass
class Group:
    spots: list[Spot]
    rate: float  # requests/s for the objective
    price: float
    idle_w: float


def units_of(ctx: StrategyContext) -> list[Unit]:
    out = []
    for n in ctx.cluster.nodes.values():
        size = n.count // 2 if n.count >= 4 and n.count % 2 == 0 else n.count
        for k in range(n.count // size):
            out.append(Unit(n.name, tuple(range(k * size, (k + 1) * size))))
    return out


class GroupPlanner:
    """Best asymmetric pipeline for a set of units (cached by the set)."""

    def __init__(self, ctx: StrategyContext):
        self.ctx = ctx
        self.cache: dict[tuple, Group | None] = {}
        m = ctx.model
        self.layer_bytes = m.layer_weight_bytes(16)
        p, o = ctx.prompt, ctx.output
        self.batch = 16
        ctxlen = p + o / 2
        # a mixed step: one decode step of the batch plus its share of the prompts' prefill
        self.step = (
            self.batch + self.batch * p / o,
            self.batch,
            self.batch * (ctxlen + 1) + self.batch / o * p * (p + 1) / 2,
            self.batch * (ctxlen + 1) + self.batch / o * p,
        )

    def group(self, units: tuple[Unit, ...]) -> Group | None:
        key = tuple(sorted((u.node, u.gpus) for u in units))
        if key not in self.cache:
            self.cache[key] = self._plan(units)
        return self.cache[key]

    def _plan(self, units) -> Group | None:
        ctx = self.ctx
        nodes = ctx.cluster.nodes
        if len({nodes[u.node].gpu.vendor for u in units}) > 1:
            return None
        per_node: dict[str, list[int]] = {}
        for u in units:
            per_node.setdefault(u.node, []).extend(u.gpus)
        order = sorted(per_node, key=lambda n: (nodes[n].zone, -nodes[n].gpu.memory_bw_gb_per_s, n))
        options = []
        for n in order:
            options.append(tp_choices(len(per_node[n]), ctx.model)[::-1][:3])
        best = None
        combos = itertools.islice(itertools.product(*options), 20 * MAX_TP_COMBOS)
        # fewest stages (highest TP) first, so that every node's degree varies, not only the last nodes'
        combos = sorted(combos, key=lambda c: (sum(len(per_node[n]) // t for n, t in zip(order, c)), c[::-1]))
        for combo in combos[:MAX_TP_COMBOS]:
            stages = []
            for n, tp in zip(order, combo):
                gpus = sorted(per_node[n])
                for k in range(len(gpus) // tp):
                    stages.append((n, tuple(gpus[k * tp : (k + 1) * tp])))
            if len(stages) > ctx.model.num_layers:
                continue
            spans = self._split(stages)
            if spans is None:
                continue
            spots = [spot(n, g, a, b, 16) for (n, g), (a, b) in zip(stages, spans)]
            rate = self._rate(spots)
            if rate > 0 and (best is None or rate > best.rate):
                best = Group(
                    spots,
                    rate,
                    sum(nodes[s.node].gpu.price_per_hour * s.tp for s in spots),
                    sum(nodes[s.node].gpu.idle_watts * s.tp for s in spots),
                )
        return best

    def _rate(self, spots: list[Spot]) -> float:
        """The pipeline's capacity (requests/s) for the objective: within the SLOs, except for throughput."""
        objective = "throughput" if self.ctx.objective == "throughput" else "goodput"
        return estimate(self.ctx, "mixed", spots, micro_batches=len(spots)).rate(objective)

    def _split(self, stages) -> list[tuple[int, int]] | None:
        """Contiguous layer counts minimising the slowest stage, within each stage's memory."""
        ctx, L = self.ctx, self.ctx.model.num_layers
        S = len(stages)
        cost, cap, extra = [], [], []
        long = ctx.long_request if ctx.max_seqs is not None else 0.0
        for i, (n, gpus) in enumerate(stages):
            gpu, tp = ctx.cluster.nodes[n].gpu, len(gpus)
            first, last = i == 0, i == S - 1
            room = weight_room(ctx.cost_model, gpu, tp, first, last, "mixed", S, ctx.max_seqs, long)
            cap.append(int(room // self.layer_bytes) if room > 0 else 0)
            one = ctx.cost_model.timer(ServerShape(gpu, tp, (16,), first=False, last=False)).time(*self.step)
            cost.append(one)
            extra.append(
                ctx.cost_model.timer(ServerShape(gpu, tp, (), first=False, last=last)).time(*self.step)
                if last
                else 0.0
            )
        if min(cap) < 1 or sum(cap) < L:
            return None

        def most(T):
            return [min(cap[s], int((T - extra[s]) / cost[s] + 1e-9)) for s in range(S)]

        lo, hi = 0.0, max(cap[s] * cost[s] + extra[s] for s in range(S))
        for _ in range(50):
            mid = (lo + hi) / 2
            n = most(mid)
            if min(n) >= 1 and sum(n) >= L:
                hi = mid
            else:
                lo = mid
        counts = most(hi)
        excess = sum(counts) - L
        while excess > 0:  # give back layers where a stage has the most slack
            s = max((s for s in range(S) if counts[s] > 1), key=lambda s: (counts[s] * cost[s], s))
            counts[s] -= 1
            excess -= 1
        spans, start = [], 0
        for c in counts:
            spans.append((start, start + c))
            start += c
        return spans


class HexGen(Strategy):
    name = "hexgen"
    summary = (
        "replicas of asymmetric TP/PP pipelines over mixed GPUs by evolutionary search; 16-bit; no P/D split"
    )

    def plan(self, ctx: StrategyContext) -> PlanFile:
        if not ctx.model.num_layers:
            raise HetserveError("hexgen: the model has no layers")
        units = units_of(ctx)
        gp = GroupPlanner(ctx)
        rng = random.Random(ctx.seed)
        deadline = ctx.elapsed() + max(2.0, ctx.time_limit * SEARCH_SHARE)

        def groups_of(genome):
            out: dict[int, list[Unit]] = {}
            for u, g in zip(units, genome):
                if g >= 0:
                    out.setdefault(g, []).append(u)
            return [tuple(v) for v in out.values()]

        def fitness(genome) -> float:
            gs = [gp.group(g) for g in groups_of(genome)]
            good = [g for g in gs if g is not None]
            rate = sum(g.rate for g in good)
            # units in a group that yields nothing are paid for nothing: count them in the price
            price = sum(
                ctx.cluster.nodes[u.node].gpu.price_per_hour * len(u.gpus)
                for u, g in zip(units, genome)
                if g >= 0
            )
            idle = sum(g.idle_w for g in good)
            if OBJECTIVES[ctx.objective].sense == "max":
                over = max(0.0, price - ctx.budget) if ctx.budget is not None else 0.0
                return rate - 1e-6 * price - (1e3 * (1 + over) if over > 0 else 0.0)
            if rate < ctx.rate:
                return -1e9 + rate
            return -(price if ctx.objective == "cost" else idle)

        unit_price = [ctx.cluster.nodes[u.node].gpu.price_per_hour * len(u.gpus) for u in units]

        def within_budget(genome):
            """Leave units out (seeded choice) until the genome's GPUs fit the budget."""
            g = list(genome)
            if ctx.budget is None:
                return g
            used = [i for i, x in enumerate(g) if x >= 0]
            rng.shuffle(used)
            while used and sum(unit_price[i] for i, x in enumerate(g) if x >= 0) > ctx.budget + 1e-9:
                g[used.pop()] = -1
            return g

        population = [within_budget(self._seed_genome(units, rng, k, ctx)) for k in range(POPULATION)]
        scored = sorted(((fitness(g), g) for g in population), key=lambda x: -x[0])
        stall = 0
        for _ in range(GENERATIONS):
            if ctx.elapsed() > deadline or stall >= STALL:
                break
            top = scored[0][0]
            nxt = [g for _, g in scored[:ELITE]]
            while len(nxt) < POPULATION:
                parent = max(rng.sample(scored, min(TOURNAMENT, len(scored))), key=lambda x: x[0])[1]
                nxt.append(within_budget(self._mutate(parent, rng, units)))
            scored = sorted(((fitness(g), g) for g in nxt), key=lambda x: -x[0])
            stall = stall + 1 if scored[0][0] <= top + 1e-9 else 0
        best = scored[0][1]
        groups = [gp.group(g) for g in groups_of(best)]
        groups = [g for g in groups if g is not None]
        if not groups:
            raise HetserveError(
                f"hexgen: no group of GPUs in {ctx.cluster.name} holds {ctx.model.name} at 16 bits "
                "(HexGen does not quantise); add GPUs or use a smaller model"
            )
        groups = sorted(groups, key=lambda g: -g.rate)
        writer = PlanWriter(ctx, f"hexgen-{ctx.model.name}")
        weights = {}
        for i, g in enumerate(groups):
            weights[writer.instance(f"replica-{i}", "mixed", g.spots, micro_batches=len(g.spots))] = max(
                round(g.rate, 4), 1e-4
            )
        desc = "; ".join(
            " -> ".join(f"{ctx.cluster.nodes[s.node].gpu.name} TP{s.tp} x{s.layers}L" for s in g.spots)
            + f" ({g.rate:.2f} req/s)"
            for g in groups
        )
        routing = RoutingPlan(policy="weighted", weights=weights) if len(groups) > 1 else RoutingPlan()
        return writer.plan(
            routing,
            notes=f"HexGen baseline: {len(groups)} replicas, requests dispatched in "
            f"proportion to their capacities: {desc}.",
        )

    @staticmethod
    def _seed_genome(units: list[Unit], rng: random.Random, k: int, ctx: StrategyContext) -> list[int]:
        """Initial genomes: one group per node, per zone, per vendor, everything in one group, every unit
        alone, and random cuts."""
        nodes = ctx.cluster.nodes
        keys = {0: lambda u: u.node, 1: lambda u: nodes[u.node].zone, 2: lambda u: nodes[u.node].gpu.vendor}
        if k in keys:
            labels = sorted({str(keys[k](u)) for u in units})
            return [labels.index(str(keys[k](u))) for u in units]
        if k == 3:
            return [0] * len(units)
        if k == 4:
            return list(range(len(units)))
        groups = rng.randint(1, max(1, len(units)))
        return [rng.randrange(groups) for _ in units]

    @staticmethod
    def _mutate(genome: list[int], rng: random.Random, units: list[Unit]) -> list[int]:
        g = list(genome)
        used = sorted({x for x in g if x >= 0})
        new_id = (max(used) + 1) if used else 0
        kind = rng.random()
        i = rng.randrange(len(g))
        if kind < 0.3:  # move a unit
            g[i] = rng.choice(used + [new_id, -1]) if used else new_id
        elif kind < 0.4:  # rejoin the unit's node: its other units follow it
            for j, u in enumerate(units):
                if u.node == units[i].node:
                    g[j] = g[i]
        elif kind < 0.55 and len(used) >= 2:  # merge two groups
            a, b = rng.sample(used, 2)
            g = [a if x == b else x for x in g]
        elif kind < 0.75 and used:  # split a group
            a = rng.choice(used)
            members = [j for j, x in enumerate(g) if x == a]
            if len(members) >= 2:
                for j in rng.sample(members, len(members) // 2):
                    g[j] = new_id
        else:  # swap two units' groups
            j = rng.randrange(len(g))
            g[i], g[j] = g[j], g[i]
        return g

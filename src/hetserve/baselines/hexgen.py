"""``hexgen``: replicas of asymmetric TP/PP pipelines found by evolutionary search (HexGen, ICML 2024).

HexGen's scheduler has two levels, and so does this strategy:

1. **Grouping (evolutionary search, seeded, on HexGen's schedule).** The cluster's GPUs are cut into
   *units* (a node, or half of a node with four or more GPUs). A genome assigns every unit to a replica
   group or leaves it unused. The search follows HexGen's released optimizer
   (``experimental/optimizer/genetic_algorithm.py``): it starts from one genome, one group per zone
   (HexGen: one group per sub-group of its fleet); each generation makes ``OFFSPRING`` mutated copies of
   survivors drawn at random and keeps ``SURVIVORS`` of the offspring (the parents are dropped) by
   tournaments of ``TOURNAMENT``, where a genome that leaves out a unit the budget could pay for loses to
   one that does not (HexGen: every GPU in a group; as released, its validity check never passes, so its
   survivors are offspring drawn at random: ours are ranked by fitness, as its code intends). Mutations
   move a unit to another group (or a new one, or out), rejoin a node's units, merge two groups, split
   one, or swap two units, and are drawn again (at most ``REDRAWS`` times) until every group holds a
   pipeline in memory; genomes over the budget drop units (a seeded choice) until they fit. Fitness is
   HexGen's two-speed one. On ordinary generations: none when a group holds no pipeline in memory, else
   the number of groups, more is better (HexGen minimises 1 / the number of groups). On every
   ``SIMULATE_EVERY``-th generation from ``SIMULATE_FROM``: each offspring's plan simulated (``trial``)
   at its analytic rate, scored for the objective (HexGen: goodput from its simulator). The answer is the
   best simulated genome. The budget is ``GENERATIONS`` generations, not time, so the plan is the same on
   any machine; the time limit only cuts a search that overruns it (the plan's notes say so). For cost
   and power, objectives HexGen does not have, the ordinary generations rank by the cheapest grouping
   whose analytic capacity carries the workload's rate, and every unit may stay out.
2. **Asymmetric parallelism per group.** A group's nodes are ordered by zone (so slow cross-zone links
   are crossed as few times as possible) and speed; every node's GPUs form one or more pipeline
   stages of one TP degree (each node may pick its own degree). Layers go to stages so that the slowest
   stage is as fast as possible, within each stage's memory at 16 bits (HexGen's cost model; the
   bottleneck split is found exactly by bisection on the stage time). Each TP combination (fewest
   stages first, at most ``MAX_TP_COMBOS``) is priced with the planner's capacity model over the real
   links, and the best one is the group's pipeline. A group whose pipelines fit but serve nothing within
   the SLOs stays a group, at rate 0 (HexGen refuses a group for memory only).

16-bit weights only; every replica is a colocated (mixed) instance: no prefill/decode disaggregation.
A group never spans vendors. Requests are routed to the replicas with weights equal to their capacities
(HexGen's dispatch in proportion to each group's serving capacity).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from ..costmodel.roofline import ServerShape
from ..errors import HetserveError, OutOfTime
from ..plan import PlanFile, RoutingPlan
from ..planner.evaluate import OBJECTIVES
from ..planner.pools import tp_choices, weight_room
from ..planner.strategy import PlanWriter, Spot, Strategy, StrategyContext, estimate, spot, trial

#: HexGen's released optimizer (``experimental/optimizer/genetic_algorithm.py``) runs 300 generations; each
#: makes 10 offspring by mutation (``algorithms.varOr``, ``lambda_=10``, ``mutpb=1``) and keeps 3 of them
#: by tournaments of 3 (``selValidTournament``). It simulates every offspring on every 10th generation from
#: the 100th (20 generations); ours simulate on every 50th (4 generations, at most 40 trials), so that a
#: scenario plans in seconds.
GENERATIONS = 300
OFFSPRING = 10
SURVIVORS = 3
TOURNAMENT = 3
SIMULATE_FROM = 100
SIMULATE_EVERY = 50
REDRAWS = 20
MAX_TP_COMBOS = 24


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
    """Best asymmetric pipeline for a set of units, and whether any fits in memory (cached by the set)."""

    def __init__(self, ctx: StrategyContext):
        self.ctx = ctx
        self.cache: dict[tuple, Group | None] = {}
        self.fit_cache: dict[tuple, bool] = {}
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

    @staticmethod
    def key(units: tuple[Unit, ...]) -> tuple:
        return tuple(sorted((u.node, u.gpus) for u in units))

    def fits(self, units: tuple[Unit, ...]) -> bool:
        """Whether some pipeline over ``units`` fits in memory (HexGen refuses a group for memory only)."""
        key = self.key(units)
        if key not in self.fit_cache:
            self.fit_cache[key] = (
                self.cache[key] is not None
                if key in self.cache
                else next(self._pipelines(units), None) is not None
            )
        return self.fit_cache[key]

    def group(self, units: tuple[Unit, ...]) -> Group | None:
        """The pipeline with the highest capacity for the objective among those that fit (None: none fits).
        A pipeline that fits but serves nothing within the SLOs is still a group, at rate 0."""
        key = self.key(units)
        if key not in self.cache:
            objective = "throughput" if self.ctx.objective == "throughput" else "goodput"
            nodes = self.ctx.cluster.nodes
            best = None
            for spots, est in self._pipelines(units):
                rate = est.rate(objective)
                if best is None or rate > best.rate:
                    best = Group(
                        spots,
                        rate,
                        sum(nodes[s.node].gpu.price_per_hour * s.tp for s in spots),
                        sum(nodes[s.node].gpu.idle_watts * s.tp for s in spots),
                    )
            self.cache[key] = best
        return self.cache[key]

    def _pipelines(self, units):
        """Every TP combination's pipeline over ``units`` that fits, with its estimate, fewest stages first."""
        ctx = self.ctx
        nodes = ctx.cluster.nodes
        if len({nodes[u.node].gpu.vendor for u in units}) > 1:
            return
        per_node: dict[str, list[int]] = {}
        for u in units:
            per_node.setdefault(u.node, []).extend(u.gpus)
        order = sorted(per_node, key=lambda n: (nodes[n].zone, -nodes[n].gpu.memory_bw_gb_per_s, n))
        options = []
        for n in order:
            options.append(tp_choices(len(per_node[n]), ctx.model)[::-1][:3])
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
            est = estimate(ctx, "mixed", spots, micro_batches=len(spots))
            if est.fits:
                yield spots, est

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
        objective = OBJECTIVES[ctx.objective]
        own = objective.sense == "max"  # HexGen's own objectives (goodput, throughput)
        unit_price = [ctx.cluster.nodes[u.node].gpu.price_per_hour * len(u.gpus) for u in units]

        def groups_of(genome) -> list[tuple[Unit, ...]]:
            out: dict[int, list[Unit]] = {}
            for u, g in zip(units, genome):
                if g >= 0:
                    out.setdefault(g, []).append(u)
            return [tuple(v) for v in out.values()]

        def price_of(genome) -> float:
            return sum(p for p, g in zip(unit_price, genome) if g >= 0)

        def within_budget(genome):
            """Leave units out (seeded choice) until the genome's GPUs fit the budget."""
            g = list(genome)
            if ctx.budget is None:
                return g
            used = [i for i, x in enumerate(g) if x >= 0]
            rng.shuffle(used)
            while used and price_of(g) > ctx.budget + 1e-9:
                g[used.pop()] = -1
            return g

        def offspring_of(parent):
            """A mutated copy of ``parent``, drawn again (at most ``REDRAWS`` times) until every group holds a
            pipeline in memory, as HexGen redraws a mutation until its groups are valid (``is_group_valid``:
            enough GPU memory for the model)."""
            for _ in range(REDRAWS):
                child = within_budget(self._mutate(parent, rng, units))
                if all(gp.fits(g) for g in groups_of(child)):
                    break
            return child

        def valid(genome) -> bool:
            """HexGen's validity (every GPU is in a group), within the budget: no unit is left out that the
            budget could still pay for. Cost and power do not ask for every GPU."""
            if not own:
                return True
            room = math.inf if ctx.budget is None else ctx.budget - price_of(genome) + 1e-9
            return all(g >= 0 or p > room for p, g in zip(unit_price, genome))

        def cheap(genome) -> float:
            """HexGen's fitness of an ordinary generation, higher is better: none when a group holds no
            pipeline in memory (HexGen: 1e9 when a group's memory overflows), else the number of groups
            (HexGen minimises 1 / the number of groups). For cost and power, which HexGen does not have:
            the cheapest grouping whose analytic capacity carries the workload's rate."""
            units_by_group = groups_of(genome)
            if not units_by_group or not all(gp.fits(g) for g in units_by_group):
                return -math.inf
            if own:
                return float(len(units_by_group))
            gs = [gp.group(g) for g in units_by_group]
            rate = sum(g.rate for g in gs)
            if rate < ctx.rate:
                return -1e9 + rate
            return -(price_of(genome) if ctx.objective == "cost" else sum(g.idle_w for g in gs))

        simulated_scores: dict[tuple, float] = {}

        def simulated(genome) -> float:
            """HexGen's fitness of a periodic generation: the genome's plan simulated (a trial of
            ``TRIAL_REQUESTS`` requests at its analytic rate, 1.2x for throughput, the workload's rate for
            cost and power), scored for the objective. The same grouping is simulated once."""
            key = tuple(sorted(tuple(i for i, x in enumerate(genome) if x == g) for g in set(genome) - {-1}))
            if key not in simulated_scores:
                gs = [gp.group(g) for g in groups_of(genome)]
                analytic = sum(g.rate for g in gs)
                rate = (
                    analytic * 1.2
                    if ctx.objective == "throughput"
                    else analytic
                    if ctx.objective == "goodput"
                    else ctx.rate
                )
                plan = self._write(ctx, gs)
                simulated_scores[key] = objective.score(trial(ctx, plan, rate), rate)
            return simulated_scores[key]

        survivors = [within_budget(self._start(units, ctx))]
        best_sim: tuple[float, list[int]] | None = None
        best_cheap: tuple[float, list[int]] | None = None
        generations, cut = 0, False
        for gen in range(GENERATIONS):
            if ctx.elapsed() > ctx.time_limit:
                cut = True
                break
            offspring = [offspring_of(rng.choice(survivors)) for _ in range(OFFSPRING)]
            periodic = gen >= SIMULATE_FROM and gen % SIMULATE_EVERY == 0
            scores, ok = [], []
            try:
                for g in offspring:
                    f = cheap(g)
                    if best_cheap is None or f > best_cheap[0]:
                        best_cheap = (f, g)
                    if periodic and f > -math.inf:  # HexGen simulates no genome over memory
                        f = simulated(g)
                        if best_sim is None or f > best_sim[0]:
                            best_sim = (f, g)
                    scores.append(f)
                    ok.append(valid(g))
            except OutOfTime:
                cut = True
                break
            generations = gen + 1
            survivors = []
            for _ in range(SURVIVORS):  # tournaments among the offspring, valid aspirants first
                aspirants = [rng.randrange(len(offspring)) for _ in range(TOURNAMENT)]
                good = [i for i in aspirants if ok[i]]
                pick = max(good, key=lambda i: scores[i]) if good else rng.randrange(len(offspring))
                survivors.append(offspring[pick])
        # the best simulated genome (every simulated genome fits); else the best by the ordinary fitness
        chosen = (
            best_sim[1] if best_sim else best_cheap[1] if best_cheap and best_cheap[0] > -math.inf else None
        )
        groups = [gp.group(g) for g in groups_of(chosen)] if chosen is not None else []
        if not groups:
            raise HetserveError(
                f"hexgen: no group of GPUs in {ctx.cluster.name} holds {ctx.model.name} at 16 bits "
                "(HexGen does not quantise); add GPUs or use a smaller model"
            )
        how = (
            f"search cut by the time limit after {generations} of {GENERATIONS} generations"
            if cut
            else f"{generations} generations"
        )
        how += f", {len(simulated_scores)} groupings simulated"
        if best_sim is None:
            how += "; none simulated, so the grouping with the most groups"
        return self._write(ctx, groups, how)

    @staticmethod
    def _write(ctx: StrategyContext, groups: list[Group], how: str = "") -> PlanFile:
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
            notes=f"HexGen baseline ({how}): {len(groups)} replicas, requests dispatched in "
            f"proportion to their capacities: {desc}.",
        )

    @staticmethod
    def _start(units: list[Unit], ctx: StrategyContext) -> list[int]:
        """HexGen's first genome: one group per zone (its fleet's sub-groups)."""
        zones = sorted({ctx.cluster.nodes[u.node].zone for u in units}, key=str)
        return [zones.index(ctx.cluster.nodes[u.node].zone) for u in units]

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

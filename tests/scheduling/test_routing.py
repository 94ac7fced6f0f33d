"""Routing policies over plain candidate lists and over load-indexed pools."""

from __future__ import annotations

import random

import pytest

from hetserve.scheduling import Sequence
from hetserve.scheduling.instance import InstanceConfig, InstanceState, Lane, WorkEstimate
from hetserve.scheduling.routing import LeastWork, Pool, _rank

EST = WorkEstimate(prefill_s_per_token=0.001, decode_s_per_token=0.01, speed=2.0)


def instance(
    name: str, role: str = "mixed", blocks: int = 40, est: WorkEstimate = EST, **kw
) -> InstanceState:
    base = dict(
        name=name,
        role=role,
        lanes=1,
        max_batch_size=8,
        max_batch_tokens=256,
        chunk_size=None,
        policy="decode-first",
        block_size=16,
    )
    base.update(kw)
    return InstanceState(InstanceConfig(**base), est, blocks, Lane)


def run_to_completion(inst: InstanceState) -> None:
    for lane in inst.lanes:
        while lane.scheduler.has_unfinished():
            inst.complete(lane, inst.schedule(lane))


@pytest.mark.parametrize("indexed", [False, True])
def test_identical_idle_instances_take_requests_in_turn(indexed):
    """Each request finds every instance idle (equal work): the ties rotate instead of all going to
    the first instance."""
    insts = [instance(f"i{k}") for k in range(5)]
    cands = Pool(insts) if indexed else insts
    policy = LeastWork()
    taken = {i.name: 0 for i in insts}
    for r in range(100):
        inst = policy.choose(cands)
        taken[inst.name] += 1
        inst.add(Sequence(r, 20, 3))
        run_to_completion(inst)
    assert taken == {f"i{k}": 20 for k in range(5)}


def test_ties_go_to_the_least_recently_chosen_then_the_first():
    insts = [instance(f"i{k}") for k in range(3)]
    pool = Pool(insts)
    policy = LeastWork()
    assert [policy.choose(pool).name for _ in range(4)] == ["i0", "i1", "i2", "i0"]
    insts[2].add(Sequence(0, 10, 2))  # i2 now has more work: i1 then i0 (least recent first)
    assert [policy.choose(pool).name for _ in range(2)] == ["i1", "i0"]


def test_less_work_and_then_more_speed_win_over_recency():
    fast = WorkEstimate(prefill_s_per_token=0.001, decode_s_per_token=0.01, speed=3.0)
    slow, quick = instance("slow"), instance("quick", est=fast)
    pool = Pool([slow, quick])
    policy = LeastWork()
    assert [policy.choose(pool).name for _ in range(3)] == ["quick"] * 3  # equal work: the faster
    quick.add(Sequence(0, 10, 2))
    assert policy.choose(pool) is slow


def random_changes(insts, pools, rng: random.Random, decisions: int, check) -> None:
    """Drive ``insts`` through a random sequence of load changes (admissions, steps with their
    completions and preemptions, aborts, hand-offs to decode instances, failures) and call ``check``
    before each of ``decisions`` routing decisions."""
    seq_id = 0
    placed: dict[int, tuple[InstanceState, Lane]] = {}
    entry, decode = pools
    for _ in range(decisions):
        for _ in range(rng.randint(0, 3)):
            kind = rng.random()
            inst = rng.choice(insts)
            if kind < 0.55:  # a step of one lane: prefill, decode, completions, maybe preemptions
                lane = rng.choice(inst.lanes)
                for seq in inst.complete(lane, inst.schedule(lane)):
                    placed.pop(seq.seq_id, None)
                    if inst.role == "prefill" and len(decode):  # hand the sequence's KV to a decode instance
                        dec = LeastWork().choose(decode)
                        d = Sequence(seq_id, seq.prompt_len, 1 + rng.randint(1, 40))
                        d.num_output_tokens = 1
                        d.num_transferred_tokens = seq.prompt_len
                        placed[seq_id] = (dec, dec.add(d))
                        seq_id += 1
            elif kind < 0.65 and placed:  # an abort
                sid = rng.choice(sorted(placed))
                owner, lane = placed.pop(sid)
                owner.abort(sid)
            elif kind < 0.67 and len(entry) > 2 and inst in entry:  # a failure
                entry.remove(inst)
        check()
        target = LeastWork().choose(entry)
        seq = Sequence(seq_id, rng.randint(1, 120), 1 if target.role == "prefill" else rng.randint(1, 60))
        placed[seq_id] = (target, target.add(seq))
        seq_id += 1


@pytest.mark.parametrize("seed", range(4))
def test_the_pool_chooses_what_a_scan_of_every_instance_chooses(seed):
    """Over random admissions, steps, completions, preemptions (small KV caches), aborts, hand-offs and
    failures, the indexed pool's choice is always the scan's: least work (a prefill instance's includes
    its decode pool's least), then speed, then least recently chosen, then the first."""
    rng = random.Random(seed)
    speeds = [1.0, 2.0, 2.0, 3.0]
    entry_insts = [
        instance(
            f"e{k}",
            role="prefill" if k % 3 == 0 else "mixed",
            blocks=rng.choice([24, 40]),
            lanes=rng.choice([1, 2]),
            est=WorkEstimate(0.001 * (1 + k % 2), 0.01, rng.choice(speeds)),
        )
        for k in range(12)
    ]
    decoders = [instance(f"d{k}", role="decode", blocks=rng.choice([12, 30])) for k in range(4)]
    entry, decode = Pool(entry_insts), Pool(decoders)
    for p in entry_insts:
        if p.role == "prefill":
            p.downstream = decode
    checked = 0

    def check():
        nonlocal checked
        for pool in (entry, decode):
            assert pool.least() is min(list(pool), key=_rank)
        checked += 1

    random_changes(entry_insts + decoders, (entry, decode), rng, 400, check)
    assert checked == 400
    assert len(entry) < len(entry_insts) or seed  # failures happen (at least for seed 0)
    assert sum(ln.scheduler.stats.preemptions for i in entry_insts + decoders for ln in i.lanes) > 0


def examined_per_decision(n: int, decisions: int = 300) -> float:
    rng = random.Random(n)
    insts = [instance(f"i{k}", blocks=200, max_batch_size=64, max_batch_tokens=4096) for k in range(n)]
    pool = Pool(insts)
    pool.least()  # the first read looks at every member once
    start = pool.examined
    random_changes(insts, (pool, Pool([])), rng, decisions, lambda: None)
    return (pool.examined - start) / decisions


def test_a_decision_examines_a_number_of_instances_that_grows_like_log_n():
    """With the same load changes per decision, 16x the instances costs a few more heap levels, not
    16x the instances examined (a scan examines all n)."""
    small, large = examined_per_decision(16), examined_per_decision(256)
    assert small < 16
    assert large < 3 * small
    assert large < 256 / 8


class Falling(InstanceState):
    """An instance that says its work may fall by up to ``most`` seconds with time alone."""

    most = 0.0

    def work_drop_bound(self):
        return (self.most / 2, 1.0, self.most)


def test_a_pool_without_a_clock_orders_members_whose_work_may_fall():
    """Without a clock (``now`` infinite) such members are keyed by their floor, which does not fall:
    every decision picks what a scan picks and reads a few of the 16 members, not all of them (an
    infinite time in a falling bound made every bound undefined, and every member was read)."""
    insts = [
        Falling(InstanceConfig(f"i{k}", "mixed", 1, 8, 256, None, "decode-first", 16), EST, 40, Lane)
        for k in range(16)
    ]
    rng = random.Random(3)
    pool = Pool(insts)
    pool.least()  # the first decision reads every member
    start = pool.reads
    for r in range(200):
        for inst in insts:
            inst.most = rng.uniform(0.0, 0.05) * inst.own_work()
        picked = pool.least()
        assert picked is min(insts, key=_rank)
        picked.add(Sequence(r, rng.randint(5, 200), rng.randint(1, 50)))
    assert (pool.reads - start) / 200 < 8


def test_members_that_change_while_idle_ones_take_the_arrivals_are_not_read():
    """Every busy instance runs a step before each decision (its work changes), while idle ones take
    the arrivals: the least recently chosen idle instance wins, and a busy one (chosen more recently,
    so it loses the tie even at no work) is not read at its changes. The pool picks what a scan picks
    and reads about one member per decision; reading every changed member would be about seven."""
    insts = [instance(f"i{k}", blocks=400, max_batch_size=16, max_batch_tokens=2048) for k in range(32)]
    rng = random.Random(5)
    pool = Pool(insts)
    policy = LeastWork()
    pool.least()  # the first decision reads a member
    start, steps, decisions = pool.reads, 0, 300
    for r in range(decisions):
        for inst in [i for i in insts if i.requests]:
            inst.complete(inst.lanes[0], inst.schedule(inst.lanes[0]))
            steps += 1
        expect = min(insts, key=_rank)
        picked = policy.choose(pool)
        assert picked is expect
        picked.add(Sequence(r, rng.randint(10, 200), rng.randint(2, 12)))
    assert steps / decisions > 5
    assert (pool.reads - start) / decisions < 3  # a member and its group's offset


class Draining:
    """A pool member whose work falls steadily with the clock down to a floor (a run of decode steps)
    and whose work, fall rate and floor change only when it tells its pools."""

    def __init__(self, name: str, speed: float, clock: list[float]):
        self.name, self.speed, self.clock = name, speed, clock
        self.last_chosen, self.pools, self.downstream = -1, [], None
        self.set(0.0, 0.0, 0.0)

    def set(self, work: float, rate: float, floor: float) -> None:
        self.t0, self.w0, self.rate, self.floor = self.clock[0], work, rate, min(floor, work)
        for pool in self.pools:
            pool.mark(self)

    def own_work(self) -> float:
        return max(self.floor, self.w0 - self.rate * (self.clock[0] - self.t0))

    def outstanding_work(self) -> float:
        return self.own_work()

    def has_free_slot(self) -> bool:
        return True

    def work_drop_bound(self) -> tuple[float, float, float]:
        return (0.0, self.rate, self.own_work() - self.floor)

    def work_view(self) -> tuple[float, tuple[float, float, float]]:
        return self.own_work(), self.work_drop_bound()


@pytest.mark.parametrize("seed", range(3))
def test_the_pool_chooses_what_a_scan_chooses_while_work_drains_with_the_clock(seed):
    """Members whose work falls with the clock (some to nothing, some to a floor, at several rates),
    changed at random, chosen and given work, through phases with idle members (ties at no work, broken
    by speed and recency without reading the busy) and without: the pool's choice is the scan's."""
    rng = random.Random(seed)
    clock = [0.0]
    members = [Draining(f"m{k}", rng.choice([1.0, 1.0, 2.0]), clock) for k in range(24)]
    pool = Pool(members, clock)
    policy = LeastWork()
    idle_ties = all_busy = 0
    for r in range(800):
        clock[0] += rng.expovariate(8.0 if (r // 200) % 2 else 30.0)
        for m in rng.sample(members, 6):
            work = m.own_work()
            if work > 0.0:
                m.set(
                    work * rng.uniform(0.6, 1.1),
                    rng.choice([0.0, 0.3, 1.0, 2.5]),
                    rng.choice([0.0, 0.2 * work]),
                )
        idle = sum(m.own_work() == 0.0 for m in members)
        idle_ties += idle > 1
        all_busy += idle == 0
        expect = min(members, key=_rank)
        picked = policy.choose(pool)
        assert picked is expect
        picked.set(
            picked.own_work() + rng.uniform(0.5, 4.0),
            rng.choice([0.0, 0.5, 1.0, 3.0]),
            rng.choice([0.0, 0.5]),
        )
    assert idle_ties > 100 and all_busy > 100

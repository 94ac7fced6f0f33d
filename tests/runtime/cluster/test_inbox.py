"""The worker's inbox: commands in order, each step's input received ahead and marked when it is here,
nothing received on groups a ``Regroup`` retires, and failures handed to the worker."""

from __future__ import annotations

import queue
import threading

import pytest

torch = pytest.importorskip("torch")

from hetserve.runtime.cluster.channel import KVInstall, Ping, Regroup, Shutdown, Step  # noqa: E402
from hetserve.runtime.cluster.inbox import Arrival, Inbox, joining  # noqa: E402

WAIT = 10.0  # seconds any one event of these tests may take


class PendingReceive:
    """A receive that completes when the test says so (or fails, like a receive from a dead peer)."""

    def __init__(self):
        self.done = threading.Event()
        self.fail: BaseException | None = None

    def wait(self):
        assert self.done.wait(WAIT)
        if self.fail is not None:
            raise self.fail


class Driver:
    """The commands the inbox receives, and the receives it posts for steps of later stages."""

    def __init__(self):
        self.commands: queue.Queue = queue.Queue()
        self.receives: dict[str, PendingReceive] = {}
        self.calls = 0

    def receive(self):
        self.calls += 1
        item = self.commands.get(timeout=WAIT)
        if isinstance(item, BaseException):
            raise item
        return item

    def post_input(self, step: Step):
        if step.instance == "first-stage":
            return None
        self.receives[step.instance] = PendingReceive()
        return torch.empty(len(step.ids), 4), self.receives[step.instance]


def step(name: str, tokens: int = 1) -> Step:
    return Step(name, torch.zeros(tokens, dtype=torch.long), torch.zeros(tokens, dtype=torch.long), None, [])


def wait_until(condition) -> None:
    done = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached")


def test_steps_come_in_order_and_are_ready_once_their_input_arrived():
    d = Driver()
    inbox = Inbox(d.receive, d.post_input)
    for cmd in (step("first-stage", 3), Ping(), step("a"), step("b", 2)):
        d.commands.put(cmd)
    head = inbox.next()
    assert head.command.instance == "first-stage" and head.ready.is_set()  # its input is its token ids
    wait_until(lambda: len(inbox.waiting()) == 2)  # the ping is not a command for the worker
    a, b = inbox.waiting()
    assert [a.command.instance, b.command.instance] == ["a", "b"]
    assert not a.ready.is_set() and not b.ready.is_set()
    assert a.hidden.shape == (1, 4) and b.hidden.shape == (2, 4)
    d.receives["a"].done.set()
    assert a.ready.wait(WAIT) and not b.ready.is_set()
    d.receives["b"].done.set()
    assert b.ready.wait(WAIT)
    assert inbox.take(2) == [a, b]  # looking did not take them
    assert inbox.waiting() == []


def test_nothing_is_received_after_a_regroup_until_the_worker_resumes():
    d = Driver()
    inbox = Inbox(d.receive, d.post_input)
    d.commands.put(Regroup(1))
    d.commands.put(step("first-stage"))
    assert isinstance(inbox.next().command, Regroup)
    threading.Event().wait(0.2)
    assert d.calls == 1 and inbox.waiting() == []  # the next command waits for the new groups
    inbox.resume()
    assert inbox.next().command.instance == "first-stage"
    assert d.calls >= 2


def test_failures_reach_the_worker():
    d = Driver()
    inbox = Inbox(d.receive, d.post_input)
    d.commands.put(step("a"))
    d.commands.put(RuntimeError("connection closed"))
    a = inbox.next()
    d.receives["a"].fail = RuntimeError("peer gone")
    d.receives["a"].done.set()
    assert a.ready.wait(WAIT) and "peer gone" in str(a.error)
    gone = inbox.next()
    assert gone.command is None and "connection closed" in str(gone.error)


def test_the_receiving_thread_leaves_at_shutdown():
    d = Driver()
    inbox = Inbox(d.receive, d.post_input)
    d.commands.put(Shutdown())
    assert isinstance(inbox.next().command, Shutdown)
    threading.Event().wait(0.2)
    assert d.calls == 1


def arrived(command, ready: bool = True, error: BaseException | None = None) -> Arrival:
    a = Arrival(command, error=error)
    if ready:
        a.ready.set()
    return a


def names(run: list[Arrival]) -> list[str]:
    return [a.command.instance for a in run]


def test_the_steps_waiting_behind_a_step_join_it_in_order_within_the_budget():
    same_layers = lambda a, b: not b.instance.startswith("other")
    head = arrived(step("a", 4))
    waiting = [arrived(step("a", 1)), arrived(step("b", 2)), arrived(step("a", 1))]
    assert names(joining(head, waiting, 8, same_layers)) == ["a", "b", "a"]
    assert names(joining(head, waiting, 7, same_layers)) == ["a", "b"]  # 4 + 1 + 2 + 1 > 7
    assert joining(head, waiting, 4, same_layers) == []  # the head alone fills the budget
    # each of these ends the run where it stands, keeping the order of what follows it
    for stop in (
        arrived(step("a", 1), ready=False),  # its input has not arrived
        arrived(step("a", 1), error=RuntimeError("peer gone")),
        arrived(KVInstall("a", 3, [0])),  # a command between steps
        arrived(step("other", 1)),  # different layers here
    ):
        assert names(joining(head, [waiting[0], stop, waiting[2]], 64, same_layers)) == ["a"]

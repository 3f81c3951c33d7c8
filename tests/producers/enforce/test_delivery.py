"""The delivery rules of enforcement (`producers/enforce/delivery.py`), without Kafka.

Examples for each rule, then properties: random sequences of commands, failing and
succeeding backends, duplicates and restarts are run through `Deliveries` against a
simulated world of users and backends, and checked against what the issue asks
(each job acknowledged, latest state wins, acts once, capped backoff, dead after N
failures, the commit point never passing an unfinished record). `CommitPoint` is
checked against a reference model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.core.plans import Action, Command
from quotaflow.producers.enforce.backends import Applied
from quotaflow.producers.enforce.delivery import (
    CommitPoint,
    Deliveries,
    MemoryIds,
    Note,
    RetryPolicy,
    example_command,
)

POLICY = RetryPolicy(base_s=1.0, cap_s=8.0, max_attempts=5)
T0 = datetime(2026, 11, 24, 10, tzinfo=UTC)


def _at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def _acks(deliveries: Deliveries) -> list[tuple[str, str, str]]:
    return [(a.command_id, a.backend, a.outcome) for a in deliveries.drain().acks]


def _succeed_all(deliveries: Deliveries, now: float) -> list[str]:
    applied = []
    for job in deliveries.due(now):
        deliveries.applied(job, Applied("applied"))
        applied.append(job.command.command_id)
    return applied


# --------------------------------------------------------------------------- examples


def test_a_disable_then_an_enable_while_the_node_is_down_ends_enabled() -> None:
    deliveries = Deliveries(POLICY, MemoryIds())
    deliveries.add(example_command("d1", "alice", "disable"), ["xray"], (0, 0), 0.0)
    for now in (0.0, 1.0, 3.0):  # the node is down: three failures
        [job] = deliveries.due(now)
        deliveries.failed(job, "connection refused", now)
    deliveries.add(example_command("e1", "alice", "enable"), ["xray"], (0, 1), 4.0)
    settled = deliveries.drain()
    assert [(a.command_id, a.outcome, a.detail) for a in settled.acks] == [
        ("d1", "skipped", "superseded by e1 (enable)")
    ]
    assert settled.finished == [(0, 0)] and settled.dead == []
    assert _succeed_all(deliveries, 4.0) == ["e1"]
    assert _acks(deliveries) == [("e1", "xray", "applied")]


def test_after_an_outage_each_users_latest_state_is_applied() -> None:
    deliveries = Deliveries(POLICY, MemoryIds())
    history: list[tuple[str, str, Action]] = [
        ("a1", "alice", "disable"), ("b1", "bob", "disable"), ("a2", "alice", "enable"),
        ("a3", "alice", "disable"), ("w1", "bob", "warn"), ("b2", "bob", "enable"),
    ]
    for offset, (cid, user, action) in enumerate(history):
        deliveries.add(example_command(cid, user, action), ["xray", "webhook"], (0, offset), 0.0)
    assert _succeed_all(deliveries, 0.0) == ["a3", "a3", "w1", "w1", "b2", "b2"]
    skipped = {(c, b) for c, b, o in _acks(deliveries) if o == "skipped"}
    assert skipped == {(c, b) for c in ("a1", "b1", "a2") for b in ("xray", "webhook")}


def test_warn_is_never_superseded_and_goes_to_every_serving_backend() -> None:
    deliveries = Deliveries(POLICY, MemoryIds())
    deliveries.add(example_command("w1", "alice", "warn"), ["xray", "webhook"], (0, 0), 0.0)
    deliveries.add(example_command("d1", "alice", "disable"), ["xray", "webhook"], (0, 1), 0.0)
    deliveries.add(example_command("e1", "alice", "enable"), ["xray", "webhook"], (0, 2), 0.0)
    due = [(j.command.command_id, j.backend) for j in deliveries.due(0.0)]
    assert due == [("w1", "xray"), ("w1", "webhook"), ("e1", "xray"), ("e1", "webhook")]


def test_capped_exponential_backoff_then_dead_and_the_next_command_goes_on() -> None:
    deliveries = Deliveries(POLICY, MemoryIds())
    deliveries.add(example_command("d1", "alice", "disable"), ["xray"], (0, 0), 0.0)
    deliveries.add(example_command("d2", "bob", "disable"), ["xray"], (0, 1), 0.0)
    now, tried = 0.0, []
    while (due := deliveries.next_due()) is not None:
        now = max(now, due)
        for job in deliveries.due(now):
            if job.command.user_id == "alice":
                tried.append(now)
                deliveries.failed(job, "refused", now)
            else:
                deliveries.applied(job, Applied("applied"))
    assert [b - a for a, b in pairwise(tried)] == [1.0, 2.0, 4.0, 8.0]
    settled = deliveries.drain()
    assert [(d.command.command_id, d.attempts, d.reason) for d in settled.dead] == [
        ("d1", 5, "refused")
    ]
    assert [(a.command_id, a.outcome) for a in settled.acks] == [
        ("d2", "applied"), ("d1", "failed"),
    ]
    assert sorted(settled.finished) == [(0, 0), (0, 1)]
    assert RetryPolicy(0.5, 30, 10).delay(100) == 30


def test_a_command_seen_twice_acts_once_even_after_a_restart() -> None:
    ids = MemoryIds()
    deliveries = Deliveries(POLICY, ids)
    command = example_command("d1", "alice", "disable")
    deliveries.add(command, ["xray"], (0, 0), 0.0)
    deliveries.add(command, ["xray"], (0, 1), 0.0)  # again while pending: joins the job
    assert _succeed_all(deliveries, 0.0) == ["d1"]
    settled = deliveries.drain()
    assert len(settled.acks) == 1 and settled.finished == [(0, 0), (0, 1)]
    restarted = Deliveries(POLICY, ids)  # the same durable ids
    restarted.add(command, ["xray"], (0, 0), 0.0)
    assert restarted.due(0.0) == []
    assert _acks(restarted) == [("d1", "xray", "already")]


def test_an_old_command_read_again_after_a_newer_one_does_not_undo_it() -> None:
    deliveries = Deliveries(POLICY, MemoryIds())
    old = example_command("d1", "alice", "disable")
    deliveries.add(old, ["xray"], (0, 0), 0.0)
    [job] = deliveries.due(0.0)
    deliveries.failed(job, "down", 0.0)
    deliveries.add(example_command("e1", "alice", "enable"), ["xray"], (0, 1), 0.5)
    _succeed_all(deliveries, 1.0)
    deliveries.add(old, ["xray"], (0, 2), 2.0)  # a duplicate of the superseded disable
    assert deliveries.due(10.0) == []
    assert _acks(deliveries)[-1] == ("d1", "xray", "skipped")


def test_an_older_command_resent_after_a_newer_one_is_skipped_even_after_a_restart() -> None:
    """The stream worker re-sends commands Kafka did not confirm when it starts again: an
    older disable can come after a newer enable."""
    ids = MemoryIds()
    deliveries = Deliveries(POLICY, ids)
    enable = example_command("e1", "alice", "enable", _at(2000))
    disable = example_command("d1", "alice", "disable", _at(1000))
    deliveries.add(enable, ["xray"], (0, 0), 0.0)
    deliveries.add(disable, ["xray"], (0, 1), 0.0)  # read later, issued earlier
    assert [j.command.command_id for j in deliveries.due(0.0)] == ["e1"]
    assert _acks(deliveries) == [("d1", "xray", "skipped")]
    _succeed_all(deliveries, 0.0)
    restarted = Deliveries(POLICY, ids)  # nothing in memory: the store knows e1 was applied
    restarted.add(disable, ["xray"], (0, 2), 0.0)
    assert restarted.due(0.0) == []
    [ack] = restarted.drain().acks
    assert (ack.outcome, ack.detail) == ("skipped", "superseded by e1 (enable)")


def test_a_record_for_no_served_user_is_finished_at_once() -> None:
    deliveries = Deliveries(POLICY, MemoryIds())
    deliveries.add(example_command("d1", "alice", "disable"), [], (3, 7), 0.0)
    settled = deliveries.drain()
    assert settled.acks == [] and settled.finished == [(3, 7)]


def test_retry_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(base_s=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_s=2, cap_s=1)


# --------------------------------------------------------------------------- the simulation

USERS = ("u1", "u2")
BACKENDS = ("proxy", "hook")  # `proxy` skips warn (as the proxies do); `hook` acts on it


@dataclass
class World:
    """The backends' state, every attempt, and what `Deliveries` said."""

    state: dict[tuple[str, str], str] = field(default_factory=dict)
    calls: list[tuple[str, str, str, float]] = field(default_factory=list)  # id, backend, how, t
    acks: list[tuple[int, Note]] = field(default_factory=list)  # (event number, ack)
    dead: list[tuple[str, str, int]] = field(default_factory=list)
    events: int = 0

    def apply(self, command: Command, backend: str) -> Applied:
        if command.action == "warn":
            return Applied("skipped") if backend == "proxy" else Applied("applied", "sent")
        wanted = "disabled" if command.action == "disable" else "enabled"
        slot = (command.user_id, backend)
        if self.state.get(slot, "enabled") == wanted:
            return Applied("already")
        self.state[slot] = wanted
        return Applied("applied")


@dataclass
class Read:
    offset: int
    command: Command
    backends: tuple[str, ...]
    event: int


class Simulation:
    """A consumer on one partition with a simulated backend, driven step by step."""

    def __init__(self) -> None:
        self.world = World()
        self.ids = MemoryIds()
        self.deliveries = Deliveries(POLICY, self.ids)
        self.point = CommitPoint()
        self.now = 0.0
        self.log: list[Read] = []  # every record on the partition, by offset
        self.reads: list[Read] = []  # every time a record was read (restarts read again)
        self.session_reads: list[Read] = []
        self.positions: list[int] = []
        self.failures: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.first_read: dict[str, int] = {}

    def _read(self, offset: int, command: Command, backends: tuple[str, ...]) -> None:
        self.world.events += 1
        read = Read(offset, command, backends, self.world.events)
        self.reads.append(read)
        self.session_reads.append(read)
        self.first_read.setdefault(command.command_id, self.world.events)
        self.point.update(offset, done=False)
        self.deliveries.add(command, backends, (0, offset), self.now)
        self._drain()

    def publish(self, command: Command, backends: tuple[str, ...]) -> None:
        offset = len(self.log)
        self.log.append(Read(offset, command, backends, 0))
        self._read(offset, command, backends)

    def again(self, index: int) -> None:
        """A record already read in this session is published again (a duplicate)."""
        earlier = self.session_reads[index % len(self.session_reads)]
        self.publish(earlier.command, earlier.backends)

    def run(self, dt: float, fails: list[bool]) -> None:
        self.now += dt
        for k, job in enumerate(self.deliveries.due(self.now)):
            command, backend = job.command, job.backend
            if fails and fails[k % len(fails)]:
                self.world.calls.append((command.command_id, backend, "failed", self.now))
                self.failures[job.key].append(self.now)
                self.deliveries.failed(job, "unreachable", self.now)
            else:
                result = self.world.apply(command, backend)
                self.world.calls.append((command.command_id, backend, result.outcome, self.now))
                self.deliveries.applied(job, result)
        self._drain()

    def restart(self) -> None:
        """The process dies and comes back: only the ids and the committed offset survive."""
        committed = self.point.position or 0
        self.deliveries = Deliveries(POLICY, self.ids)
        self.point = CommitPoint()
        self.session_reads = []
        self.failures.clear()
        for record in self.log[committed:]:
            self._read(record.offset, record.command, record.backends)
        if not self.log[committed:] and self.log:
            self.point.update(len(self.log) - 1, done=True)

    def finish(self) -> None:
        """The backends recover: run until every job is acknowledged."""
        while (due := self.deliveries.next_due()) is not None:
            self.run(max(due - self.now, 0.0), [])

    def _drain(self) -> None:
        settled = self.deliveries.drain()
        for note in settled.acks:
            self.world.events += 1
            self.world.acks.append((self.world.events, note))
        self.world.dead += [(d.command.command_id, d.backend, d.attempts) for d in settled.dead]
        for _, offset in settled.finished:
            self.point.update(offset, done=True)
        position = self.point.position
        if position is not None:
            self.positions.append(position)
        self.check_commit_point()

    def check_commit_point(self) -> None:
        """Every record below the commit point had each of its jobs acknowledged after it
        was read (in this session)."""
        position = self.point.position or 0
        for read in self.session_reads:
            if read.offset >= position:
                continue
            for backend in read.backends:
                assert any(
                    event > read.event and note.command_id == read.command.command_id
                    and note.backend == backend
                    for event, note in self.world.acks
                ), (read.offset, read.command.command_id, backend, position)


_new = st.tuples(
    st.just("new"), st.sampled_from(USERS), st.sampled_from(("warn", "disable", "enable")),
    st.lists(st.sampled_from(BACKENDS), unique=True, max_size=2), st.just(0),
)
# issued before commands already published: a re-sent command the worker never saw confirmed
_late = st.tuples(
    st.just("new"), st.sampled_from(USERS), st.sampled_from(("disable", "enable")),
    st.lists(st.sampled_from(BACKENDS), unique=True, min_size=1, max_size=2), st.integers(1, 6),
)
_again = st.tuples(st.just("again"), st.integers(0, 50))
_run = st.tuples(st.just("run"), st.sampled_from((0.0, 0.5, 1.0, 3.0, 10.0)),
                 st.lists(st.booleans(), max_size=4))
_restart = st.tuples(st.just("restart"))
Op = tuple[Any, ...]
OPERATIONS = st.lists(st.one_of(_new, _new, _late, _again, _run, _run, _restart), max_size=40)


def _issued(n: int, back: int) -> datetime:
    """Distinct instants, as the stream worker gives a user's commands (each at least a
    millisecond after the one before): the n-th operation at about 100n ms, a late one
    `back` operations earlier; the last term keeps any two operations apart."""
    return _at(100 * (n - back) + (50 if back else 0) + n)


def _simulate(operations: list[Op]) -> Simulation:
    sim = Simulation()
    for n, op in enumerate(operations):
        if op[0] == "new":
            _, user, action, backends, back = op
            command = example_command(f"c{n}", user, action, _issued(n, back))
            sim.publish(command, tuple(backends))
        elif op[0] == "again" and sim.session_reads:
            sim.again(op[1])
        elif op[0] == "run":
            sim.run(op[1], list(op[2]))
        elif op[0] == "restart":
            sim.restart()
    sim.finish()
    return sim


@settings(max_examples=400, deadline=None)
@given(OPERATIONS)
def test_every_job_is_acknowledged_and_every_record_finished(operations: list[Op]) -> None:
    sim = _simulate(operations)
    assert len(sim.deliveries) == 0
    acked = {(n.command_id, n.backend) for _, n in sim.world.acks}
    for read in sim.reads:
        for backend in read.backends:
            assert (read.command.command_id, backend) in acked
    if sim.log:
        assert sim.point.position == len(sim.log)  # everything may be committed at the end


@settings(max_examples=400, deadline=None)
@given(OPERATIONS)
def test_acts_once(operations: list[Op]) -> None:
    sim = _simulate(operations)
    acted: dict[tuple[str, str], int] = defaultdict(int)
    for cid, backend, how, _ in sim.world.calls:
        if how in ("applied", "already"):
            acted[cid, backend] += 1
    assert all(count == 1 for count in acted.values()), acted


@settings(max_examples=400, deadline=None)
@given(OPERATIONS)
def test_latest_state_wins(operations: list[Op]) -> None:
    """The reference: each (user, backend) ends in the state of its newest disable/enable
    (by issued_at, then by first publication), unless that one died; nothing older is
    applied after anything newer; a warn is never superseded; a command is superseded only
    by a newer one."""
    sim = _simulate(operations)
    first: dict[str, int] = {}
    for record in sim.log:
        first.setdefault(record.command.command_id, record.offset)

    def age(command: Command) -> tuple[datetime, int]:
        return (command.issued_at, first[command.command_id])

    last: dict[tuple[str, str], Command] = {}
    for record in sim.log:
        if record.command.action != "warn":
            for backend in record.backends:
                slot = (record.command.user_id, backend)
                if slot not in last or age(last[slot]) < age(record.command):
                    last[slot] = record.command
    died = {(cid, backend) for cid, backend, _ in sim.world.dead}
    for (user, backend), command in last.items():
        if (command.command_id, backend) in died:
            continue
        expected = "disabled" if command.action == "disable" else "enabled"
        assert sim.world.state.get((user, backend), "enabled") == expected, (user, backend)
    # nothing older applied after something newer, per (user, backend)
    newest: dict[tuple[str, str], tuple[datetime, int]] = {}
    actions = {r.command.command_id: r.command for r in sim.log}
    for cid, backend, how, _ in sim.world.calls:
        command = actions[cid]
        if how not in ("applied", "already") or command.action == "warn":
            continue
        slot = (command.user_id, backend)
        assert slot not in newest or age(command) >= newest[slot], (cid, backend)
        newest[slot] = age(command)
    for _, note in sim.world.acks:
        if note.detail.startswith("superseded by "):
            by = note.detail.removeprefix("superseded by ").split(" ")[0]
            assert actions[note.command_id].action != "warn"
            assert age(actions[by]) > age(actions[note.command_id])


@settings(max_examples=400, deadline=None)
@given(OPERATIONS)
def test_retries_back_off_and_give_up_after_max_attempts(operations: list[Op]) -> None:
    sim = _simulate(operations)
    for times in sim.failures.values():
        for k, (a, b) in enumerate(pairwise(times), 1):
            assert b - a >= POLICY.delay(k)
        assert len(times) <= POLICY.max_attempts
    failed_acks = [(n.command_id, n.backend) for _, n in sim.world.acks if n.outcome == "failed"]
    assert sorted(failed_acks) == sorted((cid, b) for cid, b, _ in sim.world.dead)
    assert all(attempts == POLICY.max_attempts for _, _, attempts in sim.world.dead)


@settings(max_examples=400, deadline=None)
@given(OPERATIONS)
def test_the_commit_point_only_moves_forward_within_a_session(operations: list[Op]) -> None:
    sim = Simulation()
    for n, op in enumerate(operations):
        before = list(sim.positions)
        if op[0] == "new":
            _, user, action, backends, back = op
            command = example_command(f"c{n}", user, action, _issued(n, back))
            sim.publish(command, tuple(backends))
        elif op[0] == "run":
            sim.run(op[1], list(op[2]))
        new = sim.positions[len(before):]
        assert new == sorted(new)
        if before and new:
            assert new[0] >= before[-1]


# --------------------------------------------------------------------------- CommitPoint


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=60))
def test_commit_point_against_a_reference(steps: list[tuple[int, bool]]) -> None:
    """The reference: the smallest offset read and not finished, else one past the highest
    offset seen; None before anything."""
    point = CommitPoint()
    open_: set[int] = set()
    seen: list[int] = []
    for offset, done in steps:
        point.update(offset, done)
        seen.append(offset)
        if done:
            open_.discard(offset)
        else:
            open_.add(offset)
        expected = min(open_) if open_ else max(seen) + 1
        assert point.position == expected
    if not steps:
        assert point.position is None

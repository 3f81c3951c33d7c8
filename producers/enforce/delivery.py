"""The delivery rules of enforcement, without I/O: which command runs when, and what is said.

The consumer (`consumer.py`) reads `<prefix>.control`, hands each command to
`Deliveries.add` with the backends that serve its user, applies what
`Deliveries.due` returns, and reports each result with `applied` or `failed`.
`Deliveries` answers with acknowledgements, dead commands and the records that
are finished (`drain`). The clock is a number the caller passes (monotonic
seconds), so every rule here runs in a test without waiting.

A *job* is one command for one backend; each ends with exactly one
acknowledgement.

* **Latest state wins.** A `disable` or `enable` of a user supersedes the user's
  earlier `disable`/`enable` for the same backend that is not applied yet (new,
  or waiting for a retry): the earlier one is acknowledged `skipped`, naming the
  command that superseded it. A consumer that comes back after an outage so
  applies each user's latest state, not the whole history. `warn` is never
  superseded and supersedes nothing. "Earlier" is by `issued_at`, then by the
  order the commands were first read: the stream worker re-sends a command that
  Kafka did not confirm when it starts again, which can put an older command
  after a newer one on the partition. A state command older than the newest one
  read in this process, or than the newest one ever applied on the backend (the
  `AppliedIds` store keeps it), is `skipped` too, so it never undoes a newer state.
* **Deduplication.** A command whose (command_id, backend) is in the
  `AppliedIds` store is acknowledged `already` and not applied again; the id is
  recorded as soon as a backend reports it `applied` or `already`, before the
  acknowledgement is sent. The same command arriving again while its job is
  pending joins that job (one acknowledgement).
* **Retries.** A failed attempt is tried again after a capped exponential
  backoff (`RetryPolicy`); after `max_attempts` failures the command is dead:
  a `Dead` entry (for `<prefix>.control.dead`) and a `failed` acknowledgement.
* **Commit point.** A record is *finished* when every job it carried is
  acknowledged (or it carried none). `CommitPoint` says how far a partition's
  offset may be committed: up to the first record that is not finished.

>>> now = 100.0
>>> deliveries = Deliveries(RetryPolicy(base_s=1, cap_s=4, max_attempts=3), MemoryIds())
>>> deliveries.add(example_command("c1", "alice", "disable"), ["xray"], (0, 10), now)
>>> [job.command.command_id for job in deliveries.due(now)]
['c1']
>>> deliveries.failed(deliveries.due(now)[0], "connection refused", now)
>>> deliveries.due(now), deliveries.next_due()
([], 101.0)

While c1 waits for its retry, an `enable` of alice supersedes it:

>>> deliveries.add(example_command("c2", "alice", "enable"), ["xray"], (0, 11), now + 0.5)
>>> done = deliveries.drain()
>>> [(a.command_id, a.outcome, a.detail) for a in done.acks], done.finished
([('c1', 'skipped', 'superseded by c2 (enable)')], [(0, 10)])
>>> job = deliveries.due(now + 0.5)[0]
>>> deliveries.applied(job, Applied("applied", "added to vless-in"))
>>> done = deliveries.drain()
>>> [(a.command_id, a.outcome) for a in done.acks], done.finished
([('c2', 'applied')], [(0, 11)])

The same command again acts once:

>>> deliveries.add(example_command("c2", "alice", "enable"), ["xray"], (0, 12), now + 1)
>>> [(a.command_id, a.outcome) for a in deliveries.drain().acks], deliveries.due(now + 1)
([('c2', 'already')], [])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from quotaflow.core.plans import AckOutcome, Action, Command, Reason
from quotaflow.producers.enforce.backends._base import Applied

Origin = tuple[int, int]
"""Where a command was read: (partition, offset)."""

SEEN_KEPT = 100_000
"""How many state commands' (command_id, backend) keep their first read order (which
decides between two commands with the same `issued_at`)."""


@dataclass(frozen=True, slots=True)
class Newest:
    """The newest `disable`/`enable` of a user applied on a backend."""

    command_id: str
    action: Action
    issued_at: datetime


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff: the n-th failure waits min(cap, base * 2**(n-1)).

    >>> policy = RetryPolicy(base_s=1, cap_s=10, max_attempts=8)
    >>> [policy.delay(n) for n in range(1, 7)]
    [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    """

    base_s: float = 1.0
    cap_s: float = 60.0
    max_attempts: int = 10
    """Attempts in all (the first one included) before a command is dead."""

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s < self.base_s or self.max_attempts < 1:
            raise ValueError("retries need base_s > 0, cap_s >= base_s and max_attempts >= 1")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt."""
        return float(min(self.cap_s, self.base_s * 2.0 ** min(failures - 1, 1000)))


class AppliedIds(Protocol):
    """The commands applied on each backend, kept durably by the consumer."""

    def seen(self, command_id: str, backend: str) -> bool:
        """Whether this command was applied on this backend before."""
        ...

    def add(self, command: Command, backend: str) -> None:
        """Record that `command` was applied on `backend` (durably, before acking); for a
        disable/enable newer than the user's `newest`, it becomes that."""
        ...

    def newest(self, user_id: str, backend: str) -> Newest | None:
        """The newest disable/enable of the user applied on the backend, if any."""
        ...


class MemoryIds:
    """`AppliedIds` in memory, for tests and examples.

    >>> ids = MemoryIds()
    >>> ids.add(example_command("c1", "alice", "disable"), "xray")
    >>> ids.seen("c1", "xray"), ids.seen("c1", "webhook"), ids.newest("alice", "xray").action
    (True, False, 'disable')
    """

    def __init__(self) -> None:
        self.ids: set[tuple[str, str]] = set()
        self.latest: dict[tuple[str, str], Newest] = {}

    def seen(self, command_id: str, backend: str) -> bool:
        return (command_id, backend) in self.ids

    def add(self, command: Command, backend: str) -> None:
        self.ids.add((command.command_id, backend))
        slot = (command.user_id, backend)
        known = self.latest.get(slot)
        if command.action != "warn" and (known is None or known.issued_at <= command.issued_at):
            self.latest[slot] = Newest(command.command_id, command.action, command.issued_at)

    def newest(self, user_id: str, backend: str) -> Newest | None:
        return self.latest.get((user_id, backend))


@dataclass(slots=True, eq=False)
class Job:
    """One command for one backend, until it is acknowledged."""

    command: Command
    backend: str
    origins: list[Origin]
    due: float
    order: int
    attempts: int = 0
    """Failed attempts so far."""
    error: str = ""
    """Why the last attempt failed."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.command.command_id, self.backend)

    @property
    def action(self) -> Action:
        return self.command.action


@dataclass(frozen=True, slots=True)
class Note:
    """An acknowledgement to publish (`Ack` without node and time)."""

    command_id: str
    backend: str
    outcome: AckOutcome
    detail: str


@dataclass(frozen=True, slots=True)
class Dead:
    """A command given up on (`DeadCommand` without node and time)."""

    command: Command
    backend: str
    attempts: int
    reason: str


@dataclass(slots=True)
class Settled:
    """What happened since the last `drain`: acknowledgements, dead commands, and the
    records that are finished once those are published."""

    acks: list[Note] = field(default_factory=list)
    dead: list[Dead] = field(default_factory=list)
    finished: list[Origin] = field(default_factory=list)


class Deliveries:
    """The pending jobs of a consumer and the rules above; see the module docstring."""

    def __init__(self, retry: RetryPolicy, ids: AppliedIds) -> None:
        self.retry = retry
        self.ids = ids
        self._jobs: dict[tuple[str, str], Job] = {}
        self._state: dict[tuple[str, str], Job] = {}  # (user, backend) -> pending disable/enable
        self._open: dict[Origin, int] = {}  # record -> its jobs not acknowledged yet
        self._first_read: OrderedDict[tuple[str, str], int] = OrderedDict()  # -> read order
        # (user, backend) -> the newest disable/enable read: (issued_at, read order, "id (action)")
        self._latest: dict[tuple[str, str], tuple[datetime, int, str]] = {}
        self._out = Settled()
        self._order = 0  # jobs, in the order their commands were read
        self._reads = 0  # state commands first read

    def __len__(self) -> int:
        """Jobs not acknowledged yet."""
        return len(self._jobs)

    def add(self, command: Command, backends: Sequence[str], origin: Origin, now: float) -> None:
        """A command read at `origin`, for the backends that serve its user (maybe none)."""
        for backend in backends:
            key = (command.command_id, backend)
            pending = self._jobs.get(key)
            if pending is not None:  # the same command again while it is pending: one job
                pending.origins.append(origin)
                self._open[origin] = self._open.get(origin, 0) + 1
                continue
            if command.action != "warn":
                newer = self._newer_state(command, backend)
                if newer is not None:  # an old command again: it must not undo the newer one
                    self._out.acks.append(Note(*key, "skipped", f"superseded by {newer}"))
                    continue
                self._supersede(command, backend)
            if self.ids.seen(*key):  # after the superseding: this state was applied
                self._out.acks.append(Note(*key, "already", "applied before; not applied again"))
                continue
            job = Job(command, backend, [origin], due=now, order=self._order)
            self._order += 1
            if command.action != "warn":
                self._state[command.user_id, backend] = job
            self._jobs[key] = job
            self._open[origin] = self._open.get(origin, 0) + 1
        if origin not in self._open:
            self._out.finished.append(origin)

    def due(self, now: float) -> list[Job]:
        """The jobs to attempt now, in the order their commands were read."""
        return sorted((j for j in self._jobs.values() if j.due <= now), key=lambda j: j.order)

    def next_due(self) -> float | None:
        """When the next job is due (None: no job is pending)."""
        return min((j.due for j in self._jobs.values()), default=None)

    def applied(self, job: Job, result: Applied) -> None:
        """The backend did `result`; the id is recorded before the acknowledgement."""
        if self._jobs.get(job.key) is not job:
            return  # settled meanwhile
        if result.outcome in ("applied", "already"):
            self.ids.add(job.command, job.backend)
        self._settle(job, result.outcome, result.detail)

    def failed(self, job: Job, reason: str, now: float) -> None:
        """An attempt failed: retry after the backoff, or give up after the last attempt."""
        if self._jobs.get(job.key) is not job:
            return
        job.attempts += 1
        job.error = reason
        if job.attempts >= self.retry.max_attempts:
            self._out.dead.append(Dead(job.command, job.backend, job.attempts, reason))
            self._settle(job, "failed", f"gave up after {job.attempts} attempts: {reason}")
        else:
            job.due = now + self.retry.delay(job.attempts)

    def drain(self) -> Settled:
        """What happened since the last drain (and forget it)."""
        out, self._out = self._out, Settled()
        return out

    def clear(self) -> None:
        """Forget every pending job and record (the partitions were taken away: they will be
        read again from the committed offsets). What was drained stays valid."""
        self._jobs.clear()
        self._state.clear()
        self._open.clear()
        self._out.finished.clear()

    def _settle(self, job: Job, outcome: AckOutcome, detail: str) -> None:
        del self._jobs[job.key]
        state_key = (job.command.user_id, job.backend)
        if self._state.get(state_key) is job:
            del self._state[state_key]
        self._out.acks.append(Note(job.command.command_id, job.backend, outcome, detail))
        for origin in job.origins:
            left = self._open[origin] - 1
            if left:
                self._open[origin] = left
            else:
                del self._open[origin]
                self._out.finished.append(origin)

    def _newer_state(self, command: Command, backend: str) -> str | None:
        """A newer disable/enable of the user on `backend` ("id (action)"), read in this
        process or ever applied; None when `command` is the newest (it is remembered so)."""
        key, slot = (command.command_id, backend), (command.user_id, backend)
        order = self._first_read.get(key)
        if order is None:
            order = self._reads
            self._reads += 1
            self._first_read[key] = order
            while len(self._first_read) > SEEN_KEPT:
                self._first_read.popitem(last=False)
        mine = (command.issued_at, order)
        latest = self._latest.get(slot)
        if latest is not None and (latest[0], latest[1]) > mine:
            return latest[2]
        applied = self.ids.newest(command.user_id, backend)
        if (applied is not None and applied.command_id != command.command_id
                and applied.issued_at > command.issued_at):
            return f"{applied.command_id} ({applied.action})"
        self._latest[slot] = (*mine, f"{command.command_id} ({command.action})")
        return None

    def _supersede(self, command: Command, backend: str) -> None:
        """`command` (disable or enable) is the user's latest state on `backend`."""
        earlier = self._state.get((command.user_id, backend))
        if earlier is not None and earlier.command.command_id != command.command_id:
            by = f"{command.command_id} ({command.action})"
            self._settle(earlier, "skipped", f"superseded by {by}")


class CommitPoint:
    """How far one partition's offset may be committed: to the first unfinished record.

    `update(offset, done)` says a record was read (`done=False`) or is finished
    (`done=True`; a record can be both at once). `position` is the offset to
    commit (the next one to read), None before anything was read.

    >>> point = CommitPoint()
    >>> for offset in (5, 6, 7):
    ...     point.update(offset, done=False)
    >>> point.update(6, done=True)
    >>> point.position
    5
    >>> point.update(5, done=True)
    >>> point.position
    7
    >>> point.update(7, done=True)
    >>> point.position
    8
    """

    __slots__ = ("_next", "_open")

    def __init__(self) -> None:
        self._open: set[int] = set()
        self._next: int | None = None

    def update(self, offset: int, done: bool) -> None:
        """Record that `offset` was read, or is finished."""
        if done:
            self._open.discard(offset)
        else:
            self._open.add(offset)
        if self._next is None or offset >= self._next:
            self._next = offset + 1

    @property
    def position(self) -> int | None:
        """The offset that may be committed: every record below it is finished."""
        if self._open:
            return min(self._open)
        return self._next


_REASONS: dict[Action, Reason] = {"warn": "threshold", "disable": "quota", "enable": "period_reset"}


def example_command(
    command_id: str, user_id: str, action: Action, at: datetime | None = None
) -> Command:
    """A command with placeholder figures, for examples and tests.

    >>> example_command("c1", "alice", "warn").threshold
    0.8
    """
    issued = at or datetime(2026, 11, 24, 10, tzinfo=UTC)
    return Command(
        command_id=command_id, user_id=user_id, action=action,
        reason=_REASONS[action],
        period_start=datetime(2026, 11, 1, tzinfo=UTC), period_end=None,
        used_bytes=100, allowance_bytes=100, threshold=0.8 if action == "warn" else None,
        issued_at=issued,
    )

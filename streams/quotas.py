"""The worker's quota step, without Faust: plans and billed bytes in, commands out.

A `QuotaKeeper` holds one `quotaflow.core.quota.QuotaBook` per partition the
worker owns, and persists every change of it into a `QuotaStore` (a Faust table
in the worker, a dict in tests), one state record and one history record per
user, under keys that carry the partition. Each call returns a `Decided`: the
commands to send to `<prefix>.control`, in order, and the quota states of the
users it touched, for `<prefix>.quota`.

>>> from datetime import datetime, UTC
>>> from quotaflow.core.plans import CalendarMonth, Plan
>>> from quotaflow.core.settings import Settings
>>> store = DictStore()
>>> keeper = QuotaKeeper(Settings(), store)
>>> now = datetime(2026, 11, 24, 10, tzinfo=UTC)
>>> _ = keeper.load(1, {}, now)
>>> plan = Plan(user_id="alice", quota_bytes=1000, enabled=True,
...             period=CalendarMonth(kind="calendar_month"))
>>> keeper.set_plans(1, [("alice", plan)], now).commands
[]
>>> decided = keeper.update(1, [("alice", int(now.timestamp()), 1200)], now)
>>> [(c.action, c.reason) for c in decided.commands]
[('warn', 'threshold'), ('disable', 'quota')]
>>> decided.states
b'{"states":[["alice","2026-11-01T00:00:00+00:00",1200,1000,"disabled"]]}'

Commands are written to the store, beside the state that issued them, before they
are sent, and struck off once Kafka has them (`sent()`); a worker that restarts
after a crash sends again, with the same ids, those it may not have sent:

>>> [c.action for c in QuotaKeeper(Settings(), store).load(1, {"alice": plan}, now).commands]
['warn', 'disable']
>>> for command in decided.commands:
...     keeper.sent(1, command)
>>> again = QuotaKeeper(Settings(), store)
>>> again.load(1, {"alice": plan}, now).commands
[]
>>> again.update(1, [("alice", int(now.timestamp()), 1)], now).commands
[]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

import orjson

from quotaflow.core.plans import Command, Plan, QuotaBatch
from quotaflow.core.quota import QuotaBook
from quotaflow.core.settings import Settings

_SEP = "\x1f"  # no identifier holds a control character
_HISTORY = b"\x1fh"
_UNSENT = b"\x1fc"


class QuotaStore(Protocol):
    """Where quota records live: keys `P<US>user` and `P<US>user<US>h` (a Faust table, a dict)."""

    def get(self, key: bytes, /) -> bytes | None: ...

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Store (None: delete) a record of `partition`."""
        ...

    def keys_of(self, partition: int) -> Iterator[bytes]:
        """The keys stored for `partition`."""
        ...


class DictStore:
    """A `QuotaStore` in a dict, for tests and examples."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes, /) -> bytes | None:
        return self.data.get(key)

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value

    def keys_of(self, partition: int) -> Iterator[bytes]:
        prefix = f"{partition}{_SEP}".encode()
        return (k for k in list(self.data) if k.startswith(prefix))


def state_key(partition: int, user_id: str) -> bytes:
    """The store key of a user's state record in `partition`."""
    return f"{partition}{_SEP}{user_id}".encode()


@dataclass(slots=True)
class Decided:
    """What one quota step makes the worker publish."""

    commands: list[Command] = field(default_factory=list)
    states: bytes | None = None  # a `QuotaBatch` record; None when no planned user changed


class QuotaKeeper:
    """The quota books of the partitions this worker owns, kept in a `QuotaStore`."""

    def __init__(self, settings: Settings, store: QuotaStore) -> None:
        self.store = store
        self.default_tz = ZoneInfo(settings.timezone)
        self.lateness_days = settings.lateness_days
        self.books: dict[int, QuotaBook] = {}
        # (partition, user) -> the user's commands not yet known to be in Kafka, in order
        self.unsent: dict[tuple[int, str], list[Command]] = {}

    def loaded(self, partition: int) -> bool:
        """Whether the partition's book is in memory."""
        return partition in self.books

    def forget_all(self) -> None:
        """Drop the books (after a rebalance the store is the truth)."""
        self.books.clear()
        self.unsent.clear()

    def load(self, partition: int, plans: Mapping[str, Plan], now: datetime) -> Decided:
        """Read the partition's book from the store and bring it in line with `plans`.

        `plans` are the latest plan of every user of the partition that has one.
        A plan that differs from the one the book holds (it changed while no
        worker owned the partition) is applied now; a plan the book holds that is
        gone was deleted.
        """
        book = QuotaBook(self.default_tz, self.lateness_days)
        states: dict[str, bytes] = {}
        histories: dict[str, bytes] = {}
        resend: list[Command] = []
        prefix_len = len(f"{partition}{_SEP}".encode())
        for key in sorted(self.store.keys_of(partition)):
            value = self.store.get(key)
            if value is None:
                continue
            if key.endswith(_UNSENT):
                user_id = key[prefix_len:-len(_UNSENT)].decode()
                unsent = [Command.decode(c) for c in orjson.loads(value)]
                self.unsent[partition, user_id] = unsent
                resend += unsent
            elif key.endswith(_HISTORY):
                histories[key[prefix_len:-len(_HISTORY)].decode()] = value
            else:
                states[key[prefix_len:].decode()] = value
        for user_id, state in states.items():
            book.load_user(user_id, state, histories.get(user_id))
        self.books[partition] = book
        held = {u for u, user in book.users.items() if user.rules is not None}
        changes: list[tuple[str, Plan | None]] = [(u, None) for u in sorted(held - set(plans))]
        changes += sorted(plans.items())
        decided = self.set_plans(partition, changes, now)
        decided.commands[:0] = resend
        return decided

    def sent(self, partition: int, command: Command) -> None:
        """Kafka has `command`: strike it off the user's unsent commands."""
        key = (partition, command.user_id)
        unsent = self.unsent.get(key)
        if unsent is None or partition not in self.books:
            return
        left = [c for c in unsent if c.command_id != command.command_id]
        if left:
            self.unsent[key] = left
        else:
            del self.unsent[key]
        self._put_unsent(partition, command.user_id, left)

    def _put_unsent(self, partition: int, user_id: str, unsent: list[Command]) -> None:
        self.store.put(
            partition, state_key(partition, user_id) + _UNSENT,
            orjson.dumps([c.encode().decode() for c in unsent]) if unsent else None,
        )

    def set_plans(
        self, partition: int, changes: Iterable[tuple[str, Plan | None]], now: datetime
    ) -> Decided:
        """Apply plan changes (None: deleted) in order; an unchanged plan is skipped."""
        book = self.books[partition]
        commands: list[Command] = []
        for user_id, plan in changes:
            user = book.users.get(user_id)
            held = None if user is None or user.rules is None else user.rules.plan
            if held != plan:
                commands += book.set_plan(user_id, plan, now)
        return self._finish(partition, book, commands)

    def update(
        self, partition: int, readings: Iterable[tuple[str, int, int]], now: datetime
    ) -> Decided:
        """Add billed readings `(user, observed_at Unix s, billed bytes)` of one batch."""
        book = self.books[partition]
        return self._finish(partition, book, book.update(readings, now))

    def tick(self, partition: int, now: datetime, max_users: int) -> Decided:
        """Decide for at most `max_users` users whose clock came due."""
        book = self.books[partition]
        return self._finish(partition, book, book.tick(now, max_users))

    def due(self, partition: int, now: datetime) -> bool:
        """Whether some user of the partition has a decision due by the clock."""
        due = self.books[partition].next_due()
        return due is not None and due <= int(now.timestamp())

    def _finish(self, partition: int, book: QuotaBook, commands: list[Command]) -> Decided:
        """Persist what changed; the quota states of the planned users among them.

        The commands are stored as unsent before the state that issued them, on
        the same changelog partition, so a state that reached Kafka has its
        commands there too.
        """
        put = self.store.put
        for command in commands:
            unsent = self.unsent.setdefault((partition, command.user_id), [])
            unsent.append(command)
        for user_id in {c.user_id for c in commands}:
            self._put_unsent(partition, user_id, self.unsent[partition, user_id])
        for user_id in book.take_history_changed():
            put(partition, state_key(partition, user_id) + _HISTORY, book.history_bytes(user_id))
        rows: list[tuple[str, str, int, int | None, str]] = []
        for user_id in book.take_changed():
            put(partition, state_key(partition, user_id), book.user_bytes(user_id))
            status = book.status(user_id)
            if status is not None:
                tz = book.users[user_id].rules.tz  # type: ignore[union-attr]
                rows.append((
                    user_id,
                    datetime.fromtimestamp(status.period_start, tz).isoformat(),
                    status.used,
                    status.allowance,
                    "disabled" if status.disabled else "enabled",
                ))
        rows.sort()
        return Decided(commands, QuotaBatch.encode(rows) if rows else None)

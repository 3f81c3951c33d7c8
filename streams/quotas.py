"""The worker's quota step, without Faust: plans and billed bytes in, commands out.

A `QuotaKeeper` holds one `quotaflow.core.quota.QuotaBook` per partition the
worker owns, and keeps it in a `QuotaStore` (the worker's ledger table, a dict in
tests) under keys that carry the partition. Each call returns a `Decided`: the
commands to send to `<prefix>.control`, in order; `report()` gives the quota
states of the users that changed since it was last called, for `<prefix>.quota`.

What is written, and when, so that a crash at any moment neither loses nor
doubles a byte of usage and announces no change twice with different ids:

- **A journal record per billed message**, written before the message's ledger
  record, to the same changelog partition: the message's offset, its observed_at
  and its billed readings, `[offset, observed_at, [[user, bytes], ...]]` (records
  written before that shape, `[offset, [[user, observed_at, bytes], ...]]`, still
  load). A ledger record that reached Kafka therefore has its journal record
  there too. Journal keys are slots of a ring, so old records are overwritten
  rather than deleted.
- **Users' states at `flush()`** (the worker flushes every ten seconds, and
  before the ring could come round to a journal record not yet folded in): each
  user's state holds the offset of the last message it includes, and the states
  are kept in `STATE_PAGES` page records per partition, a user's page by a hash
  of its id. A flush rewrites each page that has a user who changed: a record
  per page, not per user, which is what a fleet whose every user reports once a
  minute needs (about a user's state per reading otherwise). Loading a book
  replays the journal records above each user's offset. Between flushes a
  message costs one journal record, however many users it names. (Earlier
  versions wrote a record per user; those load, and the first flush moves them
  into pages.)
- **History records at `flush()`**: a user's older hourly buckets (all but the
  newest, which its state holds) in a record per UTC day, `day_key()`, written
  when the day's buckets changed: mostly once an hour, when the newest bucket
  joins the history, and when the oldest is pruned. They are written after the
  states, which hold the buckets that changed since the last flush, so a
  crash between the two loses no bucket. (Earlier versions wrote the
  whole history in one record, rewritten every hour; it loads, and the first
  flush splits it into day records and deletes it.)
- **Commands at once**: a command is stored as unsent, then the state of its
  user, before it is sent, and struck off once Kafka has it (`sent()`). A worker
  that restarts sends the unsent ones again, with their ids.

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
>>> decided = keeper.update(1, 7, int(now.timestamp()), [("alice", 1200)], now)
>>> [(c.action, c.reason) for c in decided.commands]
[('warn', 'threshold'), ('disable', 'quota')]
>>> keeper.report(1)
b'{"states":[["alice","2026-11-01T00:00:00+00:00",1200,1000,"disabled"]]}'
>>> keeper.flush(1)

A worker that restarts before Kafka acknowledged the commands sends them again:

>>> [c.action for c in QuotaKeeper(Settings(), store).load(1, {"alice": plan}, now).commands]
['warn', 'disable']
>>> for command in decided.commands:
...     keeper.sent(1, command)
>>> again = QuotaKeeper(Settings(), store)
>>> again.load(1, {"alice": plan}, now).commands
[]
>>> again.update(1, 7, int(now.timestamp()), [("alice", 1200)], now).commands  # offset 7 again
[]
>>> again.books[1].status("alice").used
1200
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

import orjson

from quotaflow.core.contracts import right_sized
from quotaflow.core.plans import Command, Plan, QuotaBatch
from quotaflow.core.quota import QuotaBook
from quotaflow.core.settings import Settings

_SEP = "\x1f"  # no identifier holds a control character
_WHOLE_HISTORY = b"h"  # earlier versions' record of a user's older buckets, all days
_DAY = b"d"
_UNSENT = b"c"
_JOURNAL = "\x1fj\x1f"
_PAGE = "\x1fp\x1f"
JOURNAL_SLOTS = 4096
"""Journal records kept per partition; a flush is forced after half as many messages."""
STATE_PAGES = 1024
"""Page records per partition that hold the users' states."""


class QuotaStore(Protocol):
    """Where quota records live, under keys that start with `P<US>` (a Faust table, a dict)."""

    def get(self, key: bytes, /) -> bytes | None: ...

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Store (None: delete) a record of `partition`."""
        ...

    def keys_of(self, partition: int) -> Iterator[bytes]:
        """The keys stored for `partition` (those starting with `P<US>`)."""
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


def state_key(partition: int, user_id: str, kind: bytes = b"") -> bytes:
    """The store key of a user's records in `partition`: under this key the state
    record of earlier versions, and with `kind` its other records (`day_key()`, its
    unsent commands)."""
    key = f"{partition}{_SEP}{user_id}".encode()
    return key + _SEP.encode() + kind if kind else key


def day_key(partition: int, user_id: str, day: int) -> bytes:
    """The store key of a user's history record of UTC day `day` (days since the epoch).

    >>> day_key(3, "alice", 20416)
    b'3\\x1falice\\x1fd20416'
    """
    return state_key(partition, user_id, _DAY + str(day).encode())


def page_of(user_id: str) -> int:
    """The state page of a user: a hash that every process computes alike.

    >>> page_of("alice")
    71
    """
    return zlib.crc32(user_id.encode()) % STATE_PAGES


def page_key(partition: int, page: int) -> bytes:
    """The store key of a state page in `partition`."""
    return f"{partition}{_PAGE}{page}".encode()


def journal_key(partition: int, offset: int) -> bytes:
    """The store key of the journal slot that the message at `offset` writes."""
    return f"{partition}{_JOURNAL}{offset % JOURNAL_SLOTS}".encode()


def _journaled(value: bytes) -> tuple[int, list[tuple[int, list[tuple[str, int]]]]]:
    """A journal record's offset and readings, grouped by observed_at, in their order.

    >>> _journaled(b'[7,1764000000,[["alice",11],["bob",3]]]')
    (7, [(1764000000, [('alice', 11), ('bob', 3)])])

    Records written before the observed_at was stored once, with every reading:

    >>> _journaled(b'[7,[["alice",1764000000,11],["bob",1764000000,3],["cy",1764000060,1]]]')
    (7, [(1764000000, [('alice', 11), ('bob', 3)]), (1764000060, [('cy', 1)])])
    """
    record = orjson.loads(value)
    if len(record) == 3:
        offset, observed_at, readings = record
        return offset, [(observed_at, [(user, count) for user, count in readings])]
    offset, triples = record
    groups: list[tuple[int, list[tuple[str, int]]]] = []
    for user, t, count in triples:
        if not groups or groups[-1][0] != t:
            groups.append((t, []))
        groups[-1][1].append((user, count))
    return offset, groups


@dataclass(slots=True)
class Decided:
    """What one quota step makes the worker publish."""

    commands: list[Command] = field(default_factory=list)


@dataclass(slots=True)
class _Partition:
    book: QuotaBook
    handled: int = -1  # the offset of the last message whose readings are in the book
    replayed: int = -1  # the last offset replayed from the journal at load
    since_flush: int = 0  # messages journaled since the last flush
    # users loaded from per-user state records (earlier versions): written into their
    # pages at the next flush, then those records are deleted
    unpaged: list[str] = field(default_factory=list)
    # users loaded with a record of their whole history (earlier versions): written
    # as day records at the next flush, then that record is deleted
    whole: list[str] = field(default_factory=list)
    # users who got a command since the last report, in order (a user may repeat)
    commanded: list[str] = field(default_factory=list)


class QuotaKeeper:
    """The quota books of the partitions this worker owns, kept in a `QuotaStore`."""

    def __init__(self, settings: Settings, store: QuotaStore) -> None:
        self.store = store
        self.default_tz = ZoneInfo(settings.timezone)
        self.lateness_days = settings.lateness_days
        self.partitions: dict[int, _Partition] = {}
        # (partition, user) -> the user's commands not yet known to be in Kafka, in order
        self.unsent: dict[tuple[int, str], list[Command]] = {}

    @property
    def books(self) -> dict[int, QuotaBook]:
        """The book of every loaded partition."""
        return {p: held.book for p, held in self.partitions.items()}

    def loaded(self, partition: int) -> bool:
        """Whether the partition's book is in memory."""
        return partition in self.partitions

    def forget_all(self) -> None:
        """Drop the books (after a rebalance the store is the truth)."""
        self.partitions.clear()
        self.unsent.clear()

    def load(self, partition: int, plans: Mapping[str, Plan], now: datetime) -> Decided:
        """Read the partition's book from the store and bring it in line with `plans`.

        The journal records above each user's stored offset are replayed first.
        `plans` are the latest plan of every user of the partition that has one:
        a plan that differs from the one the book holds (it changed while no
        worker owned the partition) is applied now; a plan the book holds that is
        gone was deleted.
        """
        book = QuotaBook(self.default_tz, self.lateness_days)
        pages: list[bytes] = []
        states: dict[str, bytes] = {}
        histories: dict[str, list[bytes]] = {}
        whole: list[str] = []  # users with an earlier version's whole-history record
        journal: list[tuple[int, list[tuple[int, list[tuple[str, int]]]]]] = []
        resend: list[Command] = []
        prefix = f"{partition}{_SEP}".encode()
        journal_prefix = f"{partition}{_JOURNAL}".encode()
        page_prefix = f"{partition}{_PAGE}".encode()
        for key in sorted(self.store.keys_of(partition)):
            value = self.store.get(key)
            if value is None:
                continue
            if key.startswith(journal_prefix):
                journal.append(_journaled(value))
            elif key.startswith(page_prefix):
                pages.append(value)
            else:
                name, _, kind = key[len(prefix):].partition(_SEP.encode())
                user_id = name.decode()
                if not kind:
                    states[user_id] = value
                elif kind == _UNSENT:
                    unsent = [Command.decode(c) for c in orjson.loads(value)]
                    self.unsent[partition, user_id] = unsent
                    resend += unsent
                elif kind == _WHOLE_HISTORY:  # older than the user's day records
                    histories.setdefault(user_id, []).insert(0, value)
                    whole.append(user_id)
                elif kind.startswith(_DAY):
                    histories.setdefault(user_id, []).append(value)
                else:
                    raise ValueError(f"partition {partition}: unknown quota record {key!r}")
        for user_id, state in states.items():
            book.load_user(user_id, state, histories.get(user_id, ()))
        for page in pages:  # newer than a per-user record of the same user
            for user_id, paged in orjson.loads(page).items():
                book.load_state(user_id, paged, histories.get(user_id, ()))
        for user_id in whole:  # split into day records at the next flush
            book.rewrite_history(user_id)
        held = self.partitions[partition] = _Partition(book, unpaged=list(states), whole=whole)
        held.handled = max((user.through for user in book.users.values()), default=-1)
        commands: list[Command] = []
        users = book.users
        for offset, groups in sorted(journal, key=lambda record: record[0]):
            missing = [
                (t, [(u, b) for u, b in readings if u not in users or offset > users[u].through])
                for t, readings in groups
            ]
            missing = [group for group in missing if group[1]]
            if missing:
                commands += book.update(missing, now)
            held.replayed = held.handled = max(held.handled, offset)
        # an unsent record can reach Kafka without its user's state: the replay then
        # decides its commands again, with the same ids, and they are sent once
        resent = {c.command_id for c in resend}
        replayed = [c for c in commands if c.command_id not in resent]
        self._store_commands(partition, replayed)  # before the plans' commands, in order
        planned = {u for u, user in book.users.items() if user.rules is not None}
        changes: list[tuple[str, Plan | None]] = [(u, None) for u in sorted(planned - set(plans))]
        changes += sorted(plans.items())
        decided = self.set_plans(partition, changes, now)
        decided.commands[:0] = resend + replayed
        return decided

    def set_plans(
        self, partition: int, changes: Iterable[tuple[str, Plan | None]], now: datetime
    ) -> Decided:
        """Apply plan changes (None: deleted) in order; an unchanged plan is skipped."""
        book = self.partitions[partition].book
        commands: list[Command] = []
        for user_id, plan in changes:
            user = book.users.get(user_id)
            held = None if user is None or user.rules is None else user.rules.plan
            if held != plan:
                commands += book.set_plan(user_id, plan, now)
        self._store_commands(partition, commands)
        return Decided(commands)

    def update(
        self, partition: int, offset: int, observed_at: int, readings: list[tuple[str, int]],
        now: datetime,
    ) -> Decided:
        """Add the billed readings `(user, billed bytes)` of the message at `offset`, observed
        at `observed_at` (Unix s); journal them before the message's ledger record is written.

        A message at or below the offsets replayed from the journal at load is
        in the book already, and changes nothing.
        """
        held = self.partitions[partition]
        if offset <= held.replayed:
            return Decided()
        held.handled = max(held.handled, offset)
        commands = held.book.update(((observed_at, readings),), now)
        self.store.put(partition, journal_key(partition, offset),
                       right_sized(orjson.dumps([offset, observed_at, readings])))
        held.since_flush += 1
        self._store_commands(partition, commands)
        return Decided(commands)

    def tick(self, partition: int, now: datetime, max_users: int) -> Decided:
        """Decide for at most `max_users` users whose clock came due."""
        commands = self.partitions[partition].book.tick(now, max_users)
        self._store_commands(partition, commands)
        return Decided(commands)

    def due(self, partition: int, now: datetime) -> bool:
        """Whether some user of the partition has a decision due by the clock."""
        due = self.partitions[partition].book.next_due()
        return due is not None and due <= int(now.timestamp())

    def must_flush(self, partition: int) -> bool:
        """Whether the journal ring would soon come round to records not yet folded in."""
        return self.partitions[partition].since_flush >= JOURNAL_SLOTS // 2

    def flush(self, partition: int) -> None:
        """Write the state of every user that changed since the last flush."""
        held = self.partitions[partition]
        book = held.book
        put = self.store.put
        self._put_states(partition, held, book.take_changed() + held.unpaged)
        for user_id in held.unpaged:  # in its page now
            put(partition, state_key(partition, user_id), None)
        held.unpaged = []
        # after the states, which hold the changed buckets until these are in Kafka
        for user_id, day in book.take_history_changed():
            put(partition, day_key(partition, user_id, day), book.history_bytes(user_id, day))
        for user_id in held.whole:  # in its day records now
            put(partition, state_key(partition, user_id, _WHOLE_HISTORY), None)
        held.whole = []
        held.since_flush = 0

    def report(self, partition: int, everyone: bool = True) -> bytes | None:
        """The quota states of the planned users that changed since the last report, as a
        `QuotaBatch` record (None if none did); without `everyone`, only of those that
        got a command since the last report, who are reported again with everyone."""
        held = self.partitions[partition]
        commanded, held.commanded = held.commanded, []
        book = held.book
        users = book.take_unreported() if everyone else list(dict.fromkeys(commanded))
        rows = book.state_rows(users)
        return QuotaBatch.encode(rows) if rows else None

    def sent(self, partition: int, command: Command) -> None:
        """Kafka has `command`: strike it off the user's unsent commands."""
        key = (partition, command.user_id)
        unsent = self.unsent.get(key)
        if unsent is None or partition not in self.partitions:
            return
        left = [c for c in unsent if c.command_id != command.command_id]
        if left:
            self.unsent[key] = left
        else:
            del self.unsent[key]
        self._put_unsent(partition, command.user_id, left)

    def _put_states(self, partition: int, held: _Partition, user_ids: Iterable[str]) -> None:
        """Write the users' states as they are now, in the pages that hold them."""
        by_page: dict[int, list[str]] = {}
        for user_id in user_ids:
            by_page.setdefault(page_of(user_id), []).append(user_id)
        book = held.book
        for page, names in by_page.items():
            key = page_key(partition, page)
            stored = self.store.get(key)
            states: dict[str, object] = orjson.loads(stored) if stored else {}
            for user_id in names:
                state = book.user_state(user_id, through=held.handled)
                if state is None:
                    states.pop(user_id, None)
                else:
                    states[user_id] = state
            self.store.put(partition, key, right_sized(orjson.dumps(states)) if states else None)

    def _put_unsent(self, partition: int, user_id: str, unsent: list[Command]) -> None:
        self.store.put(
            partition, state_key(partition, user_id, _UNSENT),
            right_sized(orjson.dumps([c.encode().decode() for c in unsent])) if unsent else None,
        )

    def _store_commands(self, partition: int, commands: list[Command]) -> None:
        """Store the commands as unsent, then the state of the users that issued them.

        Both go to the same changelog partition, in this order, so a state that
        reached Kafka has the unsent record of the commands it issued there too
        (a crash between the two, the other way round, would lose commands that
        the state says were issued). An unsent record that reached Kafka
        without its state is sent again at load, and the journal's replay
        decides its commands again, with the same ids (`load()`).
        """
        if not commands:
            return
        held = self.partitions[partition]
        for command in commands:
            self.unsent.setdefault((partition, command.user_id), []).append(command)
        users = list(dict.fromkeys(c.user_id for c in commands))
        held.commanded += users
        for user_id in users:
            self._put_unsent(partition, user_id, self.unsent[partition, user_id])
        self._put_states(partition, held, users)

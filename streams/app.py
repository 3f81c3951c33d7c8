"""The Faust application: bills counter reports from `<prefix>.raw`.

The agent only moves messages: each message is one node's report fragment for the
partition it arrived on; `quotaflow.streams.billing.RawHandler` (no Faust in it) says
what to publish for it, with `quotaflow.core.ledger.NodeLedger` deciding what to
bill, and the agent sends that. The node's whole state in that partition is one
Faust table entry, written at checkpoints (every `QUOTAFLOW_CHECKPOINT_INTERVAL_S`,
1 s by default, or sooner after `CHECKPOINT_MESSAGES` messages): a checkpoint
writes every ledger that changed since the last one, then acknowledges the
messages handled before it. Faust commits an offset only after the producer has
flushed everything sent before it (at-least-once), so a committed message is in a
written ledger; a redelivered message either finds its seqs already applied or
meets a ledger from before it and bills it once: totals stay exact across
crashes. Totals go to `<prefix>.totals` per message, refusals to `<prefix>.dead`.

The agent acknowledges a message itself, only after handling it and a checkpoint,
and only in offset order: `quotaflow.streams.offsets.OffsetGuard` finds a hole in the offsets
Faust hands over at once, and the partition is rewound to it instead of billing
past it. Faust's own gap filling, which commits past missing offsets, is turned
off for the raw topic, whose offsets are contiguous.

Quotas: before it bills a report, the worker reads `<prefix>.plans` and
`<prefix>.nodes` up to where they were when the report was appended
(`quotaflow.streams.side_inputs.SideInputs`), applies the plan changes, bills
the report at its node's rate, and lets `quotaflow.streams.quotas.QuotaKeeper`
decide; the quota books are kept in the ledgers' table. A timer does
the same for what the clock decides (period resets, expiries), every second,
over the users whose decision is due. Commands go to `<prefix>.control` at once,
and quota states to `<prefix>.quota`: within a second for a user who got a
command, every `QUOTAFLOW_QUOTA_REPORT_INTERVAL_S` for every user that changed.
How the quota records are written so that a crash loses and doubles nothing is
in `quotaflow.streams.quotas`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.types import TP

from quotaflow import logs, metrics
from quotaflow.admin import ensure_topics
from quotaflow.core.contracts import DeadLetter
from quotaflow.core.plans import Command
from quotaflow.core.settings import Settings
from quotaflow.core.topics import MAX_MESSAGE_BYTES
from quotaflow.streams.billing import RawHandler
from quotaflow.streams.health import WorkerHealth, consumer_lags
from quotaflow.streams.offsets import OffsetGuard
from quotaflow.streams.quotas import Decided, QuotaKeeper
from quotaflow.streams.side_inputs import SideInputs

log = logging.getLogger("quotaflow.streams")


class CommitWatchdog:
    """Notices when Faust stops committing offsets of messages the worker goes on handling.

    Faust commits the offsets of handled messages every second. If its
    bookkeeping stalls while the worker keeps handling new messages, each
    restart would redo ever more work. The worker then exits, and its supervisor
    (`quotaflow run`, systemd) starts it again from the last commit, which is
    harmless: a redelivered message bills nothing twice. Commits that stop while
    nothing new is handled are not a stall: the worker is idle, or Kafka is away
    (an outage), and it waits.

    >>> dog = CommitWatchdog(stall_s=30.0, active_s=10.0)
    >>> dog.stalled(0, offset=9, committed=10, now=0.0)  # all handled work is committed
    0.0
    >>> [dog.stalled(0, offset=20 + t, committed=10, now=float(t)) for t in (1, 20, 39)]
    [0.0, 0.0, 38.0]
    >>> dog.stalled(1, offset=7, committed=5, now=0.0)
    0.0
    >>> dog.stalled(1, offset=7, committed=5, now=90.0)  # nothing new handled: Kafka is away
    0.0
    """

    def __init__(self, stall_s: float, active_s: float = 10.0) -> None:
        self.stall_s = stall_s
        self.active_s = active_s
        # partition -> [committed offset, since when, last offset handled, when it was]
        self._state: dict[int, tuple[int | None, float, int, float]] = {}

    def stalled(
        self, partition: int, offset: int, committed: int | None, now: float | None = None
    ) -> float:
        """Seconds the partition's commits are stuck behind active handling (0.0 if not)."""
        now = time.monotonic() if now is None else now
        if committed is not None and committed > offset:
            self._state.pop(partition, None)
            return 0.0
        state = self._state.get(partition)
        if state is None or state[0] != committed:  # commits progress: start the clock
            self._state[partition] = (committed, now, offset, now)
            return 0.0
        _, since, handled, handled_at = state
        if offset != handled:
            handled, handled_at = offset, now
            self._state[partition] = (committed, since, handled, handled_at)
        waited = now - since
        active = now - handled_at < self.active_s
        return waited if active and waited >= self.stall_s else 0.0


class _App(faust.App):
    """Faust's app, with work that must be done before its consumer stops.

    Stopping, Faust waits until every message the agents started on is
    acknowledged, and its timers have stopped by then; the worker's last
    checkpoint, which acknowledges the messages since the one before, is run
    here instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_stop: list[Callable[[], Awaitable[None]]] = []

    async def on_stop(self) -> None:
        for finish in self.before_stop:
            try:
                await finish()
            except Exception:  # stopping goes on: what is not acknowledged comes again
                log.exception("cannot finish before stopping")
        await super().on_stop()


def faust_app(settings: Settings, app_id: str) -> _App:
    """A Faust app with quotaflow's broker, delivery and size settings."""
    datadir = settings.state_dir / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    return _App(
        app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        datadir=str(datadir),
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        producer_max_request_size=MAX_MESSAGE_BYTES,
        # changelog records hold a node's ledger (tens of KB): Faust's default 16 KB
        # batch makes each its own produce request, one round trip at a time
        producer_max_batch_size=MAX_MESSAGE_BYTES // 4,
        producer_linger_ms=5,
        consumer_max_fetch_size=MAX_MESSAGE_BYTES * 2,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # a crashed worker's partitions move on after 10 s instead of a minute
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        web_enabled=False,
        table_cleanup_interval=3600.0,
    )


class TableStore:
    """The ledger table and a `QuotaStore` on a Faust table, whose changelog records are
    produced by `send()` rather than through Faust's producer buffer.

    `put()` (quota records, for the partition named: a timer writes them outside
    any message) and `table[key] = value` (a node ledger `N|P`, for partition P)
    change the table's data at once and queue the changelog record; `send()`
    hands the queued records to the producer in the order they were written.
    The agent calls it before it acknowledges a message, so the records are in
    the producer before the message's offset can be committed (Faust flushes the
    producer before each commit), and the timers call it after they write.

    Faust's table would queue each record in its producer buffer, which hands
    them over one at a time, each with a timed wait of its own, and holds the
    agent up whenever a hundred are queued: with a record per message and one
    per user at each quota flush, that was most of the worker's time.
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self.pending: list[tuple[int, bytes, bytes | None]] = []
        self._lock = asyncio.Lock()

    def get(self, key: bytes, /) -> bytes | None:
        found: bytes | None = self.table.data.get(key)
        return found

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.table.data.pop(key, None)
        else:
            self.table.data[key] = value
        self.pending.append((partition, key, value))

    def __setitem__(self, key: bytes, value: bytes, /) -> None:
        """A node ledger's record, under `N|P`: for the changelog partition P."""
        self.put(int(key.rsplit(b"|", 1)[1]), key, value)

    def keys_of(self, partition: int) -> Iterator[bytes]:
        prefix = f"{partition}\x1f".encode()
        return (k for k in list(self.table.data.keys()) if k.startswith(prefix))

    async def send(self, producer: Any) -> None:
        """Hand the queued changelog records to `producer` (aiokafka's), in order."""
        if not self.pending:
            return
        topic = self.table.changelog_topic.get_topic_name()
        async with self._lock:  # one sender at a time: the order is kept
            while self.pending:
                batch, self.pending = self.pending, []
                for partition, key, value in batch:
                    await producer.send(topic, value, key=key, partition=partition)


CHECKPOINT_MESSAGES = 5000
"""Messages handled since the last checkpoint that bring the next one forward."""
QUOTA_FLUSH_S = 10.0
"""How often the worker writes the quota state of the users that changed."""
CLOCK_CHUNK_USERS = 5000
"""Users decided by the clock between two yields to the event loop."""


def create_app(settings: Settings) -> faust.App:
    """Build the Faust app for these settings (the app id derives from the topic prefix)."""
    app = faust_app(settings, settings.topics.worker_group)
    raw = app.topic(settings.topics.raw, partitions=settings.partitions)
    totals_topic = settings.topics.totals
    dead = app.topic(settings.topics.dead, partitions=settings.partitions)
    table = app.Table(
        "ledgers",
        default=None,
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
        extra_topic_configs={"max.message.bytes": str(MAX_MESSAGE_BYTES)},
    )
    # sent straight to aiokafka's producer, as the totals and changelog records are
    control_topic, quota_topic = settings.topics.control, settings.topics.quota
    side = SideInputs(settings)
    # quota records share the ledgers' table: a message's journal record and its
    # ledger record then go to one changelog partition, in that order
    store = TableStore(table)
    keeper = QuotaKeeper(settings, store)
    handler = RawHandler(settings, store, rate=side.rate, quotas=keeper)
    app.handler = handler  # type: ignore[attr-defined]
    health = WorkerHealth(settings, handler.stats)
    metrics_topic = app.topic(settings.topics.metrics, partitions=settings.partitions)
    owned: set[int] = set()  # raw partitions assigned to this worker
    recovered = asyncio.Event()  # the tables hold everything of the owned partitions

    def producer() -> Any:
        faust_producer: Any = app.producer
        return faust_producer._ensure_producer()  # aiokafka's producer (private)

    async def publish(partition: int, decided: Decided | None) -> None:
        """Send the queued changelog records (the commands' unsent records among them),
        then a quota step's commands, in the order they were decided."""
        await store.send(producer())
        if decided is None:
            return
        health.commands_issued += len(decided.commands)
        for command in decided.commands:
            future = await producer().send(
                control_topic, command.encode(), key=command.user_id.encode(),
                partition=partition,
            )
            future.add_done_callback(_when_sent(keeper, partition, command))

    def dead_letter_side_inputs() -> None:
        for bad in side.bad:
            letter = DeadLetter.encode(
                "invalid", bad.reason, topic=bad.topic, partition=bad.partition,
                offset=bad.offset, payload=bad.value,
            )
            dead.send_soon(value=letter, partition=bad.partition)
            handler.stats.count_dead("invalid")
        side.bad.clear()

    async def ready(partition: int) -> None:
        """Load the partition's quota book, once its plans are read to the end."""
        while not keeper.loaded(partition):
            await side.barrier(time.time())
            if side.complete(partition) and not keeper.loaded(partition):
                side.take_changes(partition)  # all of them are in `latest`
                await publish(partition,
                              keeper.load(partition, side.latest(partition), _now()))

    @app.task  # type: ignore[untyped-decorator]
    async def _start_side_inputs() -> None:
        await side.start()

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def _recovered(sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        recovered.set()
        now = time.monotonic()
        for partition in owned:  # their messages may come from now on
            arrived[partition] = now
    stats = handler.stats
    processed: dict[int, int] = {}  # raw partition -> last offset handled
    raw_topic = settings.topics.raw

    guard = OffsetGuard(retry_s=5.0)

    # Messages handled since the last checkpoint, in order, with the stream that
    # acknowledges them: only a checkpoint that holds their effects acknowledges them.
    unacknowledged: list[tuple[Any, Any]] = []
    checkpointing = asyncio.Lock()
    last_checkpoint = [time.monotonic()]

    async def checkpoint(acknowledge: bool = True) -> None:
        """Write the ledgers that changed, then acknowledge the messages they hold (or,
        without `acknowledge`, leave them to come again)."""
        async with checkpointing:
            handled = unacknowledged[:]
            del unacknowledged[:]
            last_checkpoint[0] = time.monotonic()
            handler.checkpoint()
            try:
                await store.send(producer())
            except BaseException:  # Kafka away: they wait for the next checkpoint
                unacknowledged[:0] = handled
                raise
            if acknowledge:
                for stream, event in handled:
                    await stream.ack(event)

    stopping = asyncio.Event()

    def checkpoint_due() -> bool:
        return bool(unacknowledged) and (
            len(unacknowledged) >= CHECKPOINT_MESSAGES
            or time.monotonic() - last_checkpoint[0] >= settings.checkpoint_interval_s
            or stopping.is_set()  # Faust waits for the acknowledgements; no timer runs
        )

    async def last_checkpoint_before_stop() -> None:
        stopping.set()
        await checkpoint()

    app.before_stop.append(last_checkpoint_before_stop)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _forget(sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        # What the partitions' owner handled, written before it lets go, but not
        # acknowledged: Faust has committed by now, so they come again and find
        # their seqs in these ledgers (or bill again, if these never land).
        try:
            await checkpoint(acknowledge=False)
        finally:
            del unacknowledged[:]
            handler.forget_live()
        guard.forget_all()
        recovered.clear()
        keeper.forget_all()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(
        sender: Any, assigned: Any = (), *args: Any, signal: Any = None, **kwargs: Any
    ) -> None:
        guard.forget_all()  # each partition starts again from its committed offset
        _no_gap_filling(app.consumer, raw_topic)
        owned.clear()
        owned.update(tp.partition for tp in assigned if tp.topic == raw_topic)
        keeper.forget_all()
        side.own(set(owned))

    async def start_offset(tp: TP) -> int:
        """Where Faust starts the partition: its committed offset, or the log's start."""
        consumer: Any = app.consumer
        committed = consumer._committed_offset.get(tp)  # set by Faust on assignment (private)
        if committed is not None:
            return int(committed)
        earliest = await consumer.earliest_offsets(tp)
        return int(earliest.get(tp) or 0)

    arrived: dict[int, float] = {}  # raw partition -> when its last message arrived
    lose = LostOffsets.from_env()

    async def reread(partition: int, offset: int) -> None:
        """Seek the raw partition back to `offset`: what follows comes again."""
        if lose is not None:
            lose.reread(partition, offset)
        await app.consumer.seek_wait({TP(raw_topic, partition): offset})

    @app.agent(raw)
    async def bill(stream: Any) -> None:
        acks = stream.noack()  # acknowledged below, in offset order only
        async for event in acks.events():
            message = event.message
            partition, offset = message.partition, message.offset
            if lose is not None and lose.drops(partition, offset):
                continue  # as if Faust never handed it over (fault injection for tests)
            arrived[partition] = time.monotonic()
            if not guard.knows(partition):
                _no_gap_filling(app.consumer, raw_topic)
                guard.assign(partition, await start_offset(message.tp))
            verdict = guard.check(partition, offset, time.monotonic())
            if verdict != "handle":
                if verdict == "rewind":
                    expected = guard.expected(partition)
                    log.warning("%s[%d]: offset %d arrived before %d; not billing past the "
                                "hole, re-reading from %d", raw_topic, partition, offset,
                                expected, expected)
                    await reread(partition, expected)
                continue  # neither billed nor acknowledged: it comes again
            # plans and rates published before this report was appended are in force
            appended = message.timestamp if message.timestamp else time.time()
            await side.barrier(min(appended, time.time()))
            dead_letter_side_inputs()
            await ready(partition)
            changes = side.take_changes(partition)
            if changes:  # most messages come with none: no clock read, no quota step
                await publish(partition, keeper.set_plans(partition, changes, _now()))
            processed[partition] = offset
            outcome = handler.handle(event.value, partition, offset, message.key, appended)
            await publish(partition, outcome.quota)  # the journal record before the ledger's
            if outcome.quota is not None and keeper.must_flush(partition):
                keeper.flush(partition)
                await store.send(producer())
            for fragment in outcome.rerouted:
                await raw.send(key=fragment.key, value=fragment.value,
                               partition=fragment.partition)
            for record in outcome.totals:  # straight to aiokafka, as the changelog records
                await producer().send(totals_topic, record.value, key=record.key,
                                      partition=record.partition)
            for letter in outcome.dead:
                await dead.send(value=letter.value, partition=letter.partition)
            unacknowledged.append((acks, event))
            if checkpoint_due():
                await checkpoint()

    @app.timer(interval=settings.checkpoint_interval_s / 4)  # type: ignore[untyped-decorator]
    async def _checkpoint() -> None:
        """Checkpoint when messages stop coming: the last ones are acknowledged too."""
        if checkpoint_due():
            await checkpoint()

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def _clock() -> None:
        """Plan changes without traffic, and what the clock decides: resets, expiries."""
        if not recovered.is_set():
            return
        await side.barrier(time.time())
        dead_letter_side_inputs()
        for partition in sorted(owned):
            if not recovered.is_set():
                return  # a rebalance began
            await ready(partition)
            now = _now()
            await publish(partition,
                          keeper.set_plans(partition, side.take_changes(partition), now))
            while keeper.loaded(partition) and keeper.due(partition, now):
                await publish(partition, keeper.tick(partition, now, CLOCK_CHUNK_USERS))
                await asyncio.sleep(0)

    last_full_report = [time.monotonic()]

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def _report_quotas() -> None:
        """Publish the quota states of the users that got a command, and every
        `quota_report_interval_s` those of all the users that changed."""
        everyone = time.monotonic() - last_full_report[0] >= settings.quota_report_interval_s
        if everyone:
            last_full_report[0] = time.monotonic()
        for partition in sorted(owned):
            if keeper.loaded(partition):
                states = keeper.report(partition, everyone)
                if states is not None:
                    await producer().send(quota_topic, states, partition=partition)
        await store.send(producer())  # commands struck off as sent, among others

    @app.timer(interval=QUOTA_FLUSH_S)  # type: ignore[untyped-decorator]
    async def _flush_quotas() -> None:
        """Write the users that changed (the journal holds what came since)."""
        for partition in sorted(owned):
            if keeper.loaded(partition):
                keeper.flush(partition)
        await store.send(producer())

    @app.timer(interval=10.0)  # type: ignore[untyped-decorator]
    async def _status() -> None:
        log.info("%s holes=%d", stats.line(), guard.holes)

    endpoint: list[metrics.MetricsEndpoint] = []  # started with the app, if a port is set

    @app.task  # type: ignore[untyped-decorator]
    async def _serve_metrics() -> None:
        served = metrics.serve(settings.worker_metrics_port, settings.metrics_address)
        if served is not None:
            endpoint.append(served)

    @app.timer(interval=settings.status_interval_s)  # type: ignore[untyped-decorator]
    async def _publish_health() -> None:
        """The worker's `pipeline` snapshot, to `<prefix>.metrics` and `/metrics`."""
        consumer: Any = app.consumer
        committed = consumer._committed_offset  # what Faust committed (private, as below)
        lags = consumer_lags(raw_topic, sorted(owned),
                             lambda p: consumer.highwater(TP(raw_topic, p)),
                             lambda p: committed.get(TP(raw_topic, p)))
        snapshot = health.snapshot(lags, time.time())
        metrics_topic.send_soon(key=health.host.encode(), value=snapshot.encode())
        for served in endpoint:
            served.update(snapshot)

    watchdog = CommitWatchdog(stall_s=30.0)

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def _watch_commits() -> None:
        now = time.monotonic()
        consumer: Any = app.consumer
        for partition in sorted(owned) if recovered.is_set() else ():
            # A dropped message with nothing after it shows no hole: the log's end does.
            # So does a partition that has delivered nothing since it was assigned.
            tp = TP(raw_topic, partition)
            end = consumer.highwater(tp)
            if end is None or now - arrived.get(partition, now) <= 10.0:
                continue
            if guard.knows(partition):
                expected = guard.expected(partition)
            else:  # where Faust starts it: its committed offset, else 0 (which the
                # consumer resets to the log's start when retention removed it)
                expected = int(consumer._committed_offset.get(tp) or 0)  # private
            if end > expected:
                log.warning("%s[%d]: nothing arrives though the log ends at %d; "
                            "re-reading from %d", raw_topic, partition, end, expected)
                arrived[partition] = now
                try:
                    await reread(partition, expected)
                except (TimeoutError, KafkaError) as exc:  # Kafka away: next round
                    log.warning("%s[%d]: could not re-read (%s)", raw_topic, partition, exc)
        stuck = guard.stuck(now, limit_s=60.0)
        if stuck:
            log.error("%s partitions %s: re-reading from a hole did not fill it for 60 s: "
                      "exiting so the supervisor restarts the worker from the last commit",
                      raw_topic, stuck)
            logging.shutdown()
            os._exit(70)
        committed = consumer._committed_offset  # Faust's record of what it committed (private)
        for partition, offset in list(processed.items()):
            tp = TP(raw_topic, partition)
            stalled = watchdog.stalled(partition, offset, committed.get(tp))
            if stalled:
                acked = consumer._acked.get(tp) or []
                log.error(
                    "offset commits of %s stalled for %.0fs (handled up to %d, committed %s, "
                    "acked head %s, %d acked): exiting so the supervisor restarts the worker "
                    "from the last commit", tp, stalled, offset, committed.get(tp),
                    sorted(acked)[:3], len(acked),
                )
                logging.shutdown()
                os._exit(70)

    return app


def _when_sent(
    keeper: QuotaKeeper, partition: int, command: Command
) -> Callable[[asyncio.Future[Any]], None]:
    """A callback that strikes `command` off the unsent ones once Kafka has it."""

    def sent(done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and done.exception() is None:
            keeper.sent(partition, command)

    return sent


def _now() -> datetime:
    return datetime.now(UTC)


class LostOffsets:
    """Fault injection for tests: raw offsets that Faust does not hand over until the
    worker re-reads them.

    `QUOTAFLOW_FAULT_LOSE_OFFSETS="0:5,2:0"` makes the worker behave as if Faust did
    not hand over offset 5 of partition 0 and offset 0 of partition 2, from the first
    time they come until the worker seeks their partition back to them, as Faust
    0.15.3 was seen to do after restarts. Unset in production.

    >>> lost = LostOffsets({(0, 5)})
    >>> lost.drops(0, 4), lost.drops(0, 5), lost.drops(0, 5)  # Faust redelivers on its own
    (False, True, True)
    >>> lost.reread(0, 6); lost.drops(0, 5)                   # a seek past it changes nothing
    True
    >>> lost.reread(0, 5); lost.drops(0, 5)
    False
    """

    def __init__(self, offsets: set[tuple[int, int]]) -> None:
        self._armed = set(offsets)
        self._dropped: set[tuple[int, int]] = set()

    @classmethod
    def from_env(cls) -> LostOffsets | None:
        """The offsets named by `QUOTAFLOW_FAULT_LOSE_OFFSETS`, or None when it is unset."""
        spec = os.environ.get("QUOTAFLOW_FAULT_LOSE_OFFSETS", "")
        pairs = (item.split(":") for item in spec.split(",") if item.strip())
        offsets = {(int(partition), int(offset)) for partition, offset in pairs}
        return cls(offsets) if offsets else None

    def drops(self, partition: int, offset: int) -> bool:
        """Whether the message at this offset is to be taken as never handed over."""
        key = (partition, offset)
        if key in self._armed:
            self._armed.discard(key)
            self._dropped.add(key)
            return True
        return key in self._dropped

    def reread(self, partition: int, offset: int) -> None:
        """The worker seeks `partition` back to `offset`: what it dropped from there comes."""
        self._dropped = {(p, o) for p, o in self._dropped if p != partition or o < offset}


def _no_gap_filling(consumer: Any, topic: str) -> None:
    """Stop Faust from taking missing offsets of `topic` as done.

    Faust adds the offsets between two messages it read to a "gap" that it
    commits past: right for compacted or transactional topics, where offsets can
    be missing. Raw offsets are contiguous, so a missing one is a message Faust
    did not deliver, and committing past it would lose it.
    """
    if getattr(consumer, "_quotaflow_gaps_off", False):
        return
    add_gap = consumer._add_gap  # private

    async def add_gap_except_raw(tp: TP, offset_from: int, offset_to: int) -> None:
        if tp.topic != topic:
            await add_gap(tp, offset_from, offset_to)

    consumer._add_gap = add_gap_except_raw
    consumer._quotaflow_gaps_off = True


def _quiet_gc() -> None:
    """Keep the garbage collector off the hot path.

    Each message allocates a few hundred short-lived objects (the validated
    report); with the default thresholds the collector then keeps walking the
    worker's long-lived objects (Faust, aiokafka, decoded ledgers). Freezing what
    exists at start and collecting the young generation less often cut the
    worker's CPU time by a fifth in `bench/throughput.py` (13.9 s -> 11.1 s for
    2.4M readings).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def run_worker(settings: Settings, loglevel: str = "WARNING") -> None:
    """Run the worker in the foreground until SIGINT/SIGTERM."""
    _quiet_gc()
    ensure_topics(settings)
    app = create_app(settings)
    worker = _Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()


class _Worker(faust.Worker):
    """Faust's worker, with repeated warnings held back (a Kafka outage repeats them)."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        logs.hold_back_repeats(logger)

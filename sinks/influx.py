"""The InfluxDB sink: `<prefix>.totals` in, `traffic_daily` and `traffic_monthly` points out.

Each point holds a period's running total, so writing the same series and time
again replaces it and redelivery never double-counts. The sink coalesces: per
flush it writes the latest total of each (user, node, period) once. Three parts:
the pure `Coalescer` (records in, lines out), the `InfluxWriter` (the only code
that talks to InfluxDB) and the runner `InfluxSink` (Kafka in, commits). It commits
its Kafka offsets only after InfluxDB accepted everything consumed before them;
while InfluxDB is down it pauses its partitions, keeps its group membership,
retries with backoff and catches up afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import CommitFailedError
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.domain.write_precision import WritePrecision
from pydantic import ValidationError

from quotaflow.core.contracts import DeadLetter, PeriodKind, TotalsBatch
from quotaflow.core.settings import Settings
from quotaflow.core.topics import MAX_MESSAGE_BYTES
from quotaflow.sinks.influxql import InfluxQL, InfluxQLError, InfluxUnreachable

log = logging.getLogger("quotaflow.sinks.influx")

MEASUREMENTS: dict[PeriodKind, str] = {"day": "traffic_daily", "month": "traffic_monthly"}

SeriesKey = tuple[PeriodKind, str, str, int]  # period, user, node, start


def _escape_tag(value: str) -> str:
    r"""A tag value for InfluxDB 1.x line protocol: `,`, `=` and space get a backslash.

    A backslash is not escaped: 1.x reads a character after a backslash as escaped,
    whatever precedes the backslash, and unescapes only `\,`, `\=` and `\ `, so it
    would keep `\\` as two backslashes. That also makes a tag value that ends with a
    backslash, or has one before a space, impossible to write; the contracts refuse
    such identifiers (`quotaflow.core.contracts.identifier_problem`).

    >>> print(_escape_tag("DOMAIN\\alice,b=c d"))
    DOMAIN\alice\,b\=c\ d
    """
    return value.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def line_protocol(points: dict[SeriesKey, tuple[int, int]]) -> Iterator[str]:
    """Line-protocol lines (second precision) for coalesced totals.

    >>> print(next(line_protocol({("day", "al ice", "n1", 1763683200): (1, 2)})))
    traffic_daily,node_id=n1,user_id=al\\ ice up_bytes=1i,down_bytes=2i,total_bytes=3i 1763683200
    """
    for (period, user, node, start), (up, down) in points.items():
        yield (
            f"{MEASUREMENTS[period]},node_id={_escape_tag(node)},user_id={_escape_tag(user)} "
            f"up_bytes={up}i,down_bytes={down}i,total_bytes={up + down}i {start}"
        )


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class SinkStats:
    """Counters for the status line."""

    records: int = 0
    totals: int = 0
    points: int = 0
    writes: int = 0
    failures: int = 0
    invalid: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        """One line for logs and the status display."""
        return (
            f"records={self.records} totals={self.totals} points={self.points} "
            f"writes={self.writes} failures={self.failures} invalid={self.invalid}"
        )


class Coalescer:
    """The latest total of each series (period, user, node, start) since the last drain.

    Pure state: totals records go in, line-protocol lines come out, one per series.

    >>> coalescer = Coalescer()
    >>> coalescer.update(TotalsBatch.encode("n1", 86400, 0, [("alice", 1, 2, 10, 20)]))
    True
    >>> coalescer.update(TotalsBatch.encode("n1", 86400, 0, [("alice", 5, 6, 14, 24)]))
    True
    >>> coalescer.update(b'{"node_id": "n1"}')  # not a TotalsBatch: nothing changes
    False
    >>> len(coalescer), coalescer.totals
    (2, 4)
    >>> for line in coalescer.drain():
    ...     print(line)
    traffic_daily,node_id=n1,user_id=alice up_bytes=5i,down_bytes=6i,total_bytes=11i 86400
    traffic_monthly,node_id=n1,user_id=alice up_bytes=14i,down_bytes=24i,total_bytes=38i 0
    >>> len(coalescer), coalescer.drain()
    (0, [])
    """

    def __init__(self) -> None:
        self._latest: dict[SeriesKey, tuple[int, int]] = {}
        self.totals = 0  # user totals taken in (a day's and a month's per row)

    def __len__(self) -> int:
        return len(self._latest)

    def update(self, value: bytes) -> bool:
        """Coalesce one totals record into the held points; False if it is malformed."""
        try:
            batch = TotalsBatch.decode(value)
        except ValidationError:
            return False
        latest = self._latest
        node, day, month = batch.node_id, batch.day, batch.month
        for user, day_up, day_down, month_up, month_down in batch.totals:
            latest[("day", user, node, day)] = (day_up, day_down)
            latest[("month", user, node, month)] = (month_up, month_down)
        self.totals += 2 * len(batch.totals)
        return True

    def points(self) -> Iterator[str]:
        """The held points as line protocol, without letting go of them."""
        return line_protocol(self._latest)

    def drain(self) -> list[str]:
        """The held points as line protocol; the coalescer is empty afterwards."""
        lines = list(self.points())
        self._latest.clear()
        return lines


class InfluxWriter:
    """The only code that talks to InfluxDB: writes lines, creates the database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client = InfluxDBClientAsync(
            url=settings.influx_url,
            token=settings.influx_token.get_secret_value(),
            org=settings.influx_org,
            enable_gzip=True,
            timeout=30_000,
        )
        self._write_api = self._client.write_api()

    async def write(self, lines: Sequence[str]) -> None:
        """Write lines (second precision) in one request; raises if InfluxDB does not take them."""
        await self._write_api.write(
            bucket=self.settings.influx_bucket,
            record="\n".join(lines),
            write_precision=WritePrecision.S,  # type: ignore[arg-type]
        )

    async def ensure_database(self) -> None:
        """Create the 1.x database; raises only while InfluxDB does not answer.

        InfluxDB 2.x refuses CREATE DATABASE: there the bucket must exist already,
        and a refusal is logged and otherwise ignored.
        """
        try:
            await asyncio.to_thread(InfluxQL.from_settings(self.settings).create_database)
        except InfluxUnreachable:
            raise
        except InfluxQLError as exc:
            log.warning("could not create database %r (%s); writing to it as it is",
                        self.settings.influx_bucket, exc)

    async def close(self) -> None:
        """Release the HTTP session."""
        await self._client.close()  # type: ignore[no-untyped-call]


class InfluxSink:
    """Consumes totals, coalesces them and writes them to InfluxDB, never dropping one.

    The runner: Kafka in, a `Coalescer` in between, an `InfluxWriter` out. Offsets
    are committed only after InfluxDB accepted every point consumed before them.
    """

    def __init__(self, settings: Settings, *, max_backoff_s: float = 30.0) -> None:
        self.settings = settings
        self.stats = SinkStats()
        self.max_backoff_s = max_backoff_s
        self.coalescer = Coalescer()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask `run()` to flush what it holds and return."""
        self._stopping.set()

    async def _write(self, writer: InfluxWriter, lines: list[str]) -> None:
        """Write the lines in chunks; raises if InfluxDB refuses or is unreachable."""
        for chunk in _chunks(lines, self.settings.sink_batch_lines):
            await writer.write(chunk)
            self.stats.writes += 1
        self.stats.points += len(lines)

    async def _write_until_done(
        self, writer: InfluxWriter, consumer: AIOKafkaConsumer, lines: list[str]
    ) -> None:
        """Retry the write with backoff, keeping the consumer alive but paused meanwhile."""
        backoff = 0.5
        paused = False
        while True:
            try:
                await self._write(writer, lines)
            except Exception as exc:  # the client raises many types; all mean "not written"
                self.stats.failures += 1
                log.warning("InfluxDB write failed (%s); retrying in %.1fs", exc, backoff)
                if not paused:
                    consumer.pause(*consumer.assignment())
                    paused = True
                await consumer.getmany(timeout_ms=int(backoff * 1000))
                backoff = min(backoff * 2, self.max_backoff_s)
                if backoff >= self.max_backoff_s:
                    try:
                        await writer.ensure_database()
                    except Exception as db_exc:
                        log.debug("database check failed: %s", db_exc)
                continue
            if paused:
                consumer.resume(*consumer.assignment())
            return

    async def run(self) -> None:
        """Consume and write until `stop()`; commits only what InfluxDB has accepted."""
        settings = self.settings
        coalescer = self.coalescer
        consumer = AIOKafkaConsumer(
            settings.topics.totals,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.topics.influx_sink_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES * 2,
            fetch_max_bytes=MAX_MESSAGE_BYTES * 4,
        )
        dead = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
        )
        writer = InfluxWriter(settings)
        await consumer.start()
        await dead.start()
        try:
            while True:
                try:
                    await writer.ensure_database()
                    break
                except Exception as exc:
                    log.warning("InfluxDB not ready (%s); retrying", exc)
                    await asyncio.sleep(1.0)
            last_flush = time.monotonic()
            while not self._stopping.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=20_000)
                for tp, records in batches.items():
                    for record in records:
                        self.stats.records += 1
                        if record.value is None or not coalescer.update(record.value):
                            self.stats.invalid += 1
                            await dead.send_and_wait(
                                settings.topics.dead,
                                value=DeadLetter.encode(
                                    "invalid", "not a TotalsBatch record", topic=tp.topic,
                                    partition=tp.partition, offset=record.offset,
                                    payload=record.value,
                                ),
                                partition=tp.partition,
                            )
                self.stats.totals = coalescer.totals
                now = time.monotonic()
                if (
                    now - last_flush >= settings.sink_flush_interval_s
                    or len(coalescer) >= settings.sink_batch_lines * 4
                ):
                    await self._flush(writer, consumer)
                    last_flush = now
            await self._flush(writer, consumer)
        finally:
            await consumer.stop()
            await dead.stop()
            await writer.close()

    async def _flush(self, writer: InfluxWriter, consumer: AIOKafkaConsumer) -> None:
        """Write everything held, then commit what was consumed before it."""
        lines = self.coalescer.drain()
        if lines:
            await self._write_until_done(writer, consumer, lines)
        try:
            await consumer.commit()
        except CommitFailedError as exc:  # a rebalance took the partitions; they are re-read
            log.warning("offset commit failed after a rebalance: %s", exc)


def run_sink(settings: Settings) -> None:
    """Run the InfluxDB sink in the foreground until SIGINT/SIGTERM."""
    import signal

    sink = InfluxSink(settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, sink.stop)
        status = asyncio.create_task(_log_status(sink))
        try:
            await sink.run()
        finally:
            status.cancel()

    asyncio.run(main())


async def _log_status(sink: InfluxSink) -> None:
    while True:
        await asyncio.sleep(10.0)
        log.info("%s", sink.stats.line())

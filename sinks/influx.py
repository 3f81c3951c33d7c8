"""The InfluxDB sink: `<prefix>.totals` in, `traffic_daily` and `traffic_monthly` points out.

Each point holds a period's running total, so writing the same series and time
again replaces it and redelivery never double-counts. The sink coalesces: per
flush it writes the latest total of each (user, node, period) once. It commits
its Kafka offsets only after InfluxDB accepted everything consumed before them;
while InfluxDB is down it pauses its partitions, keeps its group membership,
retries with backoff and catches up afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
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
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


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


class InfluxSink:
    """Consumes totals, coalesces them and writes them to InfluxDB, never dropping one."""

    def __init__(self, settings: Settings, *, max_backoff_s: float = 30.0) -> None:
        self.settings = settings
        self.stats = SinkStats()
        self.max_backoff_s = max_backoff_s
        self._pending: dict[SeriesKey, tuple[int, int]] = {}
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask `run()` to flush what it holds and return."""
        self._stopping.set()

    def absorb(self, value: bytes) -> bool:
        """Coalesce one totals record into the pending points; False if it is malformed."""
        try:
            batch = TotalsBatch.decode(value)
        except ValidationError:
            return False
        pending = self._pending
        node, day, month = batch.node_id, batch.day, batch.month
        for user, day_up, day_down, month_up, month_down in batch.totals:
            pending[("day", user, node, day)] = (day_up, day_down)
            pending[("month", user, node, month)] = (month_up, month_down)
        self.stats.totals += 2 * len(batch.totals)
        return True

    async def _ensure_database(self) -> None:
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

    async def _write(self, client: InfluxDBClientAsync) -> None:
        """Write all pending points; raises if InfluxDB refuses or is unreachable."""
        write_api = client.write_api()
        for chunk in _chunks(line_protocol(self._pending), self.settings.sink_batch_lines):
            await write_api.write(
                bucket=self.settings.influx_bucket,
                record="\n".join(chunk),
                write_precision=WritePrecision.S,  # type: ignore[arg-type]
            )
            self.stats.writes += 1
        self.stats.points += len(self._pending)
        self._pending.clear()

    async def _write_until_done(
        self, client: InfluxDBClientAsync, consumer: AIOKafkaConsumer
    ) -> None:
        """Retry the write with backoff, keeping the consumer alive but paused meanwhile."""
        backoff = 0.5
        paused = False
        while True:
            try:
                await self._write(client)
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
                        await self._ensure_database()
                    except Exception as db_exc:
                        log.debug("database check failed: %s", db_exc)
                continue
            if paused:
                consumer.resume(*consumer.assignment())
            return

    async def run(self) -> None:
        """Consume and write until `stop()`; commits only what InfluxDB has accepted."""
        settings = self.settings
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
        client = InfluxDBClientAsync(
            url=settings.influx_url,
            token=settings.influx_token.get_secret_value(),
            org=settings.influx_org,
            enable_gzip=True,
            timeout=30_000,
        )
        await consumer.start()
        await dead.start()
        try:
            while True:
                try:
                    await self._ensure_database()
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
                        if record.value is None or not self.absorb(record.value):
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
                now = time.monotonic()
                if (
                    now - last_flush >= settings.sink_flush_interval_s
                    or len(self._pending) >= settings.sink_batch_lines * 4
                ):
                    await self._flush(client, consumer)
                    last_flush = now
            await self._flush(client, consumer)
        finally:
            await consumer.stop()
            await dead.stop()
            await client.close()  # type: ignore[no-untyped-call]

    async def _flush(self, client: InfluxDBClientAsync, consumer: AIOKafkaConsumer) -> None:
        if self._pending:
            await self._write_until_done(client, consumer)
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

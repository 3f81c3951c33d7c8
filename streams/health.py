"""The worker's `pipeline` snapshot: what it billed, refused and issued, and its lag.

Built every `QUOTAFLOW_STATUS_INTERVAL_S` (default 10 s) by the worker's timer,
published to `<prefix>.metrics` for the InfluxDB sink to write, and served on
`/metrics` when `QUOTAFLOW_WORKER_METRICS_PORT` is set. Nothing here runs per
message: the counters are the `WorkerStats` the handler keeps anyway.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable

from kafka.errors import KafkaError

from quotaflow.core.health import PipelineSnapshot, Rate, dead_letter_fields, lag_fields
from quotaflow.core.settings import Settings
from quotaflow.streams.billing import WorkerStats
from quotaflow.streams.lag import LagProbe

log = logging.getLogger("quotaflow.streams")


class WorkerHealth:
    """The worker's figures (docs/influx-schema.md, `pipeline`, process `worker`).

    >>> from quotaflow.streams.billing import WorkerStats
    >>> stats = WorkerStats(messages=10, readings=400)
    >>> health = WorkerHealth(Settings(topic_prefix="qf"), stats, host="w1", clock=lambda: 0.0)
    >>> stats.messages, stats.readings = 30, 1400
    >>> health.commands_issued = 2
    >>> stats.count_dead("late")
    >>> snapshot = health.snapshot({("qf.raw", 0): 4, ("qf.raw", 1): 0}, now=10.0)
    >>> snapshot.process, snapshot.host, snapshot.at
    ('worker', 'w1', 10000)
    >>> {k: v for k, v in snapshot.fields.items() if not k.startswith("dead_letters_")}
    ... # doctest: +NORMALIZE_WHITESPACE
    {'readings_per_s': 100.0, 'reports_per_s': 2.0, 'readings_total': 1400,
     'reports_total': 30, 'late_reports': 0, 'stale_reports': 0, 'commands_issued': 2,
     'lag': 4, 'lag_raw_0': 4, 'lag_raw_1': 0}
    >>> snapshot.fields["dead_letters_late"], snapshot.fields["dead_letters_invalid"]
    (1, 0)
    """

    def __init__(
        self, settings: Settings, stats: WorkerStats, *, host: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.host = host or socket.gethostname()
        self.commands_issued = 0  # commands handed to the producer
        now = clock()
        self._readings = Rate(stats.readings, now)
        self._reports = Rate(stats.messages, now)
        self._probe: LagProbe | None = None

    def snapshot(self, lags: dict[tuple[str, int], int] | None, now: float) -> PipelineSnapshot:
        """The figures at `now` (Unix s); rates since the previous snapshot; no lag if None."""
        stats = self.stats
        fields: dict[str, int | float] = {
            "readings_per_s": self._readings.per_s(stats.readings, now),
            "reports_per_s": self._reports.per_s(stats.messages, now),
            "readings_total": stats.readings,
            "reports_total": stats.messages,
            "late_reports": stats.late,
            "stale_reports": stats.stale,
            "commands_issued": self.commands_issued,
            **dead_letter_fields(stats.dead_letters),
        }
        if lags is not None:
            fields |= lag_fields(self.settings.topic_prefix, lags)
        return PipelineSnapshot(process="worker", host=self.host, at=int(now * 1000),
                                fields=fields)

    def _lags(self, partitions: list[int]) -> dict[tuple[str, int], int]:
        if self._probe is None:
            self._probe = LagProbe(self.settings)
        topics = self.settings.topics
        found = self._probe.by_partition(topics.raw, topics.worker_group, partitions, retry_s=2.0)
        return {(topics.raw, partition): lag for partition, lag in found.items()}

    async def lags(self, partitions: Iterable[int]) -> dict[tuple[str, int], int] | None:
        """The worker group's lag on the raw partitions this worker owns; None if Kafka is away."""
        try:
            return await asyncio.to_thread(self._lags, sorted(partitions))
        except (KafkaError, OSError) as exc:
            log.debug("consumer lag unknown for now: %s", exc)
            return None

    def close(self) -> None:
        """Close the lag probe's Kafka connections."""
        if self._probe is not None:
            self._probe.close()

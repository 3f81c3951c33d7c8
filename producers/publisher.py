"""Publishing counter reports to `<prefix>.raw`, one message per partition fragment.

The only place producers talk to Kafka. Reports are cut with
`quotaflow.core.partitioning.split_report` so that every reading reaches the partition
that owns its user, many readings per message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from kafka import KafkaProducer

from quotaflow.core.contracts import CounterReport
from quotaflow.core.partitioning import partition_of, split_report
from quotaflow.core.settings import Settings
from quotaflow.core.topics import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


class SendFuture(Protocol):
    """A pending send: `get()` blocks until the broker acknowledged it, or raises."""

    def get(self, timeout: float | None = None) -> Any: ...


class Publisher(Protocol):
    """What the agent's sender needs of a publisher: `ReportPublisher`, or a test double."""

    def publish(self, report: CounterReport) -> Sequence[SendFuture]:
        """Queue one report; one future per message it went out as."""
        ...

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued (waiting up to `timeout` seconds) and release the connection."""
        ...


class ReportPublisher:
    """Sends reports (or raw lines) to the raw topic with acks=all and idempotence."""

    def __init__(self, settings: Settings, **producer_options: Any) -> None:
        self.settings = settings
        self.topic = settings.topics.raw
        options: dict[str, Any] = {
            "bootstrap_servers": settings.kafka_bootstrap,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 20,
            "batch_size": 1024 * 1024,
            "max_request_size": MAX_MESSAGE_BYTES,
            "client_id": "quotaflow-producer",
        }
        options.update(producer_options)
        self._producer = KafkaProducer(**options)
        self._partitions = settings.partitions

    def publish(self, report: CounterReport) -> list[Any]:
        """Queue one report, cut per partition; returns the send futures."""
        return [
            self._producer.send(
                self.topic, value=fragment.encode(), key=report.node_id.encode(), partition=p
            )
            for p, fragment in split_report(report, self._partitions).items()
        ]

    def publish_raw(self, line: bytes) -> Any:
        """Queue bytes that are not a valid report as they are, so the worker dead-letters them."""
        partition = partition_of(line.decode("utf-8", "replace"), self._partitions)
        return self._producer.send(self.topic, value=line, partition=partition)

    def publish_lines(self, lines: Iterable[bytes]) -> tuple[int, int]:
        """Publish JSON lines in order; returns (reports, lines published as they are)."""
        reports = raw = 0
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                report = CounterReport.decode(line)
            except ValueError:
                self.publish_raw(line)
                raw += 1
            else:
                self.publish(report)
                reports += 1
        return reports, raw

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything queued is acknowledged by the broker."""
        self._producer.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush (waiting up to `timeout` seconds, None: as long as it takes) and disconnect."""
        self._producer.close(timeout=timeout)

    def __enter__(self) -> ReportPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""How far behind the pipeline is, read from Kafka's committed offsets.

The worker commits a raw offset only after everything it produced for it is
flushed, and the InfluxDB sink commits a totals offset only after InfluxDB took
the points: when both groups have committed up to the ends of their topics,
everything published so far is in InfluxDB.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from quotaflow.core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lag:
    """Messages not yet handled by the worker (raw) and by the InfluxDB sink (totals,
    quota states and commands)."""

    raw: int
    sink: int

    @property
    def done(self) -> bool:
        """True when nothing published is waiting."""
        return self.raw == 0 and self.sink == 0


class LagProbe:
    """Reads end offsets and committed offsets; keep one open while polling."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin = KafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap, client_id="quotaflow-lag"
        )
        self._consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, client_id="quotaflow-lag"
        )

    def behind(
        self, topic: str, group: str, retry_s: float = 30.0,
        ends: dict[TopicPartition, int] | None = None,
    ) -> int:
        """Messages of `topic` that `group` has not committed yet: up to `ends` if given
        (a mark taken earlier), else up to the topic's end offsets now.

        Errors Kafka calls retriable (no group coordinator yet on a fresh broker, a
        leader moving) are retried for up to `retry_s` seconds.
        """
        partitions = self._partitions(topic)
        deadline = time.monotonic() + retry_s
        while True:
            try:
                if ends is None:
                    ends = self._consumer.end_offsets(partitions)
                committed = self._admin.list_group_offsets({group: partitions}).get(group, {})
                break
            except KafkaError as exc:
                if not exc.retriable or time.monotonic() >= deadline:
                    raise
                log.debug("lag unknown for now, retrying: %s", exc)
                time.sleep(0.5)
        total = 0
        for tp in partitions:
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else 0
            total += max(ends.get(tp, 0) - done, 0)
        return total

    def _partitions(self, topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for p in range(self.settings.partitions)]

    def mark(self, topics: tuple[str, ...] | None = None) -> dict[TopicPartition, int]:
        """The end offsets of `topics` (default: raw) now, to wait for with `wait_until_done`."""
        partitions = [tp for topic in topics or (self.settings.topics.raw,)
                      for tp in self._partitions(topic)]
        ends: dict[TopicPartition, int] = self._consumer.end_offsets(partitions)
        return ends

    @property
    def _sink_topics(self) -> tuple[str, ...]:
        """The topics the InfluxDB sink reads."""
        topics = self.settings.topics
        return (topics.totals, topics.quota, topics.control)

    def lag(self) -> Lag:
        """The current lag of both stages."""
        s = self.settings
        raw = self.behind(s.topics.raw, s.topics.worker_group)
        sink = sum(self.behind(topic, s.topics.influx_sink_group) for topic in self._sink_topics)
        return Lag(raw=raw, sink=sink)

    def wait_until_done(
        self, timeout_s: float, poll_s: float = 0.5,
        mark: dict[TopicPartition, int] | None = None,
    ) -> Lag:
        """Poll until everything published to raw before `mark` (default: now) is in
        InfluxDB, or the timeout passes; the lag returned is counted up to the marks.

        A node that goes on reporting leaves raw never empty at any one instant (the
        worker commits at checkpoints, a second apart), so what is waited for is what
        came before the mark. Raw must be drained to it before the sink's topics are
        marked, since draining raw is what adds to them.
        """
        s = self.settings
        sink_topics = self._sink_topics
        deadline = time.monotonic() + timeout_s
        lag = Lag(-1, -1)  # unknown until Kafka answers
        sink_mark: dict[TopicPartition, int] | None = None
        while True:
            try:
                if mark is None:
                    mark = self.mark()
                raw = self.behind(s.topics.raw, s.topics.worker_group, ends=mark)
                sink = -1
                if raw == 0:
                    if sink_mark is None:
                        sink_mark = self.mark(sink_topics)
                    sink = sum(self.behind(topic, s.topics.influx_sink_group, ends=sink_mark)
                               for topic in sink_topics)
                lag = Lag(raw, sink)
                if lag.done:
                    return lag
            except KafkaError as exc:  # e.g. no group coordinator yet on a fresh broker
                log.debug("lag unknown for now: %s", exc)
            if time.monotonic() >= deadline:
                return lag
            time.sleep(poll_s)

    def close(self) -> None:
        """Close the Kafka connections."""
        self._admin.close()
        self._consumer.close()

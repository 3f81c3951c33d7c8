"""The names of quotaflow's Kafka topics and consumer groups, defined once.

>>> topics = Topics("quotaflow")
>>> topics.raw, topics.totals, topics.dead
('quotaflow.raw', 'quotaflow.totals', 'quotaflow.dead')
>>> topics.worker_group, topics.influx_sink_group
('quotaflow-streams', 'quotaflow-influx-sink')
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""The largest record quotaflow writes or accepts (`max.message.bytes` of its topics)."""


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics and groups of one quotaflow deployment, all named from one prefix."""

    prefix: str

    @property
    def raw(self) -> str:
        """Counter reports from the producers, partitioned by user."""
        return f"{self.prefix}.raw"

    @property
    def totals(self) -> str:
        """Running totals from the stream worker, for the sinks."""
        return f"{self.prefix}.totals"

    @property
    def dead(self) -> str:
        """Records that were not billed, with the reason."""
        return f"{self.prefix}.dead"

    @property
    def created(self) -> tuple[str, ...]:
        """The topics quotaflow creates, all partitioned alike."""
        return (self.raw, self.totals, self.dead)

    @property
    def worker_group(self) -> str:
        """The Faust application id: the worker's consumer group and its changelogs' prefix."""
        return f"{self.prefix}-streams"

    @property
    def influx_sink_group(self) -> str:
        """The consumer group of the InfluxDB sink."""
        return f"{self.prefix}-influx-sink"

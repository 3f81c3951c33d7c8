"""The names of quotaflow's Kafka topics and consumer groups, defined once.

>>> topics = Topics("quotaflow")
>>> topics.raw, topics.totals, topics.dead
('quotaflow.raw', 'quotaflow.totals', 'quotaflow.dead')
>>> topics.plans, topics.nodes, topics.control, topics.quota, topics.metrics
('quotaflow.plans', 'quotaflow.nodes', 'quotaflow.control', 'quotaflow.quota', 'quotaflow.metrics')
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
    def plans(self) -> str:
        """Users' quota plans, keyed by user id; compacted."""
        return f"{self.prefix}.plans"

    @property
    def nodes(self) -> str:
        """Nodes' billing rates, keyed by node id; compacted."""
        return f"{self.prefix}.nodes"

    @property
    def control(self) -> str:
        """Quota commands (warn, disable, enable) for the enforcement consumers, keyed by user."""
        return f"{self.prefix}.control"

    @property
    def control_acks(self) -> str:
        """What enforcement consumers did with each command, keyed by command id."""
        return f"{self.prefix}.control.acks"

    @property
    def control_dead(self) -> str:
        """Commands an enforcement consumer gave up on after its retries, with the reason."""
        return f"{self.prefix}.control.dead"

    @property
    def quota(self) -> str:
        """Users' quota states (usage against allowance) from the worker, for the sinks."""
        return f"{self.prefix}.quota"

    @property
    def metrics(self) -> str:
        """The worker's `pipeline` snapshots, for the InfluxDB sink."""
        return f"{self.prefix}.metrics"

    @property
    def created(self) -> tuple[str, ...]:
        """The topics quotaflow creates, all partitioned alike (a user keeps one partition)."""
        return (
            self.raw, self.totals, self.dead, self.plans, self.nodes, self.control,
            self.control_acks, self.control_dead, self.quota, self.metrics,
        )

    @property
    def compacted(self) -> tuple[str, ...]:
        """The topics that keep the latest record per key for good."""
        return (self.plans, self.nodes)

    @property
    def worker_group(self) -> str:
        """The Faust application id: the worker's consumer group and its changelogs' prefix."""
        return f"{self.prefix}-streams"

    def enforce_group(self, node_id: str | None) -> str:
        """The consumer group of a node's enforcement (or, for None, the central one).

        >>> Topics("q").enforce_group("node-a"), Topics("q").enforce_group(None)
        ('q-enforce-node-a', 'q-enforce-central')
        """
        return f"{self.prefix}-enforce-{node_id or 'central'}"

    @property
    def influx_sink_group(self) -> str:
        """The consumer group of the InfluxDB sink."""
        return f"{self.prefix}-influx-sink"

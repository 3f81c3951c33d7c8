"""Plans and node rates, read ahead of the reports they apply to.

Kafka does not order records across topics: a plan published a moment before a
burst of traffic may reach the worker after it. `SideInputs` therefore reads
`<prefix>.plans` (the partitions the worker owns) and `<prefix>.nodes` (all of
them) with a consumer of its own, and `barrier(since)` returns once it has read
both topics up to the end offsets they had at some instant at or after `since`.
The worker calls it with the instant a report was appended to `.raw` before it
bills the report, so every plan or rate published before the report is in force
for it. One read to the end serves every report appended before it started, so
under load a barrier costs one round trip per batch of reports, not per report
(Kafka Streams synchronises its inputs by timestamp for the same reason).

Records that do not decode go to `bad` with the reason, for the dead-letter
topic; the previous plan or rate of their key stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from pydantic import ValidationError

from quotaflow.core.contracts import validation_reason
from quotaflow.core.partitioning import partition_of
from quotaflow.core.plans import NodeRates, Plan, rate_at
from quotaflow.core.settings import Settings

log = logging.getLogger("quotaflow.streams")


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record of `.plans` or `.nodes` that does not decode, and why."""

    topic: str
    partition: int
    offset: int
    value: bytes
    reason: str


@dataclass(slots=True)
class _Plans:
    """The plans of one partition: the latest of each user, and the changes not yet taken."""

    latest: dict[str, Plan] = field(default_factory=dict)
    changes: list[tuple[str, Plan | None]] = field(default_factory=list)
    complete: bool = False  # read to the end at least once since it was assigned


class SideInputs:
    """The plans of the owned partitions and every node's rates; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.rates: dict[str, NodeRates] = {}
        self.bad: list[BadRecord] = []
        self._plans: dict[int, _Plans] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._started = asyncio.Event()
        self._synced_at = 0.0

    async def start(self) -> None:
        """Connect and read the node rates; no plans until `own()` names partitions."""
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="quotaflow-side-inputs",
            # a read to the end waits for fetches: the default 500 ms would be the
            # floor of every barrier, and so of every quota decision's latency
            fetch_max_wait_ms=10,
        )
        await self._consumer.start()
        await self._assign()
        self._started.set()

    async def stop(self) -> None:
        """Disconnect."""
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    def own(self, partitions: set[int]) -> None:
        """Read the plans of these partitions from the next barrier on (from their beginning)."""
        self._plans = {p: self._plans.get(p, _Plans()) for p in partitions}
        self._synced_at = 0.0  # the next barrier reads, and assigns first

    async def _assign(self) -> None:
        if self._consumer is None:
            return
        n = self.settings.partitions
        tps = {TopicPartition(self.topics.nodes, p) for p in range(n)}
        tps |= {TopicPartition(self.topics.plans, p) for p in self._plans}
        if set(self._consumer.assignment()) != tps:
            self._consumer.assign(list(tps))
            self.rates.clear()
            for plans in self._plans.values():
                plans.latest.clear()
                plans.changes.clear()
                plans.complete = False
            await self._consumer.seek_to_beginning()

    def complete(self, partition: int) -> bool:
        """Whether the partition's plans have been read to the end since it was assigned."""
        found = self._plans.get(partition)
        return found is not None and found.complete

    def latest(self, partition: int) -> dict[str, Plan]:
        """The latest plan of every user of the partition that has one."""
        return dict(self._plans[partition].latest)

    def take_changes(self, partition: int) -> list[tuple[str, Plan | None]]:
        """The plan changes read since the last call (None: deleted), in order."""
        plans = self._plans.get(partition)
        if plans is None or not plans.changes:
            return []
        changes, plans.changes = plans.changes, []
        return changes

    def rate(self, node_id: str, observed_s: int) -> int:
        """The node's rate (1/10000) in effect at `observed_s`."""
        return rate_at(self.rates.get(node_id), observed_s)

    async def barrier(self, since: float) -> None:
        """Return once both topics were read to ends taken at or after `since` (Unix s)."""
        await self._started.wait()
        while self._synced_at < since:
            async with self._lock:
                if self._synced_at >= since:
                    return
                started = time.time()
                await self._read_to_end()
                self._synced_at = started

    async def _read_to_end(self) -> None:
        consumer = self._consumer
        assert consumer is not None, "start() first"
        await self._assign()
        tps = list(consumer.assignment())
        ends = await consumer.end_offsets(tps)
        behind = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
        consumer.resume(*behind)
        try:
            while behind:
                batches = await consumer.getmany(*behind, timeout_ms=500)
                for tp, records in batches.items():
                    for record in records:
                        self._apply(tp, record.offset, record.key, record.value)
                behind = {tp for tp in behind if await consumer.position(tp) < ends[tp]}
        finally:
            # between barriers nothing is fetched: the consumer would otherwise ask
            # the brokers for new records a hundred times a second
            consumer.pause(*tps)
        for partition, plans in self._plans.items():
            if not plans.complete:
                plans.complete = True
                log.info("%s[%d]: %d plans read", self.topics.plans, partition,
                         len(plans.latest))

    def _apply(
        self, tp: TopicPartition, offset: int, key: bytes | None, value: bytes | None
    ) -> None:
        if key is None:
            self._bad(tp, offset, value or b"", "a record without a key")
            return
        name = key.decode("utf-8", "replace")
        if tp.topic == self.topics.nodes:
            if value is None:
                self.rates.pop(name, None)
                return
            try:
                rates = NodeRates.decode(value)
            except ValidationError as exc:
                self._bad(tp, offset, value, validation_reason(exc))
                return
            if rates.node_id != name:
                self._bad(tp, offset, value, f"keyed {name!r} but holds node {rates.node_id!r}")
                return
            self.rates[name] = rates
            return
        plans = self._plans.get(tp.partition)
        if plans is None:
            return
        if value is None:
            if plans.latest.pop(name, None) is not None:
                plans.changes.append((name, None))
            return
        try:
            plan = Plan.decode(value)
        except ValidationError as exc:
            self._bad(tp, offset, value, validation_reason(exc))
            return
        if plan.user_id != name:
            self._bad(tp, offset, value, f"keyed {name!r} but holds the plan of {plan.user_id!r}")
            return
        owner = partition_of(name, self.settings.partitions)
        if owner != tp.partition:
            self._bad(tp, offset, value, f"the plan of {name!r} belongs in partition {owner}, "
                      f"where its reports are, not in {tp.partition}")
            return
        plans.latest[name] = plan
        plans.changes.append((name, plan))

    def _bad(self, tp: TopicPartition, offset: int, value: bytes, reason: str) -> None:
        log.warning("%s[%d]@%d not applied: %s", tp.topic, tp.partition, offset, reason)
        self.bad.append(BadRecord(tp.topic, tp.partition, offset, value, reason))


"""Plans, node rates and quota commands on Kafka, for the operator's commands.

The only place the `plans`, `nodes` and `control` commands talk to Kafka
(kafka-python). Plans and node rates live on compacted topics, one record per key:

* publishing creates the topics when they are missing, keys a plan by its user id
  and sends it to `partition_of(user_id)`, the partition number that holds the
  user's reports on `<prefix>.raw`; node rates go to `partition_of(node_id)`. The
  producer waits for every in-sync replica (acks=all) and for every record;
* deleting a plan publishes a tombstone (a record without a value);
* reading takes each partition from its beginning up to the end offsets taken when
  the read starts, without a consumer group: the latest record of each key wins, a
  tombstone removes the key, and a record that does not decode is reported with its
  place and left out (the key keeps what earlier records said; a later good record
  or tombstone of the key ends the report);
* following `<prefix>.control` yields each command as it arrives.

Every Kafka failure comes out as a `CatalogError` saying what was being done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from pydantic import ValidationError

from quotaflow.admin import ensure_topics
from quotaflow.core.partitioning import partition_of
from quotaflow.core.plan_edits import describe_errors
from quotaflow.core.plans import Command, NodeRates, Plan
from quotaflow.core.settings import Settings
from quotaflow.core.topics import MAX_MESSAGE_BYTES

T = TypeVar("T")


class CatalogError(RuntimeError):
    """Kafka failed, or a topic is not as quotaflow needs it; the message says which."""


@dataclass(frozen=True)
class RecordProblem:
    """A record that was left out because it is not what its topic holds."""

    topic: str
    partition: int
    offset: int
    key: str | None
    reason: str

    def __str__(self) -> str:
        key = "no key" if self.key is None else f"key {self.key[:60]!r}"
        where = f"{self.topic} partition {self.partition} offset {self.offset}"
        return f"{where} ({key}): {self.reason}"


@dataclass
class Snapshot(Generic[T]):
    """The latest record of every key of a compacted topic, and the records left out."""

    latest: dict[str, T] = field(default_factory=dict)
    problems: list[RecordProblem] = field(default_factory=list)

    def forget_problems(self, key: str) -> None:
        """A later record of `key` replaced what was left out of it: no problem any more."""
        if self.problems:
            self.problems = [p for p in self.problems if p.key != key]

    def troubled(self, key: str) -> bool:
        """Whether some record of `key` was left out (its latest may be unknown)."""
        return any(problem.key == key for problem in self.problems)


@contextmanager
def _failing_as(what: str) -> Iterator[None]:
    try:
        yield
    except KafkaError as exc:
        text = str(exc)  # kafka-python's errors mostly start with their class name already
        if not text.startswith(type(exc).__name__):
            text = f"{type(exc).__name__}: {text}"
        raise CatalogError(f"{what}: {text}") from None


def _consumer(settings: Settings) -> KafkaConsumer:
    """A consumer without a group, which never creates a topic by asking for it."""
    return KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="quotaflow-catalog",
        group_id=None,
        enable_auto_commit=False,
        allow_auto_create_topics=False,
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
        fetch_max_bytes=MAX_MESSAGE_BYTES,
    )


# ---------------------------------------------------------------------------- publishing


def _publish(settings: Settings, topic: str, records: Sequence[tuple[str, bytes | None]]) -> None:
    """Send (key, value) records, each to the partition that owns its key, and wait for all."""
    with _failing_as(f"cannot create the topics on {settings.kafka_bootstrap}"):
        ensure_topics(settings)
    with _failing_as(f"cannot publish to {topic}"):
        producer = KafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id="quotaflow-catalog",
            acks="all",
            enable_idempotence=True,
            max_request_size=MAX_MESSAGE_BYTES,
        )
        try:
            partitions = producer.partitions_for(topic)
            if len(partitions) != settings.partitions:
                raise CatalogError(
                    f"{topic} has {len(partitions)} partitions but QUOTAFLOW_PARTITIONS is "
                    f"{settings.partitions}: records would miss the partition of their user"
                )
            futures = [
                producer.send(
                    topic, key=key.encode(), value=value,
                    partition=partition_of(key, settings.partitions),
                )
                for key, value in records
            ]
            producer.flush()
            for future in futures:
                future.get(timeout=30)
        finally:
            producer.close()


def publish_plans(settings: Settings, plans: Sequence[Plan]) -> None:
    """Upsert plans on `<prefix>.plans`, keyed by user id."""
    _publish(settings, settings.topics.plans, [(p.user_id, p.encode()) for p in plans])


def delete_plan(settings: Settings, user_id: str) -> None:
    """Publish a tombstone for the user's plan: the user becomes unmanaged."""
    _publish(settings, settings.topics.plans, [(user_id, None)])


def publish_node_rates(settings: Settings, rates: NodeRates) -> None:
    """Replace a node's rates on `<prefix>.nodes` (the record holds all of them)."""
    _publish(settings, settings.topics.nodes, [(rates.node_id, rates.encode())])


# ---------------------------------------------------------------------------- reading


def _topic_partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]


def _read_latest(
    settings: Settings,
    topic: str,
    decode: Callable[[bytes], T],
    key_of: Callable[[T], str],
    timeout_s: float,
) -> Snapshot[T]:
    """Every key's latest record on `topic`, up to the end offsets taken at the start."""
    snapshot: Snapshot[T] = Snapshot()
    with _failing_as(f"cannot read {topic} from {settings.kafka_bootstrap}"):
        consumer = _consumer(settings)
        try:
            partitions = _topic_partitions(consumer, topic)
            if not partitions:  # nothing was ever published
                return snapshot
            consumer.assign(partitions)
            ends: dict[TopicPartition, int] = consumer.end_offsets(partitions)
            consumer.seek_to_beginning(*partitions)
            pending = {tp for tp in partitions if consumer.position(tp) < ends[tp]}
            deadline = time.monotonic() + timeout_s
            while pending:
                if time.monotonic() > deadline:
                    raise CatalogError(
                        f"reading {topic} took longer than {timeout_s:.0f} s; is Kafka well?"
                    )
                for tp, records in consumer.poll(timeout_ms=500).items():
                    for record in records:
                        if record.offset < ends[tp]:
                            _apply(snapshot, topic, record, decode, key_of)
                pending = {tp for tp in pending if consumer.position(tp) < ends[tp]}
        finally:
            consumer.close()
    return snapshot


def _apply(
    snapshot: Snapshot[T],
    topic: str,
    record: Any,
    decode: Callable[[bytes], T],
    key_of: Callable[[T], str],
) -> None:
    """Take one record into the snapshot: the latest of its key, a tombstone, or a problem."""
    key = None if record.key is None else bytes(record.key).decode("utf-8", "replace")

    def problem(reason: str) -> None:
        snapshot.problems.append(
            RecordProblem(topic, record.partition, record.offset, key, reason)
        )

    if key is None:
        problem("a record without a key")
        return
    if record.value is None:
        snapshot.latest.pop(key, None)
        snapshot.forget_problems(key)
        return
    try:
        item = decode(record.value)
    except ValidationError as exc:
        problem("; ".join(describe_errors(exc)))
        return
    if key_of(item) != key:
        problem(f"the record is about {key_of(item)[:60]!r}, not about its key")
        return
    snapshot.latest[key] = item
    snapshot.forget_problems(key)


def read_plans(settings: Settings, timeout_s: float = 60.0) -> Snapshot[Plan]:
    """Every user's stored plan, by user id."""
    return _read_latest(
        settings, settings.topics.plans, Plan.decode, lambda p: p.user_id, timeout_s
    )


def read_node_rates(settings: Settings, timeout_s: float = 60.0) -> Snapshot[NodeRates]:
    """Every node's stored rates, by node id."""
    return _read_latest(
        settings, settings.topics.nodes, NodeRates.decode, lambda r: r.node_id, timeout_s
    )


# ---------------------------------------------------------------------------- following


def follow_commands(
    settings: Settings,
    *,
    from_beginning: bool = False,
    limit: int | None = None,
    timeout_s: float | None = None,
    on_ready: Callable[[], None] | None = None,
) -> Iterator[Command | RecordProblem]:
    """The commands on `<prefix>.control` as they arrive, and the records that are no command.

    Starts at the beginning of every partition, or at its end (only what comes
    next); `on_ready` is called once the starting offsets are fixed. Stops after
    `limit` commands or `timeout_s` seconds, when given; otherwise it runs until
    the caller stops iterating. Commands of one user come in order (they share a
    partition); commands of different users come in the order they are fetched.
    """
    topic = settings.topics.control
    with _failing_as(f"cannot create the topics on {settings.kafka_bootstrap}"):
        ensure_topics(settings)
    with _failing_as(f"cannot read {topic} from {settings.kafka_bootstrap}"):
        consumer = _consumer(settings)
    try:
        with _failing_as(f"cannot read {topic} from {settings.kafka_bootstrap}"):
            partitions = _topic_partitions(consumer, topic)
            consumer.assign(partitions)
            if from_beginning:
                consumer.seek_to_beginning(*partitions)
            else:
                consumer.seek_to_end(*partitions)
            for tp in partitions:  # fix the starting offsets now, not at the first fetch
                consumer.position(tp)
        if on_ready is not None:
            on_ready()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        seen = 0
        while limit is None or seen < limit:
            wait_s = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait_s <= 0:
                return
            with _failing_as(f"cannot read {topic} from {settings.kafka_bootstrap}"):
                batch = consumer.poll(timeout_ms=int(wait_s * 1000))
            for records in batch.values():
                for record in records:
                    key = None if record.key is None else bytes(record.key).decode(
                        "utf-8", "replace"
                    )
                    if record.value is None:
                        yield RecordProblem(topic, record.partition, record.offset, key,
                                            "a record without a value")
                        continue
                    try:
                        command = Command.decode(record.value)
                    except ValidationError as exc:
                        yield RecordProblem(topic, record.partition, record.offset, key,
                                            "; ".join(describe_errors(exc)))
                        continue
                    yield command
                    seen += 1
                    if limit is not None and seen >= limit:
                        return
    finally:
        consumer.close()

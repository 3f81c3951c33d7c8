"""Running the `quotaflow` command line against this test's real Kafka and InfluxDB."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from typer.testing import CliRunner, Result

from quotaflow.cli import app
from quotaflow.core.settings import Settings


@dataclass
class Cli:
    """`quotaflow ARGS` in this process, with the test's settings as QUOTAFLOW_* variables."""

    settings: Settings

    def __call__(self, *args: str, input: str | None = None) -> Result:
        env = {**self.settings.to_env(), "COLUMNS": "200"}  # tables as on a wide terminal
        return CliRunner().invoke(app, list(args), env=env, input=input)

    def ok(self, *args: str, input: str | None = None) -> Result:
        """Run and insist on exit status 0."""
        result = self(*args, input=input)
        assert result.exit_code == 0, (
            f"quotaflow {' '.join(args)} exited {result.exit_code}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\n{result.exception!r}"
        )
        return result


@pytest.fixture
def cli(settings: Settings) -> Cli:
    """The command line for this test's topics and database."""
    return Cli(settings)


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def read_topic(settings: Settings, topic: str) -> list[Record]:
    """Every record on `topic` now, read with a plain consumer (none when it does not exist)."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
        allow_auto_create_topics=False,
    )
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        if not partitions:
            return []
        consumer.assign(partitions)
        ends: dict[Any, int] = consumer.end_offsets(partitions)
        consumer.seek_to_beginning(*partitions)
        found: list[Record] = []
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            assert time.monotonic() < deadline, f"{topic} could not be read to its end"
            for tp, records in consumer.poll(timeout_ms=1000).items():
                found += [Record(tp.partition, r.offset, r.key, r.value) for r in records
                          if r.offset < ends[tp]]
        return found
    finally:
        consumer.close()

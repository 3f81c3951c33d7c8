"""`quotaflow control tail` on real Kafka: commands printed as they arrive."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from kafka import KafkaProducer

from quotaflow.admin import ensure_topics
from quotaflow.core.partitioning import partition_of
from quotaflow.core.plans import Command
from quotaflow.core.settings import Settings
from tests.cli.conftest import Cli
from tests.conftest import settings_env

pytestmark = pytest.mark.integration

BERLIN = ZoneInfo("Europe/Berlin")


def _command(command_id: str, user: str, action: str = "disable") -> Command:
    return Command(
        command_id=command_id, user_id=user, action=action,  # type: ignore[arg-type]
        reason="threshold" if action == "warn" else "quota",
        period_start=datetime(2026, 11, 1, tzinfo=BERLIN),
        period_end=datetime(2026, 12, 1, tzinfo=BERLIN),
        used_bytes=50_000_012_345, allowance_bytes=50_000_000_000,
        threshold=0.8 if action == "warn" else None,
        issued_at=datetime(2026, 11, 24, 10, 0, 1, 234000, tzinfo=UTC),
    )


def _publish(settings: Settings, values: list[tuple[str, bytes]]) -> None:
    """Publish to the control topic as the worker does: keyed and partitioned by user."""
    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    for user, value in values:
        producer.send(settings.topics.control, key=user.encode(), value=value,
                      partition=partition_of(user, settings.partitions))
    producer.flush()
    producer.close()


def test_tail_from_the_beginning_prints_json_lines(cli: Cli, settings: Settings) -> None:
    sent = [_command("c1", "alice", "warn"), _command("c2", "alice"), _command("c3", "bob")]
    _publish(settings, [(c.user_id, c.encode()) for c in sent[:2]]
             + [("bob", b"not a command")] + [(sent[2].user_id, sent[2].encode())])
    result = cli.ok("control", "tail", "--from-beginning", "--json", "--limit", "3",
                    "--timeout", "30")
    lines = result.stdout.splitlines()
    got = [Command.decode(line) for line in lines]
    assert sorted(got, key=lambda c: c.command_id) == sent
    assert [c.command_id for c in got if c.user_id == "alice"] == ["c1", "c2"]  # in order
    assert set(lines) == {c.encode().decode() for c in sent}  # the records as they are
    assert f"following {settings.topics.control} from the beginning" in result.stderr
    assert "not a command:" in result.stderr and "(key 'bob'): not JSON" in result.stderr


def test_tail_starts_at_the_end_and_prints_readable_lines(settings: Settings) -> None:
    _publish(settings, [("alice", _command("old", "alice").encode())])
    tail = subprocess.Popen(
        [sys.executable, "-m", "quotaflow", "control", "tail", "--limit", "2",
         "--timeout", "60"],
        env=settings_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert tail.stderr is not None
        ready = tail.stderr.readline()
        assert f"following {settings.topics.control} from the end" in ready
        _publish(settings, [("carol", _command("new-1", "carol", "warn").encode()),
                            ("carol", _command("new-2", "carol").encode())])
        out, err = tail.communicate(timeout=90)
    finally:
        if tail.poll() is None:
            tail.kill()
    assert tail.returncode == 0, err
    lines = out.splitlines()
    assert lines == [
        "2026-11-24T10:00:01.234Z  warn     carol  threshold at 0.8  used 50 GB of 50 GB  "
        "period 2026-11-01T00:00:00+01:00 to 2026-12-01T00:00:00+01:00  id new-1",
        "2026-11-24T10:00:01.234Z  disable  carol  quota  used 50 GB of 50 GB  "
        "period 2026-11-01T00:00:00+01:00 to 2026-12-01T00:00:00+01:00  id new-2",
    ]


def test_tail_stops_after_its_timeout_when_nothing_comes(cli: Cli) -> None:
    started = datetime.now(UTC)
    result = cli.ok("control", "tail", "--json", "--timeout", "2")
    assert result.stdout == ""
    assert (datetime.now(UTC) - started).total_seconds() < 30


def test_json_lines_are_for_scripts(cli: Cli, settings: Settings) -> None:
    _publish(settings, [("dave", _command("c9", "dave").encode())])
    out = cli.ok("control", "tail", "--from-beginning", "--json", "--limit", "1").stdout
    assert json.loads(out)["command_id"] == "c9"

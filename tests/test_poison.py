"""Input that once wedged or fooled the pipeline, among valid reports, on real Kafka and InfluxDB.

Each poison message must reach `<prefix>.dead` with its reason, nothing may stop,
and every valid byte must be billed exactly once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from kafka import KafkaConsumer

from quotaflow.core.contracts import MAX_COUNTER, CounterReport, DeadLetter
from quotaflow.core.periods import Calendar
from quotaflow.core.settings import Settings
from quotaflow.core.topics import MAX_MESSAGE_BYTES
from quotaflow.dev.simulation import FleetSpec, simulate
from quotaflow.dev.truth_check import compare, read_daily_totals
from quotaflow.producers.publisher import ReportPublisher

pytestmark = pytest.mark.integration

SPEC = FleetSpec(nodes=4, users=60, days=1, start=datetime(2026, 11, 2, tzinfo=UTC),
                 malformed=0)
AT = "2026-11-02T12:00:00Z"


def _report(**fields: Any) -> bytes:
    base: dict[str, Any] = {"node_id": "poison", "epoch": 1, "seq": 1, "observed_at": AT,
                            "counters": [{"user_id": "u", "up": 1, "down": 1}]}
    base.update(fields)
    return orjson.dumps(base)


POISON: dict[str, bytes] = {
    "garbage": b"\x00\xff not json at all",
    "wrong types": _report(seq="7"),
    "trailing backslash": _report(counters=[{"user_id": "alice\\", "up": 1, "down": 1}]),
    "newline in user_id": _report(counters=[{"user_id": "al\nice", "up": 1, "down": 1}]),
    "control char in node_id": _report(node_id="no\x07de"),
    "seq 2**62": _report(seq=2**62),
    "epoch in microseconds": _report(epoch=1_761_000_000_000_000),
    "observed in 1970": _report(observed_at="1970-01-01T00:00:00Z"),
    "duplicate keys": b'{"node_id": "poison", "epoch": 1, "seq": 1, "seq": 2, '
                      b'"observed_at": "' + AT.encode() + b'", "counters": []}',
    "13 MiB invalid": b"[" + b"1," * (13 * 1024 * 1024 // 2) + b"1]",
}


def _overflow() -> list[bytes]:
    """Five new-epoch reports of 10**18 up and down each: up + down must not overflow."""
    return [
        _report(node_id="whale-node", epoch=epoch, seq=1,
                observed_at=(datetime(2026, 11, 2, 12, tzinfo=UTC)
                             + timedelta(minutes=epoch)).isoformat(),
                counters=[{"user_id": "whale", "up": 10**18, "down": 10**18}])
        for epoch in range(1, 6)
    ]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A rate bound so high that only the overflow bound stops the whale."""
    return settings.model_copy(update={"max_rate_bytes_per_s": 10**18})


def test_poison_is_dead_lettered_and_valid_traffic_stays_exact(
    settings: Settings, pipeline: Any
) -> None:
    sim = simulate(SPEC)
    with ReportPublisher(settings) as publisher:
        publisher.publish_lines(sim.lines[: len(sim.lines) // 2])
        for line in POISON.values():
            publisher.publish_raw(line)
        for line in _overflow():
            publisher.publish(CounterReport.decode(line))
        publisher.publish_lines(sim.lines[len(sim.lines) // 2:])
        publisher.flush()
    pipeline.wait(timeout_s=240)

    calendar = Calendar(ZoneInfo(settings.timezone))
    truth = {(u, n, calendar.label(d, "day")): (t[0], t[1]) for (u, n, d), t in sim.truth.items()}
    billed = read_daily_totals(settings)
    whale = {k: v for k, v in billed.items() if k[1] == "whale-node"}
    result = compare(truth, {k: v for k, v in billed.items() if k[1] != "whale-node"})
    assert result.exact, result.summary()
    assert len(whale) == 1 and sum(next(iter(whale.values()))) <= MAX_COUNTER

    dead = KafkaConsumer(settings.topics.dead, bootstrap_servers=settings.kafka_bootstrap,
                         auto_offset_reset="earliest", consumer_timeout_ms=5000,
                         max_partition_fetch_bytes=MAX_MESSAGE_BYTES)
    letters = [DeadLetter.decode(m.value) for m in dead]
    dead.close()
    invalid = [d for d in letters if d.reason == "invalid"]
    assert len(invalid) == len(POISON), [d.detail for d in invalid]
    by_sha = {d.sha256: d for d in invalid}
    import hashlib

    for name, line in POISON.items():
        letter = by_sha.get(hashlib.sha256(line).hexdigest())
        assert letter is not None, f"{name} has no dead letter"
        assert letter.size == len(line) and letter.detail
        assert letter.truncated == (len(line) > 2 * 1024 * 1024), name
    anomalies = [d for d in letters if d.reason == "anomaly"]
    assert anomalies and all(r["user_id"] == "whale" for d in anomalies for r in d.readings)

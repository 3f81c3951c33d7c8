"""The simulator's ground truth equals what the billing rules compute from its lines."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from quotaflow.core.contracts import CounterReport
from quotaflow.core.ledger import BillingPolicy, NodeLedger
from quotaflow.core.partitioning import split_report
from quotaflow.dev.simulation import FleetSpec, simulate


def bill_offline(lines: list[bytes], partitions: int, tz: str) -> tuple[dict, int]:
    """What the worker computes, without Kafka: per (user, node, day) totals."""
    policy = BillingPolicy(timezone=ZoneInfo(tz))
    ledgers: dict[tuple[str, int], NodeLedger] = {}
    days: dict[tuple[str, str, int], tuple[int, int]] = {}
    invalid = 0
    for line in lines:
        try:
            report = CounterReport.model_validate_json(line)
        except ValidationError:
            invalid += 1
            continue
        for p, fragment in split_report(report, partitions).items():
            ledger = ledgers.setdefault((report.node_id, p), NodeLedger(report.node_id))
            billing = ledger.update(fragment, policy)
            assert not billing.refused
            for user_id, up, down, *_ in billing.totals:
                days[(user_id, report.node_id, billing.day)] = (up, down)
    return days, invalid


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "America/New_York"])
def test_rules_reproduce_ground_truth(tz: str) -> None:
    from datetime import UTC, datetime

    spec = FleetSpec(nodes=12, users=150, days=3, timezone=tz, seed=3,
                     start=datetime(2026, 3, 7, tzinfo=UTC))
    sim = simulate(spec)
    assert sim.duplicates and sim.reordered and sim.restarts and sim.malformed
    days, invalid = bill_offline(sim.lines, 4, tz)
    assert invalid == sim.malformed
    expected = {k: tuple(v) for k, v in sim.truth.items()}
    assert {k: v for k, v in days.items() if v != (0, 0)} == expected

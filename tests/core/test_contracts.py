"""The Kafka message contracts accept exactly the well-formed reports."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from quotaflow.core.contracts import (
    MAX_COUNTER,
    Counter,
    CounterReport,
    DeadLetter,
    TotalsBatch,
)


def valid() -> dict[str, Any]:
    return {
        "node_id": "node-a",
        "epoch": 1761000000000,
        "seq": 42,
        "observed_at": "2026-11-21T12:00:05Z",
        "counters": [{"user_id": "alice", "up": 10, "down": 20}],
    }


def test_valid_report_with_defaults() -> None:
    report = CounterReport.model_validate_json(json.dumps(valid()))
    assert report.kind == "cumulative"
    assert report.baseline is False
    assert report.observed_at == datetime(2026, 11, 21, 12, 0, 5, tzinfo=UTC)
    assert report.counters == (Counter(user_id="alice", up=10, down=20),)
    minimal = CounterReport.model_validate_json(
        b'{"node_id": "n", "epoch": 0, "seq": 0, "observed_at": "2026-01-01T00:00:00+05:45"}'
    )
    assert minimal.counters == ()
    assert minimal.observed_at.utcoffset() == timedelta(hours=5, minutes=45)


def test_valid_delta_baseline_and_limits() -> None:
    data = valid() | {"kind": "delta", "baseline": True}
    data["counters"] = [
        {"user_id": "alice", "up": 0, "down": MAX_COUNTER},
        {"user_id": "bob", "up": 1, "down": 0},
    ]
    report = CounterReport.model_validate_json(json.dumps(data))
    assert (report.kind, report.baseline, len(report.counters)) == ("delta", True, 2)
    # Python objects too (what producers build), with an aware datetime.
    minus3 = timezone(timedelta(hours=-3))
    built = CounterReport(
        node_id="n", epoch=1, seq=1, observed_at=datetime(2026, 1, 1, tzinfo=minus3)
    )
    assert built.kind == "cumulative"


def test_round_trip_json() -> None:
    report = CounterReport.model_validate_json(json.dumps(valid()))
    assert CounterReport.model_validate_json(report.model_dump_json()) == report


def counter_with(**changes: Any) -> dict[str, Any]:
    data = valid()
    data["counters"] = [data["counters"][0] | changes]
    return data


MALFORMED: dict[str, dict[str, Any]] = {
    "negative up": counter_with(up=-1),
    "negative down": counter_with(down=-5),
    "counter above int64": counter_with(up=MAX_COUNTER + 1),
    "float counter": counter_with(up=10.0),
    "float counter fraction": counter_with(down=2.5),
    "string counter": counter_with(up="10"),
    "bool counter": counter_with(down=True),
    "null counter": counter_with(up=None),
    "missing counter": {**valid(), "counters": [{"user_id": "alice", "up": 1}]},
    "empty user_id": counter_with(user_id=""),
    "unknown counter field": counter_with(extra=1),
    "float seq": valid() | {"seq": 42.0},
    "string seq": valid() | {"seq": "42"},
    "bool seq": valid() | {"seq": False},
    "string epoch": valid() | {"epoch": "1761000000000"},
    "bool epoch": valid() | {"epoch": True},
    "negative epoch": valid() | {"epoch": -1},
    "negative seq": valid() | {"seq": -1},
    "naive observed_at": valid() | {"observed_at": "2026-11-21T12:00:05"},
    "date-only observed_at": valid() | {"observed_at": "2026-11-21"},
    "garbage observed_at": valid() | {"observed_at": "yesterday"},
    "unknown field": valid() | {"region": "eu"},
    "unknown kind": valid() | {"kind": "gauge"},
    "string baseline": valid() | {"baseline": "true"},
    "int baseline": valid() | {"baseline": 1},
    "empty node_id": valid() | {"node_id": ""},
    "long node_id": valid() | {"node_id": "n" * 257},
    "int node_id": valid() | {"node_id": 7},
    "missing node_id": {k: v for k, v in valid().items() if k != "node_id"},
    "missing observed_at": {k: v for k, v in valid().items() if k != "observed_at"},
    "counters not a list": valid() | {"counters": {"alice": 1}},
    "duplicate users": valid() | {
        "counters": [
            {"user_id": "alice", "up": 1, "down": 2},
            {"user_id": "alice", "up": 3, "down": 4},
        ]
    },
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_json_is_rejected(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CounterReport.model_validate_json(json.dumps(data))


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"{", b'{"node_id": "n",}', b"[]", b"null", b"42", b"\xff\xfe",
     b'{"node_id": "n", "epoch": 1, "seq": NaN, "observed_at": "2026-01-01T00:00:00Z"}'],
)
def test_non_json_is_rejected(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        CounterReport.model_validate_json(raw)


def test_python_input_is_strict_too() -> None:
    base = {"node_id": "n", "epoch": 1, "seq": 1, "observed_at": datetime(2026, 1, 1, tzinfo=UTC)}
    CounterReport.model_validate(base)
    for bad in (
        base | {"observed_at": datetime(2026, 1, 1)},  # naive
        base | {"seq": True},
        base | {"seq": 1.0},
        base | {"epoch": "1"},
        base | {"counters": ({"user_id": "a", "up": 1, "down": -1},)},
        base | {"extra": 1},
    ):
        with pytest.raises(ValidationError):
            CounterReport.model_validate(bad)


def test_reports_are_frozen() -> None:
    report = CounterReport.model_validate_json(json.dumps(valid()))
    with pytest.raises(ValidationError):
        report.seq = 43  # type: ignore[misc]


def test_other_contracts() -> None:
    batch = TotalsBatch(node_id="n", day=1761004800, month=1759276800,
                        totals=(("alice", 1, 2, 3, 4), ("bob", 0, 0, 5, 6)))
    assert TotalsBatch.model_validate_json(batch.model_dump_json()) == batch
    encoded = TotalsBatch.encode("n", 1761004800, 1759276800,
                                 [("alice", 1, 2, 3, 4), ("bob", 0, 0, 5, 6)])
    assert TotalsBatch.model_validate_json(encoded) == batch
    for bad_row in (("alice", -1, 2, 3, 4), ("alice", 1, 2, 3), ("", 1, 2, 3, 4),
                    ("alice", 1.0, 2, 3, 4)):
        with pytest.raises(ValidationError):
            TotalsBatch.model_validate_json(
                json.dumps({"node_id": "n", "day": 0, "month": 0, "totals": [bad_row]})
            )
    letter = DeadLetter(
        reason="invalid", detail="x", topic="t", partition=0, offset=5,
        at=datetime(2026, 1, 1, tzinfo=UTC), payload="AP8=",
    )
    assert letter.original() == b"\x00\xff"
    with pytest.raises(ValidationError):
        DeadLetter(reason="bored", detail="x", topic="t", partition=0, offset=5,  # type: ignore[arg-type]
                   at=datetime(2026, 1, 1, tzinfo=UTC), payload="")

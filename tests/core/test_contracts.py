"""The Kafka message contracts accept exactly the well-formed reports."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from quotaflow.core.contracts import (
    MAX_COUNTER,
    MAX_SEQ,
    OBSERVED_AT_FLOOR,
    Counter,
    CounterReport,
    DeadLetter,
    TotalsBatch,
    identifier_problem,
    validate_counter,
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


# --- identifiers, bounds and duplicate keys (the reliability issue) ------------------------

AWKWARD_IDS = [
    "a\\b", "\\\\srv\\share", "a\\,b", "a\\=b", "a,b=c d", " ", "=", ",", "x y",
    "it's", 'say "hi"', "ü日本語", "emoji 🎉", "\u00a0nbsp", "tab\\t-literal", "a" * 256,
]
BAD_IDS = {
    "NUL": "a\x00b", "LF": "a\nb", "CR": "a\rb", "TAB": "a\tb", "US": "a\x1f",
    "DEL": "a\x7f", "C1 0x80": "\x80a", "NEL": "a\x85b", "C1 0x9f": "a\x9f",
    "LINE SEPARATOR": "a\u2028b", "PARAGRAPH SEPARATOR": "a\u2029b",
    "trailing backslash": "abc\\", "only a backslash": "\\", "two trailing backslashes": "a\\\\",
    "backslash before space": "a\\ b", "too long": "a" * 257, "empty": "",
}


@pytest.mark.parametrize("user_id", AWKWARD_IDS)
def test_awkward_but_allowed_identifiers(user_id: str) -> None:
    data = valid() | {"node_id": user_id}
    data["counters"] = [{"user_id": user_id, "up": 1, "down": 2}]
    report = CounterReport.decode(json.dumps(data))
    assert report.node_id == user_id and report.counters[0].user_id == user_id
    assert CounterReport.decode(report.encode()) == report
    assert identifier_problem(user_id) is None


@pytest.mark.parametrize("bad", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_identifiers_outside_the_contract_are_refused(bad: str) -> None:
    assert identifier_problem(bad)
    for field in ("node_id", "user_id"):
        data = counter_with(user_id=bad) if field == "user_id" else valid() | {"node_id": bad}
        with pytest.raises(ValidationError) as raised:
            CounterReport.decode(json.dumps(data))
        [error] = raised.value.errors()
        assert error["loc"][-1] == field
        if bad and len(bad) <= 256:
            assert "pattern" not in error["msg"], "the message says what is wrong, not a regex"
            assert error["msg"] == f"Value error, {identifier_problem(bad)}"
    with pytest.raises(ValidationError):
        validate_counter({"user_id": bad, "up": 1, "down": 1})
    with pytest.raises(ValidationError):
        CounterReport(node_id=bad, epoch=1, seq=1, observed_at=datetime(2026, 1, 1, tzinfo=UTC))


def test_lone_surrogates_are_refused() -> None:
    raw = b'{"node_id": "n\\ud800", "epoch": 1, "seq": 1, "observed_at": "2026-01-01T00:00:00Z"}'
    with pytest.raises(ValidationError):
        CounterReport.decode(raw)
    with pytest.raises(ValidationError):
        validate_counter({"user_id": "a\udc80", "up": 1, "down": 1})
    assert identifier_problem("a\udc80")


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_property_the_identifier_check_and_the_model_agree(text: str) -> None:
    problem = identifier_problem(text)
    try:
        validate_counter({"user_id": text, "up": 0, "down": 0})
    except ValidationError:
        assert problem is not None
    else:
        assert problem is None


def test_epoch_and_seq_are_below_2_48() -> None:
    top = MAX_SEQ - 1
    assert MAX_SEQ == 1 << 48
    report = CounterReport.decode(json.dumps(valid() | {"epoch": top, "seq": top}))
    assert (report.epoch, report.seq) == (top, top)
    for field in ("epoch", "seq"):
        with pytest.raises(ValidationError) as raised:
            CounterReport.decode(json.dumps(valid() | {field: MAX_SEQ}))
        [error] = raised.value.errors()
        assert error["loc"] == (field,)
        assert "2**48" in error["msg"]


def test_observed_at_floor() -> None:
    assert datetime(2020, 1, 1, tzinfo=UTC) == OBSERVED_AT_FLOOR
    ok = CounterReport.decode(json.dumps(valid() | {"observed_at": "2020-01-01T00:00:00Z"}))
    assert ok.observed_at == OBSERVED_AT_FLOOR
    for early in ("1970-01-01T00:00:00Z", "2019-12-31T23:59:59Z", "2020-01-01T00:30:00+01:00"):
        with pytest.raises(ValidationError) as raised:
            CounterReport.decode(json.dumps(valid() | {"observed_at": early}))
        [error] = raised.value.errors()
        assert error["loc"] == ("observed_at",) and "2020-01-01" in error["msg"]
    with pytest.raises(ValidationError):
        CounterReport(node_id="n", epoch=1, seq=1, observed_at=datetime(1970, 1, 1, tzinfo=UTC))


DUPLICATED = {
    "top level": b'{"node_id": "a", "node_id": "b", "epoch": 1, "seq": 1,'
                 b' "observed_at": "2026-01-01T00:00:00Z"}',
    "compact": b'{"node_id":"a","epoch":1,"seq":1,"seq":2,"observed_at":"2026-01-01T00:00:00Z"}',
    "in a counter": b'{"node_id":"a","epoch":1,"seq":1,"observed_at":"2026-01-01T00:00:00Z",'
                    b'"counters":[{"user_id":"u","up":1,"down":2,"up":900}]}',
    "escaped key": b'{"node_id":"a","epoch":1,"seq":1,"s\\u0065q":2,'
                   b'"observed_at":"2026-01-01T00:00:00Z"}',
    "key then spaces": b'{"node_id":"a","epoch":1,"seq" :1,"seq":2,'
                       b'"observed_at":"2026-01-01T00:00:00Z"}',
    "with a quote in an id": b'{"node_id":"a\\"b","epoch":1,"seq":1,"observed_at":'
                             b'"2026-01-01T00:00:00Z","counters":[{"user_id":"u\\\\",'
                             b'"user_id":"v","up":1,"down":2}]}',
    "same counters twice": b'{"node_id":"a","epoch":1,"seq":1,"observed_at":"2026-01-01T00:00:00Z",'
                           b'"counters":[],"counters":[{"user_id":"u","up":1,"down":2}]}',
}


@pytest.mark.parametrize("raw", DUPLICATED.values(), ids=DUPLICATED.keys())
def test_duplicate_keys_are_refused(raw: bytes) -> None:
    json.loads(raw)  # valid JSON, where the last key would win
    for data in (raw, raw.decode()):
        with pytest.raises(ValidationError) as raised:
            CounterReport.decode(data)
        assert "twice" in str(raised.value)


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(valid(), indent=2).encode(),
        b'{"node_id":"a\\"b\\\\c","epoch":1,"seq":1,"observed_at":"2026-01-01T00:00:00Z",'
        b'"counters":[{"user_id":"\\":\\"","up":1,"down":2}]}',
        b'{"node_id":"n","kind":"delta","epoch":1,"seq":1,"observed_at":"2026-01-01T00:00:00Z",'
        b'"baseline":true,"counters":[{"user_id":"\\u0075","up":1,"down":2}]}',
        b'{"node_id":"n","epoch":1,"seq":1,"observed_at":"2026-01-01T00:00:00+05:45"}',
    ],
)
def test_reports_without_duplicates_still_decode(raw: bytes) -> None:
    assert CounterReport.decode(raw) == CounterReport.model_validate_json(raw)


@st.composite
def report_json_with_a_key_twice(draw: st.DrawFn) -> str:
    counters = [
        {"user_id": draw(st.sampled_from(AWKWARD_IDS)) + str(i), "up": 1, "down": 2}
        for i in range(draw(st.integers(0, 3)))
    ]
    top: dict[str, Any] = valid() | {"counters": counters, "kind": "delta"}
    objects: list[dict[str, Any]] = [top, *counters]
    target = draw(st.sampled_from(objects))
    key = draw(st.sampled_from(sorted(target)))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (",", " : ")]))

    def render(obj: object) -> str:
        if isinstance(obj, dict):
            pairs = [json.dumps(k) + separators[1] + render(v) for k, v in obj.items()]
            if obj is target:
                at = draw(st.integers(0, len(pairs)))
                pairs.insert(at, json.dumps(key) + separators[1] + render(obj[key]))
            return "{" + separators[0].join(pairs) + "}"
        if isinstance(obj, list):
            return "[" + separators[0].join(render(v) for v in obj) + "]"
        return json.dumps(obj, ensure_ascii=draw(st.booleans()))

    return render(top)


@hypothesis_settings(max_examples=200, deadline=None)
@given(report_json_with_a_key_twice())
def test_property_any_key_twice_is_refused(raw: str) -> None:
    with pytest.raises(ValidationError):
        CounterReport.decode(raw.encode())

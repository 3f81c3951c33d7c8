"""The message contracts: the one definition of every record quotaflow puts on Kafka.

Producers, the stream worker, the sinks and the tests all import these models;
`docs/contracts.md` describes them for people writing their own producers.

>>> report = CounterReport.model_validate_json(
...     b'{"node_id": "node-a", "epoch": 1761000000000, "seq": 42,'
...     b' "observed_at": "2026-11-21T12:00:05Z",'
...     b' "counters": [{"user_id": "alice", "up": 10, "down": 20}]}'
... )
>>> report.kind, report.baseline, report.counters[0].down
('cumulative', False, 20)

Every record's wire form is next to its model: `encode()` writes the bytes that go
on Kafka and `decode()` reads and validates them.

>>> CounterReport.decode(report.encode()) == report
True
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass

MAX_COUNTER = 2**63 - 1  # InfluxDB integers are signed 64-bit.
MAX_SEQ = 2**48  # `epoch` and `seq` are below this (a millisecond clock fits until 10889)
OBSERVED_AT_FLOOR = datetime(2020, 1, 1, tzinfo=UTC)
"""Reports observed before this are refused: a node clock at 1970 would be billed on 1970-01-01."""
MAX_IDENTIFIER_LENGTH = 256

# C0, DEL, C1 and the Unicode line and paragraph separators.
_CONTROL = "\x00-\x1f\x7f-\x9f\u2028\u2029"
# Spaces, and runs of backslashes that end in a character which is neither a space nor a
# control character: so no control characters, no backslash at the end and none right
# before a space, the two backslashes InfluxDB 1.x line protocol cannot carry in a tag
# (see `identifier_problem`). Checked by pydantic-core's Rust regex engine, which is fast
# enough for the hot path; lone surrogates never reach it (pydantic refuses them).
_IDENTIFIER_PATTERN = rf"^(?: |\\*[^\\ {_CONTROL}])*$"
_CONTROL_CHAR = re.compile(f"[{_CONTROL}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def right_sized(record: bytes) -> bytes:
    """`record` copied into a bytes object of its own size: for records kept in memory.

    orjson hands its output over in the buffer it wrote it into, which is at least
    about 4 KB and grows by doubling, so a 40-byte record held in a table keeps
    4 KB of memory, and a 20 KB one up to 40 KB. The copy costs a memcpy; made by
    bytes formatting, which sizes its result exactly, it takes a third of the time
    of `memoryview(record).tobytes()` for a record of a few dozen bytes.

    >>> record = orjson.dumps({"n": 1})
    >>> right_sized(record) == record, right_sized(b"%s 100%") == b"%s 100%"
    (True, True)
    """
    return b"%b" % record


def validation_reason(exc: ValidationError) -> str:
    """A short, readable reason for a refused record; the record's values are left out.

    >>> class Pair(BaseModel):
    ...     a: int
    >>> try:
    ...     Pair.model_validate({})
    ... except ValidationError as exc:
    ...     print(validation_reason(exc))
    a: Field required
    """
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(x) for x in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def identifier_problem(value: str) -> str | None:
    r"""What makes `value` no valid user or node id, or None if it is one.

    An identifier has 1 to 256 characters, none of them a control character (C0,
    DEL, C1, U+2028, U+2029) or a lone surrogate; it does not end with a backslash
    and has no backslash right before a space. InfluxDB 1.x line protocol takes a
    character after a backslash as escaped, whatever precedes the backslash, so a
    tag value cannot end with one, and its line splitter pairs backslashes, so a
    backslash before a space can split a batch in the wrong place.

    >>> identifier_problem("DOMAIN\\alice") is None
    True
    >>> identifier_problem("alice\\")
    'must not end with a backslash'
    """
    if not value:
        return "must not be empty"
    if len(value) > MAX_IDENTIFIER_LENGTH:
        return f"longer than {MAX_IDENTIFIER_LENGTH} characters"
    found = _CONTROL_CHAR.search(value)
    if found:
        return f"contains the control character U+{ord(found.group()):04X}"
    found = _SURROGATE.search(value)
    if found:
        return f"contains the lone surrogate U+{ord(found.group()):04X}"
    if value.endswith("\\"):
        return "must not end with a backslash"
    if "\\ " in value:
        return "has a backslash right before a space"
    return None


def check_identifier(value: str, what: str = "identifier") -> str:
    """`value` if it is a valid user or node id; raises ValueError naming the problem."""
    problem = identifier_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {value[:60]!r} {problem}")
    return value


def _below_max_seq(value: int) -> int:
    if value >= MAX_SEQ:
        raise ValueError(f"must be below 2**48 ({MAX_SEQ})")
    return value


def _not_before_floor(value: datetime) -> datetime:
    if value < OBSERVED_AT_FLOOR:
        raise ValueError("is before 2020-01-01T00:00:00Z, so the node's clock is wrong")
    return value


ByteCount = Annotated[StrictInt, Field(ge=0, le=MAX_COUNTER)]
Identifier = Annotated[
    StrictStr,
    Field(min_length=1, max_length=MAX_IDENTIFIER_LENGTH, pattern=_IDENTIFIER_PATTERN),
]
SeqNumber = Annotated[StrictInt, Field(ge=0), AfterValidator(_below_max_seq)]
ObservedAt = Annotated[AwareDatetime, AfterValidator(_not_before_floor)]


class _Contract(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


# Not strict as a whole, so that it can be built from a dict; its fields are strict.
@dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class Counter:
    """One user's byte counters on one node: `up` is what the user sent, `down` what it got.

    A slotted pydantic dataclass rather than a model: reports carry thousands of
    them, and validating into slots is half again as fast (the worker's hot path).
    """

    user_id: Identifier
    up: ByteCount
    down: ByteCount


_COUNTER = TypeAdapter(Counter)


def validate_counter(data: object) -> Counter:
    """A `Counter` from plain data (a dict), validated like inside a report.

    >>> validate_counter({"user_id": "alice", "up": 1, "down": 2})
    Counter(user_id='alice', up=1, down=2)
    """
    return _COUNTER.validate_python(data)


ReportKind = Literal["cumulative", "delta"]


class CounterReport(_Contract):
    """A node's counters at one moment; the unit producers publish to `<prefix>.raw`.

    `epoch` grows whenever the node's counters restart from zero, `seq` grows with
    every report within an epoch. `cumulative` counters count since the epoch began,
    `delta` counters since the previous report. `baseline` marks counters that hold
    traffic which must not be billed (the agent's first look at a busy node).
    """

    node_id: Identifier
    epoch: SeqNumber
    seq: SeqNumber
    observed_at: ObservedAt
    kind: ReportKind = "cumulative"
    baseline: bool = False
    counters: tuple[Counter, ...] = ()

    @model_validator(mode="after")
    def _users_unique(self) -> CounterReport:
        users = {c.user_id for c in self.counters}
        if len(users) != len(self.counters):
            raise ValueError("a user appears twice in one report")
        return self

    def encode(self) -> bytes:
        """The wire form: compact JSON, defaults left out."""
        return orjson.dumps(self.model_dump(mode="json", exclude_defaults=True))

    @classmethod
    def decode(cls, data: bytes | str) -> CounterReport:
        """Read and validate the wire form; raises `pydantic.ValidationError`.

        Stricter than `model_validate_json`: a key given twice in any object is
        refused rather than the last one winning, and an invalid identifier is
        reported in words rather than as a regular expression.

        >>> try:
        ...     CounterReport.decode(b'{"node_id": "a", "node_id": "b", "epoch": 1, "seq": 1,'
        ...                          b' "observed_at": "2026-01-01T00:00:00Z"}')
        ... except ValidationError as exc:
        ...     print(exc.errors()[0]["msg"])
        Value error, the key 'node_id' is given twice in one JSON object
        """
        try:
            report = cls.model_validate_json(data)
        except ValidationError as exc:
            raise _explained(exc) from None
        # Duplicate keys, without parsing again on the hot path. With no backslash in
        # the message every `"` delimits a string, so the quotes count the strings: a
        # valid report has a key per field it names and three per counter, and the
        # string values node_id, observed_at, kind (when named) and every user_id. A
        # key given twice adds a key, so any other count, and any message with a
        # backslash (escaped quotes or keys), is looked at closely.
        fields = report.__pydantic_fields_set__
        quotes = 2 * (len(fields) + 4 * len(report.counters) + 2 + ("kind" in fields))
        if isinstance(data, bytes):
            if b"\\" in data or data.count(b'"') != quotes:
                _refuse_duplicate_keys(data)
        elif "\\" in data or data.count('"') != quotes:
            _refuse_duplicate_keys(data)
        return report


def _explained(exc: ValidationError) -> ValidationError:
    """`exc` with identifier pattern mismatches said in words (only on the error path)."""
    errors = exc.errors(include_url=False)
    if not any(e["type"] == "string_pattern_mismatch" for e in errors):
        return exc
    details: list[Any] = []
    for error in errors:
        value = error.get("input")
        problem = (
            identifier_problem(value)
            if error["type"] == "string_pattern_mismatch" and isinstance(value, str)
            else None
        )
        detail = {"type": error["type"], "loc": error["loc"], "input": value}
        if problem is not None:
            detail |= {"type": "value_error", "ctx": {"error": problem}}
        elif "ctx" in error:
            detail["ctx"] = error["ctx"]
        details.append(detail)
    return ValidationError.from_exception_data(exc.title, details, input_type="json")


def _refuse_duplicate_keys(data: bytes | str) -> None:
    """Raise a ValidationError if an object in `data` (valid JSON) has a key twice."""
    try:
        json.loads(data, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        problem = f"the key {exc.key[:60]!r} is given twice in one JSON object"
        raise ValidationError.from_exception_data(
            "CounterReport",
            [{"type": "value_error", "loc": (), "input": data, "ctx": {"error": problem}}],
            input_type="json",
        ) from None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


PeriodKind = Literal["day", "month"]

# user_id, day up, day down, month up, month down (raw bytes), then the same four
# billed (after the node's rate); records written before rates existed have only
# the raw four, whose billed bytes equal them
UserTotals = (
    tuple[Identifier, ByteCount, ByteCount, ByteCount, ByteCount,
          ByteCount, ByteCount, ByteCount, ByteCount]
    | tuple[Identifier, ByteCount, ByteCount, ByteCount, ByteCount]
)
FullTotalsRow = tuple[str, int, int, int, int, int, int, int, int]
# a row as the worker sends it: without its billed bytes when they equal the raw ones
TotalsRow = FullTotalsRow | tuple[str, int, int, int, int]


def full_row(row: TotalsRow | UserTotals) -> FullTotalsRow:
    """A totals row with its billed bytes, which equal the raw ones when it has none.

    >>> full_row(("u", 1, 2, 3, 4))
    ('u', 1, 2, 3, 4, 1, 2, 3, 4)
    """
    return row if len(row) == 9 else (*row, *row[1:])


class ReportSeen(_Contract):
    """The report a `TotalsBatch` came from, as the worker saw it: the node's status.

    `observed_at` and `received_at` are Unix milliseconds: the report's own time, and
    when it was appended to `<prefix>.raw` (the Kafka record's timestamp; for a
    fragment the worker re-routed, when it re-sent it). `readings` counts the
    fragment's readings. The sinks count the node's restarts from the epochs.
    """

    epoch: SeqNumber
    seq: SeqNumber
    observed_at: StrictInt
    received_at: StrictInt
    readings: Annotated[StrictInt, Field(ge=0)]


class TotalsBatch(_Contract):
    """Running totals the worker publishes to `<prefix>.totals` for each fragment it bills.

    All totals of a fragment belong to the day and month that contain its
    `observed_at`, so they are given once (`day`, `month`: the periods' first
    seconds, Unix time, in the billing timezone) and each user's totals are a
    row: raw day up, day down, month up, month down, then the same billed, which a
    row leaves out when they equal the raw ones (`rows()` fills them in). A later
    total of the same (user, node, period) replaces an earlier one.

    `report` says which report it came from (`ReportSeen`); records written before it
    existed have none. A fragment that changed no user's totals today still gets a
    record, with no rows, for its `report`: the node is alive.
    """

    node_id: Identifier
    day: StrictInt
    month: StrictInt
    totals: tuple[UserTotals, ...]
    report: ReportSeen | None = None

    @staticmethod
    def encode(
        node_id: str, day: int, month: int, rows: list[TotalsRow],
        report: tuple[int, int, int, int, int] | None = None,
    ) -> bytes:
        """Encode without building a model (the hot path); the same JSON the model reads.

        `report` is a `ReportSeen`'s fields in their order: epoch, seq, observed_at,
        received_at, readings.

        >>> TotalsBatch.decode(TotalsBatch.encode("n", 86400, 0, [("u", 1, 2, 3, 4, 1, 3, 3, 6)]))
        TotalsBatch(node_id='n', day=86400, month=0, totals=(('u', 1, 2, 3, 4, 1, 3, 3, 6),), \
report=None)
        >>> TotalsBatch.decode(TotalsBatch.encode("n", 0, 0, [], (7, 3, 5000, 5100, 1))).report
        ReportSeen(epoch=7, seq=3, observed_at=5000, received_at=5100, readings=1)
        """
        if report is None:
            return orjson.dumps({"node_id": node_id, "day": day, "month": month, "totals": rows})
        epoch, seq, observed_at, received_at, readings = report
        return orjson.dumps({
            "node_id": node_id, "day": day, "month": month, "totals": rows,
            "report": {"epoch": epoch, "seq": seq, "observed_at": observed_at,
                       "received_at": received_at, "readings": readings},
        })

    @classmethod
    def decode(cls, data: bytes | str) -> TotalsBatch:
        """Read and validate the wire form; raises `pydantic.ValidationError`."""
        return cls.model_validate_json(data)

    def rows(self) -> list[FullTotalsRow]:
        """Every row with its billed bytes (those of raw-only rows equal the raw ones).

        >>> TotalsBatch.decode(b'{"node_id":"n","day":0,"month":0,"totals":[["u",1,2,3,4]]}').rows()
        [('u', 1, 2, 3, 4, 1, 2, 3, 4)]
        """
        return [full_row(row) for row in self.totals]


DeadReason = Literal["invalid", "anomaly", "late", "stale-epoch", "stale-seq", "error"]


MAX_DEAD_PAYLOAD_BYTES = 2 * 1024 * 1024
"""The most of a message a dead letter carries; with readings it stays under the topic limit."""


class DeadLetter(_Contract):
    """A message, or part of one, that was not billed, with why; published to `<prefix>.dead`.

    `payload` is the original message value, base64-encoded so that any bytes survive;
    a message larger than `MAX_DEAD_PAYLOAD_BYTES` is cut there (`truncated`), and
    `size` and `sha256` describe the whole of it. `readings` lists bytes that were
    not billed (anomalies, late data), and only those.
    """

    reason: DeadReason
    detail: str
    topic: str
    partition: int
    offset: int
    at: datetime
    payload: str
    readings: tuple[dict[str, int | str], ...] = ()
    size: int | None = None
    sha256: str | None = None
    truncated: bool = False

    def original(self) -> bytes:
        """The bytes of the message as it arrived (its first part, if `truncated`)."""
        return base64.b64decode(self.payload)

    @classmethod
    def encode(
        cls,
        reason: DeadReason,
        detail: str,
        *,
        topic: str,
        partition: int,
        offset: int,
        payload: bytes | None,
        readings: tuple[dict[str, int | str], ...] = (),
        at: datetime | None = None,
    ) -> bytes:
        """The record for a message that was not billed, stamped `at` (default: now).

        >>> letter = DeadLetter.decode(DeadLetter.encode(
        ...     "invalid", "not JSON", topic="t", partition=0, offset=7, payload=b"\\xff"))
        >>> letter.reason, letter.original(), letter.size, letter.truncated
        ('invalid', b'\\xff', 1, False)
        >>> huge = DeadLetter.decode(DeadLetter.encode(
        ...     "invalid", "too big", topic="t", partition=0, offset=8,
        ...     payload=b"x" * (MAX_DEAD_PAYLOAD_BYTES + 1)))
        >>> len(huge.original()) == MAX_DEAD_PAYLOAD_BYTES, huge.size, huge.truncated
        (True, 2097153, True)
        """
        data = payload or b""
        return cls(
            reason=reason,
            detail=detail,
            topic=topic,
            partition=partition,
            offset=offset,
            at=at or datetime.now(UTC),
            payload=base64.b64encode(data[:MAX_DEAD_PAYLOAD_BYTES]).decode(),
            readings=readings,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            truncated=len(data) > MAX_DEAD_PAYLOAD_BYTES,
        ).model_dump_json().encode()

    @classmethod
    def decode(cls, data: bytes | str) -> DeadLetter:
        """Read and validate the wire form; raises `pydantic.ValidationError`."""
        return cls.model_validate_json(data)

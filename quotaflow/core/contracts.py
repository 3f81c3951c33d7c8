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
from datetime import UTC, datetime
from typing import Annotated, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    model_validator,
)
from pydantic.dataclasses import dataclass

MAX_COUNTER = 2**63 - 1  # InfluxDB integers are signed 64-bit.

ByteCount = Annotated[StrictInt, Field(ge=0, le=MAX_COUNTER)]
Identifier = Annotated[StrictStr, Field(min_length=1, max_length=256)]


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
    epoch: Annotated[StrictInt, Field(ge=0)]
    seq: Annotated[StrictInt, Field(ge=0)]
    observed_at: AwareDatetime
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
        """Read and validate the wire form; raises `pydantic.ValidationError`."""
        return cls.model_validate_json(data)


PeriodKind = Literal["day", "month"]

# user_id, day up, day down, month up, month down
UserTotals = tuple[Identifier, ByteCount, ByteCount, ByteCount, ByteCount]


class TotalsBatch(_Contract):
    """Running totals the worker publishes to `<prefix>.totals` for each fragment it bills.

    All totals of a fragment belong to the day and month that contain its
    `observed_at`, so they are given once (`day`, `month`: the periods' first
    seconds, Unix time, in the billing timezone) and each user's totals are a
    row. A later total of the same (user, node, period) replaces an earlier one.
    """

    node_id: Identifier
    day: StrictInt
    month: StrictInt
    totals: tuple[UserTotals, ...]

    @staticmethod
    def encode(
        node_id: str, day: int, month: int, rows: list[tuple[str, int, int, int, int]]
    ) -> bytes:
        """Encode without building a model (the hot path); the same JSON the model reads.

        >>> TotalsBatch.decode(TotalsBatch.encode("n", 86400, 0, [("u", 1, 2, 3, 4)]))
        TotalsBatch(node_id='n', day=86400, month=0, totals=(('u', 1, 2, 3, 4),))
        """
        return orjson.dumps({"node_id": node_id, "day": day, "month": month, "totals": rows})

    @classmethod
    def decode(cls, data: bytes | str) -> TotalsBatch:
        """Read and validate the wire form; raises `pydantic.ValidationError`."""
        return cls.model_validate_json(data)


DeadReason = Literal["invalid", "anomaly", "late", "stale-epoch", "error"]


class DeadLetter(_Contract):
    """A message, or part of one, that was not billed, with why; published to `<prefix>.dead`.

    `payload` is the original message value, base64-encoded so that any bytes survive.
    `readings` lists the affected users' computed deltas for anomalies and late data.
    """

    reason: DeadReason
    detail: str
    topic: str
    partition: int
    offset: int
    at: datetime
    payload: str
    readings: tuple[dict[str, int | str], ...] = ()

    def original(self) -> bytes:
        """The bytes of the message as it arrived."""
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
    ) -> bytes:
        """The record for a message that was not billed, stamped now.

        >>> letter = DeadLetter.decode(DeadLetter.encode(
        ...     "invalid", "not JSON", topic="t", partition=0, offset=7, payload=b"\\xff"))
        >>> letter.reason, letter.original()
        ('invalid', b'\\xff')
        """
        return cls(
            reason=reason,
            detail=detail,
            topic=topic,
            partition=partition,
            offset=offset,
            at=datetime.now(UTC),
            payload=base64.b64encode(payload or b"").decode(),
            readings=readings,
        ).model_dump_json().encode()

    @classmethod
    def decode(cls, data: bytes | str) -> DeadLetter:
        """Read and validate the wire form; raises `pydantic.ValidationError`."""
        return cls.model_validate_json(data)

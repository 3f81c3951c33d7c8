"""Quota plans, node rates and quota commands: their contracts and the pure rules on them.

A `Plan` (`<prefix>.plans`, compacted, keyed by user id) says how many bytes a user
may use per period, and when the periods start; `NodeRates` (`<prefix>.nodes`)
say how a node's raw bytes are billed; a `Command` (`<prefix>.control`) tells the
panels to warn, disable or enable a user. Every model is strict and frozen, with
its wire form next to it, like those in `contracts.py`.

>>> plan = Plan.decode(b'{"user_id": "alice", "quota_bytes": 50000000000,'
...     b' "period": {"kind": "calendar_month"}, "timezone": "Europe/Berlin",'
...     b' "packs": [{"pack_id": "nov-extra", "bytes": 10000000000,'
...     b' "added_at": "2026-11-20T10:00:00Z", "expires_at": null}], "enabled": true}')
>>> plan.warn_at, plan.packs[0].expires_at, Plan.decode(plan.encode()) == plan
((0.8,), None, True)
>>> start, end = period_at(plan, datetime(2026, 11, 24, 10, tzinfo=UTC), ZoneInfo("UTC"))
>>> start.isoformat(), end.isoformat()
('2026-11-01T00:00:00+01:00', '2026-12-01T00:00:00+01:00')

Billed bytes are raw bytes times the node's rate in effect when they were observed,
rounded down, with the rate as an integer number of 1/10000:

>>> rates = NodeRates.decode(b'{"node_id": "node-a",'
...     b' "rates": [{"from": "2026-11-01T00:00:00Z", "rate": "1.5"}]}')
>>> before, after = datetime(2026, 10, 31, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)
>>> rate_at(rates, before), rate_at(rates, after)
(10000, 15000)
>>> billed(1001, rate_at(rates, after))
1501

All instants are handled to the whole second: fractions of a second (of an
anchor, a `starts_at`, an `observed_at`) are cut off.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from functools import cached_property
from typing import Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from quotaflow.core.contracts import MAX_COUNTER, Identifier

RATE_UNIT = 10_000
"""Rates are integers of 1/10000: a rate of "1.5" is 15000."""
NO_END = 2**62
"""The end, in Unix seconds, of a period that never ends (kind `none`)."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


_R = TypeVar("_R", bound=_Record)


def _decode(cls: type[_R], data: bytes | str) -> _R:
    """Validate the wire form; a key given twice in any object is refused."""
    try:
        json.loads(data, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        problem = f"the key {exc.key[:60]!r} is given twice in one JSON object"
        raise ValidationError.from_exception_data(
            cls.__name__,
            [{"type": "value_error", "loc": (), "input": data, "ctx": {"error": problem}}],
            input_type="json",
        ) from None
    except ValueError:
        pass  # not JSON: pydantic says so below
    return cls.model_validate_json(data)


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


def unix(t: datetime) -> int:
    """Unix seconds of an aware instant, fractions cut off (towards the past)."""
    return int(t.timestamp() // 1)


# ---------------------------------------------------------------------------- plans


class CalendarMonth(_Record):
    """Periods from local midnight on the 1st of each month."""

    kind: Literal["calendar_month"]


class Monthly(_Record):
    """Periods from local midnight on `reset_day` of each month (its last day when shorter)."""

    kind: Literal["monthly"]
    reset_day: Annotated[StrictInt, Field(ge=1, le=31)]


class EveryDays(_Record):
    """Periods of `days` * 86400 elapsed seconds, one of them starting at `anchor`."""

    kind: Literal["every_days"]
    days: Annotated[StrictInt, Field(ge=1, le=100_000)]
    anchor: AwareDatetime


class NoReset(_Record):
    """One period from the plan's `starts_at`, never reset."""

    kind: Literal["none"]


PeriodRule = Annotated[CalendarMonth | Monthly | EveryDays | NoReset, Field(discriminator="kind")]

Bytes = Annotated[StrictInt, Field(gt=0, le=MAX_COUNTER)]


class Pack(_Record):
    """Extra bytes, valid from `added_at` until `expires_at` (None: no expiry)."""

    pack_id: Identifier
    bytes: Bytes
    added_at: AwareDatetime
    expires_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _expires_after_added(self) -> Pack:
        if self.expires_at is not None and self.expires_at <= self.added_at:
            raise ValueError("a pack's expires_at must be after its added_at")
        return self


class Plan(_Record):
    """A user's quota: bytes per period, extra packs, warnings and the operator's switch."""

    user_id: Identifier
    quota_bytes: StrictInt | None
    period: PeriodRule
    timezone: StrictStr | None = None
    starts_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    packs: tuple[Pack, ...] = ()
    warn_at: tuple[float, ...] = (0.8,)
    enabled: bool

    @field_validator("quota_bytes")
    @classmethod
    def _positive_quota(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("must be positive; use null for unlimited")
        if value is not None and value > MAX_COUNTER:
            raise ValueError(f"must be at most 2**63-1 ({MAX_COUNTER})")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"unknown IANA timezone {value[:60]!r}") from exc
        return value

    @field_validator("warn_at")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        for fraction in value:
            if not 0 < fraction < 1:
                raise ValueError(f"{fraction} is not a fraction between 0 and 1 (exclusive)")
        if len(set(value)) != len(value):
            raise ValueError("a threshold is given twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if self.period.kind == "none" and self.starts_at is None:
            raise ValueError("a plan whose period kind is 'none' needs starts_at")
        ids = [p.pack_id for p in self.packs]
        if len(set(ids)) != len(ids):
            raise ValueError("a pack_id is given twice")
        return self

    def encode(self) -> bytes:
        """The wire form: compact JSON, defaults left out."""
        return orjson.dumps(self.model_dump(mode="json", exclude_defaults=True))

    @classmethod
    def decode(cls, data: bytes | str) -> Plan:
        """Read and validate the wire form; raises `pydantic.ValidationError`.

        >>> try:
        ...     Plan.decode(b'{"user_id": "a", "quota_bytes": 0,'
        ...                 b' "period": {"kind": "calendar_month"}, "enabled": true}')
        ... except ValidationError as exc:
        ...     print(exc.errors()[0]["msg"])
        Value error, must be positive; use null for unlimited
        """
        return _decode(cls, data)

    def zone(self, default_tz: ZoneInfo) -> ZoneInfo:
        """The zone whose calendar the periods follow."""
        return default_tz if self.timezone is None else ZoneInfo(self.timezone)


# ---------------------------------------------------------------------------- periods


def _first_instant(day: date, tz: ZoneInfo) -> int:
    """Unix time of local midnight starting `day` (in a DST gap: the first instant after it)."""
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp())


def _days_in_month(year: int, month: int) -> int:
    nxt = date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)
    return (nxt - timedelta(days=1)).day


def _reset_instant(year: int, month: int, reset_day: int, tz: ZoneInfo) -> int:
    """Local midnight on `reset_day` of the month, or of its last day when shorter."""
    return _first_instant(date(year, month, min(reset_day, _days_in_month(year, month))), tz)


def _shift_month(year: int, month: int, by: int) -> tuple[int, int]:
    index = year * 12 + month - 1 + by
    return index // 12, index % 12 + 1


def period_bounds(
    rule: CalendarMonth | Monthly | EveryDays | NoReset,
    tz: ZoneInfo,
    starts_at: int | None,
    t: int,
) -> tuple[int, int]:
    """(start, end) in Unix seconds of the period containing `t`; end is `NO_END` for `none`.

    >>> berlin = ZoneInfo("Europe/Berlin")
    >>> start, end = period_bounds(Monthly(kind="monthly", reset_day=31), berlin, None,
    ...                            unix(datetime(2028, 3, 1, tzinfo=UTC)))
    >>> [datetime.fromtimestamp(x, berlin).isoformat() for x in (start, end)]
    ['2028-02-29T00:00:00+01:00', '2028-03-31T00:00:00+02:00']
    """
    if rule.kind == "every_days":
        length = rule.days * 86400
        anchor = unix(rule.anchor)
        start = anchor + (t - anchor) // length * length
        return start, start + length
    if rule.kind == "none":
        assert starts_at is not None  # the Plan refuses `none` without starts_at
        return starts_at, NO_END
    local = datetime.fromtimestamp(t, tz)
    if rule.kind == "calendar_month":
        year, month = local.year, local.month
        nyear, nmonth = _shift_month(year, month, 1)
        return _first_instant(date(year, month, 1), tz), _first_instant(date(nyear, nmonth, 1), tz)
    day = rule.reset_day
    this = _reset_instant(local.year, local.month, day, tz)
    if t >= this:
        nyear, nmonth = _shift_month(local.year, local.month, 1)
        return this, _reset_instant(nyear, nmonth, day, tz)
    pyear, pmonth = _shift_month(local.year, local.month, -1)
    return _reset_instant(pyear, pmonth, day, tz), this


def period_at(
    plan: Plan, t: datetime, default_tz: ZoneInfo
) -> tuple[datetime, datetime | None]:
    """The period of `plan` containing `t`: its start and end (None for kind `none`).

    The bounds are given in the plan's zone. Calendar kinds follow local midnights
    (a DST change makes a period an hour shorter or longer); `every_days` counts
    elapsed seconds from its anchor, whatever the zone.

    >>> plan = Plan(user_id="bob", quota_bytes=None, enabled=True, timezone="America/New_York",
    ...             period=Monthly(kind="monthly", reset_day=31))
    >>> [x.isoformat() for x in period_at(plan, datetime(2026, 4, 15, tzinfo=UTC), ZoneInfo("UTC"))]
    ['2026-03-31T00:00:00-04:00', '2026-04-30T00:00:00-04:00']
    """
    tz = plan.zone(default_tz)
    starts_at = None if plan.starts_at is None else unix(plan.starts_at)
    start, end = period_bounds(plan.period, tz, starts_at, unix(t))
    return (
        datetime.fromtimestamp(start, tz),
        None if end == NO_END else datetime.fromtimestamp(end, tz),
    )


# ---------------------------------------------------------------------------- packs


def pack_order(pack: Pack) -> tuple[bool, datetime, datetime, str]:
    """The order packs are drawn in: the one that expires first (no expiry last), then
    the one added first, then by pack_id."""
    expires = pack.expires_at
    return (expires is None, expires or pack.added_at, pack.added_at, pack.pack_id)


def pack_valid(pack: Pack, t: int) -> bool:
    """Whether the pack's bytes can be drawn at `t` (Unix seconds): added_at ≤ t < expires_at."""
    if unix(pack.added_at) > t:
        return False
    return pack.expires_at is None or t < unix(pack.expires_at)


# ---------------------------------------------------------------------------- node rates

_RATE_PATTERN = r"^(0|[1-9][0-9]{0,14})(\.[0-9]{1,4})?$"


class Rate(_Record):
    """A node's rate from an instant on: a decimal string with up to 4 places."""

    model_config = ConfigDict(populate_by_name=True)

    from_: AwareDatetime = Field(alias="from")
    rate: Annotated[StrictStr, Field(pattern=_RATE_PATTERN)] = "1"

    @property
    def units(self) -> int:
        """The rate as an integer of 1/10000."""
        whole, _, places = self.rate.partition(".")
        return int(whole) * RATE_UNIT + int(places.ljust(4, "0") or "0")


class NodeRates(_Record):
    """How a node's raw bytes are billed (`<prefix>.nodes`, compacted, keyed by node_id)."""

    node_id: Identifier
    rates: tuple[Rate, ...] = ()

    @field_validator("rates")
    @classmethod
    def _distinct(cls, value: tuple[Rate, ...]) -> tuple[Rate, ...]:
        starts = [r.from_ for r in value]
        if len(set(starts)) != len(starts):
            raise ValueError("two rates start at the same instant")
        return value

    @cached_property
    def schedule(self) -> tuple[list[int], list[int]]:
        """(starts, rates): the rates' first Unix seconds in order, and their units."""
        ordered = sorted((unix(r.from_), r.units) for r in self.rates)
        return [s for s, _ in ordered], [u for _, u in ordered]

    def encode(self) -> bytes:
        """The wire form: compact JSON."""
        return orjson.dumps(self.model_dump(mode="json", by_alias=True))

    @classmethod
    def decode(cls, data: bytes | str) -> NodeRates:
        """Read and validate the wire form; raises `pydantic.ValidationError`."""
        return _decode(cls, data)


def rate_at(node_rates: NodeRates | None, t: datetime | int) -> int:
    """The rate (in 1/10000) in effect at `t` (an instant or Unix seconds); 1 when none is."""
    if node_rates is None or not node_rates.rates:
        return RATE_UNIT
    starts, units = node_rates.schedule
    index = bisect_right(starts, t if isinstance(t, int) else unix(t)) - 1
    return RATE_UNIT if index < 0 else units[index]


def billed(raw: int, rate: int) -> int:
    """Billed bytes of `raw` bytes at `rate` (1/10000), rounded down; per reading and direction.

    >>> billed(3, 3333), billed(10**18, 10000)
    (0, 1000000000000000000)
    """
    return raw * rate // RATE_UNIT


# ---------------------------------------------------------------------------- commands

Action = Literal["warn", "disable", "enable"]
Reason = Literal[
    "threshold", "quota", "expired", "operator", "period_reset", "pack", "quota_raised",
    "renewed", "plan_removed",
]


class Command(_Record):
    """What a panel must do about a user (`<prefix>.control`, keyed by user_id).

    Every field is always on the wire: `period_end` is null for kind `none`,
    `allowance_bytes` when unlimited, `threshold` except for `warn`. Consumers
    deduplicate on `command_id`.

    >>> c = Command(command_id="9f2c", user_id="alice", action="warn", reason="threshold",
    ...     period_start=datetime(2026, 11, 1, tzinfo=ZoneInfo("Europe/Berlin")), period_end=None,
    ...     used_bytes=8, allowance_bytes=10, threshold=0.8,
    ...     issued_at=datetime(2026, 11, 24, 10, 0, 1, 234567, tzinfo=UTC))
    >>> c.encode()[-76:]
    b'"allowance_bytes":10,"threshold":0.8,"issued_at":"2026-11-24T10:00:01.234Z"}'
    >>> Command.decode(c.encode()).period_start.isoformat()
    '2026-11-01T00:00:00+01:00'
    """

    command_id: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    user_id: Identifier
    action: Action
    reason: Reason
    period_start: AwareDatetime
    period_end: AwareDatetime | None
    used_bytes: Annotated[StrictInt, Field(ge=0, le=MAX_COUNTER)]
    allowance_bytes: Annotated[StrictInt, Field(ge=0, le=MAX_COUNTER)] | None
    threshold: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] | None
    issued_at: AwareDatetime

    @field_serializer("issued_at")
    def _milliseconds(self, value: datetime) -> str:
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def encode(self) -> bytes:
        """The wire form: compact JSON, every field present."""
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def decode(cls, data: bytes | str) -> Command:
        """Read and validate the wire form; raises `pydantic.ValidationError`."""
        return _decode(cls, data)


AckOutcome = Literal["applied", "already", "failed", "skipped"]


class Ack(_Record):
    """What an enforcement consumer did with a command (`<prefix>.control.acks`, keyed by
    command_id).

    `node_id` is the node whose agent applied it, or `central` for `quotaflow
    enforce`; `outcome` is `applied` (done now), `already` (the proxy was in that
    state: idempotent), `failed` (given up after the retries; the command is on
    `<prefix>.control.dead` too) or `skipped` (nothing to do for this backend,
    such as a `warn` for a proxy, or a command superseded by a later one of the
    same user).

    >>> ack = Ack(command_id="9f2c", node_id="node-a", backend="xray", outcome="applied",
    ...           detail="removed from vless-in", at=datetime(2026, 11, 24, 10, tzinfo=UTC))
    >>> Ack.decode(ack.encode()) == ack
    True
    """

    command_id: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    node_id: Identifier
    backend: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    outcome: AckOutcome
    detail: Annotated[StrictStr, Field(max_length=2000)] = ""
    at: AwareDatetime

    @field_serializer("at")
    def _milliseconds(self, value: datetime) -> str:
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def encode(self) -> bytes:
        """The wire form: compact JSON, every field present."""
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def decode(cls, data: bytes | str) -> Ack:
        """Read and validate the wire form; raises `pydantic.ValidationError`."""
        return _decode(cls, data)


class DeadCommand(_Record):
    """A command an enforcement consumer gave up on (`<prefix>.control.dead`), and why."""

    command: Command
    node_id: Identifier
    backend: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    attempts: Annotated[StrictInt, Field(ge=1)]
    reason: Annotated[StrictStr, Field(max_length=2000)]
    at: AwareDatetime

    def encode(self) -> bytes:
        """The wire form: compact JSON."""
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def decode(cls, data: bytes | str) -> DeadCommand:
        """Read and validate the wire form; raises `pydantic.ValidationError`."""
        return _decode(cls, data)


def fraction(threshold: float) -> tuple[int, int]:
    """A threshold as an exact (numerator, denominator) of its decimal form: 0.8 is 4/5."""
    exact = Fraction(repr(threshold))
    return exact.numerator, exact.denominator


# ---------------------------------------------------------------------------- quota states

QuotaStateName = Literal["enabled", "disabled"]
# user_id, period_start (RFC 3339, in the plan's zone), used_bytes, allowance_bytes
# (null: unlimited), state
QuotaRow = tuple[Identifier, AwareDatetime, Annotated[StrictInt, Field(ge=0, le=MAX_COUNTER)],
                 Annotated[StrictInt, Field(ge=0, le=MAX_COUNTER)] | None, QuotaStateName]


class QuotaBatch(_Record):
    """Quota states the worker publishes to `<prefix>.quota`: one row per user it decided on.

    A later row of a user replaces an earlier one; the sinks keep the latest per
    flush (`quota_usage` in InfluxDB).

    >>> row = ("alice", "2026-11-01T00:00:00+01:00", 40, 50, "enabled")
    >>> QuotaBatch.decode(QuotaBatch.encode([row])).states[0][2:]
    (40, 50, 'enabled')
    """

    states: tuple[QuotaRow, ...]

    @staticmethod
    def encode(rows: list[tuple[str, str, int, int | None, str]]) -> bytes:
        """Encode without building a model (the hot path); the same JSON the model reads."""
        return orjson.dumps({"states": rows})

    @classmethod
    def decode(cls, data: bytes | str) -> QuotaBatch:
        """Read and validate the wire form; raises `pydantic.ValidationError`."""
        return _decode(cls, data)

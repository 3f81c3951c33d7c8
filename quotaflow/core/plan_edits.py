"""What operators type about plans and node rates, read into the models of `plans.py`.

Pure: no I/O. The command line (`quotaflow plans`, `quotaflow nodes`) parses its
options and files with these functions, then publishes what they return. Every
error is a `ValueError` whose message names the input it refuses.

Sizes take SI units (powers of 1000) and IEC units (powers of 1024), with decimals;
a `b` is always a byte, whatever its case:

>>> parse_size("50GB"), parse_size("10GiB"), parse_size("1.5 kB"), parse_size("123")
(50000000000, 10737418240, 1500, 123)
>>> format_size(50_000_000_000), format_size(10_737_418_240), format_size(1536)
('50 GB', '10 GiB', '1.5 KiB')
>>> parse_quota("unlimited"), parse_quota("2TB")
(None, 2000000000000)

Periods have one line each, which `format_period` writes back:

>>> now = datetime(2026, 11, 24, 10, 30, 5, 123456, tzinfo=UTC)
>>> parse_period("monthly:15", now)
Monthly(kind='monthly', reset_day=15)
>>> format_period(parse_period("every_days:30@2026-11-01T00:00:00+01:00", now))
'every_days:30@2026-11-01T00:00:00+01:00'

`quotaflow plans set` changes the fields it is given and keeps the others:

>>> plan = PlanEdit(quota="50GB", timezone="Europe/Berlin").apply("alice", None, now)
>>> plan.quota_bytes, plan.period.kind, plan.timezone, plan.enabled
(50000000000, 'calendar_month', 'Europe/Berlin', True)
>>> later = PlanEdit(add_packs=("10GB:2026-12-31T00:00:00Z",)).apply("alice", plan, now)
>>> later.quota_bytes, later.timezone, [(p.pack_id, p.bytes) for p in later.packs]
(50000000000, 'Europe/Berlin', [('pack-20261124T103005Z', 10000000000)])
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

from pydantic import ValidationError

from quotaflow.core.contracts import MAX_COUNTER
from quotaflow.core.plans import (
    CalendarMonth,
    EveryDays,
    Monthly,
    NodeRates,
    NoReset,
    Pack,
    Plan,
    Rate,
)

Period = CalendarMonth | Monthly | EveryDays | NoReset

# ---------------------------------------------------------------------------- sizes

SIZE_UNITS: Mapping[str, int] = {
    "B": 1,
    "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15, "EB": 10**18,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50, "EiB": 2**60,
}
"""Every unit a size may carry, in its usual spelling, with its bytes."""

# matched case-insensitively: "KB", "kb" and "kB" are all 1000 bytes, "gib" is a GiB
_UNITS_BY_LOWER = {name.lower(): factor for name, factor in SIZE_UNITS.items()}
_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)")
_MAX_TEXT = 64  # no size is longer; longer input is refused before any arithmetic


def _bare_prefix_hint(unit: str) -> str | None:
    """For a unit without its B ("G", "Gi"): which two units the operator may have meant."""
    lower = unit.lower()
    prefix = lower.removesuffix("i")
    if prefix in ("k", "m", "g", "t", "p", "e"):
        si = "kB" if prefix == "k" else prefix.upper() + "B"
        return f"say {si} (10^{3 * 'kmgtpe'.index(prefix) + 3}) or {prefix.upper()}iB " \
            f"(2^{10 * 'kmgtpe'.index(prefix) + 10})"
    return None


def parse_size(text: str) -> int:
    """Bytes of a size such as `50GB`, `10GiB`, `1.5TB`, `123` or `123B`.

    SI units are powers of 1000 (kB or KB, MB, GB, TB, PB, EB), IEC units powers
    of 1024 (KiB, MiB, GiB, TiB, PiB, EiB); units are read whatever their case,
    and a space may stand between the number and the unit. A decimal is exact
    (`1.5GB` is 1,500,000,000 bytes); a fraction of a byte left over is dropped
    (`1.3KiB` is 1331 bytes, not 1331.2). Bits, exponents, signs and sizes above
    2**63-1 bytes are refused.

    >>> parse_size("1.3KiB"), parse_size("0.5 gb"), parse_size(".25MiB")
    (1331, 500000000, 262144)
    >>> parse_size("50G")
    Traceback (most recent call last):
    ValueError: size '50G': say GB (10^9) or GiB (2^30)
    >>> parse_size("-1GB")
    Traceback (most recent call last):
    ValueError: size '-1GB' is not a size like 50GB, 10GiB, 1.5TB or 123
    """
    stripped = text.strip()
    if len(stripped) > _MAX_TEXT:
        raise ValueError(f"size {stripped[:20]!r}... is too long ({len(stripped)} characters)")
    match = _SIZE.fullmatch(stripped)
    if match is None:
        raise ValueError(f"size {text!r} is not a size like 50GB, 10GiB, 1.5TB or 123")
    unit = match["unit"]
    factor = _UNITS_BY_LOWER.get(unit.lower(), 1 if unit == "" else 0)
    if factor == 0:
        hint = _bare_prefix_hint(unit)
        if hint is not None:
            raise ValueError(f"size {text!r}: {hint}")
        raise ValueError(
            f"size {text!r}: unknown unit {unit!r}; use one of {', '.join(SIZE_UNITS)}"
        )
    size = math.floor(Fraction(match["number"]) * factor)
    if size > MAX_COUNTER:
        raise ValueError(f"size {text!r} is above the largest, 2**63-1 bytes (about 9.2 EB)")
    return size


def _decimal(value: Fraction) -> str:
    """The exact decimal of a fraction whose denominator has no prime but 2 and 5."""
    places = 0
    while (value * 10**places).denominator != 1:
        places += 1
    whole, part = divmod(int(value * 10**places), 10**places)
    return str(whole) if places == 0 else f"{whole}.{part:0{places}d}"


def format_size(size: int) -> str:
    """A size exactly, in its shortest form among all units; `parse_size` reads it back.

    >>> format_size(0), format_size(999), format_size(1_500_000), format_size(12_345_678_901)
    ('0 B', '999 B', '1.5 MB', '12345678901 B')
    """
    if size < 0:
        raise ValueError(f"a size cannot be negative: {size}")
    candidates = [(str(size), "B", 1)] + [
        (_decimal(Fraction(size, factor)), name, factor)
        for name, factor in SIZE_UNITS.items()
        if 1 < factor <= size
    ]
    # the shortest number; of two as short, the larger unit ("1 kB" rather than "1000 B")
    number, name, _ = min(candidates, key=lambda c: (len(c[0]), -c[2]))
    return f"{number} {name}"


def brief_size(size: int) -> str:
    """A size for reading at a glance: the largest SI unit it reaches, two decimals cut off.

    >>> brief_size(12_345_678_901), brief_size(999), brief_size(50_000_000_000)
    ('12.34 GB', '999 B', '50 GB')
    """
    name, factor = "B", 1
    for unit, unit_factor in SIZE_UNITS.items():
        if "i" not in unit and unit_factor <= size:
            name, factor = unit, unit_factor
    hundredths = size * 100 // factor
    whole, part = divmod(hundredths, 100)
    text = str(whole) if part == 0 or factor == 1 else f"{whole}.{part:02d}".rstrip("0")
    return f"{text} {name}"


def parse_quota(text: str) -> int | None:
    """Bytes per period, or None for `unlimited`.

    >>> parse_quota("0")
    Traceback (most recent call last):
    ValueError: quota '0' is not positive: use 'unlimited' for no limit (or disable the user)
    """
    if text.strip().lower() == "unlimited":
        return None
    size = parse_size(text)
    if size <= 0:
        raise ValueError(
            f"quota {text!r} is not positive: use 'unlimited' for no limit (or disable the user)"
        )
    return size


# ---------------------------------------------------------------------------- instants


def current_second(now: datetime) -> datetime:
    """`now` without its fraction of a second: quotaflow handles instants to the second."""
    return now.replace(microsecond=0)


def parse_instant(text: str, now: datetime) -> datetime:
    """An RFC 3339 instant with its offset (`2026-11-01T00:00:00+01:00`, `...Z`), or `now`.

    `now` stands for the current second. A time without an offset is refused:
    it would mean a different instant in every zone.

    >>> parse_instant("2026-12-31T23:59:59Z", datetime.now(UTC)).isoformat()
    '2026-12-31T23:59:59+00:00'
    >>> parse_instant("2026-12-31 00:00", datetime.now(UTC))
    Traceback (most recent call last):
    ValueError: time '2026-12-31 00:00' has no offset: add Z or one like +01:00
    """
    stripped = text.strip()
    if stripped.lower() == "now":
        return current_second(now)
    try:
        instant = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(
            f"time {text[:80]!r} is not an RFC 3339 time like 2026-11-01T00:00:00+01:00 "
            "(or now)"
        ) from None
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"time {text!r} has no offset: add Z or one like +01:00")
    return instant


def format_instant(instant: datetime) -> str:
    """An instant as RFC 3339, `Z` for UTC, fractions kept only when there are some.

    >>> format_instant(datetime(2026, 11, 1, tzinfo=UTC)), format_instant(parse_instant(
    ...     "2026-11-01T00:00:00.5+01:00", datetime.now(UTC)))
    ('2026-11-01T00:00:00Z', '2026-11-01T00:00:00.500000+01:00')
    """
    text = instant.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


# ---------------------------------------------------------------------------- periods

PERIOD_SYNTAX = "calendar_month, monthly:DAY, every_days:DAYS@ANCHOR or none"


def parse_period(text: str, now: datetime) -> Period:
    """A plan's period rule from one of `calendar_month`, `monthly:15`,
    `every_days:30@2026-11-01T00:00:00+01:00` (the anchor may be `now`) or `none`.

    >>> parse_period("none", datetime.now(UTC))
    NoReset(kind='none')
    >>> parse_period("monthly:32", datetime.now(UTC))
    Traceback (most recent call last):
    ValueError: period 'monthly:32': the reset day must be 1 to 31
    >>> parse_period("every_days:30", datetime.now(UTC))
    Traceback (most recent call last):
    ValueError: period 'every_days:30' needs an anchor: every_days:30@TIME or @now
    """
    stripped = text.strip()
    kind, colon, argument = stripped.partition(":")
    if kind in ("calendar_month", "none") and not colon:
        return CalendarMonth(kind="calendar_month") if kind == "calendar_month" else NoReset(
            kind="none"
        )
    if kind == "monthly" and colon:
        if not argument.isdigit() or not 1 <= int(argument) <= 31:
            raise ValueError(f"period {text!r}: the reset day must be 1 to 31")
        return Monthly(kind="monthly", reset_day=int(argument))
    if kind == "every_days" and colon:
        days, at, anchor = argument.partition("@")
        if not days.isdigit() or not 1 <= int(days) <= 100_000:
            raise ValueError(f"period {text!r}: the days must be a whole number, 1 to 100000")
        if not at:
            raise ValueError(f"period {text!r} needs an anchor: every_days:{days}@TIME or @now")
        try:
            instant = parse_instant(anchor, now)
        except ValueError as exc:
            raise ValueError(f"period {text!r}: the anchor's {exc}") from None
        return EveryDays(kind="every_days", days=int(days), anchor=instant)
    raise ValueError(f"period {text!r} is not one of {PERIOD_SYNTAX}")


def format_period(rule: Period) -> str:
    """A period rule in the syntax `parse_period` reads.

    >>> format_period(Monthly(kind="monthly", reset_day=31)), format_period(NoReset(kind="none"))
    ('monthly:31', 'none')
    """
    if rule.kind == "monthly":
        return f"monthly:{rule.reset_day}"
    if rule.kind == "every_days":
        return f"every_days:{rule.days}@{format_instant(rule.anchor)}"
    return rule.kind


# ---------------------------------------------------------------------------- warnings


def parse_thresholds(text: str) -> tuple[float, ...]:
    """`warn_at` fractions from `0.5,0.8` or `50%,80%`, ascending; `none` for no warning.

    >>> parse_thresholds("0.9, 50%"), parse_thresholds("none")
    ((0.5, 0.9), ())
    >>> parse_thresholds("0.8,1")
    Traceback (most recent call last):
    ValueError: thresholds '0.8,1': '1' is not a fraction between 0 and 1 (exclusive)
    """
    if text.strip().lower() == "none":
        return ()
    found: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        except ValueError:
            raise ValueError(
                f"thresholds {text!r}: {part!r} is not a number (give fractions like 0.5,0.8)"
            ) from None
        if not 0 < value < 1:  # also refuses nan
            raise ValueError(
                f"thresholds {text!r}: {part!r} is not a fraction between 0 and 1 (exclusive)"
            )
        if value in found:
            raise ValueError(f"thresholds {text!r}: {part!r} is given twice")
        found.append(value)
    return tuple(sorted(found))


# ---------------------------------------------------------------------------- packs


def pack_id_at(added_at: datetime, taken: Iterable[str]) -> str:
    """The id of a pack added at `added_at`: `pack-` and the UTC second, then `-2`, `-3`...
    when a pack of the plan already has it (two packs bought in the same second).

    >>> t = datetime(2026, 11, 20, 10, 0, 0, tzinfo=UTC)
    >>> pack_id_at(t, []), pack_id_at(t, ["pack-20261120T100000Z"])
    ('pack-20261120T100000Z', 'pack-20261120T100000Z-2')
    """
    base = f"pack-{added_at.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    used = set(taken)
    candidate, number = base, 1
    while candidate in used:
        number += 1
        candidate = f"{base}-{number}"
    return candidate


def parse_pack(text: str, now: datetime, taken: Iterable[str] = ()) -> Pack:
    """A pack from `SIZE` or `SIZE:EXPIRY` (EXPIRY an RFC 3339 time or `never`), added now.

    The pack's id comes from the second it was added (see `pack_id_at`).

    >>> now = datetime(2026, 11, 20, 10, 0, 0, 500000, tzinfo=UTC)
    >>> pack = parse_pack("10GB:2026-12-01T00:00:00+01:00", now)
    >>> pack.pack_id, pack.bytes, pack.added_at.isoformat(), pack.expires_at.isoformat()
    ('pack-20261120T100000Z', 10000000000, '2026-11-20T10:00:00+00:00', '2026-12-01T00:00:00+01:00')
    """
    size_text, colon, expiry_text = text.strip().partition(":")
    try:
        size = parse_size(size_text)
        expires = (
            None if not colon or expiry_text.strip().lower() == "never"
            else parse_instant(expiry_text, now)
        )
    except ValueError as exc:
        raise ValueError(f"pack {text!r}: {exc}") from None
    if size <= 0:
        raise ValueError(f"pack {text!r}: a pack must hold at least one byte")
    added = current_second(now)
    if expires is not None and expires <= added:
        raise ValueError(
            f"pack {text!r}: it would expire at {format_instant(expires)}, "
            f"not after now ({format_instant(added)})"
        )
    return Pack(pack_id=pack_id_at(added, taken), bytes=size, added_at=added, expires_at=expires)


# ---------------------------------------------------------------------------- validation errors

_MAX_REASON = 200


def describe_errors(exc: ValidationError) -> list[str]:
    """A validation error as short lines, `field.path: message`, never echoing the input.

    >>> try:
    ...     Plan.decode(b'{"user_id": "a", "quota_bytes": 0, "enabled": true}')
    ... except ValidationError as exc:
    ...     print(describe_errors(exc))
    ['quota_bytes: must be positive; use null for unlimited', 'period: Field required']
    >>> try:
    ...     Plan.decode(b'{"user_id": "a", "quota_bytes": 1, "period": {"kind": "weekly"},'
    ...                 b' "enabled": true}')
    ... except ValidationError as exc:
    ...     print(describe_errors(exc))
    ["period.kind: 'weekly' is not one of calendar_month, monthly, every_days, none"]
    """
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "json_invalid":
            message = message.replace("Invalid JSON: ", "not JSON: ", 1)
        context = error.get("ctx", {})
        if error["type"] == "union_tag_invalid":  # pydantic's own words are long
            expected = str(context.get("expected_tags", "")).replace("'", "")
            where = f"{where}.{context.get('discriminator', '')}".strip(".").replace("'", "")
            message = f"{str(context.get('tag', ''))[:60]!r} is not one of {expected}"
        line = f"{where}: {message}" if where else message
        lines.append(line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "...")
    return lines


# ---------------------------------------------------------------------------- plans set


class PlanEditError(ValueError):
    """`plans set` options that cannot make a plan; `problems` names each bad option."""

    def __init__(self, user_id: str, problems: Sequence[str]) -> None:
        super().__init__(f"cannot set the plan of {user_id!r}: " + "; ".join(problems))
        self.problems = tuple(problems)


# which option of `plans set` changes which field of a plan
_OPTION_OF_FIELD = {
    "quota_bytes": "--quota", "period": "--period", "timezone": "--timezone",
    "starts_at": "--starts-at", "expires_at": "--expires", "packs": "--add-pack",
    "warn_at": "--warn-at", "enabled": "--enable/--disable",
}


@dataclass(frozen=True)
class PlanEdit:
    """The options of `quotaflow plans set`, as typed; None (or empty) keeps a field as stored.

    | option | text | field |
    |---|---|---|
    | quota | a size, or `unlimited` | quota_bytes |
    | period | see `parse_period` | period |
    | timezone | an IANA zone, or `default` (follow `QUOTAFLOW_TIMEZONE`) | timezone |
    | starts_at | a time, or `none` | starts_at |
    | expires | a time, or `never` | expires_at |
    | add_packs | `SIZE[:EXPIRY]` each, added now | packs |
    | remove_packs | pack ids | packs |
    | warn_at | see `parse_thresholds` | warn_at |
    | enabled | True or False | enabled |

    A user without a plan needs `quota`; the rest defaults to a calendar month in
    `QUOTAFLOW_TIMEZONE`, warnings at 0.8, enabled. Period `none` needs a start:
    when none is stored or given, it starts now.
    """

    quota: str | None = None
    period: str | None = None
    timezone: str | None = None
    starts_at: str | None = None
    expires: str | None = None
    add_packs: tuple[str, ...] = ()
    remove_packs: tuple[str, ...] = ()
    warn_at: str | None = None
    enabled: bool | None = None

    @property
    def empty(self) -> bool:
        """True when no option is given: there is nothing to change."""
        return self == PlanEdit()

    def apply(self, user_id: str, stored: Plan | None, now: datetime) -> Plan:
        """The plan with these changes made to `stored` (or a new plan, when None).

        Raises `PlanEditError` naming every bad option at once.

        >>> now = datetime(2026, 11, 24, tzinfo=UTC)
        >>> try:
        ...     PlanEdit(period="monthly:40", warn_at="2").apply("bob", None, now)
        ... except PlanEditError as exc:
        ...     print("\\n".join(exc.problems))
        --period: period 'monthly:40': the reset day must be 1 to 31
        --warn-at: thresholds '2': '2' is not a fraction between 0 and 1 (exclusive)
        bob has no plan yet: give --quota (a size, or unlimited)
        """
        problems: list[str] = []
        fields: dict[str, Any] = (
            {name: getattr(stored, name) for name in Plan.model_fields}
            if stored is not None
            else {"user_id": user_id, "period": CalendarMonth(kind="calendar_month"),
                  "enabled": True}
        )

        def change(field: str, parse: Callable[[str], object], text: str | None) -> None:
            if text is None:
                return
            try:
                fields[field] = parse(text)
            except ValueError as exc:
                problems.append(f"{_OPTION_OF_FIELD[field]}: {exc}")

        change("quota_bytes", parse_quota, self.quota)
        change("period", lambda t: parse_period(t, now), self.period)
        change("timezone", lambda t: None if t.strip() == "default" else t.strip(), self.timezone)
        change("starts_at", lambda t: _instant_or_none(t, now, "none"), self.starts_at)
        change("expires_at", lambda t: _instant_or_none(t, now, "never"), self.expires)
        change("warn_at", parse_thresholds, self.warn_at)
        if self.enabled is not None:
            fields["enabled"] = self.enabled
        if stored is None and self.quota is None:
            problems.append(f"{user_id} has no plan yet: give --quota (a size, or unlimited)")
        packs = list(fields.get("packs", ()))
        for pack_id in self.remove_packs:
            kept = [p for p in packs if p.pack_id != pack_id]
            if len(kept) == len(packs):
                known = ", ".join(p.pack_id for p in packs) or "none"
                problems.append(
                    f"--remove-pack: {user_id} has no pack {pack_id!r} (its packs: {known})"
                )
            packs = kept
        for text in self.add_packs:
            try:
                packs.append(parse_pack(text, now, (p.pack_id for p in packs)))
            except ValueError as exc:
                problems.append(f"--add-pack: {exc}")
        fields["packs"] = tuple(packs)
        period = fields["period"]
        if period.kind == "none" and fields.get("starts_at") is None:
            fields["starts_at"] = current_second(now)  # a period `none` runs from its start
        if problems:
            raise PlanEditError(user_id, problems)
        try:
            return Plan.model_validate(fields)
        except ValidationError as exc:
            lines = [_option_problem(line) for line in describe_errors(exc)]
            raise PlanEditError(user_id, lines) from None


def _instant_or_none(text: str, now: datetime, none_word: str) -> datetime | None:
    return None if text.strip().lower() == none_word else parse_instant(text, now)


def _option_problem(line: str) -> str:
    """A plan validation line (`timezone: unknown ...`) with the option that set the field."""
    field, sep, message = line.partition(": ")
    option = _OPTION_OF_FIELD.get(field.split(".")[0])
    return f"{option}: {message}" if sep and option else line


def plan_changes(before: Plan, after: Plan) -> list[str]:
    """What an edit changed: `field: old -> new` in the wire form, and a line per pack
    added (`+`) or removed (`-`).

    >>> now = datetime(2026, 11, 24, tzinfo=UTC)
    >>> plan = PlanEdit(quota="50GB").apply("alice", None, now)
    >>> later = PlanEdit(quota="60GB", enabled=False, add_packs=("5GB",)).apply("alice", plan, now)
    >>> for line in plan_changes(plan, later):
    ...     print(line)
    quota_bytes: 50000000000 -> 60000000000
    packs: + pack-20261124T000000Z, 5 GB, expires never
    enabled: true -> false
    """
    old = before.model_dump(mode="json")
    new = after.model_dump(mode="json")
    lines = []
    for name, value in new.items():
        if name == "packs":
            lines += _pack_changes(before.packs, after.packs)
        elif old[name] != value:
            lines.append(f"{name}: {json.dumps(old[name])} -> {json.dumps(value)}")
    return lines


def _pack_changes(before: Sequence[Pack], after: Sequence[Pack]) -> list[str]:
    def line(sign: str, pack: Pack) -> str:
        expires = "never" if pack.expires_at is None else format_instant(pack.expires_at)
        return f"packs: {sign} {pack.pack_id}, {format_size(pack.bytes)}, expires {expires}"

    return [line("-", p) for p in before if p not in after] + [
        line("+", p) for p in after if p not in before
    ]


# ---------------------------------------------------------------------------- node rates


def set_rate(stored: NodeRates | None, node_id: str, rate: str, starts: datetime) -> NodeRates:
    """The node's rates with `rate` in effect from `starts`, replacing one from the same instant.

    >>> t = datetime(2026, 11, 1, tzinfo=UTC)
    >>> rates = set_rate(None, "node-a", "1.5", t)
    >>> [(r.from_.isoformat(), r.rate) for r in set_rate(rates, "node-a", "2", t).rates]
    [('2026-11-01T00:00:00+00:00', '2')]
    >>> set_rate(None, "node-a", "1.23456", t)
    Traceback (most recent call last):
    ValueError: rate '1.23456' is not a decimal with at most 4 places, like 1, 0.5 or 1.2345
    """
    try:
        new = Rate.model_validate({"from": starts, "rate": rate.strip()})
    except ValidationError:
        raise ValueError(
            f"rate {rate!r} is not a decimal with at most 4 places, like 1, 0.5 or 1.2345"
        ) from None
    kept = [] if stored is None else [r for r in stored.rates if r.from_ != new.from_]
    ordered = tuple(sorted([*kept, new], key=lambda r: r.from_))
    try:
        return NodeRates(node_id=node_id, rates=ordered)
    except ValidationError as exc:
        raise ValueError(f"node {node_id[:60]!r}: " + "; ".join(describe_errors(exc))) from None


# ---------------------------------------------------------------------------- plan files


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _array_elements(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """The elements of one JSON array, each with the line it starts on; syntax errors."""
    decoder = json.JSONDecoder()
    elements: list[tuple[int, str]] = []
    position = _skip_space(text, text.index("[") + 1)
    if text.startswith("]", position):
        position += 1
    else:
        while True:
            try:
                _, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError as exc:
                return elements, [(exc.lineno, f"not JSON: {exc.msg} (column {exc.colno})")]
            elements.append((_line_of(text, position), text[position:end]))
            position = _skip_space(text, end)
            if text.startswith(",", position):
                position = _skip_space(text, position + 1)
                continue
            if text.startswith("]", position):
                position += 1
                break
            return elements, [(_line_of(text, position), "not JSON: expected ',' or ']'")]
    rest = _skip_space(text, position)
    if rest < len(text):
        return elements, [(_line_of(text, rest), "not JSON: more after the array's end")]
    return elements, []


def read_plans_file(text: str) -> tuple[list[Plan], list[tuple[int, str]]]:
    """The plans of a file: JSON lines, or one JSON array (one plan per element).

    Every line (element) is validated with `Plan.decode`; blank lines are skipped.
    Returns the plans and the errors, as (line number, reason), where the line is
    the one an element starts on. A user given twice is an error on the later line.

    >>> good = '{"user_id": "a", "quota_bytes": null, "period": {"kind": "none"},'
    >>> good += ' "starts_at": "2026-11-01T00:00:00Z", "enabled": true}'
    >>> plans, errors = read_plans_file(good + "\\n\\n" + good.replace('"a"', '"b"') + "\\n{")
    >>> [p.user_id for p in plans], errors
    (['a', 'b'], [(4, 'not JSON: EOF while parsing an object at line 1 column 1')])
    >>> read_plans_file(f"[{good},\\n {good}]")[1]
    [(2, "user 'a' is given again (first on line 1)")]
    """
    text = text.removeprefix("\ufeff")
    if text.lstrip().startswith("["):
        elements, errors = _array_elements(text)
    else:
        elements = [
            (number, line) for number, line in enumerate(text.split("\n"), start=1)
            if line.strip()
        ]
        errors = []
    plans: list[Plan] = []
    first_line: dict[str, int] = {}
    for number, element in elements:
        try:
            plan = Plan.decode(element)
        except ValidationError as exc:
            errors.append((number, "; ".join(describe_errors(exc))))
            continue
        if plan.user_id in first_line:
            errors.append((
                number,
                f"user {plan.user_id!r} is given again (first on line {first_line[plan.user_id]})",
            ))
            continue
        first_line[plan.user_id] = number
        plans.append(plan)
    return plans, sorted(errors)


def plans_file(plans: Iterable[Plan]) -> str:
    """Plans as the JSON lines `read_plans_file` reads, sorted by user id.

    >>> plan = PlanEdit(quota="1GiB").apply("a", None, datetime(2026, 11, 1, tzinfo=UTC))
    >>> print(plans_file([plan]), end="")
    {"user_id":"a","quota_bytes":1073741824,"period":{"kind":"calendar_month"},"enabled":true}
    >>> read_plans_file(plans_file([plan])) == ([plan], [])
    True
    """
    return "".join(p.encode().decode() + "\n" for p in sorted(plans, key=lambda p: p.user_id))

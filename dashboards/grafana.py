"""What Grafana does to a panel's InfluxQL before InfluxDB sees it, for the proof and the report.

No Grafana runs here, so the proof test (tests/dashboards/test_proof.py) and `quotaflow
report` resolve each query the way Grafana's InfluxDB data source does:

* the time range: the dashboard's (`now-30d` to `now`) or the panel's relative time
  (`timeFrom`: `now/d` today so far, `now/M`, `now/y`, `now-29d/d`, `now-11M/M`), with
  Grafana's date math rounded in the dashboard's time zone;
* `$timeFilter` and `$__timeFilter` as `time >= <from>ms and time <= <to>ms` (Grafana's
  InfluxQL query builder);
* `$__interval` (and `$interval`, `$__interval_ms`): the range divided by the panel's
  data points, rounded to Grafana's steps, at least the data source's 10 s;
* variables: a multi-value or All-able variable becomes a regex-escaped value, or
  `(a|b)` for several; All is the variable's custom all value when it has one (`.*`),
  otherwise every value; `${name}` works like `$name`.

>>> interpolate("node_id =~ /^$node$/", {"node": Selection(("a.b", "c"))}, RANGE_EXAMPLE)
'node_id =~ /^(a\\\\.b|c)$/'
>>> interpolate("WHERE $timeFilter GROUP BY time($__interval)", {}, RANGE_EXAMPLE)
'WHERE time >= 1764543600000ms and time <= 1764630000000ms GROUP BY time(1m)'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

MIN_INTERVAL_MS = 10_000  # the data source's "min time interval" (deploy/grafana/provisioning)
MAX_DATA_POINTS = 1000  # about a panel's width in pixels, Grafana's default resolution


@dataclass(frozen=True)
class TimeRange:
    """A resolved time range, in Unix milliseconds."""

    start_ms: int
    end_ms: int


RANGE_EXAMPLE = TimeRange(1764543600000, 1764630000000)


@dataclass(frozen=True)
class Selection:
    """A variable's current value: some values, or All (`everything` holds all values)."""

    values: tuple[str, ...]
    all: bool = False


_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_MATH = re.compile(r"([+-])(\d+)([smhdwMy])|/([smhdwMy])")


def _add_months(moment: datetime, months: int) -> datetime:
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, [31, 29 if year % 4 == 0 and (year % 100 or year % 400 == 0) else 28,
                           31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month - 1])
    return moment.replace(year=year, month=month, day=day)


def _round_down(moment: datetime, unit: str) -> datetime:
    zone = moment.tzinfo
    if unit in "smh":
        keep = {"s": {"microsecond": 0}, "m": {"second": 0, "microsecond": 0},
                "h": {"minute": 0, "second": 0, "microsecond": 0}}[unit]
        return moment.replace(**keep)  # type: ignore[arg-type]
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    if unit == "w":
        day -= timedelta(days=day.weekday())
    elif unit == "M":
        day = day.replace(day=1)
    elif unit == "y":
        day = day.replace(month=1, day=1)
    return day.replace(tzinfo=zone)


def date_math(expression: str, now: datetime, zone: str) -> datetime:
    """Grafana's date math: `now`, then `-N<unit>`/`+N<unit>` steps and `/<unit>` rounding
    (down), in the time zone `zone`.

    >>> date_math("now-1M/M", datetime.fromisoformat("2026-03-31T10:00:00+00:00"), "UTC")
    datetime.datetime(2026, 2, 1, 0, 0, tzinfo=zoneinfo.ZoneInfo(key='UTC'))
    """
    if not expression.startswith("now"):
        raise ValueError(f"not a relative time: {expression!r}")
    moment = now.astimezone(ZoneInfo(zone))
    rest = expression[3:]
    position = 0
    while position < len(rest):
        match = _MATH.match(rest, position)
        if match is None:
            raise ValueError(f"cannot read {expression!r} at {rest[position:]!r}")
        sign, amount, unit, rounding = match.groups()
        if rounding:
            moment = _round_down(moment, rounding)
        else:
            n = int(amount) * (-1 if sign == "-" else 1)
            if unit == "M":
                moment = _add_months(moment.replace(tzinfo=None), n).replace(tzinfo=moment.tzinfo)
            elif unit == "y":
                moment = _add_months(moment.replace(tzinfo=None), 12 * n).replace(
                    tzinfo=moment.tzinfo)
            elif unit == "d":  # calendar days, as moment.js adds them: same wall time
                moment = (moment.replace(tzinfo=None) + timedelta(days=n)).replace(
                    tzinfo=moment.tzinfo)
            else:
                moment = moment + timedelta(**{_UNITS[unit]: n})
        position = match.end()
    return moment


def panel_range(model: dict[str, Any], panel: dict[str, Any], now: datetime) -> TimeRange:
    """The time range Grafana queries a panel with: its relative time, or the dashboard's."""
    zone = model.get("timezone") or "UTC"
    start = panel.get("timeFrom") or model["time"]["from"]
    return TimeRange(
        int(date_math(start, now, zone).timestamp() * 1000),
        int(date_math(model["time"]["to"], now, zone).timestamp() * 1000),
    )


# Grafana's rangeutil.roundInterval: (below this many ms, use this interval)
_ROUNDED = (
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000),
    (3500, 2000), (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000),
    (45000, 30000), (90000, 60000), (210000, 120000), (450000, 300000), (750000, 600000),
    (1050000, 900000), (1500000, 1200000), (2700000, 1800000), (5400000, 3600000),
    (9000000, 7200000), (16200000, 10800000), (32400000, 21600000), (86400000, 43200000),
    (604800000, 86400000), (1814400000, 604800000), (3628800000, 2592000000),
)


def interval_ms(time_range: TimeRange, max_data_points: int = MAX_DATA_POINTS) -> int:
    """`$__interval` in milliseconds, as Grafana computes it."""
    raw = (time_range.end_ms - time_range.start_ms) / max_data_points
    rounded = next((step for below, step in _ROUNDED if raw < below), 31536000000)
    return max(rounded, MIN_INTERVAL_MS)


def interval_text(ms: int) -> str:
    """An interval as InfluxQL writes durations: `10s`, `2m`, `1h`, `1d`.

    >>> interval_text(86_400_000), interval_text(120_000), interval_text(500)
    ('1d', '2m', '500ms')
    """
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|\[\]{}/]")


def regex_escape(value: str) -> str:
    r"""Grafana's regex escaping of a variable's value (kbn.regexEscape).

    >>> print(regex_escape("user.1/(a)"))
    user\.1\/\(a\)
    """
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), value)


def format_value(selection: Selection, variable: dict[str, Any] | None) -> str:
    """A variable's value in an InfluxQL query, as Grafana's InfluxDB data source formats it."""
    regex = variable is None or variable.get("multi") or variable.get("includeAll")
    if selection.all and variable is not None and variable.get("allValue"):
        return str(variable["allValue"])
    if not regex:
        return ",".join(selection.values)
    escaped = [regex_escape(v) for v in selection.values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


_TOKEN = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def interpolate(
    query: str, selections: dict[str, Selection], time_range: TimeRange,
    variables: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The query as Grafana sends it to InfluxDB. `variables` are the dashboard's variable
    models by name (for their multi, includeAll and allValue); unknown `$names` stay."""
    interval = interval_ms(time_range)
    time_filter = f"time >= {time_range.start_ms}ms and time <= {time_range.end_ms}ms"
    macros = {
        "timeFilter": time_filter, "__timeFilter": time_filter,
        "__interval": interval_text(interval), "interval": interval_text(interval),
        "__interval_ms": str(interval),
        "__from": str(time_range.start_ms), "__to": str(time_range.end_ms),
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in macros:
            return macros[name]
        if name in selections:
            return format_value(selections[name], (variables or {}).get(name))
        return match.group(0)

    return _TOKEN.sub(replace, query)


def dashboard_variables(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A dashboard's template variables by name."""
    return {v["name"]: v for v in model.get("templating", {}).get("list", [])}


def resolve(
    model: dict[str, Any], panel: dict[str, Any], query: str,
    selections: dict[str, Selection], now: datetime,
) -> str:
    """A panel's query of dashboard `model`, as Grafana would send it at `now`."""
    return interpolate(
        query, selections, panel_range(model, panel, now), dashboard_variables(model)
    )

"""`quotaflow plans`: users' quota plans on `<prefix>.plans`, and their state from InfluxDB.

Parsing and editing are pure (`quotaflow.core.plan_edits`); Kafka is
`quotaflow.catalog`, imported inside the commands; InfluxDB is read with InfluxQL.
Data goes to stdout (tables, JSON lines), messages and errors to stderr.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo

import typer
from rich.console import Console
from rich.markup import escape

from quotaflow.cli._common import (
    catalog_failures,
    load_settings,
    tell,
    warn_left_out,
)
from quotaflow.core.plan_edits import (
    PERIOD_SYNTAX,
    PlanEdit,
    PlanEditError,
    brief_size,
    format_instant,
    format_period,
    format_size,
    plan_changes,
    plans_file,
    read_plans_file,
)
from quotaflow.core.plans import Plan, pack_valid, period_at, unix
from quotaflow.core.settings import Settings

if TYPE_CHECKING:
    from quotaflow.catalog import Snapshot
    from quotaflow.sinks.influxql import InfluxQL

app = typer.Typer(
    no_args_is_help=True,
    help="Users' quota plans: import, set, show, list, delete, export (docs/plans.md).",
)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _unix_iso(seconds: int) -> str:
    return format_instant(datetime.fromtimestamp(seconds, UTC))


def _instant_or(instant: datetime | None, absent: str) -> str:
    """The instant in RFC 3339, or what stands for its absence."""
    return absent if instant is None else format_instant(instant)


def _stored_plans(settings: Settings) -> Snapshot[Plan]:
    with catalog_failures():
        from quotaflow.catalog import read_plans

        snapshot = read_plans(settings)
    warn_left_out(snapshot)
    return snapshot


# ---------------------------------------------------------------------------- InfluxDB


@dataclass(frozen=True)
class QuotaUsage:
    """A user's latest point of `quota_usage`: usage of the period against the allowance."""

    time: int
    used_bytes: int
    allowance_bytes: int | None
    state: str
    period_start: str

    def usage_text(self) -> str:
        """Usage against allowance for people: `41 GB used of 50 GB (82.00%)`."""
        used = f"{brief_size(self.used_bytes)} used"
        if self.allowance_bytes is None:
            return f"{used} (unlimited)"
        share = (
            f"{self.used_bytes * 100 / self.allowance_bytes:.2f}%" if self.allowance_bytes
            else "no allowance"
        )
        return f"{used} of {brief_size(self.allowance_bytes)} ({share})"

    def to_json(self) -> dict[str, Any]:
        """The point as JSON, its time in RFC 3339."""
        return {**asdict(self), "time": _unix_iso(self.time)}


@dataclass(frozen=True)
class QuotaEvent:
    """One command as `quota_events` holds it."""

    time: int
    action: str
    reason: str
    command_id: str
    used_bytes: int | None
    allowance_bytes: int | None
    threshold: float | None

    def to_json(self) -> dict[str, Any]:
        """The point as JSON, its time in RFC 3339."""
        return {**asdict(self), "time": _unix_iso(self.time)}


def _query_or_nothing(client: InfluxQL, statement: str) -> list[dict[str, Any]]:
    """The rows of a query; none when the database does not exist yet."""
    from quotaflow.sinks.influxql import InfluxQLError

    try:
        return [row for series in client.query(statement) for row in series.rows]
    except InfluxQLError as exc:
        if "database not found" in str(exc):
            return []
        raise


def read_quota_usage(client: InfluxQL, user_id: str) -> QuotaUsage | None:
    """The user's latest `quota_usage` point, or None when there is none.

    The latest point as a whole: `last(used_bytes)` is the only selector and the
    other fields come from the same point. `last()` of each field would not do:
    `allowance_bytes` is absent from the points of an unlimited plan, and
    `last(allowance_bytes)` would give an older, limited plan's allowance.
    """
    from quotaflow.sinks.influxql import quote_string

    rows = _query_or_nothing(
        client,
        "SELECT last(used_bytes) AS used_bytes, allowance_bytes, state, period_start "
        f"FROM quota_usage WHERE user_id = {quote_string(user_id)}",
    )
    if not rows or rows[0].get("used_bytes") is None:
        return None
    row = rows[0]
    return QuotaUsage(
        time=int(row["time"]), used_bytes=int(row["used_bytes"]),
        allowance_bytes=None if row.get("allowance_bytes") is None else int(row["allowance_bytes"]),
        state=str(row.get("state") or "unknown"), period_start=str(row.get("period_start") or ""),
    )


def read_quota_events(client: InfluxQL, user_id: str, limit: int = 10) -> list[QuotaEvent]:
    """The user's last `limit` commands from `quota_events`, newest first."""
    from quotaflow.sinks.influxql import quote_string

    rows = _query_or_nothing(
        client,
        "SELECT action, reason, command_id, used_bytes, allowance_bytes, threshold "
        f"FROM quota_events WHERE user_id = {quote_string(user_id)} "
        f"ORDER BY time DESC LIMIT {int(limit)}",
    )

    def number(value: Any) -> int | None:
        return None if value is None else int(value)

    return [
        QuotaEvent(
            time=int(row["time"]), action=str(row.get("action") or ""),
            reason=str(row.get("reason") or ""), command_id=str(row.get("command_id") or ""),
            used_bytes=number(row.get("used_bytes")),
            allowance_bytes=number(row.get("allowance_bytes")),
            threshold=None if row.get("threshold") is None else float(row["threshold"]),
        )
        for row in rows
    ]


# ---------------------------------------------------------------------------- import


@app.command("import")
def import_cmd(
    file: Annotated[
        Path, typer.Argument(help="JSON lines or one JSON array of plans; - for stdin.")
    ],
) -> None:
    """Validate every plan of FILE, then upsert them all; with any bad line, write nothing."""
    settings = load_settings()
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        tell(f"[red]cannot read {escape(str(file))}:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    plans, errors = read_plans_file(text)
    if errors:
        for number, reason in errors:
            tell(f"{escape(str(file))}:{number}: {escape(reason)}")
        tell(
            f"[red]{_count(len(errors), 'bad line')} in {escape(str(file))}; "
            "nothing was written[/red]"
        )
        raise typer.Exit(1)
    if not plans:
        tell(f"[red]{escape(str(file))} holds no plan; nothing was written[/red]")
        raise typer.Exit(1)
    with catalog_failures():
        from quotaflow.catalog import publish_plans

        publish_plans(settings, plans)
    tell(f"imported {_count(len(plans), 'plan')} into {settings.topics.plans}")


# ---------------------------------------------------------------------------- set


@app.command("set")
def set_cmd(
    user: Annotated[str, typer.Argument(help="The user id.")],
    quota: Annotated[
        str | None, typer.Option(help="Bytes per period: 50GB, 10GiB, 1.5TB... or unlimited.")
    ] = None,
    period: Annotated[str | None, typer.Option(help=f"{PERIOD_SYNTAX}.")] = None,
    timezone: Annotated[
        str | None,
        typer.Option(help="IANA zone of the periods, or default (QUOTAFLOW_TIMEZONE)."),
    ] = None,
    starts_at: Annotated[
        str | None,
        typer.Option(
            "--starts-at", help="When traffic starts to count: an RFC 3339 time, now, or none."
        ),
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option(help="When the user is disabled: an RFC 3339 time, now, or never."),
    ] = None,
    add_pack: Annotated[
        list[str] | None,
        typer.Option("--add-pack", help="SIZE[:EXPIRY] extra bytes from now; repeatable."),
    ] = None,
    remove_pack: Annotated[
        list[str] | None, typer.Option("--remove-pack", help="A pack id to remove; repeatable.")
    ] = None,
    warn_at: Annotated[
        str | None, typer.Option("--warn-at", help="Fractions to warn at: 0.5,0.8 (or none).")
    ] = None,
    enable: Annotated[
        bool | None, typer.Option("--enable/--disable", help="The operator's switch.")
    ] = None,
) -> None:
    """Change the given fields of USER's plan, keeping the rest (a new user needs --quota)."""
    edit = PlanEdit(
        quota=quota, period=period, timezone=timezone, starts_at=starts_at, expires=expires,
        add_packs=tuple(add_pack or ()), remove_packs=tuple(remove_pack or ()),
        warn_at=warn_at, enabled=enable,
    )
    if edit.empty:
        tell("[red]nothing to set: give at least one option (see --help)[/red]")
        raise typer.Exit(2)
    settings = load_settings()
    stored = _stored_plans(settings).latest.get(user)
    try:
        plan = edit.apply(user, stored, datetime.now(UTC))
    except PlanEditError as exc:
        tell(f"[red]cannot set the plan of {escape(repr(user))}:[/red]")
        for problem in exc.problems:
            tell(f"  {escape(problem)}")
        raise typer.Exit(2) from None
    if plan == stored:
        tell(f"the plan of {escape(repr(user))} is unchanged; nothing was written")
        return
    with catalog_failures():
        from quotaflow.catalog import publish_plans

        publish_plans(settings, [plan])
    if stored is None:
        tell(f"created the plan of {escape(repr(user))}: {escape(plan.encode().decode())}")
        return
    tell(f"updated the plan of {escape(repr(user))}:")
    for line in plan_changes(stored, plan):
        tell(f"  {escape(line)}")


# ---------------------------------------------------------------------------- show


def _plan_lines(plan: Plan, settings: Settings, now: datetime) -> list[str]:
    """The plan for people: quota, period (the current one too), dates, warnings, packs."""
    zone = plan.timezone or f"{settings.timezone} (QUOTAFLOW_TIMEZONE)"
    start, end = period_at(plan, now, ZoneInfo(settings.timezone))
    quota = (
        "unlimited" if plan.quota_bytes is None
        else f"{format_size(plan.quota_bytes)} ({plan.quota_bytes} bytes) per period"
    )
    lines = [
        f"plan of {plan.user_id}",
        f"  quota         {quota}",
        f"  period        {format_period(plan.period)}, in {zone}",
        f"  current       {format_instant(start)} to {_instant_or(end, 'never reset')}",
        f"  starts at     {_instant_or(plan.starts_at, '-')}",
        f"  expires at    {_instant_or(plan.expires_at, 'never')}"
        + (" (expired)" if plan.expires_at is not None and plan.expires_at <= now else ""),
        f"  warn at       {', '.join(f'{t:g}' for t in plan.warn_at) or 'never'}",
        f"  enabled       {'yes' if plan.enabled else 'no (disabled by the operator)'}",
    ]
    if not plan.packs:
        lines.append("  packs         none")
    for number, pack in enumerate(plan.packs):
        label = "  packs         " if number == 0 else " " * 16
        if pack_valid(pack, unix(now)):
            validity = "valid now"
        elif pack.added_at > now:
            validity = "not valid yet"
        else:
            validity = "expired"
        lines.append(
            f"{label}{pack.pack_id}: {format_size(pack.bytes)}, "
            f"added {format_instant(pack.added_at)}, "
            f"expires {_instant_or(pack.expires_at, 'never')}, {validity}"
        )
    return lines


@app.command("show")
def show_cmd(
    user: Annotated[str, typer.Argument(help="The user id.")],
    commands: Annotated[int, typer.Option(min=0, help="How many of the last commands.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """USER's plan, current period, usage against allowance, state and last commands."""
    from quotaflow.sinks.influxql import InfluxQL, InfluxQLError

    settings = load_settings()
    plan = _stored_plans(settings).latest.get(user)
    if plan is None:
        tell(f"[red]{escape(repr(user))} has no plan on {settings.topics.plans}[/red]")
        raise typer.Exit(1)
    now = datetime.now(UTC)
    start, end = period_at(plan, now, ZoneInfo(settings.timezone))
    client = InfluxQL.from_settings(settings)
    try:
        usage = read_quota_usage(client, user)
        events = read_quota_events(client, user, commands) if commands else []
        influx_problem = None
    except (InfluxQLError, ValueError) as exc:
        usage, events, influx_problem = None, [], str(exc)
    if as_json:
        print(json.dumps({
            "plan": plan.model_dump(mode="json", exclude_defaults=True),
            "period": {
                "start": format_instant(start),
                "end": None if end is None else format_instant(end),
            },
            "usage": None if usage is None else usage.to_json(),
            "commands": [event.to_json() for event in events],
        }))
    else:
        for line in _plan_lines(plan, settings, now):
            print(line)
        print(_usage_text(usage, start, influx_problem))
        if commands and influx_problem is None:
            print(_events_text(events))
    if influx_problem is not None:
        tell(f"[red]cannot read InfluxDB:[/red] {escape(influx_problem)}")
        raise typer.Exit(1)


def _usage_text(usage: QuotaUsage | None, period_start: datetime, problem: str | None) -> str:
    if problem is not None:
        return "usage         unknown: InfluxDB could not be read"
    if usage is None:
        return "usage         nothing in InfluxDB yet (no quota_usage point for this user)"
    try:
        same_period = datetime.fromisoformat(usage.period_start) == period_start
    except ValueError:
        same_period = False
    note = "" if same_period else " (not the current period: nothing billed in it yet)"
    return "\n".join([
        f"usage         {usage.usage_text()} in the period from {usage.period_start}{note}",
        f"state         {usage.state}",
        f"as of         {_unix_iso(usage.time)} (InfluxDB quota_usage)",
    ])


def _events_text(events: list[QuotaEvent]) -> str:
    if not events:
        return "commands      none in InfluxDB yet (no quota_events point for this user)"
    lines = ["last commands (newest first)"]
    for event in events:
        used = "?" if event.used_bytes is None else brief_size(event.used_bytes)
        allowance = (
            "unlimited" if event.allowance_bytes is None else brief_size(event.allowance_bytes)
        )
        threshold = "" if event.threshold is None else f" at {event.threshold:g}"
        lines.append(
            f"  {_unix_iso(event.time)}  {event.action} ({event.reason}{threshold}), "
            f"used {used} of {allowance}, id {event.command_id}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- list, export


def _packs_summary(plan: Plan) -> str:
    if not plan.packs:
        return "-"
    return f"{len(plan.packs)}: {format_size(sum(p.bytes for p in plan.packs))}"


@app.command("list")
def list_cmd(
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines: the plans as `export` writes them.")
    ] = False,
) -> None:
    """Every stored plan, by user id."""
    from rich.table import Table

    settings = load_settings()
    plans = sorted(_stored_plans(settings).latest.values(), key=lambda p: p.user_id)
    if as_json:
        sys.stdout.write(plans_file(plans))
        return
    table = Table(title=f"{_count(len(plans), 'plan')} on {settings.topics.plans}")
    for column in ("user_id", "quota", "period", "timezone", "packs", "warn_at", "expires_at",
                   "enabled"):
        table.add_column(column, overflow="fold")  # a narrow terminal wraps, never cuts
    for plan in plans:
        table.add_row(
            plan.user_id,
            "unlimited" if plan.quota_bytes is None else format_size(plan.quota_bytes),
            format_period(plan.period),
            plan.timezone or "default",
            _packs_summary(plan),
            ",".join(f"{t:g}" for t in plan.warn_at) or "-",
            _instant_or(plan.expires_at, "-"),
            "yes" if plan.enabled else "no",
        )
    Console().print(table)


@app.command("export")
def export_cmd(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Every stored plan as JSON lines, sorted by user id: what `plans import` reads."""
    settings = load_settings()
    text = plans_file(_stored_plans(settings).latest.values())
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        tell(f"wrote {_count(text.count(chr(10)), 'plan')} to {escape(str(output))}")


# ---------------------------------------------------------------------------- delete


@app.command("delete")
def delete_cmd(user: Annotated[str, typer.Argument(help="The user id.")]) -> None:
    """Delete USER's plan (a tombstone): the user is no longer managed by a quota."""
    settings = load_settings()
    snapshot = _stored_plans(settings)
    if user not in snapshot.latest and not snapshot.troubled(user):
        tell(
            f"[red]{escape(repr(user))} has no plan on {settings.topics.plans}; "
            "nothing was written[/red]"
        )
        raise typer.Exit(1)
    with catalog_failures():
        from quotaflow.catalog import delete_plan

        delete_plan(settings, user)
    tell(f"deleted the plan of {escape(repr(user))}")

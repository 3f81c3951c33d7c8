"""`quotaflow nodes`: the nodes' billing rates on `<prefix>.nodes`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from quotaflow.cli._common import catalog_failures, load_settings, tell, warn_left_out
from quotaflow.core.plan_edits import current_second, format_instant, parse_instant, set_rate
from quotaflow.core.plans import RATE_UNIT, NodeRates, rate_at
from quotaflow.core.settings import Settings

app = typer.Typer(
    no_args_is_help=True, help="Nodes' billing rates (billed bytes = raw bytes x rate)."
)


def _stored_rates(settings: Settings) -> dict[str, NodeRates]:
    with catalog_failures():
        from quotaflow.catalog import read_node_rates

        snapshot = read_node_rates(settings)
    warn_left_out(snapshot)
    return snapshot.latest


def _current_rate(rates: NodeRates, now: datetime) -> str:
    """The rate in effect now, as a decimal."""
    whole, places = divmod(rate_at(rates, now), RATE_UNIT)
    return str(whole) if places == 0 else f"{whole}.{places:04d}".rstrip("0")


@app.command("set")
def set_cmd(
    node: Annotated[str, typer.Argument(help="The node id.")],
    rate: Annotated[str, typer.Option(help="Decimal multiplier, up to 4 places: 2, 0.5, 1.25.")],
    from_: Annotated[
        str, typer.Option("--from", help="RFC 3339 time the rate applies from, or now.")
    ] = "now",
) -> None:
    """Set NODE's rate from an instant on (replacing one from the same instant), keeping the others.

    Reports already billed are not billed again at the new rate.
    """
    settings = load_settings()
    now = datetime.now(UTC)
    try:
        starts = parse_instant(from_, now)
        stored = _stored_rates(settings).get(node)
        rates = set_rate(stored, node, rate, starts)
    except ValueError as exc:  # a bad time, rate or node id
        tell(f"[red]cannot set the rate of {escape(repr(node))}:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    with catalog_failures():
        from quotaflow.catalog import publish_node_rates

        publish_node_rates(settings, rates)
    tell(f"{escape(node)}: rate {escape(rate.strip())} from {format_instant(starts)}")
    if starts < current_second(now):
        tell(
            "note: readings billed before now keep their rate; only readings billed from now "
            f"on whose observed_at is at or after {format_instant(starts)} get this one"
        )


@app.command("list")
def list_cmd(
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines: the stored records.")
    ] = False,
) -> None:
    """Every node with stored rates, and the rate in effect now."""
    from rich.table import Table

    stored = sorted(_stored_rates(load_settings()).values(), key=lambda r: r.node_id)
    if as_json:
        for rates in stored:
            print(rates.encode().decode())
        return
    now = datetime.now(UTC)
    table = Table(title=f"{len(stored)} nodes with rates (others bill at 1)")
    for column in ("node_id", "now", "rates (from: rate)"):
        table.add_column(column, overflow="fold")
    for rates in stored:
        schedule = ", ".join(f"{format_instant(r.from_)}: {r.rate}" for r in rates.rates)
        table.add_row(rates.node_id, _current_rate(rates, now), schedule)
    Console().print(table)

"""Commands for a node: the agent, the panel push receiver, and checking a source's output."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import orjson
import typer

from quotaflow.cli._common import console, needs
from quotaflow.core.contracts import Counter

app = typer.Typer()


@app.command("parse")
def parse_cmd(
    file: Annotated[Path, typer.Argument(help="The source's raw output; - for stdin.")],
    source: Annotated[str, typer.Option(help="The source's name, as in the agent config.")],
    user_map: Annotated[
        Path | None, typer.Option(help="JSON object mapping source ids to user ids.")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="KEY=VALUE of the source's config, repeatable (prometheus: up_metric, "
            "down_metric, user_label, direction_label, up_value, down_value, match.LABEL).",
        ),
    ] = None,
) -> None:
    """Print the readings a source's raw output yields, as JSON lines, to check a mapping."""
    try:
        from quotaflow.producers.sources import SOURCES, ParseError, apply_user_map
    except ImportError as exc:
        raise needs("agent", exc) from None

    found = SOURCES.get(source)
    text_sources = sorted(name for name, s in SOURCES.items() if s.parse is not None)
    if found is None or found.parse is None:
        console.print(f"[red]--source must be one of {', '.join(text_sources)}[/red]")
        raise typer.Exit(2)
    parse = found.parse
    if option:
        parse = _configured_parser(source, option)
    text = sys.stdin.read() if str(file) == "-" else file.read_text(errors="replace")
    try:
        counters = parse(text)
        if user_map is not None:
            counters = apply_user_map(counters, json.loads(user_map.read_text()))
    except (ParseError, ValueError) as exc:
        console.print(f"[red]cannot parse {file} as {source}:[/red] {exc}")
        raise typer.Exit(1) from None
    for counter in counters:
        print(orjson.dumps(dataclasses.asdict(counter)).decode())


def _configured_parser(source: str, options: list[str]) -> Callable[[str], list[Counter]]:
    """The parser of a source whose text format has settings (only prometheus has)."""
    from quotaflow.producers.sources.prometheus import PrometheusConfig, parse_prometheus

    if source != "prometheus":
        console.print(f"[red]--set applies to prometheus only, not to {source}[/red]")
        raise typer.Exit(2)
    fields: dict[str, object] = {"type": "prometheus", "url": "-"}
    match: dict[str, str] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            console.print(f"[red]--set takes KEY=VALUE, not {item!r}[/red]")
            raise typer.Exit(2)
        if key.startswith("match."):
            match[key.removeprefix("match.")] = value
        else:
            fields[key] = value
    if match:
        fields["match"] = match
    try:
        mapping = PrometheusConfig.model_validate(fields).mapping()
    except ValueError as exc:
        console.print(f"[red]bad --set:[/red] {exc}")
        raise typer.Exit(2) from None
    return lambda text: parse_prometheus(text, mapping)


_RESET_HELP = (
    "Start a new outbox if the configured one is missing, empty or damaged where one "
    "existed before (without it the agent refuses to start). The damaged files are "
    "moved aside. The cost: reports Kafka had not acknowledged are lost, and the traffic "
    "since each node's last acknowledged report is not billed (its first report is a "
    "baseline). Use it once, after reading the refusal; a sound outbox is never reset."
)


@app.command("agent")
def agent_cmd(
    config: Annotated[Path, typer.Option("--config", help="The agent's TOML file.")],
    reset_outbox: Annotated[bool, typer.Option("--reset-outbox", help=_RESET_HELP)] = False,
) -> None:
    """Run the node agent: collectors, the durable outbox and the sender."""
    try:
        from quotaflow.producers.agent import run_agent
    except ImportError as exc:
        raise needs("agent", exc) from None

    run_agent(config, reset_outbox=reset_outbox)


@app.command("push-receiver")
def push_receiver_cmd(
    config: Annotated[Path, typer.Option("--config", help="The agent's TOML file.")],
    reset_outbox: Annotated[bool, typer.Option("--reset-outbox", help=_RESET_HELP)] = False,
) -> None:
    """Run the Xboard/V2Board UniProxy push endpoint with its outbox.

    With an `upstream` in its push table it is a gateway in front of the panel: every other UniProxy
    call passes through, and a push is billed only when the panel accepted it.
    Without, it is the only receiver and serves pushes alone (docs/agent.md).
    """
    try:
        from quotaflow.producers.agent import run_push_receiver
    except ImportError as exc:
        raise needs("agent", exc) from None

    run_push_receiver(config, reset_outbox=reset_outbox)

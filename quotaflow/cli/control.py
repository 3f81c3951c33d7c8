"""`quotaflow control`: the quota commands on `<prefix>.control`, as they come."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from quotaflow.cli._common import catalog_failures, load_settings, tell
from quotaflow.core.plan_edits import brief_size, format_instant
from quotaflow.core.plans import Command

app = typer.Typer(no_args_is_help=True, help="The quota commands (warn, disable, enable).")


def command_line(command: Command) -> str:
    """A command on one line for people: when, what, whom, why, usage, period, id."""
    allowance = (
        "unlimited" if command.allowance_bytes is None else brief_size(command.allowance_bytes)
    )
    threshold = "" if command.threshold is None else f" at {command.threshold:g}"
    end = "never" if command.period_end is None else format_instant(command.period_end)
    issued_at = command.model_dump(mode="json")["issued_at"]  # in milliseconds, as on the wire
    return (
        f"{issued_at}  {command.action:<7}  {command.user_id}  "
        f"{command.reason}{threshold}  used {brief_size(command.used_bytes)} of {allowance}  "
        f"period {format_instant(command.period_start)} to {end}  id {command.command_id}"
    )


@app.command("tail")
def tail_cmd(
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start with the oldest command kept.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines: each command in its wire form.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many commands (for scripts).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="Stop after this many seconds (for scripts).")
    ] = None,
) -> None:
    """Print commands as they come (from the end, unless --from-beginning), until Ctrl-C,
    --limit or --timeout."""
    settings = load_settings()
    topic = settings.topics.control

    def ready() -> None:
        where = "the beginning" if from_beginning else "the end"
        tell(f"following {topic} from {where}")

    with catalog_failures():
        from quotaflow.catalog import follow_commands

        try:
            for item in follow_commands(
                settings, from_beginning=from_beginning, limit=limit, timeout_s=timeout,
                on_ready=ready,
            ):
                if not isinstance(item, Command):
                    tell(f"[yellow]not a command:[/yellow] {escape(str(item))}")
                elif as_json:
                    print(item.encode().decode(), flush=True)
                else:
                    print(command_line(item), flush=True)
        except KeyboardInterrupt:
            return

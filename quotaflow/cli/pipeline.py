"""The pipeline's processes: the stream worker, the sinks, and both together."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from typing import Annotated, Any

import typer

from quotaflow.cli._common import console, load_settings, needs

app = typer.Typer()
sink_app = typer.Typer(no_args_is_help=True, help="Run one sink in the foreground.")
app.add_typer(sink_app, name="sink")


@app.command("worker")
def worker_cmd(loglevel: str = "WARNING") -> None:
    """Run the Faust stream worker in the foreground."""
    try:
        from quotaflow.streams.app import run_worker
    except ImportError as exc:
        raise needs("pipeline", exc) from None

    run_worker(load_settings(), loglevel=loglevel)


@sink_app.command("influx")
def sink_influx_cmd() -> None:
    """Run the InfluxDB sink in the foreground."""
    try:
        from quotaflow.sinks.influx import run_sink
    except ImportError as exc:
        raise needs("pipeline", exc) from None

    run_sink(load_settings())


@app.command("run")
def run_cmd(
    seconds: Annotated[float | None, typer.Option(help="Stop after this long.")] = None,
) -> None:
    """Run the whole single-machine pipeline (worker and sinks) until SIGINT/SIGTERM."""
    from rich.live import Live

    try:
        from quotaflow.admin import ensure_topics
        from quotaflow.streams.lag import LagProbe

        for module in ("faust", "aiokafka", "influxdb_client"):  # what the children import
            if importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(f"No module named {module!r}", name=module)
    except ImportError as exc:
        raise needs("pipeline", exc) from None

    settings = load_settings()
    ensure_topics(settings)
    commands = {"worker": ["worker"], "influx-sink": ["sink", "influx"]}
    children = {name: _spawn(args) for name, args in commands.items()}
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    probe = LagProbe(settings)
    started = time.monotonic()
    restarts = 0
    try:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while not stopping:
                for name, process in children.items():
                    if process.poll() is not None:  # e.g. Kafka was gone too long: start again
                        console.print(f"[yellow]{name} exited ({process.returncode}); "
                                      "restarting[/yellow]")
                        restarts += 1
                        time.sleep(1.0)
                        children[name] = _spawn(commands[name])
                try:
                    lag = probe.lag()
                    text = f"worker lag {lag.raw:>8}  sink lag {lag.sink:>8}"
                except Exception as exc:  # the display must not stop the pipeline
                    text = f"lag unknown ({type(exc).__name__})"
                live.update(f"quotaflow run  {time.monotonic() - started:7.0f}s  {text}"
                            f"  restarts {restarts}")
                if seconds is not None and time.monotonic() - started >= seconds:
                    break
                time.sleep(1.0)
    finally:
        probe.close()
        for process in children.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in children.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    """Start `quotaflow ARGS` as a child process with this environment."""
    return subprocess.Popen([sys.executable, "-m", "quotaflow", *args])

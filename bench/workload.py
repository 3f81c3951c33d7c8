"""The benchmarks' shared workload: a simulated fleet chosen on the command line."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from quotaflow.dev.simulation import FleetSpec, Simulation, simulate


def workload_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the fleet's shape options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--days", type=float, default=1.0)
    parser.add_argument("--interval", type=int, default=600, help="seconds between reports")
    return parser


def workload(args: argparse.Namespace) -> Simulation:
    """The fleet the options describe, with no malformed lines."""
    return simulate(FleetSpec(nodes=args.nodes, users=args.users, days=args.days,
                              interval_s=args.interval, malformed=0, nodes_per_user=(1, 2)))


RESULTS = Path(__file__).resolve().parent / "results.json"


def results_options(parser: argparse.ArgumentParser) -> None:
    """--results FILE (default bench/results.json) and --no-results."""
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-results", action="store_true")


def begin_run(kind: str) -> tuple[tuple[float, float, float], Path]:
    """The load average now and a fresh directory for the run's logs, both printed."""
    load = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix=f"quotaflow-{kind}-"))
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"logs in {workdir}", flush=True)
    return load, workdir


T = TypeVar("T")


def on_servers(run: Callable[[str, str], T]) -> T:
    """`run(kafka_bootstrap, influx_url)` on the servers in QUOTAFLOW_KAFKA_BOOTSTRAP and
    QUOTAFLOW_INFLUX_URL when both are set, otherwise on local ones, stopped afterwards
    (also when the run fails) if this call started them."""
    bootstrap = os.environ.get("QUOTAFLOW_KAFKA_BOOTSTRAP")
    influx = os.environ.get("QUOTAFLOW_INFLUX_URL")
    if bootstrap and influx:
        return run(bootstrap, influx)
    from quotaflow.dev import local

    started_here = not local.status().get("running")
    services = local.up()
    try:
        return run(services.kafka_bootstrap, services.influx_url)
    finally:
        if started_here:
            local.down()


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def pid_listening(port: int) -> int | None:
    """The pid of the local process listening on TCP `port`, if it can be found."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None

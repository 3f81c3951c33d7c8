"""Enforcement latency: a crossing report on Kafka -> the first refused connection on v2ray.

    python bench/enforce_latency.py [--users 20] [--quota 2000000] [--interval 1.0]
        [--results bench/results.json | --no-results]

The setup of tests/test_enforcement_end_to_end.py: real Kafka, the real worker
(`quotaflow worker`), the Debian v2ray server (API inbound with StatsService and
HandlerService, a VLESS inbound with `--users` users), one v2ray client with a
SOCKS inbound per user, and `quotaflow agent` as a process with a `v2ray`
collector every `--interval` seconds and `[enforce]` with the `v2ray` backend and
a credentials file. Every user has a plan of `--quota` bytes a month.

The users cross their quota one after another: each downloads 1 MB GETs from a
local HTTP server through its SOCKS port until v2ray's counters reach the quota,
then a new tiny request (an empty POST, a new connection) is made every 50 ms
until one fails.

A warm-up user goes first, as in bench/latency.py: the worker's first `disable`
takes about a second longer than the others (measured at ~1.07 s against ~0.015 s,
once per worker start), which is not the steady state. Its figures are printed
and stored apart, and not in the percentiles.

Definition of the latency, per user: from the Kafka timestamp (CreateTime, set
by the agent's producer when it sent the record; the produce ack is not
observable from outside, and the broker receives the record a few ms later, so
this slightly overstates the latency) of the first `.raw` record in which the
user's billed bytes (up + down, cumulative; the agent runs with
`baseline_on_first_start = false` on a fresh v2ray) reach the quota, to the
wall-clock moment the first refused request was seen failing (its end, so the
failed attempt's own duration is included). All clocks are this machine's wall
clock. The shares are printed beside it: crossing -> the `disable` record's
timestamp on `.control` (the worker), -> the `applied` ack's timestamp on
`.control.acks` (the agent: snapshot of the counters, HandlerService
RemoveUser), -> the refused request (the client's next poll). The time from the
end of the crossing download to the crossing record (up to one collector
interval) is not part of it.

Figures go to bench/results.json under "enforce_latency", per command line
(other keys are kept). Uses QUOTAFLOW_KAFKA_BOOTSTRAP / QUOTAFLOW_INFLUX_URL
when set, otherwise starts local servers with `quotaflow.dev.local`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latency import percentile  # noqa: E402
from throughput import merge_results, options  # noqa: E402
from workload import on_servers  # noqa: E402

from quotaflow.admin import ensure_topics  # noqa: E402
from quotaflow.core.settings import Settings  # noqa: E402
from tests.conftest import Pipeline  # noqa: E402
from tests.producers.sources import helpers  # noqa: E402
from tests.producers.sources.helpers import Processes  # noqa: E402
from tests.test_enforcement_end_to_end import (  # noqa: E402
    MB,
    Bus,
    V2RayNode,
    make_users,
    plan,
    start_agent,
)

RESULTS = Path(__file__).resolve().parent / "results.json"
POLL_S = 0.05


def _http_server() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((helpers.LOCAL, 0), helpers._Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50_s": round(percentile(values, 50), 3), "p99_s": round(percentile(values, 99), 3),
            "min_s": round(min(values), 3), "max_s": round(max(values), 3)}


def run(args: argparse.Namespace, bootstrap: str, influx: str) -> dict[str, Any]:
    if shutil.which("v2ray") is None:
        subprocess.run(["bash", str(helpers.INSTALL)], check=True, timeout=900)
    workdir = Path(tempfile.mkdtemp(prefix="quotaflow-enforce-latency-"))
    print(f"logs in {workdir}", flush=True)
    tag = uuid.uuid4().hex[:8]
    settings = Settings(kafka_bootstrap=bootstrap, influx_url=influx,
                        topic_prefix=f"bench-enforce-{tag}", influx_bucket=f"bench_{tag}",
                        state_dir=workdir / "state")
    ensure_topics(settings)
    pipeline = Pipeline(settings, workdir)
    processes = Processes(workdir)
    http = _http_server()
    port = http.server_address[1]
    bus = Bus(settings)
    users = make_users(args.users + 1)  # users[0]: the warm-up
    refused_at: dict[str, tuple[float, float]] = {}  # user -> (attempt start, failure seen)
    try:
        pipeline.start("worker")
        node = V2RayNode(processes, users)
        start_agent(processes, settings, node, interval_s=args.interval)
        for u in users:
            bus.publish(plan(u.name, args.quota))
        bus.wait("the agent's first report", bus.reports, timeout=120)
        for u in users:
            assert node.ping(u.name, port), f"{u.name} cannot connect at the start"
        for n, u in enumerate(users, 1):
            while True:
                c = node.counters().get(u.name)
                if c is not None and c.up + c.down >= args.quota:
                    break
                assert node.download(u.name, port) == MB
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                start = time.time()
                if not node.ping(u.name, port):
                    refused_at[u.name] = (start, time.time())
                    break
                time.sleep(POLL_S)
            else:
                raise SystemExit(f"{u.name} was not cut off within 60 s; logs in {workdir}")
            print(f"  {n}/{len(users)} {u.name} cut off", flush=True)
        rows = []
        for u in users:
            crossing = bus.wait(f"{u.name}'s crossing report",
                                partial(bus.crossing, u.name, args.quota))
            disable = bus.wait(f"{u.name}'s disable", partial(bus.command, u.name, "disable"))
            ack = bus.wait(f"{u.name}'s ack", partial(bus.ack, disable.value.command_id))
            assert ack.value.outcome == "applied", ack.value
            t0 = crossing.timestamp_ms / 1000
            rows.append({
                "user": u.name,
                "total_s": refused_at[u.name][1] - t0,
                "to_disable_s": disable.timestamp_ms / 1000 - t0,
                "to_ack_s": ack.timestamp_ms / 1000 - t0,
                "failed_attempt_s": refused_at[u.name][1] - refused_at[u.name][0],
            })
    finally:
        bus.close()
        processes.stop()
        pipeline.stop()
        http.shutdown()
    warmup, rows = rows[0], rows[1:]
    figures = {key: _stats([r[key] for r in rows])
               for key in ("total_s", "to_disable_s", "to_ack_s", "failed_attempt_s")}
    return {"users": len(rows), "rows": rows, "figures": figures, "warmup": warmup,
            "workdir": str(workdir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--quota", type=int, default=2 * MB)
    parser.add_argument("--interval", type=float, default=1.0,
                        help="the agent's collector interval_s")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    command = " ".join(["python", "bench/enforce_latency.py", *options()])

    load = os.getloadavg()
    out = on_servers(lambda bootstrap, influx: run(args, bootstrap, influx))

    print()
    print(f"enforcement latency, {out['users']} users, quota {args.quota:,} bytes, "
          f"collector every {args.interval} s (seconds)")
    print(f"{'from the crossing .raw record to':<44}{'p50':>8}{'p99':>8}{'min':>8}{'max':>8}")
    labels = {
        "to_disable_s": "the disable on .control (worker)",
        "to_ack_s": "the applied ack on .control.acks (agent)",
        "total_s": "the first refused connection (observed)",
    }
    for key, label in labels.items():
        f = out["figures"][key]
        print(f"{label:<44}{f['p50_s']:>8.3f}{f['p99_s']:>8.3f}{f['min_s']:>8.3f}"
              f"{f['max_s']:>8.3f}")
    f = out["figures"]["failed_attempt_s"]
    print(f"(the failed attempt itself took p50 {f['p50_s']:.3f} s, max {f['max_s']:.3f} s; "
          f"connections polled every {POLL_S * 1000:.0f} ms)")
    w = out["warmup"]
    print(f"warm-up user (not in the figures): disable {w['to_disable_s']:.3f} s, ack "
          f"{w['to_ack_s']:.3f} s, refused {w['total_s']:.3f} s after its crossing record")
    print(f"rerun: {command}")
    if args.no_results:
        return
    merge_results(args.results, "enforce_latency", {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": f"{os.cpu_count()} cores; load average before the run {load[0]:.2f} "
                   f"(1 min), {load[2]:.2f} (15 min)",
        "definition": "Kafka timestamp (producer CreateTime) of the first .raw record whose "
                      "billed bytes of the user reach the quota -> the moment the first new "
                      "connection through the user's v2ray client was seen failing (polled "
                      "every 50 ms); same machine's wall clock",
        "users": out["users"], "quota_bytes": args.quota, "collector_interval_s": args.interval,
        "p50_s": out["figures"]["total_s"]["p50_s"], "p99_s": out["figures"]["total_s"]["p99_s"],
        "figures": out["figures"],
        "warmup_user": {k: (round(v, 3) if isinstance(v, float) else v)
                        for k, v in out["warmup"].items()},
        "per_user": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                     for r in out["rows"]],
    })
    print(f"figures merged into {args.results} under \"enforce_latency\"")


if __name__ == "__main__":
    main()

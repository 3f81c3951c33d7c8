"""End-to-end throughput: raw topic -> worker -> totals -> InfluxDB, against a per-reading baseline.

Both runs bill the same simulated fleet on the same local servers in this one
run; each is timed from the moment the worker starts consuming to the moment
InfluxDB holds every total, and each is checked against the ground truth.

    python bench/throughput.py [--nodes 10 --users 3000 --days 1 --interval 600]

Uses the servers in QUOTAFLOW_KAFKA_BOOTSTRAP / QUOTAFLOW_INFLUX_URL when set,
otherwise starts local ones with `quotaflow.dev.local`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from zoneinfo import ZoneInfo

from kafka import KafkaProducer
from workload import workload, workload_parser

from quotaflow.admin import ensure_topics
from quotaflow.core.contracts import CounterReport
from quotaflow.core.partitioning import partition_of
from quotaflow.core.periods import Calendar
from quotaflow.core.settings import Settings
from quotaflow.dev.simulation import Simulation
from quotaflow.dev.truth_check import compare, read_daily_totals
from quotaflow.producers.publisher import ReportPublisher
from quotaflow.streams.lag import LagProbe

HERE = Path(__file__).resolve().parent


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds a live process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _first_message_at(log: Path) -> float:
    """When the worker handled its first message (it logs that moment)."""
    for line in log.read_text(errors="replace").splitlines():
        if "first message at " in line:
            return float(line.rsplit("first message at ", 1)[1].split()[0])
    raise SystemExit(f"no 'first message' line in {log}")


def _drain(settings: Settings, worker_cmd: list[str], group: str, topic: str,
           workdir: Path) -> tuple[float, float, float]:
    """Start worker and sink, wait until InfluxDB has everything.

    Returns (seconds from the worker's first message until InfluxDB held every
    total, seconds the worker took to start, the worker's peak RSS in MB).
    """
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    worker_log = workdir / f"{group}-worker.log"
    with worker_log.open("wb") as wlog, (workdir / f"{group}-sink.log").open("wb") as slog:
        worker = subprocess.Popen(worker_cmd, env=env, stdout=wlog, stderr=subprocess.STDOUT)
        sink = subprocess.Popen([sys.executable, "-m", "quotaflow", "sink", "influx"], env=env,
                                stdout=slog, stderr=subprocess.STDOUT)
    probe = LagProbe(settings)
    started = time.time()
    worker_done = None
    try:
        while True:
            raw = probe.behind(topic, group)
            if raw == 0 and worker_done is None:
                worker_done = time.time()
            totals = probe.behind(settings.topics.totals, settings.topics.influx_sink_group)
            if raw == 0 and totals == 0:
                break
            if time.time() - started > 1800:
                raise SystemExit(f"{group}: did not finish in 30 minutes")
            time.sleep(0.1)
        done = time.time()
        rss = _peak_rss_mb(worker.pid)
        print(f"  CPU seconds: worker {_cpu_s(worker.pid):.1f}, sink {_cpu_s(sink.pid):.1f}")
    finally:
        probe.close()
        for p in (worker, sink):
            p.terminate()
        for p in (worker, sink):
            p.wait(timeout=30)
    first = _first_message_at(worker_log)
    print(f"  worker committed its last offset {worker_done - first:.2f} s after its first message")
    return done - first, first - started, rss


def _check(settings: Settings, sim: Simulation) -> str:
    calendar = Calendar(ZoneInfo(settings.timezone))
    truth = {(u, n, calendar.label(d, "day")): (a, b) for (u, n, d), (a, b) in sim.truth.items()}
    return "EXACT" if compare(truth, read_daily_totals(settings)).exact else "MISMATCH"


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0])
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    bootstrap = os.environ.get("QUOTAFLOW_KAFKA_BOOTSTRAP")
    influx = os.environ.get("QUOTAFLOW_INFLUX_URL")
    if bootstrap and influx:
        run(args, bootstrap, influx)
        return
    from quotaflow.dev import local

    started_here = not local.status().get("running")
    services = local.up()
    try:
        run(args, services.kafka_bootstrap, services.influx_url)
    finally:
        if started_here:  # stop what this run started, also when it failed
            local.down()


def run(args: argparse.Namespace, bootstrap: str, influx: str) -> None:
    """Both designs on one workload, against these servers."""
    sim = workload(args)
    workdir = Path(tempfile.mkdtemp(prefix="quotaflow-bench-"))
    tag = uuid.uuid4().hex[:8]
    print(f"workload: {sim.reports} reports, {sim.readings} readings from {args.nodes} nodes, "
          f"{args.users} users ({sim.duplicates} duplicates, {sim.reordered} reordered)")

    batched = Settings(kafka_bootstrap=bootstrap, influx_url=influx, topic_prefix=f"bench-{tag}",
                       influx_bucket=f"bench_{tag}", state_dir=workdir / "batched")
    ensure_topics(batched)
    t = time.monotonic()
    with ReportPublisher(batched) as publisher:
        publisher.publish_lines(sim.lines)
        publisher.flush()
    publish_s = time.monotonic() - t
    end = LagProbe(batched)
    raw_messages = end.behind(batched.topics.raw, batched.topics.worker_group)
    end.close()
    seconds, startup, rss = _drain(
        batched, [sys.executable, "-m", "quotaflow", "worker", "--loglevel", "INFO"],
        batched.topics.worker_group, batched.topics.raw, workdir,
    )
    rate = sim.readings / seconds
    print(f"batched worker:  {seconds:7.2f} s  {rate:12,.0f} readings/s end to end "
          f"({raw_messages} messages; startup {startup:.1f} s; worker peak RSS {rss:.0f} MB; "
          f"publish {publish_s:.1f} s) ledger {_check(batched, sim)}")
    if args.skip_baseline:
        return

    base = batched.model_copy(update={"topic_prefix": f"bench-{tag}-base",
                                      "influx_bucket": f"bench_{tag}_base",
                                      "state_dir": workdir / "base"})
    ensure_topics(base)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                             linger_ms=20, batch_size=1 << 20)
    t = time.monotonic()
    for line in sim.lines:
        report = CounterReport.decode(line)
        for counter in report.counters:
            single = report.model_copy(update={"counters": (counter,)})
            producer.send(f"{base.topic_prefix}.readings", value=single.encode(),
                          partition=partition_of(counter.user_id, base.partitions))
    producer.flush()
    producer.close()
    base_publish = time.monotonic() - t
    base_seconds, base_startup, base_rss = _drain(
        base, [sys.executable, str(HERE / "baseline_worker.py")],
        f"{base.topic_prefix}-baseline", f"{base.topic_prefix}.readings", workdir,
    )
    base_rate = sim.readings / base_seconds
    print(f"per-reading baseline: {base_seconds:7.2f} s  {base_rate:12,.0f} readings/s end to end "
          f"(startup {base_startup:.1f} s; worker peak RSS {base_rss:.0f} MB; "
          f"publish {base_publish:.1f} s) ledger {_check(base, sim)}")
    print(f"ratio: batched / per-reading = {rate / base_rate:.1f}x")


if __name__ == "__main__":
    main()

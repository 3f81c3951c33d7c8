"""End-to-end freshness: a report reaching `.raw` -> its totals point in InfluxDB, under load.

    python bench/freshness.py [--rates 10000,100000] [--probes 100] [--probe-seconds 40]
        [--warmup 10] [--settle 60] [--bg-users 20000] [--bg-nodes 50] [--before REF]
        [--results bench/results.json | --no-results]

Each phase (one per rate in `--rates`, background readings per second) runs on
topics and a database of its own, with a worker and an InfluxDB sink started for
it (default settings: the sink flushes every second):

1. A warm-up probe is sent and awaited in InfluxDB: the worker and the sink are up.
2. A separate process publishes the background load (`bench/latency.py`'s
   generator: `--bg-nodes` nodes reporting `--bg-users` users' cumulative
   counters, about 100 readings per message, at the rate asked), and measures the
   rate it achieved.
3. After `--warmup` seconds, `--probes` probes are sent at even intervals over
   `--probe-seconds`: each is one report of a new user on a probe node.
   "Reached Kafka" is the moment the broker acknowledged its produce request
   (acks=all; wall clock in the producer's callback).
4. One poller asks InfluxDB every 0.1 s for the probes' `traffic_daily` points
   (one query for all of them) and notes, for each, the wall clock when the query
   that first returned it came back: "in InfluxDB". The figure is the difference,
   so it includes up to one poll interval and a query's time (printed).
5. Probes not in InfluxDB `--settle` seconds after the last probe count as
   missing; a p99 with missing probes is given as "> settle".

A worker that exits (its commit watchdog exits with status 70 when Faust stops
committing) is started again at once, as `quotaflow run` or systemd would; the
restarts are counted and printed, and the probes' times include them.

With `--before REF` every rate is run a second time, right after, with the worker
of git revision REF (extracted with `git archive`, git's state untouched; the sink
stays this one), and the ratios of the two are printed: on a shared machine only
figures of the same run compare.

The sink's own freshness figures (`pipeline`, `freshness_ms_p50`/`_p99`: append
time on `.raw` -> totals point accepted, per 10 s) over the probe window are
printed beside them. All processes share the machine's cores. Figures go to
`bench/results.json` under "freshness" and the command line.

Uses the servers in QUOTAFLOW_KAFKA_BOOTSTRAP / QUOTAFLOW_INFLUX_URL when set,
otherwise starts local ones with `quotaflow.dev.local`.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from latency import (
    Probe,
    Prober,
    load_parser,
    run_phases,
    send_probes,
    start_background,
    wait_until,
)
from throughput import extract_tree, log_facts, merge_results
from workload import on_servers

from quotaflow.admin import ensure_topics
from quotaflow.core.health import percentile
from quotaflow.core.settings import Settings
from quotaflow.sinks.influxql import InfluxQL, InfluxQLError
from quotaflow.streams.lag import LagProbe

TARGET_P99_S = 5.0
POLL_S = 0.1


class InfluxPoller(threading.Thread):
    """Polls InfluxDB for the daily points of users named `<prefix>...`; notes when each came."""

    def __init__(self, settings: Settings, prefix: str) -> None:
        super().__init__(daemon=True)
        self.client = InfluxQL.from_settings(settings)
        self.query = (f"SELECT last(up_bytes) FROM traffic_daily WHERE user_id =~ /^{prefix}/ "
                      "GROUP BY user_id")
        self.seen: dict[str, float] = {}
        self.query_s: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            began = time.time()
            try:
                series = self.client.query(self.query)
            except InfluxQLError:
                series = []  # no database before the sink's first write
            answered = time.time()
            self.query_s.append(answered - began)
            for s in series:
                self.seen.setdefault(s.tags["user_id"], answered)
            time.sleep(max(0.0, POLL_S - (time.time() - began)))


@dataclass
class Phase:
    target_per_s: int
    worker: str = "this"  # or the revision given with --before
    background: dict[str, Any] = field(default_factory=dict)
    probes_sent: int = 0
    probes_seen: int = 0
    missing: int = 0
    p50_s: float | None = None
    p99_s: float | None = None
    max_s: float | None = None
    query_p50_s: float | None = None  # the poller's query time: part of the figures
    sink_freshness_p50_ms: float | None = None  # median of the sink's 10 s p50s
    sink_freshness_p99_ms: float | None = None  # the largest of its 10 s p99s
    raw_lag_end: int | None = None
    worker_restarts: int = 0
    worker_failed: str = ""  # the last error line of a worker that exited
    note: str = ""


class Worker:
    """The phase's worker process, started again when it exits (a supervisor's job)."""

    def __init__(self, env: dict[str, str], log: Path, tree: Path | None) -> None:
        self.env, self.log, self.tree = env, log, tree
        if tree is not None:  # the revision's package first on the path
            self.env = {**env, "PYTHONPATH": str(tree)}
        self.restarts = 0
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "quotaflow", "worker", "--loglevel", "INFO"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.tree)

    def alive(self) -> bool:
        """True; restarts the worker first if it exited."""
        if self.process.poll() is not None:
            print(f"  worker exited with status {self.process.returncode}; started again",
                  flush=True)
            self.restarts += 1
            self.process = self._start()
        return True


def _sink_freshness(settings: Settings, since: float, until: float) -> tuple[float | None, ...]:
    """The sink's own figures over [since, until]: median p50 and largest p99, in ms."""
    rows = [row for s in InfluxQL.from_settings(settings).query(
        "SELECT freshness_ms_p50, freshness_ms_p99 FROM pipeline WHERE process = 'sink' "
        f"AND time >= {int(since * 1e9)} AND time <= {int(until * 1e9)}") for row in s.rows]
    p50s = [r["freshness_ms_p50"] for r in rows if r.get("freshness_ms_p50") is not None]
    p99s = [r["freshness_ms_p99"] for r in rows if r.get("freshness_ms_p99") is not None]
    return (percentile(p50s, 50) if p50s else None, max(p99s) if p99s else None)


def run_phases_of_both(args: argparse.Namespace, bootstrap: str, influx: str, rate: int,
                       workdir: Path) -> list[Phase]:
    """The rate's phase with this worker, then (with --before) with the revision's."""
    phases = [run_phase(args, bootstrap, influx, rate, workdir, None)]
    if args.before:
        tree = workdir / f"tree-{args.before}"
        if not tree.exists():
            tree = extract_tree(args.before, workdir)
        print(f"phase: background {rate:,} readings/s, the worker of {args.before}", flush=True)
        phases.append(run_phase(args, bootstrap, influx, rate, workdir, tree))
        phases[-1].worker = args.before
    return phases


def run_phase(args: argparse.Namespace, bootstrap: str, influx: str, rate: int,
              workdir: Path, tree: Path | None) -> Phase:
    tag = uuid.uuid4().hex[:8]
    label = f"{rate}" if tree is None else f"{rate}-{args.before}"
    settings = Settings(kafka_bootstrap=bootstrap, influx_url=influx,
                        topic_prefix=f"fresh-{tag}", influx_bucket=f"fresh_{tag}",
                        state_dir=workdir / f"state-{label}")
    ensure_topics(settings)
    phase = Phase(rate)
    probes = [Probe(f"probe-{tag}-{i:04d}") for i in range(args.probes)]
    warm = Probe(f"probe-{tag}-warm")
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    worker_log = workdir / f"{label}-worker.log"
    worker = Worker(env, worker_log, tree)
    with (workdir / f"{label}-sink.log").open("wb") as slog:
        sink = subprocess.Popen([sys.executable, "-m", "quotaflow", "sink", "influx"], env=env,
                                stdout=slog, stderr=subprocess.STDOUT)
    poller = InfluxPoller(settings, f"probe-{tag}-")
    poller.start()
    prober = Prober(settings)
    bg_process = None
    window = (0.0, 0.0)
    try:
        prober.send(warm)
        if not wait_until(lambda: warm.user in poller.seen, 180, worker.alive):
            raise SystemExit(f"the warm-up probe never reached InfluxDB; see {worker_log}")
        print(f"  pipeline ready: warm-up probe in InfluxDB "
              f"{poller.seen[warm.user] - warm.acked_at:.2f} s after its ack", flush=True)
        bg_process, queue = start_background(args, bootstrap, settings, rate)
        began = time.time() + args.warmup
        send_probes(args, prober, probes, lambda i, probe: worker.alive())
        window = (began, time.time())
        phase.probes_sent = len(probes)
        phase.background = queue.get(timeout=args.warmup + args.probe_seconds + 120)
        bg_process.join(timeout=30)
        bg = phase.background
        print(f"  background: asked {rate:,} readings/s, achieved {bg['achieved_per_s']:,.0f} "
              f"({bg['readings_acked']:,} readings in {bg['seconds']:.1f} s, {bg['errors']} "
              "send errors)", flush=True)
        wait_until(lambda: all(p.user in poller.seen for p in probes), args.settle, worker.alive)
        probe_lag = LagProbe(settings)
        phase.raw_lag_end = probe_lag.behind(settings.topics.raw, settings.topics.worker_group)
        probe_lag.close()
        time.sleep(settings.status_interval_s + 2)  # the sink's point for the last interval
        phase.sink_freshness_p50_ms, phase.sink_freshness_p99_ms = _sink_freshness(
            settings, window[0], window[1] + args.settle)
    finally:
        poller.stop.set()
        prober.close()
        if bg_process is not None and bg_process.is_alive():
            bg_process.terminate()
        for p in (worker.process, sink):
            if p.poll() is None:
                p.terminate()
        for p in (worker.process, sink):
            p.wait(timeout=30)
        poller.join(timeout=5)
    phase.worker_restarts = worker.restarts
    if worker.restarts:
        phase.worker_failed = log_facts(worker_log)[0]
    _summarise(phase, probes, poller, args.settle)
    return phase


def _summarise(phase: Phase, probes: list[Probe], poller: InfluxPoller, settle: float) -> None:
    times = [poller.seen[p.user] - p.acked_at for p in probes
             if p.user in poller.seen and p.acked_at]
    phase.probes_seen = len(times)
    phase.missing = len(probes) - len(times)
    if poller.query_s:
        phase.query_p50_s = percentile(poller.query_s, 50)
    if times:
        phase.p50_s = percentile(times, 50)
        phase.max_s = max(times)
        if len(times) >= math.ceil(0.99 * len(probes)):
            phase.p99_s = percentile(times + [math.inf] * phase.missing, 99)
    if phase.missing:
        phase.note = f"{phase.missing} probes not in InfluxDB {settle:.0f} s after the last probe"


def _s(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value / 1000:.3f}"


def report(phases: list[Phase], settle: float) -> None:
    print()
    print("| background asked | worker | achieved | probes in InfluxDB | p50 s | p99 s | max s "
          "| poll query p50 s | sink's own p50 / p99 s | worker raw lag at end "
          "| worker restarts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ph in phases:
        bg = ph.background
        p99 = _s(ph.p99_s) if ph.p99_s is not None or not ph.missing else f"> {settle:.0f}"
        print(f"| {ph.target_per_s:,}/s | {ph.worker} | {bg.get('achieved_per_s', 0):,.0f}/s | "
              f"{ph.probes_seen} / {ph.probes_sent} | {_s(ph.p50_s)} | {p99} | {_s(ph.max_s)} | "
              f"{_s(ph.query_p50_s)} | {_ms(ph.sink_freshness_p50_ms)} / "
              f"{_ms(ph.sink_freshness_p99_ms)} | {ph.raw_lag_end} | {ph.worker_restarts} |")
    print()
    for this, before in pairwise(phases):
        if this.worker == "this" and before.worker != "this":
            print(f"{this.target_per_s:,}/s, this worker / the worker of {before.worker}: "
                  f"p50 {_ratio(this.p50_s, before.p50_s)}, "
                  f"p99 {_ratio(this.p99_s, before.p99_s)}")
    for ph in phases:
        verdict = ("met" if ph.p99_s is not None and ph.p99_s <= TARGET_P99_S and not ph.missing
                   else "MISSED")
        print(f"{ph.target_per_s:,}/s ({ph.worker} worker): p99 target <= {TARGET_P99_S:.0f} s "
              f"{verdict}"
              + (f"; {ph.note}" if ph.note else "")
              + (f"; the worker was restarted {ph.worker_restarts} time(s), last error: "
                 f"{ph.worker_failed}" if ph.worker_restarts else ""))


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isinf(a) or math.isinf(b) or not b:
        return "-"
    return f"{a / b:.2f}"


def main() -> None:
    parser = load_parser(__doc__.splitlines()[0], probes=100, settle=60.0)
    parser.add_argument("--before", metavar="REF",
                        help="also run every rate with the worker of this git revision")
    args = parser.parse_args()
    on_servers(lambda bootstrap, influx: run(args, bootstrap, influx))


def run(args: argparse.Namespace, bootstrap: str, influx: str) -> None:
    pairs, facts = run_phases(args, "freshness", run_phases_of_both, bootstrap, influx)
    phases = [phase for pair in pairs for phase in pair]
    report(phases, args.settle)
    if args.no_results:
        return
    merge_results(args.results, "freshness", {
        **facts,
        "reached_kafka": "produce acknowledgement (acks=all), wall clock in the callback",
        "in_influxdb": f"a poll every {POLL_S} s returned the probe's traffic_daily point "
                       "(wall clock when the query came back)",
        "target_p99_s": TARGET_P99_S,
        "phases": [asdict(p) for p in phases],
    })
    print(f"figures merged into {args.results} under \"freshness\"")


if __name__ == "__main__":
    main()

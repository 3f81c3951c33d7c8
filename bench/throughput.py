"""End-to-end throughput: raw topic -> worker -> totals -> InfluxDB, with and without quotas.

One run bills the same simulated fleet on the same local servers several times:

- (a) the batched worker, with no plans published (the quota step only keeps each
  user's hourly usage history);
- (b) the batched worker, with a plan for every simulated user published before
  the run, chosen so that about a quarter of the users pass 80% and 100% of their
  quota (a `warn` and a `disable` each), a quarter pass 80% only (a `warn`), and
  the rest stay far below: commands are really produced. The commands read back
  from `<prefix>.control` are checked against those the ground truth calls for;
- the textbook per-reading Faust agent (`bench/baseline_worker.py`);
- optionally (`--before REF`), the worker of git revision REF (say, the last one
  before quotas), extracted with `git archive` into a temporary directory and
  run on the same fleet with no plans; git's state is not touched.

Each run is timed from the moment the worker handles its first message to the
moment InfluxDB holds every total (and every quota state and command: the sink's
group has read `.totals`, `.quota` and `.control` to their ends), and each run's
daily totals are checked against the ground truth. The figures are printed as a
table and merged into `bench/results.json` under "quotas" and the command line.

    python bench/throughput.py [--nodes 10 --users 3000 --days 1 --interval 600]
        [--rounds 1] [--skip-baseline] [--skip-quotas] [--before REF]
        [--results bench/results.json | --no-results]

--rounds N      run (a) and (b) N times each, alternating (a b b a a b ...), and report
                medians; runs of a few seconds on a shared 2-core box vary by 10-20%.
--skip-baseline leave out the per-reading baseline (it takes three to six minutes).
--skip-quotas   leave out (b).
--before REF    also run the worker of git revision REF, e.g. 866ded1 (before quotas).
--profile DIR   sample the workers of round 1 with py-spy (`bench/worker_profile.py`) and
                print where their CPU goes.

Worker CPU is given twice: all of it (start-up, loading the plans, billing) and
the part used from its first message on ("drain CPU"), which is what the quotas
add to. A worker that exits before the end (its commit watchdog, say) is not
restarted: its row says FAILED, with its last error line and its own readings/s
until then, and the ratios say they use that figure. With the defaults the whole
run takes five to eight minutes on the 2-core machine, most of it the baseline;
`--skip-baseline` brings it to about two.

Uses the servers in QUOTAFLOW_KAFKA_BOOTSTRAP / QUOTAFLOW_INFLUX_URL when set,
otherwise starts local ones with `quotaflow.dev.local`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter as Tally
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from worker_profile import read as read_profile
from worker_profile import record, summary
from workload import on_servers, workload, workload_parser

from quotaflow.admin import ensure_topics
from quotaflow.core.contracts import CounterReport
from quotaflow.core.partitioning import partition_of
from quotaflow.core.periods import Calendar
from quotaflow.core.plans import CalendarMonth, Command, NoReset, Plan, fraction
from quotaflow.core.settings import Settings
from quotaflow.dev.simulation import FleetSpec, Simulation
from quotaflow.dev.truth_check import compare, read_daily_totals
from quotaflow.producers.publisher import ReportPublisher
from quotaflow.streams.lag import LagProbe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.json"
WARN_AT = 0.8
TARGET = 0.85  # the issue: quotas keep the worker within 15% of its throughput without them
QUIET_S = 20.0  # .quota/.control lag unchanged this long once the totals are in: not read


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


def _first_message_at(log: Path) -> float | None:
    """When the worker handled its first message (it logs that moment)."""
    for line in log.read_text(errors="replace").splitlines():
        if "first message at " in line:
            return float(line.rsplit("first message at ", 1)[1].split()[0])
    return None


def log_facts(log: Path) -> tuple[str, float, int]:
    """From a worker log: its last error line, its last status rate, Faust's peak producer backlog.

    The rate is the worker's own count of readings billed per second since its
    first message (the `messages=... readings=... (N/s)` status line, every 10 s).
    """
    error, rate, backlog = "", 0.0, 0
    for line in log.read_text(errors="replace").splitlines():
        if "[ERROR]" in line or "Traceback" in line:
            error = error or line.split("] ", 3)[-1].strip()[:300]
        elif " readings=" in line and "/s)" in line:
            rate = float(line.split("(", 1)[1].split("/s)", 1)[0].replace(",", ""))
        elif "producer buffer full size " in line:
            backlog = max(backlog, int(line.rsplit("size ", 1)[1].split()[0]))
    return error, rate, backlog


@dataclass
class Run:
    """What one drain of the workload measured."""

    name: str
    seconds: float = 0.0  # first message -> InfluxDB holds everything
    readings_per_s: float = 0.0
    worker_cpu_s: float = 0.0  # all of it
    drain_cpu_s: float = 0.0  # from the first message on
    sink_cpu_s: float = 0.0
    startup_s: float = 0.0
    peak_rss_mb: float = 0.0
    publish_s: float = 0.0
    raw_messages: int = 0
    ledger: str = ""
    plans: int = 0
    commands: dict[str, int] = field(default_factory=dict)
    commands_check: str = ""
    producer_backlog_peak: int = 0  # Faust's "producer buffer full size N", 0 if never full
    failed: str = ""  # why the worker exited before the end, if it did
    status_rate: float = 0.0  # the worker's own last readings/s figure
    note: str = ""


def _drain(settings: Settings, worker_cmd: list[str], group: str, topic: str,
           workdir: Path, label: str, extra_env: dict[str, str] | None = None,
           profile: Path | None = None) -> Run:
    """Start worker and sink, wait until InfluxDB has everything; what it took.

    A worker that exits before is not restarted: the run is marked failed, with
    the worker's last error line and the rate it reached. With `profile`, py-spy
    samples the worker into that file until the end of the run.
    """
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    worker_log = workdir / f"{label}-worker.log"
    sink_env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    with worker_log.open("wb") as wlog, (workdir / f"{label}-sink.log").open("wb") as slog:
        worker = subprocess.Popen(worker_cmd, env=env, stdout=wlog, stderr=subprocess.STDOUT,
                                  cwd=env.get("BENCH_WORKER_CWD"))
        sink = subprocess.Popen([sys.executable, "-m", "quotaflow", "sink", "influx"],
                                env=sink_env, stdout=slog, stderr=subprocess.STDOUT)
    spy = record(worker.pid, profile) if profile is not None else None
    probe = LagProbe(settings)
    topics = settings.topics
    sink_group = topics.influx_sink_group
    started = time.time()
    worker_done = None
    cpu_samples: list[tuple[float, float]] = []
    run = Run(label)
    totals_done: float | None = None
    last_quota_lag: tuple[int, int] = (-1, -1)
    moved_at = time.time()
    try:
        while True:
            if worker.poll() is not None:
                run.failed = f"the worker exited with status {worker.returncode}"
                break
            cpu_samples.append((time.time(), _cpu_s(worker.pid)))
            if sink.poll() is not None:
                raise SystemExit(f"{label}: the sink exited; see {workdir}")
            raw = probe.behind(topic, group)
            if raw == 0 and worker_done is None:
                worker_done = time.time()
            if raw == 0 and probe.behind(topics.totals, sink_group) == 0:
                totals_done = totals_done or time.time()
                quota_lag = (probe.behind(topics.quota, sink_group),
                             probe.behind(topics.control, sink_group))
                if quota_lag == (0, 0):
                    break
                if quota_lag != last_quota_lag:
                    last_quota_lag, moved_at = quota_lag, time.time()
                elif time.time() - moved_at > QUIET_S:  # a sink that does not read them
                    run.note = (f"the sink left .quota/.control {quota_lag} behind: timed "
                                "until InfluxDB held every total")
                    print(f"  [{label}] {run.note}", flush=True)
                    break
            else:
                totals_done = None
            if time.time() - started > 1800:
                raise SystemExit(f"{label}: did not finish in 30 minutes")
            time.sleep(0.1)
        done = time.time() if totals_done is None or not run.note else totals_done
        if not run.failed:
            run.peak_rss_mb = _peak_rss_mb(worker.pid)
            run.worker_cpu_s = _cpu_s(worker.pid)
        else:
            run.worker_cpu_s = cpu_samples[-1][1] if cpu_samples else 0.0
        run.sink_cpu_s = _cpu_s(sink.pid)
    finally:
        probe.close()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            spy.wait(timeout=60)
        for p in (worker, sink):
            if p.poll() is None:
                p.terminate()
        for p in (worker, sink):
            p.wait(timeout=30)
    error, run.status_rate, run.producer_backlog_peak = log_facts(worker_log)
    first = _first_message_at(worker_log)
    if first is None:
        raise SystemExit(f"{label}: no 'first message' line in {worker_log}")
    before = [cpu for at, cpu in cpu_samples if at <= first]
    run.drain_cpu_s = run.worker_cpu_s - (before[-1] if before else 0.0)
    run.seconds = done - first
    run.startup_s = first - started
    if run.failed:
        run.failed += f" {run.seconds:.0f} s after its first message: {error}"
        run.ledger = "not checked"
        print(f"  [{label}] FAILED: {run.failed}; it billed {run.status_rate:,.0f} readings/s "
              f"until then; Faust's producer backlog peaked at {run.producer_backlog_peak:,} "
              f"records", flush=True)
        return run
    assert worker_done is not None
    print(f"  [{label}] worker committed its last offset {worker_done - first:.2f} s after its "
          f"first message; CPU seconds: worker {run.worker_cpu_s:.1f} (from its first message "
          f"{run.drain_cpu_s:.1f}), sink {run.sink_cpu_s:.1f}; Faust's producer backlog peak "
          f"{run.producer_backlog_peak:,} records", flush=True)
    return run


def _check(settings: Settings, sim: Simulation) -> str:
    calendar = Calendar(ZoneInfo(settings.timezone))
    truth = {(u, n, calendar.label(d, "day")): (a, b) for (u, n, d), (a, b) in sim.truth.items()}
    return "EXACT" if compare(truth, read_daily_totals(settings)).exact else "MISMATCH"


# ----------------------------------------------------------------------------- plans


def user_totals(sim: Simulation) -> dict[str, int]:
    """Billed bytes (up + down, rate 1) per user, from the ground truth."""
    totals: dict[str, int] = {}
    for (user, _node, _day), (up, down) in sim.truth.items():
        totals[user] = totals.get(user, 0) + up + down
    return totals


def bench_plans(
    sim: Simulation, users: int, days: float, settings: Settings
) -> tuple[list[Plan], str]:
    """A plan for every simulated user; a quarter end past 100%, a quarter between 80 and 100%.

    The period is the calendar month when the whole simulated fleet lies in the
    current one (commands are issued for the current period only), else one
    period (`none`) from the fleet's start.
    """
    totals = user_totals(sim)
    spec = FleetSpec()
    tz = ZoneInfo(settings.timezone)
    now = datetime.now(UTC).astimezone(tz)
    first = spec.start.astimezone(tz)
    last = datetime.fromtimestamp(spec.start.timestamp() + days * 86400, tz)
    same_month = (first.year, first.month) == (now.year, now.month) == (last.year, last.month)
    period: CalendarMonth | NoReset
    if same_month:
        period, starts_at, kind = CalendarMonth(kind="calendar_month"), None, "calendar_month"
    else:
        period, starts_at, kind = NoReset(kind="none"), spec.start, "none (from the fleet's start)"
    plans = []
    for i in range(users):
        user = f"user-{i:05d}"
        total = totals.get(user, 0)
        if total == 0:
            quota = 10**12
        elif i % 4 == 0:  # ends at about 160%: warn and disable
            quota = max(1, total * 5 // 8)
        elif i % 4 == 1:  # ends at about 90%: warn only
            quota = total * 10 // 9 + 1
        else:  # ends at about 25%: nothing
            quota = total * 4 + 1
        plans.append(Plan(user_id=user, quota_bytes=quota, period=period, starts_at=starts_at,
                          warn_at=(WARN_AT,), enabled=True))
    return plans, kind


def expected_commands(sim: Simulation, plans: list[Plan]) -> Tally[tuple[str, str]]:
    """(user, action) -> how many times the ground truth calls for it (once each)."""
    totals = user_totals(sim)
    num, den = fraction(WARN_AT)
    expected: Tally[tuple[str, str]] = Tally()
    for plan in plans:
        used, quota = totals.get(plan.user_id, 0), plan.quota_bytes
        assert quota is not None
        if used >= -(-num * quota // den):
            expected[plan.user_id, "warn"] += 1
        if used >= quota:
            expected[plan.user_id, "disable"] += 1
    return expected


def publish_plans(settings: Settings, plans: list[Plan]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                             linger_ms=20)
    for plan in plans:
        producer.send(settings.topics.plans, key=plan.user_id.encode(), value=plan.encode(),
                      partition=partition_of(plan.user_id, settings.partitions))
    producer.flush()
    producer.close()


def read_commands(settings: Settings) -> list[Command]:
    """Every command on `<prefix>.control`, read to the end offsets of now."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                             enable_auto_commit=False)
    tps = [TopicPartition(settings.topics.control, p) for p in range(settings.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning()
    ends = consumer.end_offsets(tps)
    commands: list[Command] = []
    deadline = time.monotonic() + 60
    while any(consumer.position(tp) < ends[tp] for tp in tps):
        if time.monotonic() > deadline:
            raise SystemExit("could not read .control to its end in 60 s")
        for records in consumer.poll(timeout_ms=500).values():
            commands += [Command.decode(r.value) for r in records]
    consumer.close()
    return commands


# ----------------------------------------------------------------------------- runs


def _publish(settings: Settings, sim: Simulation) -> tuple[float, int]:
    t = time.monotonic()
    with ReportPublisher(settings) as publisher:
        publisher.publish_lines(sim.lines)
        publisher.flush()
    publish_s = time.monotonic() - t
    end = LagProbe(settings)
    raw_messages = end.behind(settings.topics.raw, settings.topics.worker_group)
    end.close()
    return publish_s, raw_messages


def run_worker(sim: Simulation, bootstrap: str, influx: str, workdir: Path, label: str,
               plans: list[Plan] | None, tree: Path | None = None,
               profile: Path | None = None) -> Run:
    """One drain of the workload by the batched worker (of `tree`, if given); with
    `profile`, sampled by py-spy into that file, whose summary is printed."""
    tag = uuid.uuid4().hex[:8]
    settings = Settings(kafka_bootstrap=bootstrap, influx_url=influx,
                        topic_prefix=f"bench-{tag}", influx_bucket=f"bench_{tag}",
                        state_dir=workdir / label)
    ensure_topics(settings)
    if plans:
        publish_plans(settings, plans)  # before the reports: in force for all of them
    publish_s, raw_messages = _publish(settings, sim)
    extra = None
    if tree is not None:
        extra = {"PYTHONPATH": str(tree), "BENCH_WORKER_CWD": str(tree)}
    run = _drain(settings, [sys.executable, "-m", "quotaflow", "worker", "--loglevel", "INFO"],
                 settings.topics.worker_group, settings.topics.raw, workdir, label, extra,
                 profile)
    if profile is not None and profile.exists():
        print(f"  [{label}] py-spy profile of the worker ({profile}):")
        print("\n".join(f"    {line}" for line in summary(read_profile(profile))), flush=True)
    run.publish_s, run.raw_messages = publish_s, raw_messages
    run.plans = len(plans or ())
    if run.failed:  # the worker's own rate until it exited; nothing to check
        run.readings_per_s = run.status_rate
        return run
    run.readings_per_s = sim.readings / run.seconds
    run.ledger = _check(settings, sim)
    if plans:
        commands = read_commands(settings)
        run.commands = dict(sorted(Tally(c.action for c in commands).items()))
        got: Tally[tuple[str, str]] = Tally((c.user_id, c.action) for c in commands)
        ids = {c.command_id for c in commands}
        want = expected_commands(sim, plans)
        if got == want and len(ids) == len(commands):
            run.commands_check = "AS EXPECTED"
        else:
            wrong = sorted((k, got.get(k, 0), want.get(k, 0)) for k in got.keys() | want.keys()
                           if got.get(k, 0) != want.get(k, 0))
            run.commands_check = f"DIFFERENT ({len(wrong)} (user, action) differ: {wrong[:3]})"
    print(f"  [{label}] {run.seconds:.2f} s, {run.readings_per_s:,.0f} readings/s, "
          f"ledger {run.ledger}"
          + (f", commands {run.commands} {run.commands_check}" if plans else ""), flush=True)
    return run


def run_baseline(sim: Simulation, bootstrap: str, influx: str, workdir: Path) -> Run:
    tag = uuid.uuid4().hex[:8]
    base = Settings(kafka_bootstrap=bootstrap, influx_url=influx,
                    topic_prefix=f"bench-{tag}-base", influx_bucket=f"bench_{tag}_base",
                    state_dir=workdir / "base")
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
    publish_s = time.monotonic() - t
    run = _drain(base, [sys.executable, str(HERE / "baseline_worker.py")],
                 f"{base.topic_prefix}-baseline", f"{base.topic_prefix}.readings", workdir,
                 "baseline")
    run.publish_s = publish_s
    run.raw_messages = sim.readings
    if run.failed:
        run.readings_per_s = run.status_rate
        return run
    run.readings_per_s = sim.readings / run.seconds
    run.ledger = _check(base, sim)
    print(f"  [baseline] {run.seconds:.2f} s, {run.readings_per_s:,.0f} readings/s, "
          f"ledger {run.ledger}", flush=True)
    return run


def extract_tree(ref: str, workdir: Path) -> Path:
    """The files of git revision `ref`, in a directory of their own (git's state untouched)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref],
                             check=True, capture_output=True).stdout
    tree = workdir / f"tree-{ref}"
    tree.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="tar")
    return tree


# ----------------------------------------------------------------------------- report


def _median(runs: list[Run], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in runs))


HEADER = ("| run | seconds | readings/s end to end | worker CPU s | worker CPU s from 1st "
          "message | µs CPU per reading | peak RSS MB | Faust producer backlog peak | ledger |\n"
          "|---|---|---|---|---|---|---|---|---|")


def us_per_reading(runs: list[Run], readings: int) -> float:
    """Median worker CPU µs per reading from the first message on (approximate for a failed run:
    the readings it billed are taken as its own rate times its seconds)."""
    return float(statistics.median(
        r.drain_cpu_s / max(r.status_rate * r.seconds if r.failed else readings, 1) * 1e6
        for r in runs
    ))


def _row(label: str, runs: list[Run], readings: int) -> str:
    failed = [r for r in runs if r.failed]
    if failed:
        r = failed[0]
        return (f"| {label} | FAILED {r.seconds:.0f} s after its first message | "
                f"{r.status_rate:,.0f} (the worker's own figure until then) | "
                f"{r.worker_cpu_s:.1f} | {r.drain_cpu_s:.1f} | "
                f"{r.drain_cpu_s / max(r.status_rate * r.seconds, 1) * 1e6:.2f} (approx.) | - | "
                f"{r.producer_backlog_peak:,} | {r.failed} |")
    rate = _median(runs, "readings_per_s")
    cpu = _median(runs, "drain_cpu_s")
    ledgers = "/".join(sorted({r.ledger for r in runs}))
    spread = ""
    if len(runs) > 1:
        rates = sorted(r.readings_per_s for r in runs)
        spread = f" ({rates[0]:,.0f}-{rates[-1]:,.0f})"
    return (f"| {label} | {_median(runs, 'seconds'):.2f} | {rate:,.0f}{spread} | "
            f"{_median(runs, 'worker_cpu_s'):.1f} | {cpu:.1f} | "
            f"{cpu / readings * 1e6:.2f} | {_median(runs, 'peak_rss_mb'):.0f} | "
            f"{max(r.producer_backlog_peak for r in runs):,} | {ledgers} |")


def merge_results(path: Path, key: str, value: dict[str, Any]) -> None:
    """Put `value` in the JSON file at `path` under `key` and then its command line.

    Other keys, and the figures of other command lines under `key`, are kept:
    `{"quotas": {"python bench/throughput.py": {...}, "python bench/throughput.py
    --days 0.25": {...}}, "latency": {...}}`.
    """
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            print(f"warning: {path} did not hold JSON; starting it afresh")
    section = data.get(key)
    if not isinstance(section, dict):
        section = {}
    section[value["command"]] = value
    data[key] = section
    path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0])
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-quotas", action="store_true")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--before", metavar="REF", help="also run the worker of this revision")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-results", action="store_true")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample the workers of round 1 with py-spy into DIR and print "
                             "where their CPU goes (the sampling costs CPU of its own)")
    args = parser.parse_args()

    on_servers(lambda bootstrap, influx: run(args, bootstrap, influx))


def options() -> list[str]:
    """The command line's options, without where the results go."""
    out, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--results":
            skip = True
        elif not arg.startswith("--results="):
            out.append(arg)
    return out


def _profile_path(args: argparse.Namespace, label: str) -> Path | None:
    """Where to put the py-spy profile of run `label`: round 1 only, with --profile."""
    if args.profile is None or not label.endswith("1"):
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    return Path(args.profile) / f"{label}.txt"


def run(args: argparse.Namespace, bootstrap: str, influx: str) -> None:
    """All designs on one workload, against these servers."""
    load = os.getloadavg()
    sim = workload(args)
    workdir = Path(tempfile.mkdtemp(prefix="quotaflow-bench-"))
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"workload: {sim.reports} reports, {sim.readings} readings from {args.nodes} nodes, "
          f"{args.users} users ({sim.duplicates} duplicates, {sim.reordered} reordered); "
          f"logs in {workdir}", flush=True)
    settings = Settings(kafka_bootstrap=bootstrap, influx_url=influx)
    plans, period = bench_plans(sim, args.users, args.days, settings)
    want = expected_commands(sim, plans)
    print(f"plans: {len(plans)}, period {period}; the truth calls for "
          f"{sum(1 for _, a in want if a == 'warn')} warn and "
          f"{sum(1 for _, a in want if a == 'disable')} disable", flush=True)

    before: list[Run] = []
    if args.before:
        tree = extract_tree(args.before, workdir)
        print(f"worker of {args.before} (no plans):", flush=True)
        before.append(run_worker(sim, bootstrap, influx, workdir, f"before-{args.before}", None,
                                 tree))
    without: list[Run] = []
    with_plans: list[Run] = []
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for which in order:
            if which == "a":
                print(f"(a) worker, no plans, round {r + 1}:", flush=True)
                without.append(run_worker(sim, bootstrap, influx, workdir, f"a{r + 1}", None,
                                          profile=_profile_path(args, f"a{r + 1}")))
            elif not args.skip_quotas:
                print(f"(b) worker, {len(plans)} plans, round {r + 1}:", flush=True)
                with_plans.append(run_worker(sim, bootstrap, influx, workdir, f"b{r + 1}",
                                             plans, profile=_profile_path(args, f"b{r + 1}")))
    baseline: list[Run] = []
    if not args.skip_baseline:
        print("per-reading baseline:", flush=True)
        baseline.append(run_baseline(sim, bootstrap, influx, workdir))

    readings = sim.readings
    print()
    print(f"{readings:,} readings, {sim.reports:,} reports, "
          f"{readings / without[0].raw_messages:.0f} readings per message; medians of "
          f"{args.rounds} round(s)")
    print(HEADER)
    if before:
        print(_row(f"worker of {args.before}, no plans", before, readings))
    print(_row("(a) worker, no plans", without, readings))
    if with_plans:
        print(_row(f"(b) worker, plans for all {len(plans)} users", with_plans, readings))
    if baseline:
        print(_row("per-reading Faust baseline", baseline, readings))
    print()
    rate_a = _median(without, "readings_per_s")
    summary: dict[str, Any] = {}
    failed = [r.name for r in (*before, *without, *with_plans, *baseline) if r.failed]
    if failed:
        print(f"runs that FAILED: {', '.join(failed)}; the ratios below that involve them use "
              "the worker's own readings/s until it exited, not an end-to-end figure")
        summary["failed_runs"] = failed
    if with_plans:
        rate_b = _median(with_plans, "readings_per_s")
        ratio = rate_b / rate_a
        cpu_ratio = us_per_reading(without, readings) / us_per_reading(with_plans, readings)
        commands = with_plans[-1].commands
        checks = sorted({r.commands_check or "not read (the worker exited)"
                         for r in with_plans})
        print(f"quotas: (b)/(a) throughput = {ratio:.2f} (target >= {TARGET:.2f}: "
              f"{'met' if ratio >= TARGET else 'MISSED'}); by worker CPU per reading from the "
              f"first message (a)/(b) = {cpu_ratio:.2f}")
        print(f"commands issued in (b): {sum(commands.values())} {commands}; against the "
              f"ground truth: {', '.join(checks)}")
        summary.update(ratio_b_over_a=round(ratio, 3), cpu_ratio_a_over_b=round(cpu_ratio, 3),
                       target=TARGET, met=ratio >= TARGET, commands=commands,
                       commands_check=checks)
    if baseline:
        base_rate = _median(baseline, "readings_per_s")
        line = f"batched / per-reading baseline: (a) {rate_a / base_rate:.1f}x"
        summary["ratio_a_over_baseline"] = round(rate_a / base_rate, 1)
        if with_plans:
            line += f", (b) {_median(with_plans, 'readings_per_s') / base_rate:.1f}x"
            summary["ratio_b_over_baseline"] = round(
                _median(with_plans, "readings_per_s") / base_rate, 1)
        print(line)
    if before:
        ratio_before = rate_a / _median(before, "readings_per_s")
        print(f"(a) / worker of {args.before} = {ratio_before:.2f}"
              + (f"; (b) / worker of {args.before} = "
                 f"{_median(with_plans, 'readings_per_s') / _median(before, 'readings_per_s'):.2f}"
                 if with_plans else ""))
        summary["ratio_a_over_before"] = round(ratio_before, 3)
    if args.no_results:
        return
    merge_results(args.results, "quotas", {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/throughput.py", *options()]),
        "machine": f"{os.cpu_count()} cores; load average before the run "
                   f"{load[0]:.2f} (1 min), {load[2]:.2f} (15 min)",
        "workload": {"nodes": args.nodes, "users": args.users, "days": args.days,
                     "interval_s": args.interval, "readings": readings,
                     "reports": sim.reports, "raw_messages": without[0].raw_messages},
        "plans": {"count": len(plans), "period": period, "warn_at": [WARN_AT]},
        "rounds": args.rounds,
        "runs": {
            "before": [asdict(r) for r in before],
            "no_plans": [asdict(r) for r in without],
            "plans": [asdict(r) for r in with_plans],
            "baseline": [asdict(r) for r in baseline],
        },
        **summary,
    })
    print(f"figures merged into {args.results} under \"quotas\"")


if __name__ == "__main__":
    main()

"""Quota latency: a crossing report on `.raw` -> its `disable` on `.control`, under load.

    python bench/latency.py [--rates 10000,100000] [--probes 200] [--probe-seconds 40]
        [--warmup 10] [--settle 30] [--bg-users 20000] [--bg-nodes 50]
        [--influx-every 10] [--results bench/results.json | --no-results]

Each phase (one per rate in `--rates`, readings per second of background load)
runs on topics of its own, with a worker and an InfluxDB sink started for it:

1. Plans are published for `--bg-users` background users (a quota they never
   reach) and for `--probes` probe users (1000 bytes a month, warned at 80%).
2. A warm-up probe is sent and its `disable` awaited: the worker is up and has
   read the plans.
3. A separate process publishes the background: `--bg-nodes` nodes, each
   reporting its share of the background users' cumulative counters (about 100
   readings per message, like `bench/throughput.py`'s fleet) at the steady rate
   asked for. It measures the rate it actually achieved (readings acknowledged
   by Kafka per second of sending), which is printed beside the one asked for.
4. After `--warmup` seconds, `--probes` probes are sent at even intervals over
   `--probe-seconds`: each is one report of one probe user whose 1200 bytes
   cross its 1000-byte quota. A probe's plan was published minutes before, so
   the worker takes it as in force (the barrier would also put a plan published
   just before the report in force).
5. "Reached .raw" is the moment the probe's produce request is acknowledged by
   the broker (acks=all; the wall clock in the producer's callback). "On
   .control" is the moment a consumer of `.control` (assigned to every
   partition, polling continuously) sees the probe user's `disable`. The
   latency is their difference; the `disable` record's own timestamp (set by the
   worker's producer when it sent the command) is reported beside it, so the
   worker's share and the consumer's share can be told apart.
6. Every `--influx-every`-th probe (0: none) is also timed from the same ack to
   the moment its daily total is readable in InfluxDB (`traffic_daily`, polled
   every 0.1 s): report -> totals in InfluxDB, including the sink's 1 s flush.
7. Probes without a `disable` after `--settle` seconds count as missing; a
   p99 with missing probes is given as "> settle".

All processes share the machine's cores (Kafka, InfluxDB, worker, sink, the
background process and this one); the achieved background rate and the worker's
fate (a worker that exits is reported with its last error line) are printed with
the latencies. Figures go to `bench/results.json` under "latency" and the command
line (other keys and command lines are kept).

Uses the servers in QUOTAFLOW_KAFKA_BOOTSTRAP / QUOTAFLOW_INFLUX_URL when set,
otherwise starts local ones with `quotaflow.dev.local`.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from throughput import _cpu_s, log_facts, merge_results, options
from workload import begin_run, machine_busy_s, on_servers, pid_listening, results_options

from quotaflow.admin import ensure_topics
from quotaflow.core.health import percentile
from quotaflow.core.partitioning import partition_of
from quotaflow.core.plans import CalendarMonth, Plan
from quotaflow.core.settings import Settings
from quotaflow.sinks.influxql import InfluxQL, InfluxQLError
from quotaflow.streams.lag import LagProbe

PROBE_QUOTA = 1000
PROBE_UP, PROBE_DOWN = 600, 600  # 1200 bytes: past 80% and 100% in one report
TARGET_P99_S = 2.0


def _iso_now() -> str:
    return datetime.now(UTC).isoformat()


# ----------------------------------------------------------------------- background


@dataclass
class Background:
    """What the background process asked for and achieved."""

    target_per_s: int
    users: int
    nodes: int
    interval_s: float = 0.0
    readings_sent: int = 0
    readings_acked: int = 0
    messages: int = 0
    seconds: float = 0.0
    achieved_per_s: float = 0.0
    worst_behind_s: float = 0.0  # how late the generator was on its own schedule, at worst
    cpu_s: float = 0.0
    errors: int = 0


def background(bootstrap: str, prefix: str, partitions: int, rate: int, users: int,
               nodes: int, seconds: float, queue: Any) -> None:
    """Publish cumulative reports of `users` users on `nodes` nodes at `rate` readings/s.

    Runs in a process of its own; puts a `Background` on `queue` when done.
    """
    names = [f"bg-{i:06d}" for i in range(users)]
    per_node = [names[n::nodes] for n in range(nodes)]
    # each node's users split by the partition that owns them, like ReportPublisher does
    groups = [
        sorted({partition_of(u, partitions) for u in node_users}) for node_users in per_node
    ]
    owned = [
        {p: [u for u in node_users if partition_of(u, partitions) == p] for p in parts}
        for node_users, parts in zip(per_node, groups, strict=True)
    ]
    interval = users / rate  # each node reports all its users once per interval
    result = Background(rate, users, nodes, interval_s=interval)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                             batch_size=1 << 20, max_request_size=16 << 20,
                             client_id="quotaflow-bench-background")
    topic = f"{prefix}.raw"
    acked = [0, 0]  # readings, errors

    def done(n: int) -> Any:
        def ok(_: Any) -> None:
            acked[0] += n

        return ok

    def failed(_: Exception) -> None:
        acked[1] += 1

    run = uuid.uuid4().hex[:6]
    epoch = int(time.time() * 1000)
    seq = [0] * nodes
    start = time.monotonic()
    due = [start + interval * n / nodes for n in range(nodes)]  # spread evenly
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        sent_any = False
        for n in range(nodes):
            if due[n] > now:
                continue
            result.worst_behind_s = max(result.worst_behind_s, now - due[n])
            due[n] += interval
            seq[n] += 1
            s = seq[n]
            observed = _iso_now()
            node = f"bg-{run}-{n:03d}"
            for p, node_users in owned[n].items():
                value = orjson.dumps({
                    "node_id": node, "epoch": epoch, "seq": s, "observed_at": observed,
                    "counters": [{"user_id": u, "up": s * 1000, "down": s * 5000}
                                 for u in node_users],
                })
                future = producer.send(topic, value=value, key=node.encode(), partition=p)
                future.add_callback(done(len(node_users)))
                future.add_errback(failed)
                result.readings_sent += len(node_users)
                result.messages += 1
            sent_any = True
        if not sent_any:
            time.sleep(max(0.0, min(min(due), end) - time.monotonic()))
    sending = time.monotonic() - start
    producer.flush(timeout=60)
    producer.close()
    result.readings_acked, result.errors = acked
    result.seconds = sending
    result.achieved_per_s = result.readings_acked / sending
    result.cpu_s = _cpu_s(os.getpid())
    queue.put(asdict(result))


# ----------------------------------------------------------------------- probes


@dataclass
class Probe:
    user: str
    sent_at: float = 0.0  # wall clock when handed to the producer
    acked_at: float = 0.0  # wall clock when the broker acknowledged it
    raw_timestamp_ms: int = 0  # the raw record's timestamp (CreateTime, set by the producer)
    seen_at: float = 0.0  # when the consumer saw the disable
    control_timestamp_ms: int = 0  # the disable record's timestamp (set by the worker)
    influx_at: float = 0.0  # when its daily total was readable in InfluxDB
    influx_watched: bool = False


class ControlWatcher(threading.Thread):
    """Reads `.control` from its end on and notes when each user's first `disable` is seen."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                      enable_auto_commit=False, fetch_max_wait_ms=50)
        tps = [TopicPartition(settings.topics.control, p) for p in range(settings.partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_end()
        for tp in tps:
            self.consumer.position(tp)  # resolve "end" now, before anything is sent
        self.disabled: dict[str, tuple[float, int]] = {}
        self.commands = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for records in self.consumer.poll(timeout_ms=50).values():
                seen = time.time()
                for record in records:
                    self.commands += 1
                    command = orjson.loads(record.value)
                    if command["action"] == "disable":
                        self.disabled.setdefault(command["user_id"], (seen, record.timestamp))
        self.consumer.close()


class Prober:
    """Sends one crossing report per probe user, one node per partition."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                      linger_ms=0, client_id="quotaflow-bench-probe")
        self.seq: dict[int, int] = {}
        self.epoch = int(time.time() * 1000)
        self.run = uuid.uuid4().hex[:6]

    def send(self, probe: Probe) -> None:
        p = partition_of(probe.user, self.settings.partitions)
        seq = self.seq[p] = self.seq.get(p, 0) + 1
        node = f"probe-{self.run}-p{p}"
        value = orjson.dumps({
            "node_id": node, "epoch": self.epoch, "seq": seq, "observed_at": _iso_now(),
            "counters": [{"user_id": probe.user, "up": PROBE_UP, "down": PROBE_DOWN}],
        })

        def acked(meta: Any) -> None:
            probe.acked_at = time.time()
            probe.raw_timestamp_ms = meta.timestamp

        probe.sent_at = time.time()
        self.producer.send(self.settings.topics.raw, value=value, key=node.encode(),
                           partition=p).add_callback(acked)

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


def watch_influx(settings: Settings, probe: Probe, timeout_s: float) -> None:
    """Poll InfluxDB until the probe user's daily total is there; note when."""
    client = InfluxQL.from_settings(settings)
    query = f"SELECT last(up_bytes) FROM traffic_daily WHERE user_id = '{probe.user}'"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if client.query(query):
                probe.influx_at = time.time()
                return
        except InfluxQLError:
            pass  # the database may not exist before the first flush
        time.sleep(0.1)


def _port(address: str) -> int:
    """The port of `host:port` or of a URL `scheme://host:port/...`."""
    return int(address.rsplit(":", 1)[1].split("/")[0])


def _cpu_snapshot(worker: int, sink: subprocess.Popen[bytes] | None,
                  others: dict[str, int | None]) -> dict[str, float | None]:
    """CPU seconds so far of the machine and of each process named (None: not found)."""
    found: dict[str, float | None] = {"machine": machine_busy_s(), "worker": _cpu_s(worker),
                                      "sink": None if sink is None else _cpu_s(sink.pid)}
    for name, pid in others.items():
        try:
            found[name] = None if pid is None else _cpu_s(pid)
        except OSError:
            found[name] = None
    return found


def start_background(args: argparse.Namespace, bootstrap: str, settings: Settings,
                     rate: int) -> tuple[Any, Any]:
    """Start `background` in a process of its own for `--warmup` + `--probe-seconds`
    seconds; (the process, the queue its `Background` comes on)."""
    context = multiprocessing.get_context("spawn")
    queue: Any = context.Queue()
    process = context.Process(
        target=background,
        args=(bootstrap, settings.topic_prefix, settings.partitions, rate, args.bg_users,
              args.bg_nodes, args.warmup + args.probe_seconds, queue),
        daemon=True,
    )
    process.start()
    return process, queue


def send_probes(args: argparse.Namespace, prober: Prober, probes: list[Probe],
                after: Callable[[int, Probe], None]) -> None:
    """After `--warmup` seconds, send the probes at even intervals over `--probe-seconds`,
    calling `after(i, probe)` after each."""
    time.sleep(args.warmup)
    spacing = args.probe_seconds / max(len(probes), 1)
    start = time.monotonic()
    for i, probe in enumerate(probes):
        delay = start + i * spacing - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        prober.send(probe)
        after(i, probe)
    prober.producer.flush()


# ----------------------------------------------------------------------- a phase


@dataclass
class Phase:
    target_per_s: int
    background: dict[str, Any] = field(default_factory=dict)
    probes_sent: int = 0
    disables_seen: int = 0
    missing: int = 0
    p50_s: float | None = None
    p99_s: float | None = None
    max_s: float | None = None
    worker_p50_s: float | None = None  # ack -> the disable record's timestamp
    worker_p99_s: float | None = None
    first_half_p50_s: float | None = None
    second_half_p50_s: float | None = None
    influx_samples: int = 0
    influx_p50_s: float | None = None
    influx_p99_s: float | None = None
    influx_missing: int = 0
    worker_failed: str = ""
    worker_cpu_s: float = 0.0
    sink_cpu_s: float = 0.0
    # cores busy while the probes were sent under the background load: the whole
    # machine (of `cores`), the worker, the sink
    cores: int = 0
    machine_cores_busy: float = 0.0
    worker_cores_busy: float = 0.0
    sink_cores_busy: float = 0.0
    # and the others: the background generator, the Kafka broker, InfluxDB (None: not
    # found on this machine)
    others_cores_busy: dict[str, float | None] = field(default_factory=dict)
    producer_backlog_peak: int = 0
    raw_lag_end: int | None = None  # raw records not committed by the worker at the end
    commands_seen: int = 0
    note: str = ""


def wait_until(what: Any, timeout_s: float, alive: Any) -> bool:
    """Poll `what()` until true, `alive()` false or the timeout; `what()`'s last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if what():
            return True
        if not alive():
            return False
        time.sleep(0.05)
    return bool(what())


def run_phase(args: argparse.Namespace, bootstrap: str, influx: str, rate: int,
              workdir: Path) -> Phase:
    tag = uuid.uuid4().hex[:8]
    settings = Settings(kafka_bootstrap=bootstrap, influx_url=influx,
                        topic_prefix=f"lat-{tag}", influx_bucket=f"lat_{tag}",
                        state_dir=workdir / f"state-{rate}")
    ensure_topics(settings)
    phase = Phase(rate)
    month = CalendarMonth(kind="calendar_month")
    probes = [Probe(f"probe-{tag}-{i:04d}") for i in range(args.probes)]
    warm = Probe(f"probe-{tag}-warm")
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    plans = [Plan(user_id=f"bg-{i:06d}", quota_bytes=10**15, period=month, enabled=True)
             for i in range(args.bg_users)]
    plans += [Plan(user_id=p.user, quota_bytes=PROBE_QUOTA, period=month, enabled=True)
              for p in (warm, *probes)]
    for plan in plans:
        producer.send(settings.topics.plans, key=plan.user_id.encode(), value=plan.encode(),
                      partition=partition_of(plan.user_id, settings.partitions))
    producer.flush()
    producer.close()
    print(f"  {len(plans):,} plans published ({args.bg_users:,} background users, "
          f"{len(probes) + 1} probe users)", flush=True)

    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    worker_log = workdir / f"{rate}-worker.log"
    with worker_log.open("wb") as wlog, (workdir / f"{rate}-sink.log").open("wb") as slog:
        worker = subprocess.Popen(
            [sys.executable, "-m", "quotaflow", "worker", "--loglevel", "INFO"], env=env,
            stdout=wlog, stderr=subprocess.STDOUT)
        sink = None if args.no_sink else subprocess.Popen(
            [sys.executable, "-m", "quotaflow", "sink", "influx"], env=env, stdout=slog,
            stderr=subprocess.STDOUT)
    watcher = ControlWatcher(settings)
    watcher.start()
    prober = Prober(settings)
    influx_threads: list[threading.Thread] = []
    bg_process = None
    exited: int | None = None
    try:
        prober.send(warm)
        if not wait_until(lambda: warm.user in watcher.disabled, 180,
                          lambda: worker.poll() is None):
            raise SystemExit(f"the worker did not disable the warm-up probe; see {worker_log}")
        print(f"  worker ready: warm-up probe disabled "
              f"{watcher.disabled[warm.user][0] - warm.acked_at:.2f} s after its ack", flush=True)

        bg_process, queue = start_background(args, bootstrap, settings, rate)

        def watch(i: int, probe: Probe) -> None:
            if args.influx_every and i % args.influx_every == 0:
                probe.influx_watched = True
                thread = threading.Thread(target=watch_influx,
                                          args=(settings, probe, args.settle), daemon=True)
                thread.start()
                influx_threads.append(thread)

        others = {"generator": bg_process.pid, "Kafka": pid_listening(_port(bootstrap)),
                  "InfluxDB": pid_listening(_port(influx))}
        start = time.monotonic()
        busy = _cpu_snapshot(worker.pid, sink, others)
        send_probes(args, prober, probes, watch)
        phase.probes_sent = len(probes)
        took = time.monotonic() - start
        if worker.poll() is None and (sink is None or sink.poll() is None) and (
                bg_process.is_alive()):
            used = {k: None if v is None or busy[k] is None else round((v - busy[k]) / took, 2)
                    for k, v in _cpu_snapshot(worker.pid, sink, others).items()}
            phase.cores = os.cpu_count() or 1
            phase.machine_cores_busy = used.pop("machine") or 0.0
            phase.worker_cores_busy = used.pop("worker") or 0.0
            phase.sink_cores_busy = used.pop("sink") or 0.0
            phase.others_cores_busy = used
        print(f"  {len(probes)} probes sent over {took:.1f} s; cores busy meanwhile: the "
              f"machine {phase.machine_cores_busy:.2f} of {phase.cores}, the worker "
              f"{phase.worker_cores_busy:.2f}, the sink {phase.sink_cores_busy:.2f}, "
              + ", ".join(f"{k} {'?' if v is None else f'{v:.2f}'}"
                          for k, v in phase.others_cores_busy.items()), flush=True)
        phase.background = queue.get(timeout=args.warmup + args.probe_seconds + 120)
        bg_process.join(timeout=30)
        bg = phase.background
        print(f"  background: asked {rate:,} readings/s, achieved {bg['achieved_per_s']:,.0f} "
              f"({bg['readings_acked']:,} readings acknowledged in {bg['seconds']:.1f} s, "
              f"{bg['messages']:,} messages, generator at worst {bg['worst_behind_s']:.2f} s "
              f"behind its schedule, {bg['errors']} send errors)", flush=True)
        wait_until(lambda: all(p.user in watcher.disabled for p in probes), args.settle,
              lambda: worker.poll() is None)
        for thread in influx_threads:
            thread.join(timeout=args.settle)
        if worker.poll() is None:
            phase.worker_cpu_s = _cpu_s(worker.pid)
        probe_lag = LagProbe(settings)
        phase.raw_lag_end = probe_lag.behind(settings.topics.raw, settings.topics.worker_group)
        probe_lag.close()
    finally:
        watcher.stop.set()
        prober.close()
        if bg_process is not None and bg_process.is_alive():
            bg_process.terminate()
        if sink is not None and sink.poll() is None:
            phase.sink_cpu_s = _cpu_s(sink.pid)
        exited = worker.poll()  # before we stop it: a worker that exited by itself
        running = [worker] if sink is None else [worker, sink]
        for p in running:
            if p.poll() is None:
                p.terminate()
        for p in running:
            p.wait(timeout=30)
        watcher.join(timeout=5)
    error, _rate, phase.producer_backlog_peak = log_facts(worker_log)
    if exited is not None:
        phase.worker_failed = f"exited with status {exited}: {error}"
    phase.commands_seen = watcher.commands
    _summarise(phase, probes, watcher.disabled, args.settle)
    return phase


def _summarise(phase: Phase, probes: list[Probe], disabled: dict[str, tuple[float, int]],
               settle: float) -> None:
    latencies: list[float] = []
    worker_share: list[float] = []
    halves: tuple[list[float], list[float]] = ([], [])
    for i, probe in enumerate(probes):
        seen = disabled.get(probe.user)
        if seen is None or not probe.acked_at:
            continue
        latency = seen[0] - probe.acked_at
        latencies.append(latency)
        worker_share.append(seen[1] / 1000 - probe.acked_at)
        halves[0 if i < len(probes) / 2 else 1].append(latency)
    phase.disables_seen = len(latencies)
    phase.missing = len(probes) - len(latencies)
    if latencies:
        phase.p50_s = percentile(latencies, 50)
        phase.max_s = max(latencies)
        # a missing probe is slower than any seen: p99 is only known while few are missing
        if len(latencies) >= math.ceil(0.99 * len(probes)):
            phase.p99_s = percentile(latencies + [math.inf] * phase.missing, 99)
        phase.worker_p50_s = percentile(worker_share, 50)
        phase.worker_p99_s = percentile(worker_share, 99)
        if halves[0] and halves[1]:
            phase.first_half_p50_s = percentile(halves[0], 50)
            phase.second_half_p50_s = percentile(halves[1], 50)
    if phase.missing:
        phase.note = f"{phase.missing} probes had no disable {settle:.0f} s after the last probe"
    watched = [p for p in probes if p.influx_watched and p.acked_at]
    timed = [p for p in watched if p.influx_at]
    phase.influx_samples = len(timed)
    phase.influx_missing = len(watched) - len(timed)
    if timed:
        values = [p.influx_at - p.acked_at for p in timed]
        phase.influx_p50_s = percentile(values, 50)
        phase.influx_p99_s = percentile(values, 99)


# ----------------------------------------------------------------------- report


def _s(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3f}"


def report(phases: list[Phase], settle: float) -> None:
    print()
    print("| background asked | background achieved | probes | disables seen | p50 s | p99 s "
          "| max s | worker share p50 / p99 s | p50 1st / 2nd half s | report -> InfluxDB "
          "p50 / p99 s (n) | cores busy: machine / worker / sink | worker |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for ph in phases:
        bg = ph.background
        p99 = _s(ph.p99_s) if ph.p99_s is not None or not ph.missing else f"> {settle:.0f}"
        worker = ph.worker_failed or "ran throughout"
        print(f"| {ph.target_per_s:,}/s | {bg.get('achieved_per_s', 0):,.0f}/s | "
              f"{ph.probes_sent} | {ph.disables_seen} | {_s(ph.p50_s)} | {p99} | "
              f"{_s(ph.max_s)} | {_s(ph.worker_p50_s)} / {_s(ph.worker_p99_s)} | "
              f"{_s(ph.first_half_p50_s)} / {_s(ph.second_half_p50_s)} | "
              f"{_s(ph.influx_p50_s)} / {_s(ph.influx_p99_s)} ({ph.influx_samples}) | "
              f"{ph.machine_cores_busy:.2f} of {ph.cores} / {ph.worker_cores_busy:.2f} / "
              f"{ph.sink_cores_busy:.2f} | {worker} |")
    print()
    for ph in phases:
        achieved = ph.background.get("achieved_per_s", 0.0)
        if achieved < 0.95 * ph.target_per_s:
            print(f"NOTE: the {ph.target_per_s:,}/s phase reached only {achieved:,.0f} "
                  "readings/s of background load on this machine (Kafka, InfluxDB, the "
                  "worker, the sink and the generator share its cores); its latencies are "
                  "for that load, not for the one asked.")
        verdict = ("met" if ph.p99_s is not None and ph.p99_s <= TARGET_P99_S and not ph.missing
                   else "MISSED")
        print(f"{ph.target_per_s:,}/s: p99 target <= {TARGET_P99_S:.0f} s {verdict}"
              + (f"; {ph.note}" if ph.note else "")
              + f"; worker raw lag at the end {ph.raw_lag_end}; Faust producer backlog peak "
                f"{ph.producer_backlog_peak:,}")


def load_parser(description: str, probes: int, settle: float) -> argparse.ArgumentParser:
    """The options of a benchmark of probes under background load (this one, freshness.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rates", default="10000,100000",
                        help="background readings per second, one phase each")
    parser.add_argument("--probes", type=int, default=probes)
    parser.add_argument("--probe-seconds", type=float, default=40.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=settle)
    parser.add_argument("--bg-users", type=int, default=20_000)
    parser.add_argument("--bg-nodes", type=int, default=50)
    results_options(parser)
    return parser


P = TypeVar("P")


def run_phases(
    args: argparse.Namespace, bench: str,
    run_phase: Callable[[argparse.Namespace, str, str, int, Path], P],
    bootstrap: str, influx: str,
) -> tuple[list[P], dict[str, str]]:
    """Run one phase per rate in `--rates`; the phases and the facts for the results file."""
    load, workdir = begin_run(bench)
    phases = []
    for rate in (int(r) for r in args.rates.split(",")):
        print(f"phase: background {rate:,} readings/s", flush=True)
        phases.append(run_phase(args, bootstrap, influx, rate, workdir))
    return phases, {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", f"bench/{bench}.py", *options()]),
        "machine": f"{os.cpu_count()} cores; load average before the run "
                   f"{load[0]:.2f} (1 min), {load[2]:.2f} (15 min)",
    }


def main() -> None:
    parser = load_parser(__doc__.splitlines()[0], probes=200, settle=30.0)
    parser.add_argument("--influx-every", type=int, default=10)
    parser.add_argument("--no-sink", action="store_true",
                        help="run no InfluxDB sink (nor time reports to InfluxDB): the worker "
                             "gets the cores the sink and InfluxDB would use, as when they run "
                             "on other machines")
    args = parser.parse_args()
    if args.no_sink:
        args.influx_every = 0

    on_servers(lambda bootstrap, influx: run(args, bootstrap, influx))


def run(args: argparse.Namespace, bootstrap: str, influx: str) -> None:
    phases, facts = run_phases(args, "latency", run_phase, bootstrap, influx)
    report(phases, args.settle)
    if args.no_results:
        return
    merge_results(args.results, "latency", {
        **facts,
        "reached_raw": "produce acknowledgement (acks=all), wall clock in the callback",
        "on_control": "a consumer of .control sees the disable (wall clock); the record's "
                      "own timestamp gives the worker share",
        "target_p99_s": TARGET_P99_S,
        "phases": [asdict(p) for p in phases],
    })
    print(f"figures merged into {args.results} under \"latency\"")


if __name__ == "__main__":
    main()

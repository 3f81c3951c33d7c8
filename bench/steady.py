"""Steady-state cost per reading: worker and sink CPU over a sustained window, start-up excluded.

    python bench/steady.py [--keys 100000 --nodes 100 --per-message 100
        --readings 10000000 --warmup 10 --workers 1 --plans/--no-plans
        --baseline-readings 300000 --memory-keys 1000000]
        [--floor --floor-seconds 30 --floor-bytes-per-reading 58]
        [--results bench/results.json | --no-results]
    python bench/steady.py --memory-only [--memory-keys 1000000 --per-message 100]

One run, on fresh topics of the local (or given) servers:

1. **Fleet.** `--keys` (node, user) keys: `--keys`/2 users, each on two of `--nodes`
   nodes. Every round, each node reports every one of its users' cumulative
   counters, cut as quotaflow's producers cut a report (a message per
   partition it has users in), and each such fragment further into messages of
   at most `--per-message` readings (0: not further); rounds are 60 s apart in
   `observed_at`.
   With `--plans` (the default) every user has a plan, and a quarter of the users
   cross 80% and then 100% of their quota during the run, spread over it, so warns
   and disables are decided and sent while it runs.
2. **Backlog.** `--readings` readings are published to `.raw` before any worker
   starts, so that the workers run flat out for the whole window.
3. **Window.** `--workers` worker processes and one InfluxDB sink start. The
   window opens `--warmup` seconds after the workers' first message (start-up,
   recovery and the first plans read lie before it) and closes when the backlog
   is almost drained. CPU seconds of every worker and of the sink come from
   /proc/<pid>/stat at both ends; readings handled come from the worker group's
   committed offsets (each message's reading count is known), so the figure is
   CPU seconds per million readings handled and committed within the window.
   The Kafka broker's and InfluxDB's CPU in the window (found by their listening
   ports when they run on this machine) and the whole machine's busy CPU are
   printed beside it, with the load average.
4. **Sink.** InfluxDB points and write requests come from the sink's status line
   (every 10 s): points per write request (the sink writes a flush in chunks of
   at most `QUOTAFLOW_SINK_BATCH_LINES` lines), points per reading (below 2, the
   day and month series of a reading, when the sink's coalescing merges
   readings of one series within a flush) and sink CPU per point.
5. **Changelog.** Bytes of the worker's changelog topic, as stored at the end
   (before compaction removes any), per reading handled.
6. **Baseline.** The textbook per-reading Faust agent (`bench/baseline_worker.py`)
   drains `--baseline-readings` single-reading messages on topics of its own, in
   the same run, measured the same way; the ratio of CPU per reading is printed.
7. **Floor.** With `--floor`, the framework's floor on the same raw topic (same
   messages, readings per message and partitions), after the worker's drain:
   `bench/floor_worker.py`, a Faust agent with the worker's Faust settings and
   acknowledgement pattern that decodes nothing, in two variants, each its own
   consumer group: `consume` (iterate and acknowledge) and `consume+produce` (plus
   one record per message of `--floor-bytes-per-reading` times the run's mean
   readings per message bytes, straight to aiokafka's producer). The floor reads
   the backlog in laps, so its window lasts `--floor-seconds` after `--warmup`;
   its CPU and readings come from its own status line. The worker's CPU per
   reading is printed beside each, with the ratio real/floor, and the bytes the
   worker stored per reading on its totals and changelog topics (what the
   produce variant stands for).
8. **Memory.** In this process, without Kafka: the worker's state (the ledger
   table's records, the decoded ledgers and the quota book's users, as the
   worker keeps them) after one round over `--memory-keys` keys, measured with
   tracemalloc, per (node, user) key. The live workers' RSS growth from their
   first message to the end is printed too. `--memory-only` runs this step
   alone (no servers, nothing merged into the results) and prints what each
   part of the state holds per key, by walking it with `sys.getsizeof`.

Figures are printed as a table and merged into `bench/results.json` under
"steady" and the command line.

Uses the servers in QUOTAFLOW_KAFKA_BOOTSTRAP / QUOTAFLOW_INFLUX_URL when set,
otherwise starts local ones with `quotaflow.dev.local`.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

import orjson
from floor_worker import VARIANTS
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from throughput import _cpu_s, extract_tree, merge_results, options, publish_plans
from workload import begin_run, machine_busy_s, on_servers, pid_listening, results_options

from quotaflow.admin import ensure_topics
from quotaflow.core.ledger import NodeLedger
from quotaflow.core.partitioning import partition_of
from quotaflow.core.plans import CalendarMonth, Plan
from quotaflow.core.settings import Settings
from quotaflow.core.topics import MAX_MESSAGE_BYTES
from quotaflow.streams.billing import RawHandler
from quotaflow.streams.quotas import DictStore, QuotaKeeper

HERE = Path(__file__).resolve().parent
ROUND_S = 60
UP, DOWN = 1000, 5000  # bytes each user moves per round on each node


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")



# ----------------------------------------------------------------------------- the fleet


@dataclass
class Fleet:
    """Users on nodes, cut by partition and into messages of at most `per_message`
    readings (0: a message per node and partition, as `ReportPublisher` cuts a report)."""

    keys: int
    nodes: int
    per_message: int
    partitions: int
    # node -> partition -> its users there, in chunks of per_message
    chunks: list[dict[int, list[list[str]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        users = self.keys // 2
        on: list[list[str]] = [[] for _ in range(self.nodes)]
        for u in range(users):
            name = f"u{u:07d}"
            on[u % self.nodes].append(name)
            on[(u + self.nodes // 2) % self.nodes].append(name)
        size = self.per_message or self.keys
        for node_users in on:
            parts: dict[int, list[str]] = {}
            for name in node_users:
                parts.setdefault(partition_of(name, self.partitions), []).append(name)
            self.chunks.append({
                p: [names[i:i + size] for i in range(0, len(names), size)]
                for p, names in sorted(parts.items())
            })

    @property
    def users(self) -> list[str]:
        return [f"u{u:07d}" for u in range(self.keys // 2)]

    def messages(self, rounds: int, start: int) -> Iterator[tuple[int, bytes, int]]:
        """(partition, value, readings) of every message of `rounds` rounds from `start`."""
        epoch = start * 1000
        seq = [0] * self.nodes
        for r in range(1, rounds + 1):
            observed = datetime.fromtimestamp(start + r * ROUND_S, UTC).isoformat()
            for n, parts in enumerate(self.chunks):
                node = f"n{n:05d}"
                for p, chunks in parts.items():
                    for chunk in chunks:
                        seq[n] += 1
                        yield p, orjson.dumps({
                            "node_id": node, "epoch": epoch, "seq": seq[n],
                            "observed_at": observed,
                            "counters": [{"user_id": u, "up": r * UP, "down": r * DOWN}
                                         for u in chunk],
                        }), len(chunk)

    @classmethod
    def sized(cls, keys: int, per_message: int = 100, partitions: int = 4) -> Fleet:
        """A fleet of `keys` keys on a node per thousand of them (at least ten)."""
        return cls(keys, max(10, keys // 1000), per_message, partitions)

    def reports(self, rounds: int) -> list[tuple[int, bytes]]:
        """(partition, value) of every message of `rounds` rounds that ended in the past."""
        start = int(time.time()) - (rounds + 1) * ROUND_S
        return [(p, value) for p, value, _ in self.messages(rounds, start)]

    def plans(self, rounds: int) -> list[Plan]:
        """A plan per user; a quarter cross 80% and then 100% of their quota during the run,
        spread evenly over it (not all in one round), the others stay far below."""
        total = rounds * (UP + DOWN) * 2  # two nodes
        users = self.users
        return [
            Plan(user_id=name,
                 quota_bytes=total * (1 + i * 3 // len(users)) // 5 if i % 4 == 0 else total * 4,
                 period=CalendarMonth(kind="calendar_month"), warn_at=(0.8,), enabled=True)
            for i, name in enumerate(users)
        ]


def publish(settings: Settings, topic: str, messages: Iterator[tuple[int, bytes, int]]
            ) -> tuple[dict[int, list[int]], float]:
    """Send the messages; per partition the prefix sums of readings by offset, and seconds."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                             enable_idempotence=True, linger_ms=20, batch_size=1 << 20,
                             max_request_size=MAX_MESSAGE_BYTES)
    sums: dict[int, list[int]] = {p: [0] for p in range(settings.partitions)}
    t = time.monotonic()
    for partition, value, readings in messages:
        producer.send(topic, value=value, partition=partition)
        sums[partition].append(sums[partition][-1] + readings)
    producer.flush()
    producer.close()
    seconds = time.monotonic() - t
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    ends = consumer.end_offsets([TopicPartition(topic, p) for p in sums])
    consumer.close()
    for tp, end in ends.items():  # one producer, no retries: offsets follow the send order
        if end != len(sums[tp.partition]) - 1:
            raise SystemExit(f"{tp}: {end} messages on Kafka, {len(sums[tp.partition]) - 1} sent")
    return sums, seconds


# ----------------------------------------------------------------------------- a window


@dataclass
class Window:
    """What one drain measured between the end of its warm-up and the end of its backlog."""

    name: str
    seconds: float = 0.0
    readings: int = 0
    worker_cpu_s: list[float] = field(default_factory=list)
    sink_cpu_s: float = 0.0
    kafka_cpu_s: float | None = None
    influx_cpu_s: float | None = None
    machine_busy_s: float = 0.0
    points: int = 0
    writes: int = 0
    worker_rss_growth_mb: list[float] = field(default_factory=list)
    changelog_bytes: int = 0
    total_readings: int = 0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    note: str = ""

    @property
    def worker_s_per_m(self) -> float:
        return sum(self.worker_cpu_s) / max(self.readings, 1) * 1e6

    @property
    def readings_per_s(self) -> float:
        return self.readings / max(self.seconds, 1e-9)


SINK = ("from quotaflow import logs; logs.setup('INFO'); "
        "from quotaflow.core.settings import Settings; "
        "from quotaflow.sinks.influx import run_sink; run_sink(Settings())")
_SINK_STATUS = re.compile(r"points=(\d+) writes=(\d+)")


def _sink_counts(log: Path) -> tuple[int, int]:
    found = _SINK_STATUS.findall(log.read_text(errors="replace"))
    return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)


def _committed(admin: KafkaAdminClient, group: str, topic: str, partitions: int
               ) -> dict[int, int]:
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    try:
        found = admin.list_group_offsets({group: tps}).get(group, {})
    except Exception:  # the group's coordinator is not ready yet
        return {}
    return {tp.partition: meta.offset for tp, meta in found.items()
            if meta is not None and meta.offset >= 0}


def _handled(sums: dict[int, list[int]], committed: dict[int, int]) -> int:
    return sum(sums[p][min(o, len(sums[p]) - 1)] for p, o in committed.items())


def _topic_bytes(admin: KafkaAdminClient, topic: str) -> int:
    total = 0

    def walk(node: Any) -> None:
        nonlocal total
        if isinstance(node, dict):
            if "partition_size" in node:
                total += int(node["partition_size"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list | tuple):
            for value in node:
                walk(value)

    walk(admin.describe_log_dirs([topic]))
    return total


def drain(settings: Settings, commands: list[list[str]], group: str, topic: str,
          sums: dict[int, list[int]], warmup: float, workdir: Path, label: str,
          changelog: str | None, sink: bool = True, tree: Path | None = None) -> Window:
    """Start the workers (of `tree`, if given) and the sink, measure the window, stop them."""
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    worker_env = {**env, "PYTHONPATH": str(tree)} if tree is not None else env
    total = sum(s[-1] for s in sums.values())
    bootstrap_port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    influx_port = int(settings.influx_url.rsplit(":", 1)[1].split("/")[0])
    kafka_pid, influx_pid = pid_listening(bootstrap_port), pid_listening(influx_port)
    logs = [workdir / f"{label}-worker{i}.log" for i in range(len(commands))]
    sink_log = workdir / f"{label}-sink.log"
    procs = []
    for command, log in zip(commands, logs, strict=True):
        with log.open("wb") as out:
            procs.append(subprocess.Popen(command, env=worker_env, stdout=out,
                                          stderr=subprocess.STDOUT, cwd=tree))
    sink_proc = None
    if sink:
        with sink_log.open("wb") as out:
            sink_proc = subprocess.Popen([sys.executable, "-c", SINK], env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    window = Window(label, total_readings=total)
    try:
        first = None
        rss_first: list[float] = []
        deadline = time.monotonic() + 3600
        while first is None:  # the first message: committed offsets move
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"{label}: a worker exited; see {workdir}")
            if _handled(sums, _committed(admin, group, topic, settings.partitions)) > 0:
                first = time.monotonic()
                rss_first = [_rss_mb(p.pid) for p in procs]
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: nothing handled in an hour")
            time.sleep(0.2)
        time.sleep(warmup)

        def sample() -> dict[str, Any]:
            return {
                "t": time.monotonic(),
                "handled": _handled(sums, _committed(admin, group, topic, settings.partitions)),
                "workers": [_cpu_s(p.pid) for p in procs],
                "sink": _cpu_s(sink_proc.pid) if sink_proc else 0.0,
                "kafka": _cpu_s(kafka_pid) if kafka_pid else None,
                "influx": _cpu_s(influx_pid) if influx_pid else None,
                "machine": machine_busy_s(),
                "sink_counts": _sink_counts(sink_log) if sink else (0, 0),
            }

        start = sample()
        window.load = os.getloadavg()
        last = now = start
        exited = None
        while True:  # until 97% is committed: the workers stay saturated
            time.sleep(1.0)
            exited = next((p for p in procs if p.poll() is not None), None)
            if exited is not None:  # the window ends at the last sample before
                window.note = (f"a worker exited (status {exited.returncode}; its log: "
                               f"{logs[procs.index(exited)]}): the window ends before")
                break
            now = sample()
            if now["handled"] >= total * 0.97:
                break
            last = now
            if now["t"] > deadline:
                raise SystemExit(f"{label}: not drained in an hour")
        end = last if last is not start or exited is not None else now
        if end is start:
            raise SystemExit(f"{label}: no window: {window.note or 'drained during warm-up'}")
        window.seconds = end["t"] - start["t"]
        window.readings = end["handled"] - start["handled"]
        window.worker_cpu_s = [b - a for a, b in zip(start["workers"], end["workers"],
                                                      strict=True)]
        window.sink_cpu_s = end["sink"] - start["sink"]
        if kafka_pid:
            window.kafka_cpu_s = end["kafka"] - start["kafka"]
        if influx_pid:
            window.influx_cpu_s = end["influx"] - start["influx"]
        window.machine_busy_s = end["machine"] - start["machine"]
        window.points = end["sink_counts"][0] - start["sink_counts"][0]
        window.writes = end["sink_counts"][1] - start["sink_counts"][1]
        while exited is None and _handled(sums, _committed(admin, group, topic,
                                                           settings.partitions)) < total:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                window.note = "the backlog's last readings were not all committed"
                break
            time.sleep(0.5)
        window.worker_rss_growth_mb = [
            _rss_mb(p.pid) - r if p.poll() is None else float("nan")
            for p, r in zip(procs, rss_first, strict=True)
        ]
        if changelog:
            window.changelog_bytes = _topic_bytes(admin, changelog)
        if window.seconds < 30:
            window.note += (f"{'; ' if window.note else ''}the window lasted "
                            f"{window.seconds:.0f} s, under 30 s")
    finally:
        admin.close()
        for p in [*procs, *([sink_proc] if sink_proc else [])]:
            if p.poll() is None:
                p.terminate()
        for p in [*procs, *([sink_proc] if sink_proc else [])]:
            p.wait(timeout=60)
    return window


# ----------------------------------------------------------------------------- the floor


_FLOOR_STATUS = re.compile(r"floor t=([\d.]+) cpu=([\d.]+) at=(\S*)")


def _floor_status(log: Path, sums: dict[int, list[int]]) -> tuple[float, float, int] | None:
    """(monotonic s, CPU s, readings handled over all laps) of the floor's last status line."""
    found = _FLOOR_STATUS.findall(log.read_text(errors="replace"))
    if not found:
        return None
    t, cpu, at = found[-1]
    handled = 0
    for part in filter(None, at.split(",")):
        p, laps, offset = (int(x) for x in part.split(":"))
        handled += laps * sums[p][-1] + sums[p][offset + 1]
    return float(t), float(cpu), handled


def floor(settings: Settings, variant: str, sums: dict[int, list[int]], record_bytes: int,
          warmup: float, seconds: float, workdir: Path) -> Window:
    """Run `bench/floor_worker.py` on the raw topic and measure `seconds` after `warmup`."""
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    label = f"floor-{variant.replace('+', '-')}"
    log = workdir / f"{label}.log"
    command = [sys.executable, str(HERE / "floor_worker.py"), settings.topics.raw, variant,
               "--record-bytes", str(record_bytes)]
    window = Window(label, total_readings=sum(s[-1] for s in sums.values()))
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:  # its first message
            if proc.poll() is not None:
                raise SystemExit(f"{label}: exited with {proc.returncode}; see {log}")
            status = _floor_status(log, sums)
            if status is not None and status[2] > 0:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: nothing handled in 10 minutes; see {log}")
            time.sleep(0.2)
        time.sleep(warmup)
        start = _floor_status(log, sums)
        window.load = os.getloadavg()
        time.sleep(seconds)
        end = _floor_status(log, sums)
        if proc.poll() is not None:
            raise SystemExit(f"{label}: exited with {proc.returncode}; see {log}")
        assert start is not None and end is not None
        window.seconds = end[0] - start[0]
        window.worker_cpu_s = [end[1] - start[1]]
        window.readings = end[2] - start[2]
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return window


def ensure_floor_topic(settings: Settings) -> None:
    """`<prefix>.floor`, where the floor's produce variant sends its records."""
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(f"{settings.topic_prefix}.floor", settings.partitions,
                                      settings.replication_factor,
                                      topic_configs={"max.message.bytes": str(MAX_MESSAGE_BYTES)})])
    finally:
        admin.close()


# ----------------------------------------------------------------------------- memory


def _deep_size(obj: object, seen: set[int]) -> int:
    """Bytes of `obj` and of everything it holds that `seen` does not list yet (then listed):
    containers, slotted objects and their items; types, modules and functions are not counted."""
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type | ModuleType | FunctionType):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        elif hasattr(o, "__slots__") or hasattr(o, "__dict__"):
            for cls in type(o).__mro__:
                for name in getattr(cls, "__slots__", ()):
                    if hasattr(o, name):
                        stack.append(getattr(o, name))
            if hasattr(o, "__dict__"):
                stack.append(vars(o))
    return total


def memory_per_key(keys: int, nodes: int, per_message: int, partitions: int,
                   breakdown: bool = False) -> dict[str, Any]:
    """Bytes per (node, user) key of the worker's state after one round, by tracemalloc.

    With `breakdown`, also the bytes per key of each part of it, by walking the
    structures (`sys.getsizeof`, each object counted once, in the order listed):
    the user id strings, the ledgers' last counters, day and month totals, the
    table's ledger and quota records (bytes objects, keys and the dict), the quota
    books' users, and what remains of the tracemalloc figure; and the ledgers as
    decoded from their records (after a restart or a rebalance), by tracemalloc.
    """
    fleet = Fleet(keys, nodes, per_message, partitions)
    settings = Settings(partitions=partitions)
    start = int(time.time()) - 2 * ROUND_S
    now = datetime.now(UTC)
    messages = list(fleet.messages(1, start))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table: dict[bytes, bytes] = {}
    store = DictStore()
    keeper = QuotaKeeper(settings, store)
    for p in range(partitions):
        keeper.load(p, {}, now)
    handler = RawHandler(settings, table, now=time.time, quotas=keeper)
    for offset, (partition, value, _) in enumerate(messages):
        handler.handle(value, partition, offset)
    handler.checkpoint()
    for p in range(partitions):
        keeper.flush(p)
        keeper.report(p)  # as the worker does every second: the users to report are taken
    del messages
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    ledger_bytes = sum(len(v) for v in table.values())
    quota_bytes = sum(len(v) for v in store.data.values())
    tracemalloc.stop()
    figures: dict[str, Any] = {
        "keys": keys,
        "worker_state_bytes_per_key": (after - before) / keys,
        "changelog_records_bytes_per_key": (ledger_bytes + quota_bytes) / keys,
        "ledger_records_bytes_per_key": ledger_bytes / keys,
        "quota_records_bytes_per_key": quota_bytes / keys,
    }
    if breakdown:
        ledgers = list(handler.biller._live.values())
        books = [held.book for held in keeper.partitions.values()]
        seen: set[int] = set()
        parts: dict[str, list[object]] = {
            "user id strings": [u for ledger in ledgers for u in ledger.users],
            "ledgers' last counters (NodeLedger.users)": [ledger.users for ledger in ledgers],
            "day totals": [ledger._totals["day"] for ledger in ledgers],
            "month totals": [ledger._totals["month"] for ledger in ledgers],
            "table: ledger records": [table],
            "table: quota records": [store.data],
            "quota books' users (_User)": [book.users for book in books],
            "ledgers and books otherwise": [*ledgers, *books],
        }
        figures["parts"] = {
            name: round(sum(_deep_size(root, seen) for root in roots) / keys, 1)
            for name, roots in parts.items()
        }
        # the ledgers as a worker holds them after a restart or a rebalance
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        decoded = [NodeLedger.from_bytes(record) for record in table.values()]
        gc.collect()
        figures["decoded_ledgers_bytes_per_key"] = (
            tracemalloc.get_traced_memory()[0] - before) / keys
        tracemalloc.stop()
        del decoded
    return figures


# ----------------------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--per-message", type=int, default=100,
                        help="the most readings per message; 0: one message per node and "
                             "partition, as quotaflow's producers cut a report")
    parser.add_argument("--readings", type=int, default=10_000_000)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--plans", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--baseline-readings", type=int, default=300_000,
                        help="0 leaves the per-reading baseline out")
    parser.add_argument("--memory-keys", type=int, default=1_000_000,
                        help="0 leaves the in-process memory measurement out")
    parser.add_argument("--floor", action="store_true",
                        help="measure the framework's floor on the worker's raw topic too")
    parser.add_argument("--floor-seconds", type=float, default=30.0)
    parser.add_argument("--floor-bytes-per-reading", type=float, default=58.0,
                        help="what the floor's produce variant sends per reading (the "
                             "bytes bench/hot_path.py reports the worker produces)")
    parser.add_argument("--before", metavar="REF",
                        help="first drain the same backlog with the worker of git revision REF "
                             "(from git archive), on topics of its own")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the in-process memory measurement, with its breakdown by "
                             "part; no servers are started and no figures are merged")
    results_options(parser)
    args = parser.parse_args()
    if args.memory_only:
        print_memory(args)
        return
    on_servers(lambda bootstrap, influx: run(args, bootstrap, influx))


def _memory_nodes(args: argparse.Namespace) -> int:
    """Nodes of the memory measurement's fleet: 5000 keys a node, at least `--nodes`."""
    return max(args.nodes, args.memory_keys // 5000)


def print_memory(args: argparse.Namespace) -> None:
    """`--memory-only`: the memory measurement and its breakdown, as a table."""
    memory = memory_per_key(args.memory_keys, _memory_nodes(args), args.per_message,
                            Settings().partitions, breakdown=True)
    print(f"worker state per (node, user) key at {memory['keys']:,} keys on "
          f"{_memory_nodes(args)} nodes (tracemalloc, no plans)\n")
    print("| part | bytes per key |\n|---|---|")
    print(f"| all (tracemalloc) | {memory['worker_state_bytes_per_key']:.1f} |")
    for name, value in memory["parts"].items():
        print(f"| {name} | {value:.1f} |")
    rest = memory["worker_state_bytes_per_key"] - sum(memory["parts"].values())
    print(f"| the rest | {rest:.1f} |")
    print(f"| (the table's record bytes alone: ledger + quota records) | "
          f"{memory['changelog_records_bytes_per_key']:.1f} "
          f"({memory['ledger_records_bytes_per_key']:.1f} + "
          f"{memory['quota_records_bytes_per_key']:.1f}) |")
    print(f"| (the ledgers decoded from their records, as after a restart) | "
          f"{memory['decoded_ledgers_bytes_per_key']:.1f} |")


def run(args: argparse.Namespace, bootstrap: str, influx: str) -> None:
    load, workdir = begin_run("steady")
    fleet = Fleet(args.keys, args.nodes, args.per_message, Settings().partitions)
    rounds = max(1, -(-args.readings // (fleet.keys // 2 * 2)))
    start = int(time.time()) - (rounds + 1) * ROUND_S
    worker = [sys.executable, "-m", "quotaflow", "worker", "--loglevel", "INFO"]

    floors: dict[str, Window] = {}
    produced: dict[str, float] = {}

    def one(label: str, tree: Path | None, with_floor: bool = False) -> Window:
        tag = uuid.uuid4().hex[:8]
        settings = Settings(kafka_bootstrap=bootstrap, influx_url=influx,
                            topic_prefix=f"steady-{tag}", influx_bucket=f"steady_{tag}",
                            state_dir=workdir / label)
        ensure_topics(settings)
        plans = fleet.plans(rounds) if args.plans else []
        if plans:
            publish_plans(settings, plans)
        sums, publish_s = publish(settings, settings.topics.raw, fleet.messages(rounds, start))
        total = sum(s[-1] for s in sums.values())
        messages = sum(len(s) - 1 for s in sums.values())
        print(f"[{label}] published {total:,} readings in {messages:,} messages "
              f"({total / messages:.0f} per message) of {fleet.keys:,} keys on {args.nodes} "
              f"nodes, {rounds} rounds, {len(plans):,} plans, in {publish_s:.0f} s", flush=True)
        changelog = f"{settings.topics.worker_group}-ledgers-changelog"
        window = drain(settings, [worker] * args.workers, settings.topics.worker_group,
                       settings.topics.raw, sums, args.warmup, workdir, label, changelog,
                       tree=tree)
        print(f"[{label}] worker CPU s per million readings {window.worker_s_per_m:.2f} over "
              f"{window.seconds:.0f} s, {window.readings_per_s:,.0f} readings/s"
              + (f"; {window.note}" if window.note else ""), flush=True)
        if with_floor:
            admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
            try:
                produced["totals"] = _topic_bytes(admin, settings.topics.totals) / total
                produced["changelog"] = window.changelog_bytes / total
            finally:
                admin.close()
            ensure_floor_topic(settings)
            record_bytes = round(args.floor_bytes_per_reading * total / messages)
            for variant in VARIANTS:
                f = floor(settings, variant, sums, record_bytes, args.warmup,
                          args.floor_seconds, workdir)
                floors[variant] = f
                print(f"[{f.name}] CPU s per million readings {f.worker_s_per_m:.2f} over "
                      f"{f.seconds:.0f} s, {f.readings_per_s:,.0f} readings/s"
                      + (f" ({record_bytes:,} bytes sent per message)"
                         if variant != "consume" else ""), flush=True)
        return window

    before_window = None
    if args.before:
        before_window = one(f"before-{args.before}", extract_tree(args.before, workdir))
    main_window = one("worker", None, with_floor=args.floor)

    base_window = None
    if args.baseline_readings:
        tag = uuid.uuid4().hex[:8]
        base = Settings(kafka_bootstrap=bootstrap, influx_url=influx,
                        topic_prefix=f"steady-{tag}-base", influx_bucket=f"steady_{tag}_base",
                        state_dir=workdir / "base")
        ensure_topics(base)
        single = Fleet(min(args.keys, 20_000), min(args.nodes, 20), 1, base.partitions)
        base_rounds = max(1, -(-args.baseline_readings // single.keys))
        base_sums, _ = publish(base, f"{base.topic_prefix}.readings",
                               single.messages(base_rounds, start))
        base_window = drain(base, [[sys.executable, str(HERE / "baseline_worker.py")]],
                            f"{base.topic_prefix}-baseline", f"{base.topic_prefix}.readings",
                            base_sums, args.warmup, workdir, "baseline", None)

    memory = None
    if args.memory_keys:
        memory = memory_per_key(args.memory_keys, _memory_nodes(args), args.per_message,
                                fleet.partitions)
    report(args, main_window, base_window, memory, load, before_window, floors, produced)


def report(args: argparse.Namespace, w: Window, base: Window | None,
           memory: dict[str, float] | None, load: tuple[float, float, float],
           before: Window | None = None, floors: dict[str, Window] | None = None,
           produced: dict[str, float] | None = None) -> None:
    m = max(w.readings, 1) / 1e6
    kafka = "n/a" if w.kafka_cpu_s is None else f"{w.kafka_cpu_s / m:.1f}"
    influx = "n/a" if w.influx_cpu_s is None else f"{w.influx_cpu_s / m:.1f}"
    others = w.machine_busy_s - sum(w.worker_cpu_s) - w.sink_cpu_s - (w.kafka_cpu_s or 0) - (
        w.influx_cpu_s or 0)
    rows = [
        ("window", f"{w.seconds:.1f} s, {w.readings:,} readings of {w.total_readings:,}, "
                   f"{args.workers} worker process(es)"),
        ("load average at the window's start (1/5/15 min)",
         " / ".join(f"{x:.2f}" for x in w.load)),
        ("worker CPU s per million readings (µs per reading)",
         f"{w.worker_s_per_m:.2f}" + (f" ({', '.join(f'{c / m:.2f}' for c in w.worker_cpu_s)}"
                                      " per process)" if len(w.worker_cpu_s) > 1 else "")),
        ("readings/s per core of worker CPU", f"{1e6 / w.worker_s_per_m:,.0f}"),
        ("sink CPU s per million readings", f"{w.sink_cpu_s / m:.2f}"),
        ("end to end readings/s in the window", f"{w.readings_per_s:,.0f}"),
        ("beside it, CPU s per million readings: Kafka broker / InfluxDB / everything else "
         "on the machine", f"{kafka} / {influx} / {others / m:.1f}"),
        ("InfluxDB points per write request (the sink's chunks of at most "
         "QUOTAFLOW_SINK_BATCH_LINES lines) and per reading",
         f"{w.points / max(w.writes, 1):,.0f} ({w.points:,} points / {w.writes:,} writes); "
         f"{w.points / max(w.readings, 1):.2f}"),
        ("sink CPU µs per point", f"{w.sink_cpu_s / max(w.points, 1) * 1e6:.1f}"),
        ("changelog bytes per reading (topic size at the end / readings)",
         f"{w.changelog_bytes / max(w.total_readings, 1):.0f}"),
        ("worker RSS growth from the first message, MB", ", ".join(
            f"{x:.0f}" for x in w.worker_rss_growth_mb)),
    ]
    summary: dict[str, Any] = {
        "worker_cpu_s_per_million": round(w.worker_s_per_m, 3),
        "sink_cpu_s_per_million": round(w.sink_cpu_s / m, 3),
        "readings_per_s": round(w.readings_per_s),
        "points_per_write": round(w.points / max(w.writes, 1), 1),
        "points_per_reading": round(w.points / max(w.readings, 1), 3),
        "sink_cpu_us_per_point": round(w.sink_cpu_s / max(w.points, 1) * 1e6, 2),
        "changelog_bytes_per_reading": round(w.changelog_bytes / max(w.total_readings, 1), 1),
    }
    if base is not None:
        ratio_cpu = base.worker_s_per_m / w.worker_s_per_m
        ratio_rate = w.readings_per_s / max(base.readings_per_s, 1e-9)
        rows += [
            ("per-reading baseline: worker CPU s per million readings, readings/s",
             f"{base.worker_s_per_m:.1f}, {base.readings_per_s:,.0f} "
             f"({base.seconds:.0f} s window)"),
            ("ratio to the baseline: by CPU per reading / by readings per second",
             f"{ratio_cpu:.1f}x / {ratio_rate:.1f}x"),
        ]
        summary.update(baseline_cpu_s_per_million=round(base.worker_s_per_m, 2),
                       baseline_readings_per_s=round(base.readings_per_s),
                       ratio_cpu=round(ratio_cpu, 1), ratio_rate=round(ratio_rate, 1))
    if before is not None:
        rows += [(f"worker of {args.before}: worker CPU s per million readings, readings/s",
                  f"{before.worker_s_per_m:.2f}, {before.readings_per_s:,.0f} "
                  f"({before.seconds:.0f} s window)"
                  + (f"; {before.note}" if before.note else ""))]
        summary["before"] = {"ref": args.before,
                             "worker_cpu_s_per_million": round(before.worker_s_per_m, 3),
                             "readings_per_s": round(before.readings_per_s)}
    if floors:
        for variant, f in floors.items():
            rows += [(f"framework's floor, {variant}: CPU s per million readings (µs per "
                      "reading), readings/s; ratio real worker / floor",
                      f"{f.worker_s_per_m:.2f}, {f.readings_per_s:,.0f} ({f.seconds:.0f} s "
                      f"window); {w.worker_s_per_m / max(f.worker_s_per_m, 1e-9):.1f}x")]
        if produced:
            rows += [("bytes the worker stored per reading on totals / changelog (the floor "
                      "sends --floor-bytes-per-reading)",
                      f"{produced['totals']:.0f} / {produced['changelog']:.0f} "
                      f"({args.floor_bytes_per_reading:.0f})")]
        summary["floor"] = {
            variant: {"cpu_s_per_million": round(f.worker_s_per_m, 3),
                      "readings_per_s": round(f.readings_per_s),
                      "ratio_real_to_floor": round(w.worker_s_per_m
                                                   / max(f.worker_s_per_m, 1e-9), 2),
                      "window": asdict(f)}
            for variant, f in floors.items()
        } | {"bytes_per_reading_sent": args.floor_bytes_per_reading,
             "worker_stored_bytes_per_reading": {k: round(v, 1)
                                                 for k, v in (produced or {}).items()}}
    if memory is not None:
        rows += [
            (f"worker state per (node, user) key at {memory['keys']:,.0f} keys (tracemalloc, "
             "no plans)", f"{memory['worker_state_bytes_per_key']:.0f} bytes"),
            ("of which its changelog records", f"{memory['changelog_records_bytes_per_key']:.0f}"
                                               " bytes"),
        ]
        summary["memory"] = memory
    notes = [x.note for x in (w, base) if x is not None and x.note]
    print()
    print("| figure | value |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")
    for note in notes:
        print(f"note: {note}")
    if args.no_results:
        return
    merge_results(args.results, "steady", {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/steady.py", *options()]),
        "machine": f"{os.cpu_count()} cores; load average before the run {load[0]:.2f} "
                   f"(1 min), {load[2]:.2f} (15 min); at the window's start "
                   f"{w.load[0]:.2f} (1 min)",
        "options": {k: v for k, v in vars(args).items() if k not in ("results", "no_results")},
        "window": asdict(w),
        "baseline": asdict(base) if base is not None else None,
        "before": asdict(before) if before is not None else None,
        **summary,
        "notes": notes,
    })
    print(f"figures merged into {args.results} under \"steady\"")


if __name__ == "__main__":
    main()

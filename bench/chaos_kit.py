"""The machinery of `bench/chaos.py`: servers, processes, lag, InfluxDB and dead-letter reads.

Everything here talks to real local servers (`quotaflow.dev.local`) on loopback and
to real `quotaflow` subprocesses; nothing is mocked. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from quotaflow.core.periods import Calendar
from quotaflow.core.settings import Settings
from quotaflow.dev.truth_check import CheckResult, compare
from quotaflow.sinks.influxql import InfluxQL, InfluxQLError

ROOT = Path(__file__).resolve().parents[1]
UTC_CALENDAR = Calendar(ZoneInfo("UTC"))
DayKey = tuple[str, str, str]  # user, node, day label ("*" when days are summed)
Truth = dict[DayKey, tuple[int, int]]

_T0 = time.monotonic()


def say(message: str) -> None:
    """A progress line with the seconds since the script started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------- results


@dataclass
class RowResult:
    """What one row of the matrix measured; `ok` is the verdict the exit status follows."""

    row: str
    fault: str
    readings: int = 0
    expected_bytes: int = 0
    billed_bytes: int = 0
    dead_letters: int = 0
    expected_dead: int | None = None
    recovery_s: float | None = None
    exact: bool = False
    ok: bool = False
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def difference(self) -> int:
        """Billed minus expected bytes."""
        return self.billed_bytes - self.expected_bytes

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["difference"] = self.difference
        return out


COLUMNS = (
    ("fault", 44), ("readings", 10), ("expected bytes", 22), ("billed bytes", 22),
    ("difference", 12), ("dead letters", 13), ("recovery", 9), ("result", 9),
)


def table_header() -> str:
    head = " ".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}"
                    for i, (name, w) in enumerate(COLUMNS))
    return head + "\n" + " ".join("-" * w for _, w in COLUMNS)


def table_line(r: RowResult) -> str:
    dead = f"{r.dead_letters}" if r.expected_dead is None else (
        f"{r.dead_letters}/{r.expected_dead}")
    recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.1f}s"
    verdict = "OK" if r.ok else ("NOT EXACT" if not r.exact else "FAIL")
    cells = (r.fault[:44], f"{r.readings:,}", f"{r.expected_bytes:,}", f"{r.billed_bytes:,}",
             f"{r.difference:+,}", dead, recovery, verdict)
    return " ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                    for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True)))


# --------------------------------------------------------------------------- servers


class Servers:
    """Kafka and InfluxDB of `quotaflow.dev.local` in a state dir of our own."""

    def __init__(self, state_dir: Path) -> None:
        from quotaflow.dev import local

        self._local = local
        self.state_dir = state_dir
        self.services = local.up(state_dir=state_dir)
        self.kafka_bootstrap = self.services.kafka_bootstrap
        self.influx_url = self.services.influx_url

    def _sigkill(self, pid: int | None) -> None:
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # local.up starts each server as a session leader
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # dead or a zombie; `local` reaps it
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
            except OSError:
                return
            if state == "Z":
                return
            time.sleep(0.1)

    def kill_kafka(self) -> None:
        """SIGKILL the broker (no shutdown), then let `local` record it as stopped."""
        self._sigkill(self.services.kafka_pid)
        self.services.stop_kafka(timeout=10)

    def stop_kafka(self) -> None:
        """Stop the broker the ordinary way (SIGTERM, as `local` does)."""
        self.services.stop_kafka()

    def start_kafka(self) -> str | None:
        """Start the broker again; a note if `local` misjudged the start (see `_started`)."""
        return self._started("kafka", lambda: self.services.start_kafka(timeout=180),
                             self._kafka_answers)

    def kill_influx(self) -> None:
        """SIGKILL influxd, then let `local` record it as stopped."""
        self._sigkill(self.services.influx_pid)
        self.services.stop_influx(timeout=10)

    def start_influx(self) -> str | None:
        return self._started("influx", lambda: self.services.start_influx(timeout=120),
                             self._influx_answers)

    def _started(self, what: str, start: Callable[[], None],
                 answers: Callable[[], bool]) -> str | None:
        """Run `start`; if `local` says the server exited while starting, wait (bounded)
        for it to answer anyway, and say so. Seen once: "Kafka exited while starting"
        while the broker it had just launched came up and served the rest of the run."""
        from quotaflow.dev.local import LocalServicesError

        try:
            start()
            return None
        except LocalServicesError as exc:
            first = str(exc).splitlines()[0][:160]
            began = time.monotonic()
            while time.monotonic() - began < 90:
                if answers():
                    pid = getattr(self.services, f"{what}_pid")
                    return (f"quotaflow.dev.local raised {first!r}, yet the {what} it launched "
                            f"(pid {pid}) answered {time.monotonic() - began:.1f}s later")
                time.sleep(0.5)
            raise

    def _kafka_answers(self) -> bool:
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.kafka_bootstrap,
                                     client_id="chaos-probe", request_timeout_ms=5000)
        except Exception:
            return False
        try:
            admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            admin.close()

    def _influx_answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.influx_url + "/health", timeout=2) as response:
                return int(response.status) == 200
        except Exception:
            return False

    def down(self) -> None:
        self._local.down(state_dir=self.state_dir)


def new_settings(servers: Servers, workdir: Path, tag: str, **extra: Any) -> Settings:
    """Settings with a fresh topic prefix and database; UTC billing."""
    unique = uuid.uuid4().hex[:8]
    safe = tag.replace("-", "_")
    return Settings(
        kafka_bootstrap=servers.kafka_bootstrap, influx_url=servers.influx_url,
        topic_prefix=f"chaos-{tag}-{unique}", influx_bucket=f"chaos_{safe}_{unique}",
        influx_org="-", influx_token="", partitions=4, timezone="UTC",
        state_dir=workdir / f"{tag}-{unique}" / "state", **extra,
    )


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1", **extra}


# --------------------------------------------------------------------------- processes

_CHILDREN: list[subprocess.Popen[bytes]] = []


def rss_mb(pid: int, key: str = "VmRSS") -> float | None:
    """Resident (VmRSS) or peak resident (VmHWM) memory of a live process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


class Child:
    """One subprocess this harness started, with its own log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.popen = subprocess.Popen(argv, env=dict(env), stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=ROOT)
        _CHILDREN.append(self.popen)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss(self) -> float | None:
        return rss_mb(self.pid) if self.alive() else None

    def peak_rss(self) -> float | None:
        return rss_mb(self.pid, "VmHWM") if self.alive() else None

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)
        return self.popen.returncode

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, chars: int = 2500) -> str:
        return self.text()[-chars:]


def kill_all_children() -> None:
    """Stop every subprocess this harness started that still runs (by its own pid)."""
    for popen in _CHILDREN:
        if popen.poll() is None:
            with contextlib.suppress(OSError):
                popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for popen in _CHILDREN:
        try:
            popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10)


QUOTAFLOW = [sys.executable, "-m", "quotaflow"]


class Pipeline:
    """Worker(s) and the InfluxDB sink as real subprocesses; a supervisor for what exits."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.procs: dict[str, Child] = {}
        self.starts: Tally[str] = Tally()
        self.exits: list[tuple[str, int | None, float]] = []  # name, status, when (monotonic)
        self.env_extra: dict[str, dict[str, str]] = {}

    def start(self, name: str, **env: str) -> Child:
        """Start `worker`, `worker2` (its own state dir) or `sink` (again)."""
        if env:
            self.env_extra[name] = env
        args = ["sink", "influx"] if name == "sink" else ["worker", "--loglevel", "INFO"]
        self.starts[name] += 1
        child = Child(name, [*QUOTAFLOW, *args],
                      settings_env(self.settings, **self.env_extra.get(name, {})),
                      self.logs / f"{name}-{self.starts[name]}.log")
        self.procs[name] = child
        return child

    def kill(self, name: str) -> None:
        """SIGKILL, as a crash; not restarted by `restart_exited`."""
        self.procs.pop(name).kill()

    def restart_exited(self) -> list[str]:
        """Start again what exited on its own, as `quotaflow run` or systemd would."""
        restarted = []
        for name, child in list(self.procs.items()):
            if not child.alive():
                self.exits.append((name, child.popen.returncode, time.monotonic()))
                say(f"  {name} exited with status {child.popen.returncode}; restarting it")
                self.start(name)
                restarted.append(name)
        return restarted

    def stop(self) -> None:
        for child in self.procs.values():
            child.stop(timeout=20)
        self.procs.clear()

    def billing_started(self, name: str = "worker") -> bool:
        """Whether the current process `name` has billed its first message (it logs that)."""
        child = self.procs.get(name)
        return child is not None and "first message at " in child.text()

    def wait_billing(self, name: str = "worker", timeout: float = 90.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.billing_started(name):
                return True
            self.restart_exited()
            time.sleep(0.1)
        return False

    def exit_notes(self) -> list[str]:
        return [f"{name} exited on its own with status {rc} (restarted)"
                for name, rc, _ in self.exits]

    def logs_tail(self) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace")[-2000:]
                for p in sorted(self.logs.glob("*.log"))}


# --------------------------------------------------------------------------- Kafka reads


class LagReader:
    """The worker's and the sink's lag, as `quotaflow.streams.lag.LagProbe` counts it
    (end offsets minus committed offsets), with short Kafka timeouts so that a poll
    during trouble returns (or raises) within seconds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: KafkaAdminClient | None = None
        self._consumer: KafkaConsumer | None = None

    def _open(self) -> tuple[KafkaAdminClient, KafkaConsumer]:
        if self._admin is None or self._consumer is None:
            self.close()
            boot = self.settings.kafka_bootstrap
            self._admin = KafkaAdminClient(bootstrap_servers=boot, client_id="chaos-lag",
                                           request_timeout_ms=10_000)
            self._consumer = KafkaConsumer(bootstrap_servers=boot, client_id="chaos-lag",
                                           request_timeout_ms=12_000)
        return self._admin, self._consumer

    def _behind(self, topic: str, group: str) -> int:
        admin, consumer = self._open()
        parts = [TopicPartition(topic, p) for p in range(self.settings.partitions)]
        ends = consumer.end_offsets(parts)
        committed = admin.list_group_offsets({group: parts}).get(group, {})
        total = 0
        for tp in parts:
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else 0
            total += max(ends.get(tp, 0) - done, 0)
        return total

    def lag(self) -> tuple[int, int] | None:
        """(raw, totals) messages not yet handled; None while Kafka does not answer."""
        s = self.settings
        try:
            raw = self._behind(s.topics.raw, s.topics.worker_group)
            totals = self._behind(s.topics.totals, s.topics.influx_sink_group)
            if raw == 0 and totals == 0:  # raw first: draining it adds totals
                raw = self._behind(s.topics.raw, s.topics.worker_group)
            return raw, totals
        except Exception:
            self.close()
            return None

    def close(self) -> None:
        for client in (self._admin, self._consumer):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self._admin = self._consumer = None


@dataclass
class Letter:
    """One record of `<prefix>.dead`, with where it sits."""

    partition: int
    offset: int
    reason: str
    detail: str
    source: tuple[str, int, int] | None  # topic, partition, offset of the message refused
    payload_len: int
    readings: list[dict[str, Any]]
    size: int
    payload_sha256: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # size, sha256, truncated if given
    parse_error: str | None = None


def read_dead(settings: Settings, timeout: float = 60.0) -> list[Letter]:
    """Every record of `<prefix>.dead`, read from the start to the current end."""
    import base64
    import hashlib

    import orjson

    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, client_id="chaos-dead",
        enable_auto_commit=False, group_id=None, request_timeout_ms=30_000,
        max_partition_fetch_bytes=64 * 2**20, fetch_max_bytes=64 * 2**20,
    )
    out: list[Letter] = []
    try:
        parts = [TopicPartition(settings.topics.dead, p) for p in range(settings.partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {settings.topics.dead} took over {timeout}s")
            for tp, records in consumer.poll(timeout_ms=1000).items():
                for rec in records:
                    value = rec.value or b""
                    try:
                        raw = orjson.loads(value)
                        payload = base64.b64decode(raw.get("payload") or "")
                        out.append(Letter(
                            tp.partition, rec.offset, str(raw.get("reason")),
                            str(raw.get("detail", "")),
                            (raw.get("topic"), raw.get("partition"), raw.get("offset")),
                            len(payload), list(raw.get("readings") or []), len(value),
                            hashlib.sha256(payload).hexdigest(),
                            {k: raw[k] for k in ("size", "sha256", "truncated") if k in raw},
                        ))
                    except Exception as exc:
                        out.append(Letter(tp.partition, rec.offset, "?", "", None, 0, [],
                                          len(value), parse_error=repr(exc)[:200]))
    finally:
        consumer.close()
    return out


def dead_summary(letters: list[Letter]) -> dict[str, Any]:
    """Counts by reason; distinct = distinct refused source messages per reason."""
    distinct = {(d.reason, d.source) for d in letters}
    return {
        "records": len(letters),
        "distinct": len(distinct),
        "by_reason": dict(Tally(d.reason for d in letters)),
        "duplicates": len(letters) - len(distinct),
        "empty_detail": sum(1 for d in letters if not d.detail),
    }


# --------------------------------------------------------------------------- InfluxDB


def read_daily(settings: Settings, timeout: float = 300.0, by_day: bool = True) -> Truth:
    """Every `traffic_daily` total of the row's database; days summed if not `by_day`."""
    client = InfluxQL(settings.influx_url, settings.influx_bucket, timeout=timeout)
    try:
        series = client.query(
            "SELECT up_bytes, down_bytes FROM traffic_daily GROUP BY user_id, node_id")
    except InfluxQLError as exc:
        if "database not found" in str(exc):
            return {}
        raise
    out: dict[DayKey, list[int]] = {}
    for s in series:
        for r in s.rows:
            day = UTC_CALENDAR.label(int(r["time"]), "day") if by_day else "*"
            total = out.setdefault((s.tags["user_id"], s.tags["node_id"], day), [0, 0])
            total[0] += int(r["up_bytes"])
            total[1] += int(r["down_bytes"])
    return {k: (v[0], v[1]) for k, v in out.items()}


def total_bytes(truth: Mapping[DayKey, tuple[int, int]]) -> int:
    return sum(up + down for up, down in truth.values())


@dataclass
class Recovery:
    """How waiting for the pipeline to hold the expected totals ended."""

    seconds: float | None  # from the end of the fault until lag 0 and InfluxDB exact
    lag: tuple[int, int] | None
    check: CheckResult | None
    found: Truth = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return self.check is not None and self.check.exact

    def mismatch_notes(self, limit: int = 6) -> list[str]:
        if self.check is None:
            return ["InfluxDB was never read: the lag never reached zero"]
        return [f"{key}: expected {want}, InfluxDB {got}"
                for key, want, got in self.check.mismatched[:limit]]


def wait_recovered(
    pipeline: Pipeline | None,
    settings: Settings,
    expected: Truth,
    since: float,
    timeout: float,
    *,
    by_day: bool = True,
    settle_s: float = 45.0,
    on_poll: Callable[[], None] | None = None,
) -> Recovery:
    """Poll until the lag is zero and InfluxDB holds exactly `expected`, or give up.

    `since` (monotonic) is the end of the fault. A pipeline process that exits is
    started again (as a supervisor would). When the lag stays zero but InfluxDB
    differs for `settle_s`, waiting longer would not help: the mismatch is returned.
    """
    reader = LagReader(settings)
    deadline = since + timeout
    lag: tuple[int, int] | None = None
    check: CheckResult | None = None
    found: Truth = {}
    wrong_since: float | None = None
    try:
        while True:
            if pipeline is not None:
                pipeline.restart_exited()
            if on_poll is not None:
                on_poll()
            lag = reader.lag()
            now = time.monotonic()
            if lag == (0, 0):
                try:
                    found = read_daily(settings, by_day=by_day)
                except Exception as exc:  # InfluxDB not back yet
                    say(f"  reading InfluxDB failed: {exc}")
                    found = {}
                check = compare(expected, found)
                if check.exact:
                    return Recovery(time.monotonic() - since, lag, check, found)
                wrong_since = wrong_since or now
                if now - wrong_since > settle_s:
                    return Recovery(None, lag, check, found)
            else:
                wrong_since = None
            if now > deadline:
                return Recovery(None, lag, check, found)
            time.sleep(1.0 if lag == (0, 0) else 0.5)
    finally:
        reader.close()


def free_port() -> int:
    from quotaflow.dev.local import free_ports

    return free_ports(1)[0]

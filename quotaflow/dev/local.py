"""Real Kafka (KRaft) and InfluxDB 1.8 on loopback, for the demo and the integration tests.

Nothing is mocked and nothing needs docker: `install()` resolves the Kafka jars with Maven
(from the `pom.xml` template shipped with this package) and builds `influxd` with
`go install`, both into a cache
directory; `up()` starts one single-node broker and one InfluxDB on free loopback ports,
in a fresh run directory, as detached processes, and records them in a state file so that
`status()` and `down()` work from any other process (`quotaflow local up` in one shell,
`quotaflow local down` in another).

Locations, each overridable by an environment variable:

* cache (jars, `influxd`, default run dirs): `~/.cache/quotaflow`, `QUOTAFLOW_CACHE_DIR`;
* state (the state file of the running services): `~/.cache/quotaflow/local`,
  `QUOTAFLOW_LOCAL_DIR`, or the `state_dir` argument (tests pass a tmp dir, so several
  sessions run side by side).

`up()` also creates the InfluxDB database named by `QUOTAFLOW_INFLUX_BUCKET` (default
`quotaflow`); `QUOTAFLOW_KAFKA_JVM_OPTS` replaces the broker's JVM options.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Literal

__all__ = [
    "INFLUXDB_VERSION",
    "LocalServices",
    "LocalServicesError",
    "down",
    "install",
    "kafka_version",
    "start_kafka",
    "status",
    "stop_kafka",
    "up",
]

INFLUXDB_VERSION = "1.8.10"
"""The InfluxDB release `install()` builds."""

_INFLUXD_MODULE = "github.com/influxdata/influxdb/cmd/influxd"
_TEMPLATES = resources.files(__package__) / "templates"  # package data
_STATE_FILE = "state.json"
# C1 only: starts about twice as fast on a busy 2-core box; set QUOTAFLOW_KAFKA_JVM_OPTS
# without it (C2) for long throughput benchmarks.
_KAFKA_JVM_OPTS = "-Xmx768m -Xms128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1"
_STOP_TIMEOUT_S = 30.0
# The servers this process started, with their command lines; reaped by `_running`, so no
# zombies linger.
_CHILDREN: dict[int, tuple[subprocess.Popen[bytes], str]] = {}
_STARTED = "--- quotaflow.dev.local started this server"  # opens each start's part of its log


class LocalServicesError(RuntimeError):
    """A step of installing, starting or stopping the local servers failed."""


@dataclass
class LocalServices:
    """One running pair of local servers: where they listen and where their data lives."""

    kafka_bootstrap: str
    influx_url: str
    run_dir: Path
    state_dir: Path
    kafka_port: int
    controller_port: int
    influx_port: int
    influx_rpc_port: int
    kafka_pid: int | None
    influx_pid: int | None
    database: str
    kafka_version: str
    influxd: Path

    def env(self) -> dict[str, str]:
        """The `QUOTAFLOW_*` variables that point quotaflow's settings at these servers.

        InfluxDB 1.8 runs without auth: the v2 client API wants an org and token, any will do.
        """
        return {
            "QUOTAFLOW_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "QUOTAFLOW_INFLUX_URL": self.influx_url,
            "QUOTAFLOW_INFLUX_ORG": "-",
            "QUOTAFLOW_INFLUX_TOKEN": "",
        }

    def stop_kafka(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Stop the broker but keep its data and port, to simulate a Kafka outage."""
        self._stop("kafka", timeout)

    def start_kafka(self, timeout: float = 60.0) -> None:
        """Start the broker again on the same port with the same data (no-op if it runs)."""
        self._start("kafka", timeout)

    def stop_influx(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Stop InfluxDB but keep its data and port, to simulate an InfluxDB outage."""
        self._stop("influx", timeout)

    def start_influx(self, timeout: float = 60.0) -> None:
        """Start InfluxDB again on the same port with the same data (no-op if it runs)."""
        self._start("influx", timeout)

    def _stop(self, server: Literal["kafka", "influx"], timeout: float) -> None:
        with _locked(self.state_dir):
            self._refresh()
            _stop_pid(getattr(self, f"{server}_pid"), self._marker, timeout)
            setattr(self, f"{server}_pid", None)
            _save(self)

    def _start(self, server: Literal["kafka", "influx"], timeout: float) -> None:
        with _locked(self.state_dir):
            self._refresh()
            if _alive(getattr(self, f"{server}_pid"), self._marker):
                return
            if server == "kafka":
                self.kafka_pid = _launch_kafka(self)
                _save(self)
                _wait_kafka(self, time.monotonic() + timeout)
            else:
                self.influx_pid = _launch_influx(self)
                _save(self)
                _wait_influx(self, time.monotonic() + timeout)

    def down(self, keep_data: bool = False) -> bool:
        """Stop both servers; see `down()`."""
        return down(self.state_dir, keep_data=keep_data)

    @property
    def _marker(self) -> str:
        return str(self.run_dir)

    def _refresh(self) -> None:
        """Pick up pids another process may have changed in the state file."""
        current = _load(self.state_dir)
        if current is None or current.run_dir != self.run_dir:
            raise LocalServicesError(f"the servers of {self.run_dir} were taken down")
        self.kafka_pid, self.influx_pid = current.kafka_pid, current.influx_pid


# -- public functions ---------------------------------------------------------------------


def kafka_version() -> str:
    """The Kafka release the `pom.xml` template pins."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.fromstring(_pom_text()).find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise LocalServicesError("no <kafka.version> property in the pom.xml template")
    return (node.text or "").strip()


def install(cache_dir: Path | None = None) -> None:
    """Make sure the Kafka jars and `influxd` are in the cache; fast when they already are.

    Runs `mvn dependency:copy-dependencies` and `go install`; never downloads tarballs.
    """
    cache = _cache_dir(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):
        _install_kafka(cache)
        if _find_influxd(cache) is None:
            _build_influxd(cache)


def up(state_dir: Path | None = None, *, timeout: float = 90.0) -> LocalServices:
    """Start Kafka and InfluxDB (installing them first if needed) and wait until both answer.

    Idempotent: if this state location already has servers, they are reused, and a server
    that is down (say after `stop_kafka()`) is restarted on its port with its data.
    """
    sdir = _state_dir(state_dir)
    sdir.mkdir(parents=True, exist_ok=True)
    install()
    with _locked(sdir):
        current = _load(sdir)
        if current is not None:
            try:
                restarted = _ensure_running(current, time.monotonic() + timeout)
                how = f"restarted {' and '.join(restarted)}" if restarted else "reusing"
                _say(f"{how}: Kafka on {current.kafka_bootstrap}, InfluxDB on {current.influx_url}")
                return current
            except LocalServicesError as exc:
                _say(f"previous servers in {current.run_dir} unusable, starting afresh: {exc}")
                _stop_all(current)
                _forget(current, keep_data=True)
        services = _create(
            sdir, explicit=state_dir is not None or "QUOTAFLOW_LOCAL_DIR" in os.environ
        )
        try:
            _ensure_running(services, time.monotonic() + timeout)
        except BaseException:
            _stop_all(services)
            _forget(services, keep_data=True)
            raise
        _say(
            f"Kafka on {services.kafka_bootstrap}, InfluxDB on {services.influx_url}, "
            f"data in {services.run_dir}"
        )
        return services


def down(state_dir: Path | None = None, *, keep_data: bool = False) -> bool:
    """Stop what `up()` started (SIGTERM, then SIGKILL) and remove the state file.

    The run directory (data and logs) is deleted too unless `keep_data` is true.
    Returns whether there was anything to stop.
    """
    sdir = _state_dir(state_dir)
    if not sdir.is_dir():
        return False
    with _locked(sdir):
        services = _load(sdir)
        if services is None:
            return False
        _stop_all(services)
        _forget(services, keep_data=keep_data)
        _say(f"stopped Kafka and InfluxDB of {services.run_dir}")
        return True


def status(state_dir: Path | None = None) -> dict[str, Any]:
    """What runs where and whether it answers, as a JSON-ready dict."""
    sdir = _state_dir(state_dir)
    services = _load(sdir) if sdir.is_dir() else None
    if services is None:
        return {"state_dir": str(sdir), "running": False}
    marker = services._marker
    kafka_alive = _alive(services.kafka_pid, marker)
    influx_alive = _alive(services.influx_pid, marker)
    kafka_ok = kafka_alive and _kafka_answers(services.kafka_bootstrap, timeout_ms=3000)
    influx_ok = influx_alive and _influx_answers(services.influx_url)
    return {
        "state_dir": str(sdir),
        "running": kafka_ok and influx_ok,
        "run_dir": str(services.run_dir),
        "kafka": {
            "bootstrap": services.kafka_bootstrap,
            "version": services.kafka_version,
            "pid": services.kafka_pid,
            "alive": kafka_alive,
            "answers": kafka_ok,
            "log": str(services.run_dir / "kafka.log"),
        },
        "influx": {
            "url": services.influx_url,
            "database": services.database,
            "binary": str(services.influxd),
            "pid": services.influx_pid,
            "alive": influx_alive,
            "answers": influx_ok,
            "log": str(services.run_dir / "influxd.log"),
        },
        "env": services.env(),
    }


def stop_kafka(state_dir: Path | None = None, timeout: float = _STOP_TIMEOUT_S) -> None:
    """Stop the broker of the services at `state_dir`, keeping its port and data."""
    _require(state_dir).stop_kafka(timeout)


def start_kafka(state_dir: Path | None = None, timeout: float = 60.0) -> None:
    """Start the broker of the services at `state_dir` again, on the same port and data."""
    _require(state_dir).start_kafka(timeout)


# -- locations and state ------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"quotaflow.dev.local: {message}", file=sys.stderr, flush=True)


def _cache_dir(override: Path | None = None) -> Path:
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("QUOTAFLOW_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quotaflow"


def _state_dir(override: Path | None = None) -> Path:
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("QUOTAFLOW_LOCAL_DIR")
    return Path(env).expanduser() if env else _cache_dir() / "local"


def _pom_text() -> str:
    return (_TEMPLATES / "pom.xml").read_text()


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise installs and state changes across processes (flock on a lock file)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _save(services: LocalServices) -> None:
    data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(services).items()}
    target = services.state_dir / _STATE_FILE
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, target)


def _load(sdir: Path) -> LocalServices | None:
    try:
        data = json.loads((sdir / _STATE_FILE).read_text())
        paths = {f.name for f in fields(LocalServices) if f.type in ("Path", Path)}
        data = {k: Path(v) if k in paths else v for k, v in data.items()}
        data["state_dir"] = sdir
        return LocalServices(**data)
    except (OSError, ValueError, TypeError):
        return None


def _require(state_dir: Path | None) -> LocalServices:
    services = _load(_state_dir(state_dir))
    if services is None:
        raise LocalServicesError(f"no local servers recorded in {_state_dir(state_dir)}")
    return services


def _forget(services: LocalServices, keep_data: bool) -> None:
    (services.state_dir / _STATE_FILE).unlink(missing_ok=True)
    if not keep_data and services.run_dir.parent.name == "runs":
        shutil.rmtree(services.run_dir, ignore_errors=True)


# -- install ------------------------------------------------------------------------------


def _run(
    step: str,
    cmd: list[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 1800.0,
) -> None:
    """Run one install step with its output in `log`; raise with the log's tail if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "wb") as out:
            rc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                timeout=timeout,
                check=False,
            ).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalServicesError(f"{step} failed: {exc}") from exc
    if rc != 0:
        raise LocalServicesError(f"{step} failed (exit {rc}); end of {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of `path`, from the last `_STARTED` line on if it has one.

    A server started again appends to its log: what comes before that line is the
    previous process's, and must not pass for the reason the new one failed.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    start = text.rfind(_STARTED)
    return "\n".join((text[start:] if start >= 0 else text).splitlines()[-lines:])


def _kafka_libs(cache: Path) -> Path:
    return cache / f"kafka-{kafka_version()}" / "libs"


def _install_kafka(cache: Path) -> None:
    libs = _kafka_libs(cache)
    digest = hashlib.sha256(_pom_text().encode()).hexdigest()
    marker = libs.parent / ".pom-sha256"
    if libs.is_dir() and marker.is_file() and marker.read_text().strip() == digest:
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalServicesError("resolving the Kafka jars failed: `mvn` is not on PATH")
    _say(f"resolving Kafka {kafka_version()} jars with Maven into {libs}")
    staging = libs.with_name("libs.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (libs.parent / "pom.xml").write_text(_pom_text())
    started = time.monotonic()
    _run(
        "resolving the Kafka jars (mvn dependency:copy-dependencies)",
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(libs.parent / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ],
        log=cache / "log" / "mvn.log",
        cwd=libs.parent,
    )
    if not any(staging.glob("kafka_2.13-*.jar")):
        raise LocalServicesError(f"Maven resolved no kafka_2.13 jar into {staging}")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    marker.write_text(digest + "\n")
    _say(f"Kafka jars ready ({len(list(libs.iterdir()))} jars, {time.monotonic() - started:.0f} s)")


def _find_influxd(cache: Path) -> Path | None:
    """Our own `go install` build of influxd, if it is in the cache."""
    own = cache / "bin" / "influxd"
    return own if _executable(own) else None


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _build_influxd(cache: Path) -> None:
    go = shutil.which("go")
    if go is None:
        raise LocalServicesError("building influxd failed: `go` is not on PATH")
    _say(f"building influxd {INFLUXDB_VERSION} with `go install` (a few minutes the first time)")
    env = dict(os.environ)
    env.update(
        GOPATH=str(cache / "go"),
        GOBIN=str(cache / "bin"),
        CGO_ENABLED="0",
        GOFLAGS=f"{env.get('GOFLAGS', '')} -modcacherw".strip(),
    )
    started = time.monotonic()
    _run(
        f"building influxd (go install {_INFLUXD_MODULE}@v{INFLUXDB_VERSION})",
        [
            go,
            "install",
            f"-ldflags=-X main.version={INFLUXDB_VERSION}",
            f"{_INFLUXD_MODULE}@v{INFLUXDB_VERSION}",
        ],
        log=cache / "log" / "influxd-build.log",
        env=env,
        cwd=cache,
    )
    _say(f"influxd built ({time.monotonic() - started:.0f} s)")


# -- start and stop -----------------------------------------------------------------------


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()


def free_ports(count: int, kind: int = socket.SOCK_STREAM) -> list[int]:
    """Free loopback ports below the kernel's ephemeral range, all distinct, and none
    handed out before by this process.

    A port from the ephemeral range can be taken between the moment it is found
    free and the moment a server binds it: the kernel gives those ports to
    outgoing connections. The servers here are also stopped and started again on
    their ports to test outages while clients keep reconnecting, and a client
    can be given that very port as its own, connect to itself and hold it.
    """
    high = max(_ephemeral_low(), 12_000)
    ports: list[int] = []
    for port in random.sample(range(10_000, high), high - 10_000):
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        _handed_out.add(port)
        if len(ports) == count:
            return ports
    raise LocalServicesError(f"no {count} free loopback ports below {high}")


def _kafka_cluster_id() -> str:
    """A random Kafka `Uuid` string, as `kafka-storage.sh random-uuid` prints (no JVM needed)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def _create(sdir: Path, explicit: bool) -> LocalServices:
    """Lay out a fresh run directory: configs, formatted Kafka storage and the state file."""
    cache = _cache_dir()
    influxd = _find_influxd(cache)
    if influxd is None:  # install() just ran, so this means another process removed it
        raise LocalServicesError(f"no influxd in {cache / 'bin'}")
    run_dir = _new_run_dir((sdir if explicit else cache) / "runs")
    kafka_port, controller_port, influx_port, rpc_port = free_ports(4)
    services = LocalServices(
        kafka_bootstrap=f"127.0.0.1:{kafka_port}",
        influx_url=f"http://127.0.0.1:{influx_port}",
        run_dir=run_dir,
        state_dir=sdir,
        kafka_port=kafka_port,
        controller_port=controller_port,
        influx_port=influx_port,
        influx_rpc_port=rpc_port,
        kafka_pid=None,
        influx_pid=None,
        database=os.environ.get("QUOTAFLOW_INFLUX_BUCKET", "quotaflow").split("/")[0],
        kafka_version=kafka_version(),
        influxd=influxd,
    )
    try:
        _lay_out(services)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    _save(services)
    return services


def _new_run_dir(runs: Path) -> Path:
    """`runs/<timestamp>-<pid>`, suffixed if this process already made one this second."""
    runs.mkdir(parents=True, exist_ok=True)
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for attempt in range(1, 1000):
        run_dir = runs / (base if attempt == 1 else f"{base}-{attempt}")
        with contextlib.suppress(FileExistsError):
            run_dir.mkdir()
            return run_dir
    raise LocalServicesError(f"cannot create a run directory in {runs}")


def _lay_out(services: LocalServices) -> None:
    """Write the configs of one run and format its Kafka storage."""
    run_dir = services.run_dir
    _render(
        "server.properties",
        run_dir / "server.properties",
        kafka_port=services.kafka_port,
        controller_port=services.controller_port,
        data_dir=run_dir / "kafka",
    )
    _render(
        "influxdb.conf",
        run_dir / "influxdb.conf",
        rpc_port=services.influx_rpc_port,
        http_port=services.influx_port,
        influx_dir=run_dir / "influxdb",
    )
    (run_dir / "log4j2.properties").write_text((_TEMPLATES / "log4j2.properties").read_text())
    _run(
        "formatting the Kafka storage (kafka.tools.StorageTool format)",
        [
            *_java_cmd(run_dir),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _kafka_cluster_id(),
            "-c",
            str(run_dir / "server.properties"),
        ],
        log=run_dir / "kafka-format.log",
        cwd=run_dir,
        timeout=120,
    )


def _render(template: str, target: Path, **values: object) -> None:
    text = Template((_TEMPLATES / template).read_text())
    target.write_text(text.substitute({k: str(v) for k, v in values.items()}))


def _java_cmd(run_dir: Path) -> list[str]:
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if java is None:
        raise LocalServicesError("Kafka needs Java 17 or newer: `java` is not on PATH")
    opts = os.environ.get("QUOTAFLOW_KAFKA_JVM_OPTS", _KAFKA_JVM_OPTS).split()
    return [
        java,
        *opts,
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={run_dir / 'log4j2.properties'}",
        f"-Dquotaflow.run={run_dir}",  # lets `_alive` tell our broker from a reused pid
        "-cp",
        str(_kafka_libs(_cache_dir()) / "*"),
    ]


def _spawn(cmd: list[str], log: Path, cwd: Path, env: Mapping[str, str] | None = None) -> int:
    """Start a detached server (own session, so Ctrl-C in the caller does not reach it)."""
    with open(log, "ab") as out:
        out.write(f"{_STARTED} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = (proc, " ".join(cmd))
    return proc.pid


def _launch_kafka(services: LocalServices) -> int:
    run_dir = services.run_dir
    return _spawn(
        [*_java_cmd(run_dir), "kafka.Kafka", str(run_dir / "server.properties")],
        run_dir / "kafka.log",
        cwd=run_dir,
    )


def _launch_influx(services: LocalServices) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLUXDB_")}
    return _spawn(
        [str(services.influxd), "run", "-config", str(services.run_dir / "influxdb.conf")],
        services.run_dir / "influxd.log",
        cwd=services.run_dir,
        env=env,
    )


def _ensure_running(services: LocalServices, deadline: float) -> list[str]:
    """Start whichever server is not running, wait until both answer; say which were started."""
    started = []
    if not _alive(services.influx_pid, services._marker):
        services.influx_pid = _launch_influx(services)
        started.append("InfluxDB")
        _save(services)
    if not _alive(services.kafka_pid, services._marker):
        services.kafka_pid = _launch_kafka(services)
        started.append("Kafka")
        _save(services)
    _wait_influx(services, deadline)
    _wait_kafka(services, deadline)
    return started


def _wait_kafka(services: LocalServices, deadline: float) -> None:
    log = services.run_dir / "kafka.log"
    while True:
        if not _alive(services.kafka_pid, services._marker):
            raise LocalServicesError(f"Kafka exited while starting; end of {log}:\n{_tail(log)}")
        if _port_open(services.kafka_port) and _kafka_answers(services.kafka_bootstrap):
            return
        if time.monotonic() > deadline:
            raise LocalServicesError(f"Kafka did not answer in time; end of {log}:\n{_tail(log)}")
        time.sleep(0.2)


def _wait_influx(services: LocalServices, deadline: float) -> None:
    log = services.run_dir / "influxd.log"
    while not _influx_answers(services.influx_url):
        if not _alive(services.influx_pid, services._marker):
            raise LocalServicesError(f"influxd exited while starting; end of {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise LocalServicesError(f"influxd did not answer in time; end of {log}:\n{_tail(log)}")
        time.sleep(0.1)
    query = urllib.parse.urlencode({"q": f'CREATE DATABASE "{services.database}"'}).encode()
    with urllib.request.urlopen(f"{services.influx_url}/query", data=query, timeout=10):
        pass


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _kafka_answers(bootstrap: str, timeout_ms: int = 5000) -> bool:
    """Whether the broker serves metadata (a TCP accept alone comes before it is ready)."""
    from kafka import KafkaAdminClient  # imported late: only probes need it

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, client_id="quotaflow-local", request_timeout_ms=timeout_ms
        )
    except Exception:
        return False
    try:
        admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        admin.close()


def _influx_answers(url: str) -> bool:
    """`/health` (1.8) says 200 when ready; older 1.x only has `/ping` (204)."""
    for path, ok in (("/health", 200), ("/ping", 204)):
        try:
            with urllib.request.urlopen(url + path, timeout=2) as response:
                return int(response.status) == ok
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                return False
        except (OSError, ValueError):
            return False
    return False


def _alive(pid: int | None, marker: str) -> bool:
    """Whether `pid` is still our server: started with `marker` in its command line, and
    not yet fully exited (see `_running`).

    For a server this process started, the command line it was given is the proof:
    the one /proc shows is empty while `exec` is still loading the program (a server
    just started would pass for one that exited while starting) and again once an
    exiting process has dropped its memory. A server another process started is told
    by /proc's, so it must be read while the server runs.
    """
    if pid is None:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        return marker in child[1] and _running(pid, None)
    proc = Path("/proc") / str(pid)
    if not proc.parent.is_dir():  # no procfs: trust the pid
        return _running(pid, None)
    try:
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline and _running(pid, _started_at(pid))


def _started_at(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot): tells it from a later process given the
    same pid."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int, started: str | None) -> bool:
    """Whether a thread of `pid` (which started at `started`) has not exited yet.

    A process holds its files (a data directory's lock) and listening ports until its
    last thread has exited, and its first thread can be a zombie long before: "not a
    zombie" is not "gone". A child of this process is gone once `waitpid` reports it
    (which it does only then); it is reaped here, so no zombies linger.
    """
    child = _CHILDREN.get(pid)
    if child is not None:
        if child[0].poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    proc = Path("/proc") / str(pid)
    if not proc.parent.is_dir():
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    if _started_at(pid) != started:
        return False
    try:
        tasks = list((proc / "task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, IndexError):
            continue  # that thread is gone
        if state not in ("Z", "X"):
            return True
    return False


def _stop_pid(pid: int | None, marker: str, timeout: float) -> None:
    """SIGTERM the server's process group, wait up to `timeout`, then SIGKILL it; return once
    the server has fully exited (so its port and data directory are free)."""
    if not _alive(pid, marker):
        return
    assert pid is not None
    # Known to be ours now; from here on it is followed by pid and start time, as an
    # exiting server's command line is empty.
    started = _started_at(pid)
    _signal(pid, signal.SIGTERM)
    deadline, killed = time.monotonic() + timeout, False
    while _running(pid, started):
        if time.monotonic() > deadline:
            if killed:
                raise LocalServicesError(f"pid {pid} survived SIGKILL")
            _signal(pid, signal.SIGKILL)
            deadline, killed = time.monotonic() + 10, True
        time.sleep(0.1)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:  # we started it as a session leader: reach its children too
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _stop_all(services: LocalServices) -> None:
    _stop_pid(services.kafka_pid, services._marker, _STOP_TIMEOUT_S)
    _stop_pid(services.influx_pid, services._marker, _STOP_TIMEOUT_S)
    services.kafka_pid = services.influx_pid = None

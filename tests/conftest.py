"""Session fixtures: real Kafka and InfluxDB on loopback, and a pipeline per test.

The servers are the ones `quotaflow local up` runs, started once per session in a
temporary directory. Set QUOTAFLOW_TEST_EXTERNAL=1 (with QUOTAFLOW_KAFKA_BOOTSTRAP
and QUOTAFLOW_INFLUX_URL) to run the integration tests against servers you run.
Every test gets its own topic prefix and database, so tests never see each
other's data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from quotaflow.core.settings import Settings


@dataclass
class ExternalServices:
    """Servers someone else runs; they cannot be stopped from here."""

    kafka_bootstrap: str
    influx_url: str

    def stop_kafka(self) -> None:
        pytest.fail("QUOTAFLOW_TEST_EXTERNAL: cannot stop an external Kafka")

    def start_kafka(self) -> None:
        pytest.fail("QUOTAFLOW_TEST_EXTERNAL: cannot start an external Kafka")

    def stop_influx(self) -> None:
        pytest.fail("QUOTAFLOW_TEST_EXTERNAL: cannot stop an external InfluxDB")

    def start_influx(self) -> None:
        pytest.fail("QUOTAFLOW_TEST_EXTERNAL: cannot start an external InfluxDB")


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Kafka and InfluxDB for this session."""
    if os.environ.get("QUOTAFLOW_TEST_EXTERNAL") == "1":
        yield ExternalServices(
            os.environ["QUOTAFLOW_KAFKA_BOOTSTRAP"], os.environ["QUOTAFLOW_INFLUX_URL"]
        )
        return
    from quotaflow.dev import local

    state = tmp_path_factory.mktemp("local-services")
    running = local.up(state_dir=state)
    try:
        yield running
    finally:
        local.down(state_dir=state)


@pytest.fixture
def settings(services: Any, tmp_path: Path) -> Settings:
    """Settings with a topic prefix and database of this test's own."""
    tag = uuid.uuid4().hex[:10]
    return Settings(
        kafka_bootstrap=services.kafka_bootstrap,
        influx_url=services.influx_url,
        topic_prefix=f"test-{tag}",
        influx_bucket=f"test_{tag}",
        partitions=4,
        state_dir=tmp_path / "state",
        sink_flush_interval_s=0.5,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a `quotaflow` subprocess use these settings."""
    return {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}


@dataclass
class Pipeline:
    """The worker and the InfluxDB sink as real subprocesses, as `quotaflow run` starts them."""

    settings: Settings
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str) -> None:
        """Start `worker` or `sink` (again)."""
        args = ["worker", "--loglevel", "INFO"] if name == "worker" else ["sink", "influx"]
        log = (self.logs / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "quotaflow", *args],
            env=settings_env(self.settings), stdout=log, stderr=subprocess.STDOUT,
        )

    def kill(self, name: str) -> None:
        """SIGKILL one process, as a crash would."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def terminate(self, name: str, timeout_s: float) -> int:
        """SIGTERM one process, as systemd stops it; its exit status, which must come
        within `timeout_s`."""
        process = self.processes.pop(name)
        process.terminate()
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            log = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"{name} did not stop within {timeout_s:.0f} s of SIGTERM: {log}")

    def stop(self) -> None:
        """Stop everything still running."""
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

    def restart_exited(self) -> None:
        """Start again what exited, as `quotaflow run` or systemd would."""
        for name, process in list(self.processes.items()):
            if process.poll() is not None:
                self.start(name)

    def wait(self, timeout_s: float = 180.0) -> None:
        """Block until everything published before the call is in InfluxDB; fail with the
        logs if not."""
        import time

        from quotaflow.streams.lag import LagProbe

        probe = LagProbe(self.settings)
        deadline = time.monotonic() + timeout_s
        try:
            mark = probe.mark()  # what was published before this call
            while True:
                self.restart_exited()
                lag = probe.wait_until_done(
                    min(5.0, max(deadline - time.monotonic(), 0.0)), mark=mark)
                if lag.done or time.monotonic() >= deadline:
                    break
        finally:
            probe.close()
        if not lag.done:
            tails = {
                p.name: p.read_text(errors="replace")[-3000:] for p in self.logs.glob("*.log")
            }
            pytest.fail(f"pipeline did not catch up: {lag}; logs: {tails}")


@pytest.fixture
def pipeline(settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    """A running worker and InfluxDB sink for this test's settings."""
    from quotaflow.admin import ensure_topics

    ensure_topics(settings)
    running = Pipeline(settings, tmp_path)
    running.start("worker")
    running.start("sink")
    try:
        yield running
    finally:
        running.stop()

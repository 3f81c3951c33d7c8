"""`[enforce]` in agent.toml: the node agent applies quota commands, on real Kafka.

The backend is the recording one of `test_consumer.py` (what it applied, in a
folder); the agent, its outbox, its collectors and Kafka are real. Checked: the
counter snapshot of a disable is taken and stored before the user is removed (and
reaches Kafka even when the agent is SIGKILLed right after applying), the command
acts once across that kill, and a bad `[enforce]` stops the agent with status 78.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from quotaflow.core.contracts import Counter, CounterReport
from quotaflow.core.settings import Settings
from quotaflow.producers.agent import Agent, AgentConfig, load_config, run_agent, run_push_receiver
from quotaflow.producers.enforce.backends import BACKENDS
from quotaflow.producers.sources import Snapshot
from tests.producers.enforce.test_consumer import (
    MODULE,
    ROOT,
    Control,
    read_log,
    state_of,
)

THIS = "tests.producers.enforce.test_agent_enforce"


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BACKENDS, "recording", MODULE)


@pytest.fixture
def control(settings: Settings) -> Any:
    running = Control(settings)
    try:
        yield running
    finally:
        running.close()


def _raw_reports(settings: Settings, node: str) -> list[CounterReport]:
    reader = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(settings.topics.raw, p) for p in range(settings.partitions)]
        reader.assign(tps)
        ends = reader.end_offsets(tps)
        reader.seek_to_beginning()
        found: list[CounterReport] = []
        deadline = time.monotonic() + 30
        while any(reader.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline
            for records in reader.poll(timeout_ms=500).values():
                found += [CounterReport.decode(r.value) for r in records]
        return [r for r in found if r.node_id == node]
    finally:
        reader.close()


class LoggedCollector:
    """alice's counters from a JSON file; every read is logged with the monotonic time."""

    def __init__(self, counters: Path, log: Path) -> None:
        self.counters, self.log = counters, log

    def collect(self) -> Snapshot:
        up, down = json.loads(self.counters.read_text())["alice"]
        with self.log.open("a") as f:
            f.write(json.dumps({"t": time.monotonic(), "up": up}) + "\n")
        return Snapshot(1_761_000_000_000, [Counter(user_id="alice", up=up, down=down)])


@pytest.mark.integration
@pytest.mark.usefixtures("recording")
def test_the_agent_stores_a_counter_snapshot_before_it_disables(
    settings: Settings, control: Control, tmp_path: Path
) -> None:
    folder = tmp_path / "backend"
    counters = tmp_path / "counters.json"
    counters.write_text(json.dumps({"alice": [10, 20]}))
    reads = tmp_path / "reads.log"
    config = AgentConfig.model_validate({
        "node_id": "n1", "outbox": str(tmp_path / "o.db"), "baseline_on_first_start": False,
        "kafka": {"bootstrap": settings.kafka_bootstrap, "topic_prefix": settings.topic_prefix},
        "enforce": {
            "poll_interval_s": 0.2,
            "retry": {"base_s": 0.2, "cap_s": 1.0},
            "backends": [{"type": "recording", "folder": str(folder),
                          "counters": str(counters)}],
        },
    })
    collector = LoggedCollector(counters, reads)
    agent = Agent(config, settings=settings, collectors={"n1": (collector, 3600.0)})
    assert agent.enforcement is not None
    assert agent.enforcement.group == settings.topics.enforce_group("n1")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(agent.run(),))
    thread.start()
    try:
        control.wait(lambda: reads.exists(), why="the first collection")
        enable = control.command("alice", "enable")
        control.publish(enable)
        control.wait(lambda: control.outcomes(enable.command_id) != [], why="the enable")
        assert len(reads.read_text().splitlines()) == 1  # no snapshot for an enable
        counters.write_text(json.dumps({"alice": [500, 900]}))  # alice moved bytes since
        disable = control.command("alice", "disable")
        control.publish(disable)
        control.wait(lambda: control.outcomes(disable.command_id) != [], why="the disable")
    finally:
        loop.call_soon_threadsafe(agent.stop.set)
        thread.join(60)
    assert not thread.is_alive()
    loop.close()
    collected = [json.loads(line) for line in reads.read_text().splitlines()]
    [applied] = read_log(folder)
    assert [c["up"] for c in collected] == [10, 500]
    assert collected[1]["t"] < applied["t"]  # the snapshot before the removal
    assert json.loads(counters.read_text())["alice"] == [0, 0]  # the removal reset them
    assert control.outcomes(disable.command_id) == ["applied"]
    assert [a.node_id for a in control.acks()] == ["n1", "n1"]
    # the snapshot reached Kafka: the bytes up to the removal are billed
    ups = [r.counters[0].up for r in _raw_reports(settings, "n1")]
    assert ups == [10, 500]


@pytest.mark.integration
def test_sigkill_between_applying_and_acknowledging_in_the_agent(
    settings: Settings, control: Control, tmp_path: Path
) -> None:
    folder = tmp_path / "backend"
    counters = tmp_path / "counters.json"
    counters.write_text(json.dumps({"alice": [10, 20]}))
    config = tmp_path / "agent.toml"
    config.write_text(textwrap.dedent(f'''
        node_id = "n1"
        outbox = "{tmp_path / "o.db"}"
        baseline_on_first_start = false
        drain_timeout_s = 5
        [[collectors]]
        type = "command"
        command = ["cat", "{counters}"]
        parser = "json"
        interval_s = 3600
        [enforce]
        poll_interval_s = 0.2
        [enforce.retry]
        base_s = 0.2
        cap_s = 1.0
        [[enforce.backends]]
        type = "recording"
        folder = "{folder}"
        counters = "{counters}"
    '''))
    log = tmp_path / "agent.log"
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    disable = control.command("alice", "disable")

    def start(**extra: str) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen([sys.executable, "-m", THIS, str(config)],
                                    env={**env, **extra}, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=ROOT)

    process = start(QUOTAFLOW_FAULT_KILL_AFTER_APPLY=disable.command_id)
    try:
        control.wait(lambda: len(_raw_reports(settings, "n1")) == 1, why="the first report")
        counters.write_text(json.dumps({"alice": [500, 900]}))
        control.publish(disable)
        assert process.wait(60) == -signal.SIGKILL, log.read_text()[-3000:]
        assert [r["command_id"] for r in read_log(folder)] == [disable.command_id]
        assert control.outcomes(disable.command_id) == []
        process = start()
        control.wait(lambda: control.outcomes(disable.command_id) != [], why="the ack")
        control.wait(lambda: len(_raw_reports(settings, "n1")) >= 2, why="the snapshot")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert [r["command_id"] for r in read_log(folder)] == [disable.command_id]  # acted once
    assert control.outcomes(disable.command_id) == ["already"]
    assert state_of(folder, "alice") == "disabled"
    # the snapshot stored before the removal was in the outbox across the kill
    assert [r.counters[0].up for r in _raw_reports(settings, "n1")][:2] == [10, 500]


# --------------------------------------------------------------------------- config errors


def _agent_toml(tmp_path: Path, enforce: str) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(textwrap.dedent(f'''
        node_id = "n1"
        outbox = "{tmp_path / "o.db"}"
        [kafka]
        bootstrap = "127.0.0.1:9"
        [[collectors]]
        type = "command"
        command = ["echo", "{{}}"]
        parser = "json"
        [push]
        port = 0
        token = "t"
    ''') + textwrap.dedent(enforce))
    return config


def _exit(run: Any, config: Path) -> Any:
    timer = threading.Timer(20, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        run(config)
    except SystemExit as exc:
        return exc.code
    finally:
        timer.cancel()
    return "did not exit"


@pytest.mark.usefixtures("recording")
def test_a_bad_enforce_section_stops_the_agent_with_status_78(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def refusal() -> str:
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
        caplog.clear()
        return lines[-1]

    folder = tmp_path / "backend"
    # a configured user without credentials
    config = _agent_toml(tmp_path, f'''
        [enforce]
        [[enforce.backends]]
        type = "recording"
        folder = "{folder}"
        users = ["alice"]
    ''')
    assert _exit(run_agent, config) == 78
    assert "no credentials" in (line := refusal()) and "alice" in line
    assert _outbox_free(tmp_path)  # the refused agent let go of its outbox
    # a credentials file that is not there
    config.write_text(config.read_text().replace(
        "[enforce]\n", f'[enforce]\ncredentials = "{tmp_path / "missing.toml"}"\n'))
    assert _exit(run_agent, config) == 78
    assert "missing.toml" in refusal()
    # a snapshot naming no collector, and a webhook secret in a bad entry: no value logged
    config = _agent_toml(tmp_path, '''
        [enforce]
        snapshot = ["n2"]
        [[enforce.backends]]
        type = "webhook"
        url = "http://127.0.0.1:9/hook"
        secret = "sekrit-sekrit-sekrit"
    ''')
    assert _exit(run_agent, config) == 78
    assert "n2" in (line := refusal()) and "sekrit" not in line
    config = _agent_toml(tmp_path, '''
        [enforce]
        [[enforce.backends]]
        type = "webhook"
        url = "http://127.0.0.1:9/hook"
        secret = "sekrit-sekrit-sekrit"
        timeout_s = "soon"
    ''')
    assert _exit(run_agent, config) == 78
    assert "timeout_s" in (line := refusal()) and "sekrit" not in line
    assert all("sekrit" not in r.getMessage() for r in caplog.records)
    # the push receiver alone does not enforce: it starts with the same file
    config = _agent_toml(tmp_path, f'''
        [enforce]
        [[enforce.backends]]
        type = "recording"
        folder = "{folder}"
        users = ["alice"]
    ''')
    assert load_config(config).enforce is not None
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert _exit(run_push_receiver, config) in (0, None, "did not exit")


def _outbox_free(tmp_path: Path) -> bool:
    """The refused agent let go of its outbox: another can open it."""
    from quotaflow.producers.outbox import Outbox

    with Outbox(tmp_path / "o.db"):
        return True


if __name__ == "__main__":  # the agent as a process, with the recording backend registered
    BACKENDS["recording"] = MODULE
    run_agent(Path(sys.argv[1]))

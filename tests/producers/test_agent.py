"""The agent: config, stamping and persistence, and exact totals through real Kafka and InfluxDB."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from quotaflow.cli import node as node_cli
from quotaflow.core.contracts import Counter, CounterReport
from quotaflow.core.ledger import BillingPolicy, NodeLedger
from quotaflow.core.settings import Settings
from quotaflow.producers import agent as agent_module
from quotaflow.producers.agent import (
    Agent,
    AgentConfig,
    Sender,
    load_config,
    run_agent,
    run_push_receiver,
)
from quotaflow.producers.outbox import Outbox
from quotaflow.producers.sources import Snapshot, build_collector, parse_counters_json, v2ray
from quotaflow.producers.sources import _runtime as runtime
from quotaflow.producers.sources._runtime import ReadParseCollector
from quotaflow.producers.sources.command import CommandConfig

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = Path(__file__).parent / "sources" / "samples"


class FakeCollector:
    """Counters that grow by known amounts; a constant epoch kept as state."""

    def __init__(self, epoch: int = 1_761_000_000_000, start: int = 0) -> None:
        self.epoch, self.n = epoch, start

    def collect(self) -> Snapshot:
        self.n += 1
        return Snapshot(self.epoch, [Counter(user_id="alice", up=self.n * 10, down=self.n * 100)])

    def state(self) -> Any:
        return {"n": self.n}

    def restore(self, state: Any) -> None:
        self.n = state["n"]


def _config(tmp_path: Path, **extra: Any) -> AgentConfig:
    return AgentConfig.model_validate({"node_id": "n1", "outbox": str(tmp_path / "o.db"), **extra})


def test_example_config_loads() -> None:
    config = load_config(ROOT / "deploy" / "agent" / "agent.example.toml")
    assert [config.node_of(i) for i in range(len(config.collectors))] == [
        "fra-1", "fra-1-wg", "fra-1-ovpn", "fra-1-ss",
    ]
    assert config.push is not None and config.push.upstream == "https://panel.example"
    assert config.push.expected_token("vless-12") == "the-panel-server-token"


def test_config_refuses_two_collectors_on_one_node(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="own node_id"):
        _config(tmp_path, collectors=[
            {"type": "wireguard"}, {"type": "iptables", "chain": "Q"},
        ])
    with pytest.raises(ValidationError):
        _config(tmp_path, collectors=[{"type": "carrier-pigeon"}])


def test_kafka_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTAFLOW_TOPIC_PREFIX", "from-env")
    monkeypatch.setenv("QUOTAFLOW_KAFKA_BOOTSTRAP", "10.0.0.1:9092")
    settings = _config(tmp_path, kafka={"partitions": 8, "topic_prefix": "toml"}).settings()
    assert (settings.kafka_bootstrap, settings.topic_prefix, settings.partitions) == (
        "10.0.0.1:9092", "toml", 8,
    )


def test_stamping_baseline_and_restart(tmp_path: Path) -> None:
    config = _config(tmp_path)
    fake = FakeCollector()
    agent = Agent(config, settings=Settings(), collectors={"n1": (fake, 1.0)})
    before_ms = time.time_ns() // 1_000_000
    agent.collect_once("n1", fake)
    agent.collect_once("n1", fake)
    reports = [r for _, r in agent.outbox.pending()]
    first = reports[0].seq  # an epoch's seqs start at the wall clock in ms (docs/agent.md)
    assert before_ms <= first <= time.time_ns() // 1_000_000
    assert [(r.node_id, r.epoch, r.seq, r.baseline, r.kind) for r in reports] == [
        ("n1", fake.epoch, first, True, "cumulative"),
        ("n1", fake.epoch, first + 1, False, "cumulative"),
    ]
    assert reports[0].observed_at.utcoffset() is not None
    agent.outbox.close()
    # A restart: seq goes on, no new baseline, the collector's state comes back.
    fresh = FakeCollector()
    agent = Agent(config, settings=Settings(), collectors={"n1": (fresh, 1.0)})
    fresh.restore(agent.outbox.get_state("collector:n1"))
    assert fresh.n == 2
    agent.collect_once("n1", fresh)
    last = agent.outbox.pending()[-1][1]
    assert (last.seq, last.baseline, last.counters[0].up) == (first + 2, False, 30)
    agent.outbox.close()


def test_no_baseline_when_configured_or_idle(tmp_path: Path) -> None:
    agent = Agent(_config(tmp_path, baseline_on_first_start=False), settings=Settings(),
                  collectors={})
    agent.collect_once("n1", FakeCollector())
    assert not agent.outbox.pending()[0][1].baseline
    agent.outbox.close()


def test_sender_keeps_reports_while_kafka_is_down(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        agent = Agent(_config(tmp_path), settings=Settings(), collectors={}, outbox=outbox)
        agent.collect_once("n1", FakeCollector())
        sender = Sender(outbox, Settings(kafka_bootstrap="127.0.0.1:9"))  # nothing listens
        assert sender.step() == (0, False)
        assert len(outbox) == 1


class _Acked:
    def get(self, timeout: float | None = None) -> None:
        return None


class _FakePublisher:
    """Kafka that acknowledges everything; remembers what was sent."""

    def __init__(self) -> None:
        self.sent: list[CounterReport] = []

    def publish(self, report: CounterReport) -> list[_Acked]:
        self.sent.append(report)
        return [_Acked()]


def _billed_bytes(reports: list[CounterReport]) -> dict[str, tuple[int, int]]:
    ledger = NodeLedger("p")
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for report in reports:
        for user, up, down in ledger.update(report, BillingPolicy(ZoneInfo("UTC"))).billed:
            out[user][0] += up
            out[user][1] += down
    return {u: (t[0], t[1]) for u, t in out.items()}


def test_compaction_while_the_sender_connects_bills_exactly(tmp_path: Path) -> None:
    """Kafka comes back; while the sender connects, new reports push the outbox over its
    bound and it compacts. The head the sender chose before must not be sent as it was
    and then again, merged, under the same seq (the stream would drop the merged one)."""
    start = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)
    stored: list[CounterReport] = []
    with Outbox(tmp_path / "o.db", max_reports=10) as outbox:

        def push(i: int) -> None:
            report = outbox.record(
                node_id="p", epoch=1, observed_at=start + timedelta(seconds=i), kind="delta",
                counters=[Counter(user_id="alice", up=1, down=i)],
            )
            assert report is not None
            stored.append(report)

        for i in range(10):
            push(i)
        publisher = _FakePublisher()

        class RacingSender(Sender):
            def _connect(self) -> Any:
                if self._publisher is None:
                    for i in range(10, 12):  # a collector thread stores meanwhile
                        push(i)
                    self._publisher = publisher
                return self._publisher

        sender = RacingSender(outbox, Settings())
        for _ in range(20):
            if len(outbox) == 0:
                break
            sender.step()
        assert len(outbox) == 0
        assert outbox.compactions >= 1
        assert _billed_bytes(publisher.sent) == {"alice": (12, sum(range(12)))}
        assert len(stored) == 12


def test_command_collector_json_and_openvpn(tmp_path: Path) -> None:
    counters = tmp_path / "c.json"
    counters.write_text('{"7": [1, 2]}')
    collector = build_collector(CommandConfig(
        type="command", command=["cat", str(counters)], parser="json", user_map={"7": "bob"},
    ))
    snap = collector.collect()
    assert snap.counters == [Counter(user_id="bob", up=1, down=2)]
    assert collector.collect().epoch == snap.epoch  # constant

    ovpn = build_collector(CommandConfig(
        type="command", command=["cat", str(SAMPLES / "openvpn-status-v2.log")], parser="openvpn",
    ))
    first = ovpn.collect()
    assert first.counters
    state = ovpn.state()  # type: ignore[attr-defined]
    idle = tmp_path / "idle.log"
    idle.write_text("".join(
        line for line in (SAMPLES / "openvpn-status-v2.log").read_text().splitlines(True)
        if not line.startswith(("CLIENT_LIST", "ROUTING_TABLE"))
    ))
    again = build_collector(CommandConfig(
        type="command", command=["cat", str(idle)], parser="openvpn",
    ))
    again.restore(json.loads(json.dumps(state)))  # type: ignore[attr-defined]
    after = again.collect()  # every session ended: their bytes stay
    assert (after.epoch, after.counters) == (first.epoch, first.counters)


def test_boot_epoch_ignores_clock_steps_and_grows_on_reboot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """btime in /proc/stat is wall clock minus uptime: an NTP step moves it. The epoch must
    not (a larger one re-bills the whole counters, a smaller one makes every report stale);
    only a reboot starts a new one, and that one is larger even if the clock is behind."""
    btime, boot = [1_761_000_000_000], ["boot-1"]
    monkeypatch.setattr(runtime, "boot_time_ms", lambda: btime[0])
    monkeypatch.setattr(runtime, "boot_id", lambda: boot[0])

    def make() -> ReadParseCollector:
        return ReadParseCollector(lambda: '{"7": [1, 2]}', parse_counters_json, {},
                                  "boot")

    collector = make()
    epoch = collector.collect().epoch
    btime[0] += 7_000  # chrony stepped the clock forward
    assert collector.collect().epoch == epoch
    btime[0] -= 3_600_000  # and back
    assert collector.collect().epoch == epoch
    restarted = make()  # an agent restart, same boot
    restarted.restore(json.loads(json.dumps(collector.state())))
    assert restarted.collect().epoch == epoch
    boot[0] = "boot-2"  # a reboot, with the clock still behind
    rebooted = make()
    rebooted.restore(json.loads(json.dumps(restarted.state())))
    new_epoch = rebooted.collect().epoch
    assert new_epoch > epoch
    btime[0] += 60_000
    assert rebooted.collect().epoch == new_epoch


def test_v2ray_epoch_ignores_clock_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The core's epoch is now - uptime; a wall-clock step must not make it a new epoch
    (that re-bills every user's whole counter), during a run or across agent restarts."""
    wall, mono, uptime = [1_761_000_123_456], [5_000_000], [100]
    monkeypatch.setattr(time, "time_ns", lambda: wall[0] * 1_000_000)
    monkeypatch.setattr(time, "monotonic_ns", lambda: mono[0] * 1_000_000)
    monkeypatch.setattr(v2ray, "boot_id", lambda: "boot-1")

    class FakeCore(v2ray.V2RayStatsClient):
        def sys_stats(self) -> dict[str, int]:
            return {"Uptime": uptime[0]}

        def query_user_counters(self) -> list[Counter]:
            return [Counter(user_id="a@x", up=1, down=2)]

    monkeypatch.setattr(v2ray, "V2RayStatsClient", FakeCore)
    config = v2ray.V2RayConfig(type="v2ray", address="127.0.0.1:1")

    def tick(seconds: int, step_ms: int = 0) -> None:
        wall[0] += seconds * 1000 + step_ms
        mono[0] += seconds * 1000
        uptime[0] += seconds

    collector = v2ray.V2RayCollector(config)
    epoch = collector.collect().epoch
    tick(60)
    assert collector.collect().epoch == epoch
    tick(60, step_ms=30_000)  # NTP stepped the clock 30 s forward
    assert collector.collect().epoch == epoch
    restarted = v2ray.V2RayCollector(config)  # the agent restarts, same boot
    restarted.restore(json.loads(json.dumps(collector.state())))
    tick(60, step_ms=-45_000)
    assert restarted.collect().epoch == epoch
    tick(60)
    uptime[0] = 3  # the core restarted
    assert restarted.collect().epoch > epoch


# --------------------------------------------------------------------------- failures


def _corrupt_error(tmp_path: Path) -> sqlite3.DatabaseError:
    """The error SQLite raises on a damaged file (a half-truncated outbox gives the like)."""
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 512)
    try:
        sqlite3.connect(garbage).execute("SELECT * FROM sqlite_master")
    except sqlite3.DatabaseError as exc:
        return exc
    raise AssertionError("SQLite read garbage")


def _died(caplog: pytest.LogCaptureFixture, what: str) -> logging.LogRecord:
    found = [r for r in caplog.records
             if what in r.getMessage() and r.exc_info and r.levelno >= logging.ERROR]
    assert found, f"no ERROR with a traceback about {what}: {caplog.text}"
    return found[0]


async def test_a_dead_collector_ends_the_agent_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 1: reading the collector's saved state failed outside the collect loop's try;
    the task died without a word while the process and the sender stayed up."""
    agent = Agent(_config(tmp_path), settings=Settings(kafka_bootstrap="127.0.0.1:9"),
                  collectors={"n1": (FakeCollector(), 0.1)})
    error = _corrupt_error(tmp_path)

    def get_state(key: str) -> Any:
        raise error

    monkeypatch.setattr(agent.outbox, "get_state", get_state)
    with caplog.at_level(logging.INFO), pytest.raises(Exception) as failed:
        await asyncio.wait_for(agent.run(), 20)
    assert type(failed.value).__name__ == "AgentFailed", failed.value
    assert _died(caplog, "n1").exc_info[1] is error  # type: ignore[index]


async def test_a_dead_sender_ends_the_agent_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = Agent(_config(tmp_path), settings=Settings(kafka_bootstrap="127.0.0.1:9"),
                  collectors={})
    error = _corrupt_error(tmp_path)

    def step() -> tuple[int, bool]:
        raise error

    monkeypatch.setattr(agent.sender, "step", step)
    with caplog.at_level(logging.INFO), pytest.raises(Exception) as failed:
        await asyncio.wait_for(agent.run(), 20)
    assert type(failed.value).__name__ == "AgentFailed", failed.value
    _died(caplog, "sender")


def _agent_toml(tmp_path: Path, top: str = "", tables: str = "") -> Path:
    counters = tmp_path / "c.json"
    counters.write_text('{"7": [1, 2]}')
    config = tmp_path / "agent.toml"
    config.write_text(textwrap.dedent(f'''
        node_id = "n1"
        outbox = "{tmp_path / "o.db"}"
        drain_timeout_s = 0
        {top}
        [kafka]
        bootstrap = "127.0.0.1:9"
        [[collectors]]
        type = "command"
        command = ["cat", "{counters}"]
        parser = "json"
        interval_s = 0.2
    ''') + textwrap.dedent(tables))
    return config


def _exit_code(run: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `run_agent`-like `run`; SIGTERM after 20 s (before the fix it ran on)."""
    timer = threading.Timer(20, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        run(*args, **kwargs)
    except SystemExit as exc:
        return exc.code
    finally:
        timer.cancel()
    return "did not exit"


def test_run_agent_exits_non_zero_when_a_task_dies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = _corrupt_error(tmp_path)
    real = Outbox.get_state

    def get_state(self: Outbox, key: str) -> Any:
        if key.startswith("collector:"):
            raise error
        return real(self, key)

    monkeypatch.setattr(Outbox, "get_state", get_state)
    code = _exit_code(run_agent, _agent_toml(tmp_path))
    assert isinstance(code, int) and code != 0, code
    _died(caplog, "n1")


def test_a_push_site_that_cannot_start_ends_the_process_non_zero(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _agent_toml(tmp_path, tables=f'''
            [push]
            port = {port}
            token = "t"
        ''')
        code = _exit_code(run_push_receiver, config)
    assert isinstance(code, int) and code != 0, code
    _died(caplog, "push")


# --------------------------------------------------------------------------- a lost outbox


def _lose(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_a_lost_outbox_is_refused_until_reset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 2: a deleted or emptied outbox was taken for a first start: new epoch, a
    baseline, the traffic since the last ack never billed, and only an INFO line."""
    config_path = _agent_toml(tmp_path, top="baseline_on_first_start = false")
    config = load_config(config_path)
    agent = Agent(config, settings=Settings(), collectors={})
    agent.collect_once("n1", FakeCollector())
    agent.outbox.close()
    _lose(config.outbox)
    code = _exit_code(run_agent, config_path)
    assert isinstance(code, int) and code != 0, code
    refusal = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert refusal and str(config.outbox) in refusal[-1].getMessage()
    assert "--reset-outbox" in refusal[-1].getMessage()
    assert not config.outbox.exists()
    config.outbox.write_bytes(b"")  # zero length: the same
    assert _exit_code(run_agent, config_path) not in (0, None, "did not exit")
    # --reset-outbox: a new outbox, and each node's first report is a baseline (its
    # counters hold traffic billed before), even with baseline_on_first_start = false.
    agent = Agent(config, settings=Settings(), collectors={}, reset_outbox=True)
    agent.collect_once("n1", FakeCollector(start=5))
    assert agent.outbox.pending()[0][1].baseline
    agent.outbox.close()
    agent = Agent(config, settings=Settings(), collectors={})  # and then it starts as usual
    agent.outbox.close()


def test_cli_passes_reset_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Path, bool]] = []
    monkeypatch.setattr(
        agent_module, "run_agent",
        lambda path, reset_outbox=False: calls.append(("agent", path, reset_outbox)),
    )
    monkeypatch.setattr(
        agent_module, "run_push_receiver",
        lambda path, reset_outbox=False: calls.append(("push", path, reset_outbox)),
    )
    runner = CliRunner()
    for args in (["agent", "--config", "a.toml", "--reset-outbox"],
                 ["push-receiver", "--config", "a.toml", "--reset-outbox"],
                 ["agent", "--config", "a.toml"]):
        result = runner.invoke(node_cli.app, args)
        assert result.exit_code == 0, result.output
    assert calls == [("agent", Path("a.toml"), True), ("push", Path("a.toml"), True),
                     ("agent", Path("a.toml"), False)]
    help_text = runner.invoke(node_cli.app, ["agent", "--help"]).output
    assert "--reset-outbox" in help_text and "not billed" in " ".join(help_text.split())


# --------------------------------------------------------------------------- a reinstall


def test_a_reinstall_in_the_same_epoch_keeps_billing(tmp_path: Path) -> None:
    """Issue 3: a boot (or core-start) epoch outlives the outbox. After a reinstall seq
    started at 0 again in the same epoch and the stream dropped every report as a
    duplicate until seq passed the old one."""
    config = _config(tmp_path)
    fake = FakeCollector(epoch=1_761_000_000_000)  # the boot's epoch, the same after
    agent = Agent(config, settings=Settings(), collectors={})
    for _ in range(3):
        agent.collect_once("n1", fake)
    before = [r for _, r in agent.outbox.pending()]
    agent.outbox.close()
    for path in tmp_path.iterdir():  # the reinstall wipes /var/lib/quotaflow, marker and all
        path.unlink()
    time.sleep(0.01)  # (a real agent stores far less than one report per ms)
    agent = Agent(config, settings=Settings(), collectors={})
    for _ in range(3):
        agent.collect_once("n1", fake)
    after = [r for _, r in agent.outbox.pending()]
    agent.outbox.close()
    assert {r.epoch for r in after} == {fake.epoch}
    assert min(r.seq for r in after) > max(r.seq for r in before)
    # Billed: 1->3 before; the reinstall's baseline at 4 (3->4 is the reinstall's cost); 4->6.
    assert after[0].baseline and not after[1].baseline
    assert _billed_bytes(before + after) == {"alice": (40, 400)}


# --------------------------------------------------------------------------- integration

FAKE_SOURCE = textwrap.dedent('''
    """A counter source for the agent's command collector: n grows by one per call."""
    import json, os, sys
    folder = sys.argv[1]
    users = int(sys.argv[2])
    path = os.path.join(folder, "n")
    n = int(open(path).read()) if os.path.exists(path) else 0
    if not os.path.exists(os.path.join(folder, "frozen")):
        n += 1
        with open(path + ".tmp", "w") as f:
            f.write(str(n))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    print(json.dumps({f"user-{k}": [n * (k + 1) * 1000, n * (k + 1) * 7919] for k in range(users)}))
''')


class AgentProcess:
    """`python -m quotaflow.producers.agent` with a fake command source, as a real subprocess."""

    def __init__(self, tmp: Path, settings: Settings, users: int, interval_s: float) -> None:
        self.tmp, self.users = tmp, users
        self.source_dir = tmp / "source"
        self.source_dir.mkdir()
        script = tmp / "fake_source.py"
        script.write_text(FAKE_SOURCE)
        self.outbox = tmp / "agent" / "outbox.db"
        self.node = f"agent-{settings.topic_prefix}"
        self.config = tmp / "agent.toml"
        self.config.write_text(textwrap.dedent(f'''
            node_id = "{self.node}"
            outbox = "{self.outbox}"
            baseline_on_first_start = false
            drain_timeout_s = 5
            log_level = "INFO"
            [[collectors]]
            type = "command"
            command = ["{sys.executable}", "{script}", "{self.source_dir}", "{users}"]
            parser = "json"
            interval_s = {interval_s}
        '''))
        self.env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tmp / "agent.log"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "quotaflow.producers.agent", str(self.config)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=60)
        self.process = None

    def wait_calls(self, at_least: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.calls() < at_least:
            assert time.monotonic() < deadline, f"source not polled: {self.log.read_text()}"
            time.sleep(0.2)

    def calls(self) -> int:
        path = self.source_dir / "n"
        return int(path.read_text()) if path.exists() else 0

    def pending(self) -> int:
        if not self.outbox.exists():
            return -1
        with sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM reports").fetchone()[0])

    def freeze_and_drain(self, timeout_s: float = 120.0) -> dict[str, tuple[int, int]]:
        """Stop the source growing; wait until its last reading is in Kafka; the truth."""
        (self.source_dir / "frozen").write_text("")
        # A call that began before the freeze still counts once more: the count is
        # read after it has surely ended, and after a collection of the frozen counters.
        time.sleep(3.0)
        n = self.calls()
        deadline = time.monotonic() + timeout_s
        while self.pending() != 0:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"outbox not drained: {self.log.read_text()}"
            time.sleep(0.5)
        return {f"user-{k}": (n * (k + 1) * 1000, n * (k + 1) * 7919) for k in range(self.users)}


def _billed(settings: Settings, node: str) -> dict[str, tuple[int, int]]:
    from quotaflow.dev.truth_check import read_daily_totals

    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (user, node_id, _day), (up, down) in read_daily_totals(settings).items():
        if node_id == node:
            out[user][0] += up
            out[user][1] += down
    return {u: (t[0], t[1]) for u, t in out.items()}


def _restart_dead(pipeline: Any) -> None:
    for name in ("worker", "sink"):
        process = pipeline.processes.get(name)
        if process is None or process.poll() is not None:
            pipeline.processes.pop(name, None)
            pipeline.start(name)


@pytest.mark.integration
def test_kafka_outage_loses_nothing(
    services: Any, settings: Settings, pipeline: Any, tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path, settings, users=50, interval_s=0.5)
    agent.start()
    try:
        agent.wait_calls(5)
        services.stop_kafka()
        before = agent.calls()
        time.sleep(60)
        assert agent.calls() > before + 60  # it kept collecting
        assert agent.pending() > 60  # and storing
        services.start_kafka()
        _restart_dead(pipeline)
        truth = agent.freeze_and_drain(timeout_s=180)
        agent.signal(signal.SIGTERM)
        _restart_dead(pipeline)
        pipeline.wait(240)
        assert _billed(settings, agent.node) == truth
    finally:
        if agent.process is not None:
            agent.signal(signal.SIGKILL)


@pytest.mark.integration
def test_sigkill_mid_batch_loses_nothing_and_bills_nothing_twice(
    settings: Settings, pipeline: Any, tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path, settings, users=400, interval_s=0.1)
    agent.start()
    try:
        agent.wait_calls(3)
        for pause in (2.0, 1.3, 0.7, 2.9, 0.4):
            time.sleep(pause)
            agent.signal(signal.SIGKILL)
            agent.start()
        truth = agent.freeze_and_drain()
        agent.signal(signal.SIGTERM)
        pipeline.wait(240)
        assert agent.calls() > 20
        assert _billed(settings, agent.node) == truth
    finally:
        if agent.process is not None:
            agent.signal(signal.SIGKILL)

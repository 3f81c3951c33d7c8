"""The enforcement consumer on real Kafka, with a recording backend defined here.

The backend is not what is tested (the real ones have their own tests): it records
what it applied in a folder, keeps each user's state there (so its apply is
idempotent like the real ones), and fails while a `down` file exists, or always
for the users it is told to. Kafka, the consumer's commits, acknowledgements, dead
letters and its SQLite are real; the SIGKILL test runs the consumer as a process
(`python -m tests.producers.enforce.test_consumer enforce.toml`, as `quotaflow enforce`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from typer.testing import CliRunner

from quotaflow.core.contracts import DeadLetter
from quotaflow.core.partitioning import partition_of
from quotaflow.core.plans import Ack, Action, Command, DeadCommand
from quotaflow.core.settings import Settings
from quotaflow.producers.enforce.backends import BACKENDS, Applied, BackendConfigBase, EnforceError
from quotaflow.producers.enforce.credentials import Credentials
from quotaflow.producers.enforce.delivery import example_command

ROOT = Path(__file__).resolve().parents[3]
MODULE = "tests.producers.enforce.test_consumer"


# --------------------------------------------------------------------------- the backend


class Config(BackendConfigBase):
    """`type = "recording"`: a folder to record in, and users it always fails for."""

    type: Literal["recording"]
    folder: Path
    fail_users: tuple[str, ...] = ()
    counters: Path | None = None
    """A JSON file of counters ({"user": [up, down]}) that a disable resets to zero for
    the user, as removing a user does on WireGuard, ss-manager and sing-box."""


class RecordingBackend:
    """Applies commands to files; see the module docstring."""

    name = "recording"

    def __init__(self, config: Config) -> None:
        self.folder = config.folder
        self.users = None if config.users is None else set(config.users)
        self.fail_users = set(config.fail_users)
        self.counters = config.counters
        self.folder.mkdir(parents=True, exist_ok=True)

    def serves(self, user_id: str) -> bool:
        return self.users is None or user_id in self.users

    def apply(self, command: Command) -> Applied:
        if (self.folder / "down").exists() or command.user_id in self.fail_users:
            _log(self.folder, "attempts", command, "failed")
            raise EnforceError(f"{command.user_id}: node unreachable (test)")
        if command.action == "warn":
            _log(self.folder, "applied", command, "applied")
            return Applied("applied", "warned")
        state = self.folder / f"state-{command.user_id}"
        wanted = "disabled" if command.action == "disable" else "enabled"
        now = state.read_text() if state.exists() else "enabled"
        if now == wanted:
            _log(self.folder, "attempts", command, "already")
            return Applied("already", f"{command.user_id} was {wanted}")
        state.write_text(wanted)
        if self.counters is not None and wanted == "disabled":
            counters = json.loads(self.counters.read_text())
            counters[command.user_id] = [0, 0]
            self.counters.write_text(json.dumps(counters))
        _log(self.folder, "applied", command, "applied")
        return Applied("applied", f"{command.user_id} {wanted}")

    def close(self) -> None:
        pass


def build(config: Config, credentials: Credentials) -> RecordingBackend:
    """Refuses configured users without an account (as the real backends do)."""
    missing = [u for u in config.users or () if not credentials.of(u, "openvpn")]
    if missing:
        raise ValueError(f"no credentials for the configured users {', '.join(missing)}")
    return RecordingBackend(config)


def _log(folder: Path, what: str, command: Command, outcome: str) -> None:
    line = {"command_id": command.command_id, "user_id": command.user_id,
            "action": command.action, "outcome": outcome, "t": time.monotonic()}
    with (folder / f"{what}.log").open("a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_log(folder: Path, what: str = "applied") -> list[dict[str, Any]]:
    path = folder / f"{what}.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def state_of(folder: Path, user: str) -> str:
    path = folder / f"state-{user}"
    return path.read_text() if path.exists() else "enabled"


# --------------------------------------------------------------------------- Kafka helpers

pytestmark = pytest.mark.integration


class Control:
    """Publishes commands to `.control` and reads `.control.acks`, `.control.dead`, `.dead`."""

    def __init__(self, settings: Settings) -> None:
        from quotaflow.admin import ensure_topics

        ensure_topics(settings)
        self.settings = settings
        self.topics = settings.topics
        self.producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        self.readers: dict[str, KafkaConsumer] = {}
        self.seen: dict[str, list[bytes]] = {}
        self.n = 0

    def close(self) -> None:
        self.producer.close()
        for reader in self.readers.values():
            reader.close()

    def command(self, user: str, action: Action, command_id: str | None = None,
                at: datetime | None = None) -> Command:
        self.n += 1
        return example_command(
            command_id or f"{action}-{user}-{self.n}", user, action,
            at or datetime.now(UTC) + timedelta(milliseconds=self.n),
        )

    def publish(self, command: Command | bytes, user: str | None = None) -> None:
        value = command if isinstance(command, bytes) else command.encode()
        key = user or (command.user_id if isinstance(command, Command) else "x")
        self.producer.send(
            self.topics.control, key=key.encode(), value=value,
            partition=partition_of(key, self.settings.partitions),
        ).get(10)

    def _read(self, topic: str) -> list[bytes]:
        reader = self.readers.get(topic)
        if reader is None:
            reader = KafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                   enable_auto_commit=False)
            reader.assign([TopicPartition(topic, p) for p in range(self.settings.partitions)])
            reader.seek_to_beginning()
            self.readers[topic] = reader
            self.seen[topic] = []
        for records in reader.poll(timeout_ms=200).values():
            self.seen[topic] += [r.value for r in records]
        return self.seen[topic]

    def acks(self) -> list[Ack]:
        return [Ack.decode(v) for v in self._read(self.topics.control_acks)]

    def dead_commands(self) -> list[DeadCommand]:
        return [DeadCommand.decode(v) for v in self._read(self.topics.control_dead)]

    def dead_letters(self) -> list[DeadLetter]:
        return [DeadLetter.decode(v) for v in self._read(self.topics.dead)]

    def outcomes(self, command_id: str) -> list[str]:
        return [a.outcome for a in self.acks() if a.command_id == command_id]

    def wait(self, what: Callable[[], bool], timeout_s: float = 60.0, why: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not what():
            assert time.monotonic() < deadline, f"timed out waiting for {why or what}"
            time.sleep(0.2)

    def committed(self, group: str) -> dict[int, int | None]:
        reader = KafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, group_id=group,
                               enable_auto_commit=False)
        try:
            return {p: reader.committed(TopicPartition(self.topics.control, p))
                    for p in range(self.settings.partitions)}
        finally:
            reader.close()

    def ends(self) -> dict[int, int]:
        reader = KafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap)
        try:
            tps = [TopicPartition(self.topics.control, p) for p in range(self.settings.partitions)]
            return {tp.partition: offset for tp, offset in reader.end_offsets(tps).items()}
        finally:
            reader.close()


@pytest.fixture
def control(settings: Settings) -> Iterator[Control]:
    running = Control(settings)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> None:
    """`type = "recording"` loads this module's backend."""
    monkeypatch.setitem(BACKENDS, "recording", MODULE)


def enforce_toml(tmp: Path, folder: Path, *, max_attempts: int = 50, base_s: float = 0.2,
                 cap_s: float = 1.0, extra: str = "") -> Path:
    path = tmp / "enforce.toml"
    path.write_text(textwrap.dedent(f'''
        log_level = "INFO"
        [enforce]
        state_file = "{tmp / "enforce.db"}"
        poll_interval_s = 0.2
        [enforce.retry]
        base_s = {base_s}
        cap_s = {cap_s}
        max_attempts = {max_attempts}
        [[enforce.backends]]
        type = "recording"
        folder = "{folder}"
    ''') + textwrap.dedent(extra))
    return path


class InProcess:
    """The consumer in a thread of this process, built from an enforce.toml as centrally."""

    def __init__(self, settings: Settings, config: Path, node_id: str | None = None,
                 before_disable: Callable[[list[str]], None] | None = None) -> None:
        from quotaflow.producers.enforce.consumer import EnforceConsumer, load_central_config

        enforce = load_central_config(config).enforce
        self.consumer = EnforceConsumer.from_config(
            enforce, settings, node_id=node_id, state_file=config.parent / "unused.db",
            before_disable=before_disable,
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.consumer.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


class Process:
    """`python -m tests.producers.enforce.test_consumer enforce.toml`: `quotaflow enforce` with
    the recording backend registered."""

    def __init__(self, settings: Settings, config: Path, log: Path) -> None:
        self.settings, self.config, self.log = settings, config, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", MODULE, str(self.config)],
                env={**os.environ, **self.settings.to_env(), "PYTHONPATH": str(ROOT),
                     "PYTHONUNBUFFERED": "1", **env},
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )

    def wait_exit(self, timeout_s: float = 60) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=timeout_s)
        self.process = None
        return code

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.wait_exit()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


# --------------------------------------------------------------------------- tests


@pytest.mark.usefixtures("recording")
def test_a_command_delivered_twice_acts_once(
    settings: Settings, control: Control, tmp_path: Path
) -> None:
    folder = tmp_path / "backend"
    config = enforce_toml(tmp_path, folder)
    disable = control.command("alice", "disable")
    control.publish(disable)
    control.publish(disable)  # delivered twice, before the consumer reads either
    running = InProcess(settings, config)
    try:
        control.wait(lambda: control.outcomes(disable.command_id) != [], why="the first ack")
        control.publish(disable)  # and once more after it was applied
        control.wait(lambda: len(control.outcomes(disable.command_id)) >= 2, why="second ack")
    finally:
        running.close()
    control.publish(disable)  # a fourth time, for a new process with the same SQLite
    running = InProcess(settings, config)
    try:
        control.wait(lambda: len(control.outcomes(disable.command_id)) >= 3, why="third ack")
    finally:
        running.close()
    assert [r["command_id"] for r in read_log(folder)] == [disable.command_id]
    assert control.outcomes(disable.command_id) == ["applied", "already", "already"]
    assert state_of(folder, "alice") == "disabled"
    ack = control.acks()[0]
    assert (ack.node_id, ack.backend) == ("central", "recording")
    ends = control.ends()
    assert control.committed(settings.topics.enforce_group(None)) == {
        p: (ends[p] or None) for p in ends
    }


def test_sigkill_between_applying_and_acknowledging_acts_once(
    settings: Settings, control: Control, tmp_path: Path
) -> None:
    folder = tmp_path / "backend"
    process = Process(settings, enforce_toml(tmp_path, folder), tmp_path / "enforce.log")
    disable = control.command("alice", "disable")
    try:
        process.start(QUOTAFLOW_FAULT_KILL_AFTER_APPLY=disable.command_id)
        control.publish(disable)
        assert process.wait_exit() == -signal.SIGKILL, process.log.read_text()[-3000:]
        assert [r["command_id"] for r in read_log(folder)] == [disable.command_id]
        time.sleep(1.0)
        assert control.outcomes(disable.command_id) == []  # killed before acknowledging
        process.start()
        control.wait(lambda: control.outcomes(disable.command_id) != [], why="the ack")
        enable = control.command("alice", "enable")  # and it goes on as usual
        control.publish(enable)
        control.wait(lambda: control.outcomes(enable.command_id) != [], why="the enable")
        assert process.stop() == 0
    finally:
        process.kill()
    assert [r["command_id"] for r in read_log(folder)] == [disable.command_id, enable.command_id]
    assert control.outcomes(disable.command_id) == ["already"]
    assert control.outcomes(enable.command_id) == ["applied"]
    assert "already" not in [r["outcome"] for r in read_log(folder, "attempts")]  # not re-run


@pytest.mark.usefixtures("recording")
def test_an_unreachable_node_is_retried_until_it_recovers(
    settings: Settings, control: Control, tmp_path: Path
) -> None:
    folder = tmp_path / "backend"
    folder.mkdir()
    (folder / "down").write_text("")
    running = InProcess(settings, enforce_toml(tmp_path, folder))
    try:
        disable = control.command("alice", "disable")
        control.publish(disable)
        control.wait(lambda: len(read_log(folder, "attempts")) >= 4, why="four failed attempts")
        assert control.outcomes(disable.command_id) == []
        (folder / "down").unlink()
        control.wait(lambda: control.outcomes(disable.command_id) != [], why="the ack")
    finally:
        running.close()
    assert control.outcomes(disable.command_id) == ["applied"]
    assert state_of(folder, "alice") == "disabled"
    assert control.dead_commands() == []
    times = [r["t"] for r in read_log(folder, "attempts")]
    gaps = [b - a for a, b in pairwise(times)]
    assert all(gap >= 0.19 for gap in gaps[:3]) and max(gaps) <= 1.0 + 1.0  # capped at 1 s


@pytest.mark.usefixtures("recording")
def test_a_disable_then_an_enable_while_the_node_is_down_ends_enabled(
    settings: Settings, control: Control, tmp_path: Path
) -> None:
    folder = tmp_path / "backend"
    folder.mkdir()
    (folder / "down").write_text("")
    running = InProcess(settings, enforce_toml(tmp_path, folder))
    try:
        disable, enable = control.command("alice", "disable"), control.command("alice", "enable")
        control.publish(disable)
        control.wait(lambda: len(read_log(folder, "attempts")) >= 2, why="failed attempts")
        control.publish(enable)
        control.wait(lambda: control.outcomes(disable.command_id) != [], why="the skip")
        (folder / "down").unlink()
        control.wait(lambda: control.outcomes(enable.command_id) != [], why="the enable")
    finally:
        running.close()
    assert control.outcomes(disable.command_id) == ["skipped"]
    [skip] = [a for a in control.acks() if a.command_id == disable.command_id]
    assert skip.detail == f"superseded by {enable.command_id} (enable)"
    # the user was never disabled; the enable found it enabled
    assert read_log(folder) == []
    assert control.outcomes(enable.command_id) == ["already"]
    assert state_of(folder, "alice") == "enabled"


@pytest.mark.usefixtures("recording")
def test_a_consumer_back_after_an_outage_applies_the_latest_state_only(
    settings: Settings, control: Control, tmp_path: Path
) -> None:
    folder = tmp_path / "backend"
    history = [control.command(u, a) for u, a in (
        ("alice", "disable"), ("bob", "disable"), ("alice", "enable"), ("bob", "warn"),
        ("alice", "disable"), ("bob", "enable"), ("carol", "disable"),
    )]
    for command in history:  # while no consumer runs
        control.publish(command)
    running = InProcess(settings, enforce_toml(tmp_path, folder), node_id="node-a")
    try:
        control.wait(lambda: len(control.acks()) >= len(history), why="every ack")
    finally:
        running.close()
    applied = [(r["user_id"], r["action"]) for r in read_log(folder)]
    assert sorted(applied) == [("alice", "disable"), ("bob", "warn"), ("carol", "disable")]
    outcomes = {a.command_id: a.outcome for a in control.acks()}
    assert [outcomes[c.command_id] for c in history] == [
        "skipped", "skipped", "skipped", "applied", "applied", "already", "applied",
    ]
    assert {a.node_id for a in control.acks()} == {"node-a"}
    assert (state_of(folder, "alice"), state_of(folder, "bob")) == ("disabled", "enabled")


@pytest.mark.usefixtures("recording")
def test_a_backlog_longer_than_one_poll_is_read_to_its_end_before_applying(
    settings: Settings, control: Control, tmp_path: Path
) -> None:
    """alice's disable and enable are 1500 records apart on her partition: more than one
    poll returns (500), so only reading on to the end finds that the disable is stale."""
    folder = tmp_path / "backend"
    disable = control.command("alice", "disable")
    control.publish(disable)
    for n in range(1500):  # other nodes' users, on alice's partition
        filler = control.command(f"user-{n}", "warn")
        control.producer.send(settings.topics.control, value=filler.encode(),
                              partition=partition_of("alice", settings.partitions))
    control.producer.flush()
    enable = control.command("alice", "enable")
    control.publish(enable)
    config = enforce_toml(tmp_path, folder, extra='''
        users = ["alice"]
    ''')
    _credentials(config)
    running = InProcess(settings, config, node_id="node-a")
    try:
        control.wait(lambda: control.outcomes(enable.command_id) != [], why="the enable")
    finally:
        running.close()
    assert control.outcomes(disable.command_id) == ["skipped"]
    assert control.outcomes(enable.command_id) == ["already"]
    assert read_log(folder) == [] and state_of(folder, "alice") == "enabled"


def _credentials(config: Path) -> None:
    """A credentials file with an account for alice, named in the config's [enforce]."""
    credentials = config.parent / "credentials.toml"
    credentials.write_text('[[accounts]]\nuser_id = "alice"\nbackend = "openvpn"\n'
                           'common_name = "alice"\n')
    config.write_text(config.read_text().replace(
        "[enforce]\n", f'[enforce]\ncredentials = "{credentials}"\n'))


@pytest.mark.usefixtures("recording")
def test_after_n_failures_the_command_is_dead_and_the_consumer_goes_on(
    settings: Settings, control: Control, tmp_path: Path
) -> None:
    folder = tmp_path / "backend"
    config = enforce_toml(tmp_path, folder, max_attempts=3, base_s=0.1, cap_s=0.2, extra='''
        fail_users = ["mallory"]
    ''')
    running = InProcess(settings, config)
    try:
        doomed = control.command("mallory", "disable")
        fine = control.command("alice", "disable")
        control.publish(doomed)
        control.publish(fine)
        control.wait(lambda: control.outcomes(doomed.command_id) != [], why="the failed ack")
        control.wait(lambda: control.dead_commands() != [], why="the dead command")
        control.wait(lambda: control.outcomes(fine.command_id) != [], why="the next command")
        later = control.command("mallory", "enable", at=datetime.now(UTC) + timedelta(hours=1))
        control.publish(later)  # the consumer is not stuck on mallory either
        control.wait(lambda: control.outcomes(later.command_id) != [], why="a later command")
        time.sleep(1.0)  # commits
    finally:
        running.close()
    [dead] = [d for d in control.dead_commands() if d.command.command_id == doomed.command_id]
    assert (dead.attempts, dead.backend, dead.node_id) == (3, "recording", "central")
    assert "node unreachable" in dead.reason and dead.command == Command.decode(doomed.encode())
    [failed] = [a for a in control.acks() if a.command_id == doomed.command_id]
    assert failed.outcome == "failed" and "gave up after 3 attempts" in failed.detail
    assert control.outcomes(fine.command_id) == ["applied"]
    assert len(read_log(folder, "attempts")) == 3 + 3  # three for each mallory command
    ends = control.ends()
    assert control.committed(settings.topics.enforce_group(None)) == {
        p: (ends[p] or None) for p in ends
    }


@pytest.mark.usefixtures("recording")
def test_before_disable_is_called_before_the_disable_is_applied(
    settings: Settings, control: Control, tmp_path: Path
) -> None:
    folder = tmp_path / "backend"
    calls: list[tuple[str, Any]] = []
    failing = [True]

    def before_disable(users: list[str]) -> None:
        calls.append(("snapshot", users))
        if failing[0]:  # the first snapshot fails: the disable waits and is retried
            failing[0] = False
            raise OSError("collector unreachable")

    running = InProcess(settings, enforce_toml(tmp_path, folder), node_id="node-a",
                        before_disable=before_disable)
    try:
        enable = control.command("bob", "enable")
        control.publish(enable)
        control.wait(lambda: control.outcomes(enable.command_id) != [], why="the enable")
        assert calls == []  # no snapshot for an enable
        disable = control.command("alice", "disable")
        control.publish(disable)
        control.wait(lambda: control.outcomes(disable.command_id) != [], why="the disable")
    finally:
        running.close()
    assert calls == [("snapshot", ["alice"]), ("snapshot", ["alice"])]
    assert read_log(folder)[-1]["command_id"] == disable.command_id
    assert control.outcomes(disable.command_id) == ["applied"]


@pytest.mark.usefixtures("recording")
def test_bad_records_are_dead_lettered_and_unserved_users_left_alone(
    settings: Settings, control: Control, tmp_path: Path
) -> None:
    folder = tmp_path / "backend"
    config = enforce_toml(tmp_path, folder, extra='''
        users = ["alice"]
    ''')
    _credentials(config)
    running = InProcess(settings, config, node_id="node-a")
    try:
        control.publish(b"not json", user="alice")
        control.publish(b'{"command_id": "x"}', user="alice")
        other = control.command("bob", "disable")  # bob is not served here
        control.publish(other)
        mine = control.command("alice", "disable")
        control.publish(mine)
        control.wait(lambda: control.outcomes(mine.command_id) != [], why="alice's ack")
        control.wait(lambda: len(control.dead_letters()) == 2, why="two dead letters")
        time.sleep(1.0)
    finally:
        running.close()
    letters = control.dead_letters()
    assert {d.reason for d in letters} == {"invalid"}
    assert {d.topic for d in letters} == {settings.topics.control}
    assert {d.original() for d in letters} == {b"not json", b'{"command_id": "x"}'}
    assert all("not a Command" in d.detail and "node-a" in d.detail for d in letters)
    assert control.outcomes(other.command_id) == []
    assert [r["user_id"] for r in read_log(folder)] == ["alice"]
    ends = control.ends()
    assert control.committed(settings.topics.enforce_group("node-a")) == {
        p: (ends[p] or None) for p in ends
    }


# --------------------------------------------------------------------------- config errors


@pytest.mark.usefixtures("recording")
def test_a_configured_user_without_credentials_is_refused_with_status_78(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from quotaflow.cli import app

    config = enforce_toml(tmp_path, tmp_path / "backend", extra='''
        users = ["alice"]
        [[enforce.backends]]
        type = "recording"
        name = "second"
        folder = "/nonexistent"
        fail_users = ["sekrit-value"]
    ''')
    caplog.set_level(logging.INFO)
    result = CliRunner().invoke(app, ["enforce", "--config", str(config)])
    assert result.exit_code == 78, result.output
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "entry 1 (recording)" in line and "no credentials" in line and "alice" in line
    # a bad option is named without its value (a webhook's secret, say)
    config.write_text(config.read_text().replace('fail_users = ["sekrit-value"]',
                                                 'fail_users = "sekrit-value"'))
    config.write_text(config.read_text().replace('users = ["alice"]\n', ""))
    caplog.clear()
    result = CliRunner().invoke(app, ["enforce", "--config", str(config)])
    assert result.exit_code == 78, result.output
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "entry 2 (second)" in line and "fail_users" in line and "sekrit" not in line


if __name__ == "__main__":  # the consumer as a process: `quotaflow enforce` + this backend
    from quotaflow.producers.enforce.consumer import run_central

    BACKENDS["recording"] = MODULE
    run_central(Path(sys.argv[1]), Settings())

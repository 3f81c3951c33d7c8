"""The `command` enforcement backend with real processes: a small Python program that
records its arguments and environment, `/bin/echo`, and programs that fail, hang or
are killed; and with an injected runner."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from quotaflow.core.plans import Action, Command
from quotaflow.producers.enforce.backends import EnforceError, load_backend
from quotaflow.producers.enforce.backends.command import CommandBackend, Config, Finished, build
from quotaflow.producers.enforce.credentials import Credentials
from tests.producers.enforce import helpers

NASTY = "x; rm -rf / $(id) `id` && touch PWNED | cat >out \"'*?{user_id}"
"""A user id that a shell would run: here it must stay one argument, as it is."""

RECORDER = r"""
import json, os, sys, time
with open(os.environ["RECORD_TO"], "w") as out:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}, out)
mode = os.environ.get("MODE", "")
if mode == "hang":
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.environ["RECORD_TO"] + ".child", "w") as out:
        out.write(str(child.pid))
    print("started", flush=True)
    print("stuck", file=sys.stderr, flush=True)
    time.sleep(60)
if mode == "signal":
    os.kill(os.getpid(), 9)
sys.stderr.write(os.environ.get("STDERR", ""))
print("first line")
print(os.environ.get("SAY", "done"))
sys.exit(int(os.environ.get("EXIT", "0")))
"""


def command(action: Action = "disable", user: str = "alice") -> Command:
    return helpers.command(action, user, used_bytes=11, issued_at=ISSUED_AT)


ISSUED_AT = datetime(2026, 11, 24, 10, 0, 1, 234000, tzinfo=UTC)


class Recorder:
    """The recording program and what it wrote."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.script = folder / "recorder.py"
        self.script.write_text(RECORDER)
        self.output = folder / "record.json"

    def backend(self, *arguments: str, env: Mapping[str, str] | None = None,
                **options: Any) -> CommandBackend:
        entry = {
            "type": "command", "argv": [sys.executable, str(self.script), *arguments],
            "env": {"RECORD_TO": str(self.output), **(env or {})}, **options,
        }
        built = load_backend(entry, Credentials())
        assert isinstance(built, CommandBackend)
        return built

    def record(self) -> dict[str, Any]:
        got: dict[str, Any] = json.loads(self.output.read_text())
        return got


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    return Recorder(tmp_path)


# --------------------------------------------------------------------------- arguments


def test_placeholders_are_whole_arguments_and_no_shell_runs(
    recorder: Recorder, tmp_path: Path
) -> None:
    backend = recorder.backend(
        "{action}", "--user={user_id}", "{user_id}", "{reason}:{used_bytes}/{allowance_bytes}",
        "{{literal}}", "{period_end}", "$(id)", cwd=str(tmp_path),
    )
    done = backend.apply(command("disable", NASTY))
    assert (done.outcome, done.detail) == ("applied", "done")
    argv = recorder.record()["argv"]
    assert argv == [
        "disable", f"--user={NASTY}", NASTY, "quota:11/10", "{literal}", "", "$(id)",
    ]
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()
    assert recorder.record()["cwd"] == str(tmp_path)


def test_echo_says_the_user_id_back_as_it_is(tmp_path: Path) -> None:
    echo = "/bin/echo"
    backend = load_backend({"type": "command", "argv": [echo, "{user_id}"]}, Credentials())
    done = backend.apply(command("disable", NASTY))
    assert done.detail == NASTY  # its standard output's last line
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_every_field_is_in_the_environment(recorder: Recorder) -> None:
    backend = recorder.backend()
    for action in ("warn", "disable", "enable"):
        sent = command(action, NASTY)
        assert backend.apply(sent).outcome == "applied"
        env = recorder.record()["env"]
        ours = {k: v for k, v in env.items() if k.startswith("QUOTAFLOW_")}
        assert set(ours) == {f"QUOTAFLOW_{f.upper()}" for f in Command.model_fields} | {
            "QUOTAFLOW_COMMAND_JSON"
        }
        assert ours["QUOTAFLOW_ACTION"] == action
        assert ours["QUOTAFLOW_USER_ID"] == NASTY
        assert ours["QUOTAFLOW_COMMAND_ID"] == sent.command_id
        assert ours["QUOTAFLOW_REASON"] == sent.reason
        assert ours["QUOTAFLOW_PERIOD_START"] == "2026-11-01T00:00:00Z"
        assert ours["QUOTAFLOW_PERIOD_END"] == ""
        assert ours["QUOTAFLOW_USED_BYTES"] == "11"
        assert ours["QUOTAFLOW_ALLOWANCE_BYTES"] == "10"
        assert ours["QUOTAFLOW_THRESHOLD"] == ("0.8" if action == "warn" else "")
        assert ours["QUOTAFLOW_ISSUED_AT"] == "2026-11-24T10:00:01.234Z"
        assert ours["QUOTAFLOW_COMMAND_JSON"].encode() == sent.encode()


def test_the_environment_is_ours_only_as_asked(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUOTAFLOW_KAFKA_PASSWORD", "kafka-secret")
    monkeypatch.setenv("UNRELATED", "1")
    recorder.backend(env={"PANEL_TOKEN": "t0ken"}).apply(command())
    env = recorder.record()["env"]
    assert env["PANEL_TOKEN"] == "t0ken" and env["PATH"] == os.environ["PATH"]
    assert "UNRELATED" not in env and "QUOTAFLOW_KAFKA_PASSWORD" not in env
    recorder.backend(inherit_env=True).apply(command())
    env = recorder.record()["env"]
    assert env["UNRELATED"] == "1" and "QUOTAFLOW_KAFKA_PASSWORD" not in env


# --------------------------------------------------------------------------- exit status


def test_exit_statuses(recorder: Recorder) -> None:
    assert recorder.backend(env={"EXIT": "3", "SAY": "was off"}).apply(command()).detail == (
        "was off"
    )
    assert recorder.backend(env={"EXIT": "3"}).apply(command()).outcome == "already"
    assert recorder.backend(env={"EXIT": "7"}, already_exit_code=7).apply(
        command()).outcome == "already"
    with pytest.raises(EnforceError, match="exited 3; stderr: nope"):
        recorder.backend(env={"EXIT": "3", "STDERR": "nope"}, already_exit_code=None).apply(
            command())
    with pytest.raises(EnforceError, match=r"\(disable alice\): exited 1; stderr: panel down"):
        recorder.backend(env={"EXIT": "1", "STDERR": "panel down\n"}).apply(command())


def test_the_error_keeps_the_end_of_a_long_stderr(recorder: Recorder) -> None:
    noise = "x" * 100_000 + "\nthe real reason"
    with pytest.raises(EnforceError) as caught:
        recorder.backend(env={"EXIT": "2", "STDERR": noise}).apply(command())
    message = str(caught.value)
    assert message.endswith("the real reason") and len(message) < 2300


def test_a_killed_program_is_an_error(recorder: Recorder) -> None:
    with pytest.raises(EnforceError, match=f"killed by signal {signal.SIGKILL.value}"):
        recorder.backend(env={"MODE": "signal"}).apply(command())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_a_hanging_program_and_its_children_are_killed(recorder: Recorder) -> None:
    started = time.monotonic()
    with pytest.raises(EnforceError, match=r"timed out after 1 s and was killed; stderr: stuck"):
        recorder.backend(env={"MODE": "hang"}, timeout_s=1).apply(command())
    assert time.monotonic() - started < 10
    child = int(Path(str(recorder.output) + ".child").read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


# --------------------------------------------------------------------------- options


def test_actions_and_users(recorder: Recorder) -> None:
    backend = recorder.backend(actions=["disable", "enable"], users=["alice"])
    assert backend.apply(command("warn")).outcome == "skipped"
    assert not recorder.output.exists()  # nothing ran
    assert backend.serves("alice") and not backend.serves("bob")
    assert recorder.backend().serves("anyone")
    assert recorder.backend().apply(command("warn")).outcome == "applied"  # the default: all


def test_an_injected_runner() -> None:
    calls: list[tuple[list[str], dict[str, str], float, Path | None]] = []

    def runner(argv: Sequence[str], env: Mapping[str, str], timeout_s: float,
               cwd: Path | None) -> Finished:
        calls.append((list(argv), dict(env), timeout_s, cwd))
        return Finished(3 if argv[1] == "enable" else 0, b"fine\n")

    config = Config(type="command", argv=("panel-ctl", "{action}", "{user_id}"), timeout_s=4)
    backend = build(config, Credentials(), runner=runner)  # not on PATH: never run for real
    assert backend.apply(command("disable")).outcome == "applied"
    assert backend.apply(command("enable")).outcome == "already"
    assert [c[0] for c in calls] == [["panel-ctl", "disable", "alice"],
                                     ["panel-ctl", "enable", "alice"]]
    assert calls[0][1]["QUOTAFLOW_ACTION"] == "disable" and calls[0][2] == 4

    def broken(*_: Any) -> Finished:
        raise PermissionError(13, "Permission denied")

    with pytest.raises(EnforceError, match=r"could not run: .*Permission denied"):
        build(config, Credentials(), runner=broken).apply(command())


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["definitely-not-a-program-qf"], "is not on PATH"),
        (["./missing/program"], "is not an executable file"),
        ([], "at least 1 item"),
        (["{action}"], "argv\\[0\\] must be the program"),
        (["/bin/echo", "{nope}"], "{nope} is not a placeholder"),
        (["/bin/echo", "{user_id.__class__}"], "is not a placeholder"),
        (["/bin/echo", "{user_id!r}"], "is not a placeholder"),
        (["/bin/echo", "{user_id:>20}"], "is not a placeholder"),
        (["/bin/echo", "{0}"], "is not a placeholder"),
        (["/bin/echo", "{}"], "is not a placeholder"),
        (["/bin/echo", "{user_id"], "expected '}'"),
        (["/bin/echo", "user_id}"], "Single '}'"),
    ],
)
def test_build_refuses(argv: list[str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        load_backend({"type": "command", "argv": argv}, Credentials())


def test_build_refuses_a_file_that_is_not_executable(tmp_path: Path) -> None:
    plain = tmp_path / "ctl"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    with pytest.raises(ValueError, match="is not an executable file"):
        load_backend({"type": "command", "argv": [str(plain)]}, Credentials())
    plain.chmod(0o755)
    load_backend({"type": "command", "argv": [str(plain)]}, Credentials())


@pytest.mark.parametrize(
    "options",
    [{"env": {"QUOTAFLOW_ACTION": "x"}}, {"env": {"A=B": "x"}}, {"already_exit_code": 0},
     {"timeout_s": 0}, {"actions": []}, {"shell": True}],
)
def test_config_refuses(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        load_backend({"type": "command", "argv": ["/bin/echo"], **options}, Credentials())


def test_env_values_never_show(recorder: Recorder) -> None:
    backend = recorder.backend(env={"PANEL_TOKEN": "t0ken-secret", "EXIT": "1"})
    with pytest.raises(EnforceError) as caught:
        backend.apply(command())
    shown = " ".join([repr(backend.config), str(backend.config), str(caught.value)])
    assert "t0ken-secret" not in shown

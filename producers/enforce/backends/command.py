"""The `command` backend: runs a configured program for each command, never through a shell.

The program gets the command in two ways, both without any shell in between:

* **environment**: every field of the command as `QUOTAFLOW_<FIELD>` (`QUOTAFLOW_ACTION`,
  `QUOTAFLOW_USER_ID`, `QUOTAFLOW_REASON`, `QUOTAFLOW_COMMAND_ID`,
  `QUOTAFLOW_PERIOD_START`, `QUOTAFLOW_PERIOD_END`, `QUOTAFLOW_USED_BYTES`,
  `QUOTAFLOW_ALLOWANCE_BYTES`, `QUOTAFLOW_THRESHOLD`, `QUOTAFLOW_ISSUED_AT`), each
  as in the command's JSON wire form (instants in RFC 3339, null as the empty
  string), and the whole wire form as `QUOTAFLOW_COMMAND_JSON`;
* **arguments**: `{field}` placeholders in `argv` (`{user_id}`, `{action}`, ...,
  and `{json}`), replaced inside the one argument they stand in. The value is
  never split, globbed or interpreted: a user id `x; rm -rf /` is one argument
  with those nine characters. `{{` and `}}` are literal braces.

The argv is run with `shell=False`, standard input closed, in a session of its
own (so a timeout kills the program and its children), with `timeout_s`.
Exit status 0 is `applied`, `already_exit_code` (default 3) is `already`, and
anything else, a signal or a timeout raises `EnforceError` with the end of its
standard error. The program's last line of standard output becomes the
acknowledgement's detail.

The environment holds only `PATH`, `HOME`, `LANG`, `LC_ALL` and `TZ` of the
consumer's own (with `inherit_env = true`: all of it except its `QUOTAFLOW_*`
settings), then `env`, then the command's fields. `env` values are secrets
(`SecretStr`), never logged.

```toml
[[enforce.backends]]
type = "command"
argv = ["/usr/local/bin/panel-ctl", "{action}", "--user={user_id}"]
timeout_s = 30
already_exit_code = 3
actions = ["warn", "disable", "enable"]   # the default: every action
env = { PANEL_TOKEN = "..." }
```

>>> Config(type="command", argv=("ctl", "{action}", "--user={user_id}")).argv[2]
'--user={user_id}'
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator

from quotaflow.core.plans import Action, Command
from quotaflow.producers.enforce.backends._base import Applied, BackendConfigBase, EnforceError
from quotaflow.producers.enforce.credentials import Credentials

log = logging.getLogger("quotaflow.enforce.command")

FIELDS: tuple[str, ...] = (*Command.model_fields, "json")
"""The names a placeholder may use: every field of a `Command`, and `json` (its wire form)."""
ENV_PREFIX = "QUOTAFLOW_"
_KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
_TAIL = 2000  # characters of standard error kept in an error


class Config(BackendConfigBase):
    """A program to run for each command; see the module docstring."""

    type: Literal["command"]
    argv: Annotated[tuple[str, ...], Field(min_length=1)]
    """The program and its arguments, with `{field}` placeholders."""
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    already_exit_code: Annotated[int, Field(ge=1, le=255)] | None = 3
    """The exit status that means "it was so already" (None: none does)."""
    actions: Annotated[tuple[Action, ...], Field(min_length=1)] = ("warn", "disable", "enable")
    """The actions passed on; the others are `skipped`."""
    env: dict[str, SecretStr] = Field(default_factory=dict)
    """Extra environment variables (secrets: never logged)."""
    inherit_env: bool = False
    """Pass the consumer's whole environment (less its `QUOTAFLOW_*` settings)."""
    cwd: Path | None = None

    @field_validator("argv")
    @classmethod
    def _placeholders(cls, argv: tuple[str, ...]) -> tuple[str, ...]:
        if not argv[0] or "{" in argv[0] or "}" in argv[0]:
            raise ValueError("argv[0] must be the program, without placeholders")
        for argument in argv[1:]:
            _template(argument)  # raises ValueError naming the problem
        return argv

    @field_validator("env")
    @classmethod
    def _names(cls, env: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name in env:
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"env: {name!r} is not an environment variable name")
            if name.upper().startswith(ENV_PREFIX):
                raise ValueError(f"env: {name!r}: QUOTAFLOW_* names are the command's fields")
        return env


def _template(argument: str) -> list[tuple[str, str | None]]:
    """An argument as (literal text, field name or None) pieces; ValueError when malformed."""
    try:
        parsed = list(Formatter().parse(argument))
    except ValueError as exc:
        raise ValueError(f"argv: {argument!r}: {exc}") from None
    pieces: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (name not in FIELDS or spec or conversion):
            known = ", ".join("{" + f + "}" for f in FIELDS)
            raise ValueError(
                f"argv: {argument!r}: {{{name}}} is not a placeholder (known: {known};"
                " no format specs or conversions; {{ and }} are literal braces)"
            )
        pieces.append((literal, name))
    return pieces


def values(command: Command) -> dict[str, str]:
    """Every field of `command` as text, as its JSON wire form has it; `json` the whole.

    >>> from datetime import UTC, datetime
    >>> c = Command(command_id="c1", user_id="a b", action="disable", reason="quota",
    ...     period_start=datetime(2026, 11, 1, tzinfo=UTC), period_end=None, used_bytes=11,
    ...     allowance_bytes=10, threshold=None, issued_at=datetime(2026, 11, 2, tzinfo=UTC))
    >>> v = values(c)
    >>> v["user_id"], v["period_end"], v["used_bytes"], v["period_start"], v["issued_at"]
    ('a b', '', '11', '2026-11-01T00:00:00Z', '2026-11-02T00:00:00.000Z')
    """
    wire = command.encode()
    result = {name: _text(value) for name, value in command.model_dump(mode="json").items()}
    result["json"] = wire.decode()
    return result


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_argv(argv: Sequence[str], fields: Mapping[str, str]) -> list[str]:
    """`argv` with its placeholders replaced; each argument stays one argument.

    >>> render_argv(["ctl", "{action}", "--user={user_id}", "{{literal}}"],
    ...             {"action": "disable", "user_id": "x; rm -rf /"})
    ['ctl', 'disable', '--user=x; rm -rf /', '{literal}']
    """
    rendered = [argv[0]]
    for argument in argv[1:]:
        rendered.append(
            "".join(literal + ("" if name is None else fields[name])
                    for literal, name in _template(argument))
        )
    return rendered


def environment(config: Config, fields: Mapping[str, str]) -> dict[str, str]:
    """The program's environment: a few of ours (or all), `env`, then the command's fields."""
    if config.inherit_env:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    else:
        env = {k: os.environ[k] for k in _KEPT_ENV if k in os.environ}
    env.update({name: secret.get_secret_value() for name, secret in config.env.items()})
    for name, value in fields.items():
        env[ENV_PREFIX + ("COMMAND_JSON" if name == "json" else name.upper())] = value
    return env


@dataclass(frozen=True, slots=True)
class Finished:
    """How a run ended: its exit status (negative: killed by that signal) and output."""

    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""


Runner = Callable[[Sequence[str], Mapping[str, str], float, Path | None], Finished]
"""Runs argv with an environment, a timeout and a working folder; raises
`subprocess.TimeoutExpired` or `OSError`. Tests inject their own."""


def run_process(
    argv: Sequence[str], env: Mapping[str, str], timeout_s: float, cwd: Path | None
) -> Finished:
    """The real runner: no shell, stdin closed, its own session, killed whole on timeout."""
    with subprocess.Popen(
        list(argv), env=dict(env), cwd=cwd, shell=False, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group it leads: it and its children
            stdout, stderr = proc.communicate()  # all of it, what was read before included
            raise subprocess.TimeoutExpired(exc.cmd, timeout_s, stdout, stderr) from None
    return Finished(proc.returncode, stdout, stderr)


def _tail(data: bytes, size: int = _TAIL) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    return text if len(text) <= size else "…" + text[-size:]


class CommandBackend:
    """Runs the configured program for each command; see the module docstring."""

    name = "command"

    def __init__(self, config: Config, runner: Runner = run_process) -> None:
        self.config = config
        self._runner = runner
        self._users = None if config.users is None else frozenset(config.users)

    def serves(self, user_id: str) -> bool:
        return self._users is None or user_id in self._users

    def close(self) -> None:
        pass

    def apply(self, command: Command) -> Applied:
        if command.action not in self.config.actions:
            return Applied("skipped", f"command backend does not pass {command.action}")
        fields = values(command)
        argv = render_argv(self.config.argv, fields)
        program = self.config.argv[0]
        what = f"command {program} ({command.action} {command.user_id})"
        log.debug("running %s for command %s", program, command.command_id)
        try:
            done = self._runner(
                argv, environment(self.config, fields), self.config.timeout_s, self.config.cwd
            )
        except subprocess.TimeoutExpired as exc:
            raise EnforceError(
                f"{what}: timed out after {self.config.timeout_s:g} s and was killed"
                + (f"; stderr: {_tail(exc.stderr)}" if exc.stderr else "")
            ) from None
        except OSError as exc:
            raise EnforceError(f"{what}: could not run: {exc}") from exc
        last = _tail(done.stdout, 400).splitlines()
        detail = last[-1].strip() if last else ""
        if done.returncode == 0:
            return Applied("applied", detail or f"{program} exited 0")
        if done.returncode == self.config.already_exit_code:
            return Applied("already", detail or f"{program} exited {done.returncode}")
        how = (
            f"killed by signal {-done.returncode}" if done.returncode < 0
            else f"exited {done.returncode}"
        )
        stderr = _tail(done.stderr)
        raise EnforceError(f"{what}: {how}" + (f"; stderr: {stderr}" if stderr else ""))


def _executable(program: str, config: Config) -> None:
    """ValueError unless `program` can be run: a path to an executable, or found on PATH."""
    if os.sep in program:
        path = Path(program) if config.cwd is None else config.cwd / program
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ValueError(f"command backend: {program!r} is not an executable file")
        return
    if shutil.which(program) is None:
        raise ValueError(f"command backend: {program!r} is not on PATH")


def build(config: Config, credentials: Credentials, runner: Runner = run_process) -> CommandBackend:
    """The backend for one `[[enforce.backends]]` entry; ValueError when its program is not
    there. Needs no credentials."""
    del credentials
    if runner is run_process:
        _executable(config.argv[0], config)
    return CommandBackend(config, runner)

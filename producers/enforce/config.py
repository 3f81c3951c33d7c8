"""The `[enforce]` table, in a node agent's agent.toml or in the central enforce.toml.

```toml
[enforce]
credentials = "/etc/quotaflow/credentials.toml"   # needed by backends that re-add users
# state_file = "..."        # the applied command ids (default: next to the outbox /
#                           # under QUOTAFLOW_STATE_DIR for `quotaflow enforce`)
# keep_applied_days = 30
# poll_interval_s = 0.5
# snapshot = ["fra-1"]      # agent only: collectors read before a disable (default: all)

[enforce.retry]
base_s = 1.0                 # the first retry waits this long, each next one twice as long
cap_s = 60.0                 # but never longer than this
max_attempts = 10            # then the command goes to <prefix>.control.dead

[[enforce.backends]]
type = "xray"
# name = "xray-eu"           # optional: told apart in acks when one type appears twice
address = "127.0.0.1:10085"
```

>>> config = EnforceConfig.model_validate({"backends": [{"type": "webhook", "url": "x"}]})
>>> config.retry.policy()
RetryPolicy(base_s=1.0, cap_s=60.0, max_attempts=10)
>>> "url" in repr(config)  # backend entries may hold secrets: never in a repr
False
>>> labels([{"type": "xray"}, {"type": "webhook"}, {"type": "xray"}, {"type": "x", "name": "y"}])
['xray', 'webhook', 'xray#2', 'y']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quotaflow.producers.enforce.backends import Backend, load_backend
from quotaflow.producers.enforce.credentials import Credentials
from quotaflow.producers.enforce.delivery import RetryPolicy


def problems(exc: ValidationError) -> str:
    """What is wrong, where, without the values (a backend entry may hold secrets).

    >>> try:
    ...     RetryConfig.model_validate({"base_s": 2, "cap_s": 1, "max_attempts": "x"})
    ... except ValidationError as exc:
    ...     print(problems(exc))
    max_attempts: Input should be a valid integer, unable to parse string as an integer
    """
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(x) for x in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


class EnforceConfigError(ValueError):
    """The `[enforce]` configuration cannot be used (a backend, the credentials); exit 78."""


class RetryConfig(BaseModel):
    """`[enforce.retry]`: capped exponential backoff, then the dead-command topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_s: float = Field(default=1.0, gt=0)
    cap_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=10, ge=1, le=10_000)

    @model_validator(mode="after")
    def _cap_above_base(self) -> RetryConfig:
        if self.cap_s < self.base_s:
            raise ValueError("cap_s must be at least base_s")
        return self

    def policy(self) -> RetryPolicy:
        """The delivery rules' `RetryPolicy`."""
        return RetryPolicy(self.base_s, self.cap_s, self.max_attempts)


class EnforceConfig(BaseModel):
    """`[enforce]`: see the module docstring and docs/enforcement.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backends: tuple[dict[str, Any], ...] = Field(min_length=1, repr=False)
    """The `[[enforce.backends]]` entries, each built by `load_backend` (plus `name`)."""
    credentials: Path | None = None
    retry: RetryConfig = Field(default_factory=RetryConfig)
    state_file: Path | None = None
    keep_applied_days: float = Field(default=30.0, gt=0)
    poll_interval_s: float = Field(default=0.5, gt=0, le=10)
    snapshot: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _typed_and_named(self) -> EnforceConfig:
        for index, entry in enumerate(self.backends, 1):
            if not isinstance(entry.get("type"), str):
                raise ValueError(f"[[enforce.backends]] entry {index} has no type")
            name = entry.get("name", entry["type"])
            if not isinstance(name, str) or not 1 <= len(name) <= 64:
                raise ValueError(
                    f"[[enforce.backends]] entry {index}: name must be 1-64 characters"
                )
        if len(set(labels(self.backends))) != len(self.backends):
            raise ValueError("two [[enforce.backends]] entries have the same name")
        return self

    @property
    def keep_applied_s(self) -> float:
        """How long applied command ids are kept, in seconds."""
        return self.keep_applied_days * 86_400


def labels(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each entry's name in acknowledgements: its `name`, else its type (`#2`, `#3` for the
    second and third entry of a type)."""
    counts: dict[str, int] = {}
    found: list[str] = []
    for entry in entries:
        if "name" in entry:
            found.append(str(entry["name"]))
            continue
        kind = str(entry.get("type"))
        counts[kind] = counts.get(kind, 0) + 1
        found.append(kind if counts[kind] == 1 else f"{kind}#{counts[kind]}")
    return found


def load_credentials(config: EnforceConfig) -> Credentials:
    """The credentials file the config names (none: an empty one); EnforceConfigError."""
    if config.credentials is None:
        return Credentials()
    try:
        return Credentials.load(config.credentials)
    except OSError as exc:
        raise EnforceConfigError(
            f"enforce: cannot read the credentials file {config.credentials}: {exc.strerror}"
        ) from None
    except ValueError as exc:
        raise EnforceConfigError(f"enforce: {config.credentials}: {exc}") from None


def open_backends(config: EnforceConfig) -> list[tuple[str, Backend]]:
    """Build every configured backend, named; EnforceConfigError naming the entry that is wrong
    (a configured user without credentials, a bad option), with no secret in the message."""
    credentials = load_credentials(config)
    built: list[tuple[str, Backend]] = []
    try:
        for index, (label, entry) in enumerate(
            zip(labels(config.backends), config.backends, strict=True), 1
        ):
            options = {k: v for k, v in entry.items() if k != "name"}
            where = f"[[enforce.backends]] entry {index} ({label})"
            try:
                built.append((label, load_backend(options, credentials)))
            except ValidationError as exc:  # its str() would show the values, secrets too
                raise EnforceConfigError(f"{where}: {problems(exc)}") from None
            except ValueError as exc:
                raise EnforceConfigError(f"{where}: {exc}") from None
    except BaseException:
        for _, backend in built:
            backend.close()
        raise
    return built

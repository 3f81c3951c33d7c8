"""The seam every enforcement backend implements, and what all of them share.

A backend applies one command at a time and says what it did. Every apply is
idempotent: disabling a user who is not there, or enabling one who is, is
`already` (and counts as success), so a command applied twice acts once.
Anything that fails raises `EnforceError`; the consumer retries it with backoff
and, after its last attempt, puts the command on `<prefix>.control.dead`.

A backend may also have `prepare_disable(user_ids)` (`PreparesDisable`): when the
agent takes a counter snapshot before a round's disables, the consumer calls it
first, so that the program's counters hold every byte it can still report before
the snapshot reads them (ss-manager waits for its ss-servers' next stat push).
Backends without it need nothing: the default is to do nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from quotaflow.core.plans import Command

Done = Literal["applied", "already", "skipped"]


@dataclass(frozen=True, slots=True)
class Applied:
    """What a backend did: `applied` now, `already` in that state, or `skipped`."""

    outcome: Done
    detail: str = ""


class EnforceError(RuntimeError):
    """A backend could not apply a command (unreachable, refused); retried by the consumer."""


class BackendConfigBase(BaseModel):
    """What every `[[enforce.backends]]` entry has: its `type`, and the users it acts for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    users: tuple[str, ...] | None = None
    """Only these users (None: every user the credentials file names for this backend)."""


class Backend(Protocol):
    """One program that commands act on; see the module docstring."""

    name: str
    """The backend's type, as in the config and in acknowledgements (`xray`, `webhook`, ...)."""

    def serves(self, user_id: str) -> bool:
        """Whether commands about `user_id` concern this backend."""
        ...

    def apply(self, command: Command) -> Applied:
        """Apply `command` (warn, disable or enable its user); raise `EnforceError` on failure.

        Proxy backends skip `warn`; `webhook` and `command` pass every action on.
        """
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class PreparesDisable(Protocol):
    """The optional step of a `Backend` before the counter snapshot of a disable.

    `prepare_disable(user_ids)` gets the users of the round's due disables that this
    backend serves, and returns once the program's counters of those users hold
    what it can still report (or raises `EnforceError`: the disables on this
    backend then count a failed attempt, like a failed snapshot). It is called only
    where a snapshot is taken (the agent), once per round, before the snapshot.
    """

    def prepare_disable(self, user_ids: list[str]) -> None:
        """Make the counters of `user_ids` current before the snapshot; see the class."""
        ...

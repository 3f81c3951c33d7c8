"""The `ss-manager` backend: users' ports stopped and started again through ss-manager.

ss-manager runs one ss-server per port; a user is one or more ports
(`SsManagerAccount` in the credentials file). It speaks the manager protocol
through the source's `SsManagerClient` (`quotaflow.producers.sources.ss_manager`).

* `disable`: `list`, then `remove: {"server_port": N}` for each of the user's
  ports that is running, then `list` again to see them gone (ss-manager answers
  `ok` to any remove, even of a port it does not run). ss-manager stops the
  port's ss-server, so its open connections are cut. No port running: `already`.
* `enable`: `list`, then `add: {"server_port": N, "password": ..., "method": ...}`
  for each port not running, then `list` again. A port that is running is never
  added again: on a running port ss-manager stops the ss-server first and races
  it for the port, which can leave the port down. All running: `already`.
* `warn`: `skipped`.

Removal loses the port's counter: ss-manager forgets the port's figure, and the
ss-server, stopped with SIGTERM, does not send its last one. Each ss-server
pushes its figure every 5 s, so a snapshot taken at a random moment before
`disable` lacks up to 5 s of the user's bytes. `prepare_disable` (which the
consumer calls before the agent's snapshot) therefore waits for the ports' next
push: it reads `ping` until each running port's figure changes, or 5.5 s pass
without a change (nothing moved since the last push). The snapshot taken then
holds the bytes up to that push; see docs/enforcement.md.

```toml
[[enforce.backends]]
type = "ss-manager"
address = "127.0.0.1:6001"     # ss-manager's --manager-address (UDP), or a unix socket path
timeout_s = 2.0
settle_s = 5.5                 # before the agent's snapshot: wait this long for the next push
```

>>> Config(type="ss-manager", address="127.0.0.1:6001").timeout_s
2.0
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, SecretStr

from quotaflow.core.plans import Command
from quotaflow.producers.enforce.backends._base import Applied, BackendConfigBase, EnforceError
from quotaflow.producers.enforce.credentials import Credentials, SsManagerAccount
from quotaflow.producers.sources import ParseError, SourceError
from quotaflow.producers.sources.ss_manager import SsManagerClient

log = logging.getLogger("quotaflow.enforce")

_MAX_PASSWORD_BYTES = 127  # ss-manager keeps no more of a password
_METHOD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class Config(BackendConfigBase):
    """An ss-manager's control address; the users' ports come from the credentials."""

    type: Literal["ss-manager"]
    address: Annotated[str, Field(min_length=1)]
    """`host:port` of ss-manager's `--manager-address` (UDP; `[v6]:port` too), or the
    path of its unix datagram socket."""
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    """How long to wait for each answer."""
    settle_s: Annotated[float, Field(ge=0, le=60)] = 5.5
    """Before the agent's snapshot of a disable, how long to wait for the ports' next stat
    push (ss-server pushes every 5 s); 0 does not wait."""


@dataclass(frozen=True, slots=True)
class _Port:
    """One port of a user, with what re-adding it needs."""

    port: int
    password: SecretStr
    method: str | None


def _ports(config: Config, credentials: Credentials) -> dict[str, tuple[_Port, ...]]:
    """Every served user's ports; ValueError when an account cannot be re-added."""
    users = set(config.users) if config.users is not None else credentials.users("ss-manager")
    found: dict[str, list[_Port]] = {}
    owner: dict[int, str] = {}
    for account in credentials.accounts:
        if not isinstance(account, SsManagerAccount) or account.user_id not in users:
            continue
        where = f"ss-manager credentials of {account.user_id!r} (port {account.server_port})"
        if account.server_port in owner:
            raise ValueError(
                f"ss-manager port {account.server_port} belongs to two users "
                f"({owner[account.server_port]!r} and {account.user_id!r}): disabling one"
                " would disable the other"
            )
        owner[account.server_port] = account.user_id
        password = account.password.get_secret_value()
        if not password:
            raise ValueError(f"{where}: the password is empty (ss-manager refuses it)")
        if len(password.encode()) > _MAX_PASSWORD_BYTES:
            raise ValueError(
                f"{where}: the password is longer than {_MAX_PASSWORD_BYTES} bytes, the most"
                " ss-manager keeps"
            )
        if any(c in password for c in '"\\') or any(ord(c) < 32 for c in password):
            raise ValueError(
                f"{where}: the password holds a quote, a backslash or a control character,"
                " which ss-manager writes unescaped into the ss-server's JSON config"
            )
        if account.method is not None and not _METHOD.fullmatch(account.method):
            raise ValueError(f"{where}: {account.method[:40]!r} is not a cipher name")
        found.setdefault(account.user_id, []).append(
            _Port(account.server_port, account.password, account.method)
        )
    if config.users is not None:
        missing = sorted(set(config.users) - set(found))
        if missing:
            raise ValueError(
                f"ss-manager backend at {config.address}: no ss-manager credentials for the"
                f" configured users: {', '.join(missing)}"
            )
    return {user: tuple(sorted(ports, key=lambda p: p.port)) for user, ports in found.items()}


def _names(ports: list[_Port]) -> str:
    return ", ".join(str(p.port) for p in ports)


class SsManagerBackend:
    """Stops and starts users' ports on ss-manager; see the module docstring."""

    name = "ss-manager"

    def __init__(
        self, config: Config, ports: dict[str, tuple[_Port, ...]],
        client: SsManagerClient | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self._ports = ports
        self._client = client or SsManagerClient(config.address, timeout=config.timeout_s)

    def serves(self, user_id: str) -> bool:
        return user_id in self._ports

    def close(self) -> None:
        """Nothing to release: every call uses its own socket."""

    def prepare_disable(self, user_ids: list[str]) -> None:
        """Wait until the users' running ports have pushed their figures (`wait_for_push`).

        Called before the counter snapshot of a disable, so that the snapshot holds
        the bytes up to the last push before the removal, not up to 5 s fewer.
        """
        ports = sorted({p.port for user in user_ids for p in self._ports.get(user, ())})
        if not ports or self.config.settle_s == 0:
            return
        started = time.monotonic()
        try:
            pushed = self._client.wait_for_push(ports, within=self.config.settle_s)
        except (SourceError, ParseError) as exc:
            raise EnforceError(
                f"ss-manager {self.config.address}: waiting for the stat push of port(s)"
                f" {', '.join(map(str, ports))}: {exc}"
            ) from exc
        log.info("ss-manager %s: before disabling %s, waited %.2f s for the stat push: %s",
                 self.config.address, ", ".join(user_ids[:10]), time.monotonic() - started,
                 ", ".join(f"{p} {'pushed' if new else 'unchanged'}"
                           for p, new in pushed.items()) or "no port running")

    def apply(self, command: Command) -> Applied:
        if command.action == "warn":
            return Applied("skipped", "ss-manager does not act on warn")
        ports = self._ports.get(command.user_id)
        if not ports:
            return Applied("skipped", f"{command.user_id} has no port on ss-manager")
        try:
            if command.action == "disable":
                return self._disable(list(ports))
            return self._enable(list(ports))
        except (SourceError, ParseError) as exc:
            raise EnforceError(
                f"ss-manager {command.action} {command.user_id}: {exc}"
            ) from exc

    def _disable(self, ports: list[_Port]) -> Applied:
        listed = set(self._client.list_ports())
        running = [p for p in ports if p.port in listed]
        stopped = [p for p in ports if p.port not in listed]
        if not running:
            return Applied("already", f"port(s) {_names(stopped)} not running")
        for port in running:
            self._client.remove(port.port)
        left = [p for p in running if p.port in set(self._client.list_ports())]
        if left:
            raise EnforceError(
                f"ss-manager {self.config.address}: port(s) {_names(left)} still listed"
                " after remove"
            )
        detail = f"removed port(s) {_names(running)}"
        if stopped:
            detail += f"; {_names(stopped)} not running"
        return Applied("applied", detail)

    def _enable(self, ports: list[_Port]) -> Applied:
        listed = set(self._client.list_ports())
        missing = [p for p in ports if p.port not in listed]
        running = [p for p in ports if p.port in listed]
        if not missing:
            return Applied("already", f"port(s) {_names(running)} running")
        for port in missing:
            self._client.add(port.port, port.password.get_secret_value(), port.method)
        absent = [p for p in missing if p.port not in set(self._client.list_ports())]
        if absent:
            raise EnforceError(
                f"ss-manager {self.config.address}: port(s) {_names(absent)} not listed"
                " after add"
            )
        detail = f"added port(s) {_names(missing)}"
        if running:
            detail += f"; {_names(running)} running already"
        return Applied("applied", detail)


def build(config: Config, credentials: Credentials) -> SsManagerBackend:
    """The backend for one `[[enforce.backends]]` entry; ValueError when the credentials
    do not let it re-add a configured user."""
    return SsManagerBackend(config, _ports(config, credentials))

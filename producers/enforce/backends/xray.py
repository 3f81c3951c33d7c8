"""The `xray` and `v2ray` backends: users removed and added back over the core's gRPC API.

One module serves both types: the same HandlerService calls, in each program's
own packages (`xray.*`, `v2ray.core.*`), through the source's `V2RayStatsClient`
and its account builders (`quotaflow.producers.sources.v2ray`).

* `disable`: `AlterInbound` + `RemoveUserOperation{email}` on each configured
  inbound where the user has an account. A user who is not there ("User x not
  found.") is `already`. Xray's old-style Shadowsocks inbound can hold the same
  email twice, so there the removal is repeated until the user is gone.
* `enable`: `AddUserOperation` with the user's account from the credentials file
  (`ProxyAccount`). On Xray, `GetInboundUsers` is asked first, since its
  old-style Shadowsocks inbound accepts a duplicate email; everywhere, "User x
  already exists." is `already` too.
* `warn`: `skipped`.

Removing a user does not close the connections already open: they keep flowing
until they end. With `cut_connections = true` the backend cuts them with `ss -K`
on the inbound's port (`ports`), limited to the user's client addresses
(`cut_scope = "client"`, Xray with the policy's `statsUserOnline`; Xray lists no
loopback clients) or all of the port's connections (`cut_scope = "port"`, any
program: the other users' clients connect again, the disabled one cannot).

```toml
[[enforce.backends]]
type = "xray"                  # or "v2ray": the program behind the API
address = "127.0.0.1:10085"    # the API (gRPC) address
inbounds = ["vless-in", "trojan-in"]
timeout_s = 5.0
cut_connections = true
ports = { vless-in = 443, trojan-in = 8443 }
cut_scope = "client"
```

>>> config = Config(type="v2ray", inbounds=("vmess-in",))
>>> config.address, config.cut_connections
('127.0.0.1:10085', False)
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, model_validator

from quotaflow.core.plans import Command
from quotaflow.producers.enforce.backends._base import (
    Applied,
    BackendConfigBase,
    EnforceError,
)
from quotaflow.producers.enforce.credentials import Credentials, ProxyAccount
from quotaflow.producers.sources import SourceError
from quotaflow.producers.sources.v2ray import ApiError, TypedMessage, V2RayStatsClient

Port = Annotated[int, Field(ge=1, le=65535)]

# The StatsService that names each program's family; the client then speaks its packages.
_SERVICE = {
    "xray": "xray.app.stats.command.StatsService",
    "v2ray": "v2ray.core.app.stats.command.StatsService",
}
_PREFIX = {"xray": "xray.", "v2ray": "v2ray.core."}
_SS_2022 = "2022-"
_MAX_COPIES = 64  # removals of one email from one Shadowsocks inbound, at most


class Config(BackendConfigBase):
    """An Xray or V2Ray core's API and the inbounds the backend acts on."""

    type: Literal["xray", "v2ray"]
    address: Annotated[str, Field(min_length=3)] = "127.0.0.1:10085"
    """The API's `host:port` (Xray's `api.listen`, or V2Ray's dokodemo-door API inbound)."""
    inbounds: Annotated[tuple[Annotated[str, Field(min_length=1)], ...], Field(min_length=1)]
    """The inbound tags it adds users to and removes them from."""
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    cut_connections: bool = False
    """After removing a user, cut the open connections with `ss -K` (needs root)."""
    ports: dict[str, Port] = Field(default_factory=dict)
    """Each inbound's listen port, for cutting connections: {tag: port}."""
    cut_scope: Literal["client", "port"] = "client"
    """`client`: only connections from the user's addresses (Xray's online list);
    `port`: every connection to the inbound's port."""

    @model_validator(mode="after")
    def _cutting(self) -> Config:
        if len(set(self.inbounds)) != len(self.inbounds):
            raise ValueError("an inbound tag is listed twice in `inbounds`")
        unknown = sorted(set(self.ports) - set(self.inbounds))
        if unknown:
            raise ValueError(f"`ports` names inbounds not in `inbounds`: {', '.join(unknown)}")
        if self.cut_connections:
            missing = [tag for tag in self.inbounds if tag not in self.ports]
            if missing:
                raise ValueError(
                    "cut_connections needs each inbound's listen port in `ports`; missing: "
                    + ", ".join(missing)
                )
            if self.type == "v2ray" and self.cut_scope == "client":
                raise ValueError(
                    'V2Ray keeps no list of a user\'s client addresses: cut_scope = "client" '
                    'cannot cut anything there; use cut_scope = "port"'
                )
        return self


@dataclass(frozen=True, slots=True)
class _Place:
    """One account of a user: the inbound, the name the proxy knows them by, the account."""

    inbound: str
    email: str
    account: TypedMessage
    level: int
    duplicates: bool
    """Xray's old-style Shadowsocks: the inbound may hold the email more than once."""


def _account_message(account: ProxyAccount) -> TypedMessage:
    """The `TypedMessage` that re-adds `account`; ValueError naming what is missing."""
    where = f"credentials of {account.user_id!r} on {account.inbound!r}"
    password = account.password.get_secret_value() if account.password else None
    if account.protocol in ("vmess", "vless"):
        if not account.id:
            raise ValueError(f"{where}: {account.protocol} needs `id` (the user's UUID)")
        try:
            uuid.UUID(account.id)
        except ValueError:
            raise ValueError(f"{where}: `id` is not a UUID") from None
        if account.protocol == "vmess":
            return TypedMessage.vmess_account(account.id)
        return TypedMessage.vless_account(account.id, account.flow)
    if not password:
        raise ValueError(f"{where}: {account.protocol} needs `password`")
    if account.protocol == "trojan":
        return TypedMessage.trojan_account(password)
    if not account.method:
        raise ValueError(f"{where}: shadowsocks needs `method`")
    try:
        return TypedMessage.shadowsocks_account(password, account.method)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _places(config: Config, credentials: Credentials) -> dict[str, tuple[_Place, ...]]:
    """Every served user's accounts on the configured inbounds; ValueError when one is wrong."""
    wanted = set(config.inbounds)
    users = set(config.users) if config.users is not None else credentials.users(config.type)
    found: dict[str, list[_Place]] = {}
    seen: dict[tuple[str, str], str] = {}  # (inbound, lowercase email) -> user
    for account in credentials.accounts:
        if not isinstance(account, ProxyAccount) or account.inbound not in wanted:
            continue
        if account.user_id not in users:
            continue
        if account.protocol == "shadowsocks" and config.type == "v2ray":
            raise ValueError(
                f"credentials of {account.user_id!r} on {account.inbound!r}: V2Ray's "
                "Shadowsocks inbound has one fixed user and cannot add or remove users"
            )
        message = _account_message(account)
        try:
            message.message(_PREFIX[config.type])
        except SourceError as exc:
            raise ValueError(f"credentials of {account.user_id!r}: {exc}") from None
        key = (account.inbound, account.name.lower())
        if key in seen:
            other = seen[key]
            raise ValueError(
                f"two accounts named {account.name!r} on {account.inbound!r} (users {other!r}"
                f" and {account.user_id!r}): removing one would remove the other"
            )
        seen[key] = account.user_id
        duplicates = (
            config.type == "xray"
            and account.protocol == "shadowsocks"
            and not (account.method or "").lower().startswith(_SS_2022)
        )
        found.setdefault(account.user_id, []).append(
            _Place(account.inbound, account.name, message, account.level, duplicates)
        )
    if config.users is not None:
        missing = sorted(set(config.users) - set(found))
        if missing:
            raise ValueError(
                f"{config.type} backend at {config.address}: no credentials on its inbounds "
                f"({', '.join(config.inbounds)}) for the configured users: {', '.join(missing)}"
            )
    order = {tag: i for i, tag in enumerate(config.inbounds)}
    return {
        user: tuple(sorted(places, key=lambda p: order[p.inbound]))
        for user, places in found.items()
    }


def _says(exc: ApiError, email: str, what: str) -> bool:
    """Whether the server's error is `User <email> <what>.` (Xray, V2Ray; any case)."""
    pattern = rf"\bUser {re.escape(email)} {re.escape(what)}\."
    return re.search(pattern, exc.details, re.IGNORECASE) is not None


def _ss_address(text: str) -> str:
    """An address for an `ss` filter; ValueError when it is not an IP address."""
    address = ipaddress.ip_address(text.strip("[]"))
    return f"[{address}]" if address.version == 6 else str(address)


class XrayBackend:
    """Removes and adds back users of an Xray or V2Ray core; see the module docstring."""

    def __init__(self, config: Config, places: dict[str, tuple[_Place, ...]]) -> None:
        self.name = config.type
        self.config = config
        self._places = places
        self._ss: str | None = None
        if config.cut_connections:
            search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
            self._ss = shutil.which("ss", path=search)
            if self._ss is None:
                raise ValueError("cut_connections needs `ss` (iproute2), which is not installed")
        self._client = V2RayStatsClient(
            config.address, _SERVICE[config.type], timeout=config.timeout_s
        )

    def serves(self, user_id: str) -> bool:
        return user_id in self._places

    def close(self) -> None:
        self._client.close()

    def apply(self, command: Command) -> Applied:
        if command.action == "warn":
            return Applied("skipped", f"{self.name} does not act on warn")
        places = self._places.get(command.user_id)
        if not places:
            return Applied("skipped", f"{command.user_id} has no account on {self.name}")
        try:
            if command.action == "disable":
                return self._disable(places)
            return self._enable(places)
        except EnforceError:
            raise
        except SourceError as exc:  # unreachable, or refused for another reason
            raise EnforceError(f"{self.name} {command.action} {command.user_id}: {exc}") from exc

    # ------------------------------------------------------------------ disable

    def _disable(self, places: Sequence[_Place]) -> Applied:
        addresses: dict[str, list[str]] = {}
        if self.config.cut_connections and self.config.cut_scope == "client":
            # Read before removal; the list lasts as long as the connections do.
            for place in places:
                if place.email not in addresses:
                    addresses[place.email] = self._online(place.email)
        removed: list[str] = []
        absent: list[str] = []
        for place in places:
            copies = self._remove(place)
            if copies == 0:
                absent.append(place.inbound)
            else:
                removed.append(place.inbound + (f" ({copies} copies)" if copies > 1 else ""))
        parts: list[str] = []
        if removed:
            parts.append("removed from " + ", ".join(removed))
        if absent:
            parts.append("not on " + ", ".join(absent))
        if self.config.cut_connections:
            parts.append(self._cut_all(places, addresses))
        return Applied("applied" if removed else "already", "; ".join(parts))

    def _remove(self, place: _Place) -> int:
        """Remove the user from one inbound; how many copies were there (0: already gone)."""
        copies = 0
        while copies < (_MAX_COPIES if place.duplicates else 1):
            try:
                self._client.remove_user(place.inbound, place.email)
            except ApiError as exc:
                if _says(exc, place.email, "not found"):
                    return copies
                raise EnforceError(
                    f"{self.name}: removing {place.email!r} from {place.inbound!r}: {exc}"
                ) from exc
            copies += 1
        return copies

    def _online(self, email: str) -> list[str]:
        addresses = []
        for text in sorted(self._client.online_ips(email)):
            try:
                addresses.append(_ss_address(text))
            except ValueError:
                continue  # not an IP address: nothing to filter on
        return addresses

    def _cut_all(self, places: Sequence[_Place], addresses: dict[str, list[str]]) -> str:
        notes = []
        for place in places:
            port = self.config.ports[place.inbound]
            if self.config.cut_scope == "port":
                count = self._cut(port, None)
                notes.append(f"cut {count} connection(s) on port {port}")
                continue
            known = addresses.get(place.email, [])
            if not known:
                notes.append(f"no client address known for {place.email!r}: nothing cut")
                continue
            count = self._cut(port, known)
            notes.append(f"cut {count} connection(s) on port {port} from {', '.join(known)}")
        return "; ".join(dict.fromkeys(notes))

    def _cut(self, port: int, addresses: Sequence[str] | None) -> int:
        """`ss -K` the TCP connections to `port` (from `addresses`); how many were cut."""
        assert self._ss is not None
        expression = f"sport = :{port}"
        if addresses is not None:
            expression += " and ( " + " or ".join(f"dst {a}" for a in addresses) + " )"
        killed = self._sockets(["-K", "-t", "-n", "-H", f"( {expression} )"])
        left = self._sockets(["-t", "-n", "-H", f"( {expression} )"]) & killed
        if left:
            raise EnforceError(
                f"{self.name}: `ss -K` did not close {len(left)} connection(s) on port {port}"
                " (does the kernel have CONFIG_INET_DIAG_DESTROY, and is this root?)"
            )
        return len(killed)

    def _sockets(self, arguments: list[str]) -> set[tuple[str, str]]:
        assert self._ss is not None
        try:
            done = subprocess.run(
                [self._ss, *arguments], capture_output=True, text=True,
                timeout=self.config.timeout_s, check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EnforceError(f"{self.name}: ss: {exc}") from exc
        if done.returncode != 0:
            raise EnforceError(f"{self.name}: ss {arguments[0]}: {done.stderr.strip()[:300]}")
        sockets = set()
        for line in done.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 5:
                sockets.add((fields[3], fields[4]))  # local, peer
        return sockets

    # ------------------------------------------------------------------- enable

    def _enable(self, places: Sequence[_Place]) -> Applied:
        added: list[str] = []
        present: list[str] = []
        for place in places:
            (added if self._add(place) else present).append(place.inbound)
        parts: list[str] = []
        if added:
            parts.append("added to " + ", ".join(added))
        if present:
            parts.append("already on " + ", ".join(present))
        return Applied("applied" if added else "already", "; ".join(parts))

    def _add(self, place: _Place) -> bool:
        """Add the user to one inbound; False when they were there already."""
        if self.name == "xray" and self._client.inbound_users(place.inbound, place.email):
            return False  # asked first: old-style Shadowsocks would take a duplicate
        try:
            self._client.add_user(place.inbound, place.email, place.account, place.level)
        except ApiError as exc:
            if _says(exc, place.email, "already exists"):
                return False
            raise EnforceError(
                f"{self.name}: adding {place.email!r} to {place.inbound!r}: {exc}"
            ) from exc
        return True


def build(config: Config, credentials: Credentials) -> XrayBackend:
    """The backend for one `[[enforce.backends]]` entry; ValueError when the credentials
    do not let it re-add a configured user."""
    return XrayBackend(config, _places(config, credentials))

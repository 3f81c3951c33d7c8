"""The `wireguard` backend: a peer's allowed IPs emptied and given back with `wg set`.

A user is one or more peers (`WireGuardAccount`: interface, public key, allowed
IPs). The backend runs `wg` (wireguard-tools) directly, never through a shell,
through the helpers of the source (`quotaflow.producers.sources.wireguard`),
with an injectable runner like the collectors.

* `disable`: `wg show IF allowed-ips` first; a peer with allowed IPs gets
  `wg set IF peer KEY allowed-ips ""`, and the interface is read again to see
  them gone. The peer stays, with its endpoint, keys and transfer counters
  (`wg set IF peer KEY remove` would reset the counters); with no allowed IPs,
  WireGuard neither sends to the peer nor accepts its packets, so traffic stops
  at once, open connections included. A peer already without allowed IPs, or
  not on the interface at all, is `already`.
* `enable`: a peer without allowed IPs gets those of the credentials back. A
  peer with allowed IPs is `already`. A peer that is not on the interface is an
  error: adding it back would need what the credentials do not hold (its
  preshared key, its endpoint), so it belongs in the interface's configuration.
* `warn`: `skipped`.

The empty allowed IPs live in the interface's runtime state: recreating the
interface from a configuration file (`wg-quick down/up`, a reboot) gives them
back, unless the file was saved while disabled (`SaveConfig = true`).

```toml
[[enforce.backends]]
type = "wireguard"
interfaces = ["wg0"]      # only peers on these (default: every interface in the credentials)
timeout_s = 5.0
```

>>> Config(type="wireguard").interfaces is None
True
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from quotaflow.core.plans import Command
from quotaflow.producers.enforce.backends._base import Applied, BackendConfigBase, EnforceError
from quotaflow.producers.enforce.credentials import Credentials, WireGuardAccount
from quotaflow.producers.sources import ParseError, SourceError
from quotaflow.producers.sources.wireguard import (
    is_wg_key,
    read_wg_allowed_ips,
    set_wg_allowed_ips,
)

_INTERFACE = re.compile(r"[A-Za-z0-9_=+.][A-Za-z0-9_=+.-]{0,14}")  # Linux: 15 bytes at most

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Runner = Callable[..., "subprocess.CompletedProcess[str]"]
"""Runs an argv like `subprocess.run` (the default); tests inject their own."""


class Config(BackendConfigBase):
    """The WireGuard interfaces the backend acts on; the peers come from the credentials."""

    type: Literal["wireguard"]
    interfaces: tuple[Annotated[str, Field(pattern=_INTERFACE.pattern)], ...] | None = None
    """Only peers on these interfaces (None: every interface the credentials name)."""
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    """How long each `wg` run may take."""


@dataclass(frozen=True, slots=True)
class _Peer:
    """One peer of a user: where it is, and the allowed IPs that enabling gives back."""

    interface: str
    public_key: str
    networks: tuple[str, ...]


def _network(text: str) -> Network:
    return ipaddress.ip_network(text.strip(), strict=False)


def _peers(config: Config, credentials: Credentials) -> dict[str, tuple[_Peer, ...]]:
    """Every served user's peers; ValueError when an account is wrong or clashes."""
    users = set(config.users) if config.users is not None else credentials.users("wireguard")
    wanted = set(config.interfaces) if config.interfaces is not None else None
    found: dict[str, list[_Peer]] = {}
    owner: dict[tuple[str, str], str] = {}
    networks_on: dict[str, list[tuple[Network, str]]] = {}
    for account in credentials.accounts:
        if not isinstance(account, WireGuardAccount) or account.user_id not in users:
            continue
        if wanted is not None and account.interface not in wanted:
            continue
        where = f"wireguard credentials of {account.user_id!r} on {account.interface!r}"
        if not _INTERFACE.fullmatch(account.interface):
            raise ValueError(f"{where}: not an interface name")
        if not is_wg_key(account.public_key):
            raise ValueError(f"{where}: {account.public_key[:60]!r} is not a public key")
        key = (account.interface, account.public_key)
        if key in owner:
            raise ValueError(
                f"wireguard peer {account.public_key} on {account.interface!r} is listed twice"
                f" (users {owner[key]!r} and {account.user_id!r})"
            )
        owner[key] = account.user_id
        if not account.allowed_ips:
            raise ValueError(f"{where}: no allowed_ips, so enabling could not give any back")
        networks: list[Network] = []
        for text in account.allowed_ips:
            try:
                networks.append(_network(text))
            except ValueError:
                raise ValueError(f"{where}: {text[:60]!r} is not an IP network") from None
        for network in networks:
            for other, user in networks_on.get(account.interface, []):
                if user != account.user_id and network.overlaps(other):
                    raise ValueError(
                        f"{where}: {network} overlaps {other} of {user!r}: WireGuard gives an"
                        " address to one peer only, so enabling one would take it from the other"
                    )
        networks_on.setdefault(account.interface, []).extend(
            (n, account.user_id) for n in networks
        )
        found.setdefault(account.user_id, []).append(
            _Peer(account.interface, account.public_key, tuple(str(n) for n in networks))
        )
    if config.users is not None:
        missing = sorted(set(config.users) - set(found))
        if missing:
            on = f" on {', '.join(config.interfaces)}" if config.interfaces is not None else ""
            raise ValueError(
                f"wireguard backend: no wireguard credentials{on} for the configured users: "
                + ", ".join(missing)
            )
    return {user: tuple(peers) for user, peers in found.items()}


def _short(key: str) -> str:
    return key[:8] + "…"


class WireGuardBackend:
    """Empties and restores peers' allowed IPs; see the module docstring."""

    name = "wireguard"

    def __init__(
        self, config: Config, peers: dict[str, tuple[_Peer, ...]],
        runner: Runner = subprocess.run,
    ) -> None:  # fmt: skip
        self.config = config
        self._peers = peers
        self._runner = runner

    def serves(self, user_id: str) -> bool:
        return user_id in self._peers

    def close(self) -> None:
        """Nothing to release: every call runs `wg` anew."""

    def apply(self, command: Command) -> Applied:
        if command.action == "warn":
            return Applied("skipped", "wireguard does not act on warn")
        peers = self._peers.get(command.user_id)
        if not peers:
            return Applied("skipped", f"{command.user_id} has no wireguard peer")
        try:
            if command.action == "disable":
                return self._disable(peers)
            return self._enable(peers)
        except (SourceError, ParseError) as exc:
            raise EnforceError(f"wireguard {command.action} {command.user_id}: {exc}") from exc

    def _read(self, interfaces: Sequence[str]) -> dict[str, dict[str, tuple[str, ...]]]:
        return {
            interface: read_wg_allowed_ips(
                interface, self._runner, timeout=self.config.timeout_s
            )
            for interface in dict.fromkeys(interfaces)
        }

    def _set(self, peer: _Peer, networks: Sequence[str]) -> None:
        set_wg_allowed_ips(
            peer.interface, peer.public_key, networks, self._runner,
            timeout=self.config.timeout_s,
        )  # fmt: skip

    def _disable(self, peers: Sequence[_Peer]) -> Applied:
        now = self._read([p.interface for p in peers])
        changed: list[_Peer] = []
        notes: list[str] = []
        for peer in peers:
            current = now[peer.interface].get(peer.public_key)
            if current is None:
                notes.append(f"peer {_short(peer.public_key)} not on {peer.interface}")
            elif not current:
                notes.append(f"peer {_short(peer.public_key)} on {peer.interface} already empty")
            else:
                self._set(peer, [])
                changed.append(peer)
        if changed:
            after = self._read([p.interface for p in changed])
            for peer in changed:
                if after[peer.interface].get(peer.public_key):
                    raise EnforceError(
                        f"wireguard: peer {peer.public_key} on {peer.interface} still has"
                        " allowed IPs after `wg set`"
                    )
        done = [f"emptied allowed-ips of {_short(p.public_key)} on {p.interface}" for p in changed]
        return Applied("applied" if changed else "already", "; ".join(done + notes))

    def _enable(self, peers: Sequence[_Peer]) -> Applied:
        now = self._read([p.interface for p in peers])
        changed: list[_Peer] = []
        notes: list[str] = []
        for peer in peers:
            current = now[peer.interface].get(peer.public_key)
            if current is None:
                raise EnforceError(
                    f"wireguard: peer {peer.public_key} is not on {peer.interface}; adding it"
                    " back needs its preshared key and endpoint, which belong in the"
                    " interface's configuration"
                )
            if current:
                note = f"peer {_short(peer.public_key)} on {peer.interface} has allowed-ips"
                if {str(_network(c)) for c in current} != set(peer.networks):
                    note += f" {','.join(current)} (credentials: {','.join(peer.networks)})"
                notes.append(note)
            else:
                self._set(peer, peer.networks)
                changed.append(peer)
        if changed:
            after = self._read([p.interface for p in changed])
            for peer in changed:
                got = {str(_network(c)) for c in after[peer.interface].get(peer.public_key, ())}
                if got != set(peer.networks):
                    raise EnforceError(
                        f"wireguard: peer {peer.public_key} on {peer.interface} has allowed-ips"
                        f" {sorted(got)} after `wg set`, not {list(peer.networks)}"
                    )
        done = [
            f"restored {','.join(p.networks)} for {_short(p.public_key)} on {p.interface}"
            for p in changed
        ]
        return Applied("applied" if changed else "already", "; ".join(done + notes))


def build(config: Config, credentials: Credentials) -> WireGuardBackend:
    """The backend for one `[[enforce.backends]]` entry; ValueError when the credentials
    do not let it restore a configured user."""
    return WireGuardBackend(config, _peers(config, credentials))

"""WireGuard: `wg show IFACE dump`; users are peer public keys.

The source named `wireguard`. The kernel's (or wireguard-go's) counters start at
zero with the interface, so the epoch is the boot time by default.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from typing import Literal

from quotaflow.core.contracts import Counter
from quotaflow.producers.sources._parsing import (
    ParseError,
    add_traffic,
    counters_of,
    decimal_uint,
)
from quotaflow.producers.sources._runtime import (
    ReadParseCollector,
    Runner,
    Source,
    SourceConfigBase,
    run_command,
)

_WG_KEY = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")


def parse_wg_dump(text: str) -> list[Counter]:
    """Per-peer counters from `wg show all dump` (or `wg show IFACE dump`).

    In the `all` form interface lines have 5 tab-separated fields and peer lines 9;
    for one interface the interface column is missing (4 and 8). `transfer-rx` is
    what the server received from the peer, the user's upload. The peer's public
    key is the user id; a key present on several interfaces is summed.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    rows = [line.split("\t") for line in lines]
    lengths = {len(row) for row in rows}
    if not rows:
        return []
    if lengths <= {5, 9}:
        with_iface = True
    elif lengths <= {4, 8}:
        with_iface = False
    else:
        raise ParseError(f"wg dump: unexpected field counts {sorted(lengths)}; expected 5/9 or 4/8")
    interfaces: set[str] = set()
    seen: set[tuple[str, str]] = set()
    totals: dict[str, tuple[int, int]] = {}
    current = ""
    for number, row in enumerate(rows, 1):
        if with_iface:
            iface, fields = row[0], row[1:]
        else:
            iface, fields = "", row
        if len(fields) == 4:  # private-key, public-key, listen-port, fwmark
            if with_iface and (not iface or iface in interfaces):
                raise ParseError(f"wg dump row {number}: bad or repeated interface {iface[:20]!r}")
            if not with_iface and interfaces:
                raise ParseError(
                    f"wg dump row {number}: a second interface in a one-interface dump"
                )
            interfaces.add(iface)
            current = iface
            continue
        if iface not in interfaces or (with_iface and iface != current):
            raise ParseError(f"wg dump row {number}: peer before its interface line")
        key, _psk, _endpoint, _ips, handshake, rx, tx, _keepalive = fields
        if not _WG_KEY.fullmatch(key):
            raise ParseError(f"wg dump row {number}: {key[:50]!r} is not a WireGuard public key")
        if (iface, key) in seen:
            raise ParseError(f"wg dump row {number}: peer {key} listed twice on {iface!r}")
        seen.add((iface, key))
        decimal_uint(handshake, f"wg dump row {number}: latest-handshake")
        up = decimal_uint(rx, f"wg dump row {number}: transfer-rx")
        down = decimal_uint(tx, f"wg dump row {number}: transfer-tx")
        add_traffic(totals, key, up, down)
    return counters_of(totals)


def read_wg_dump(
    interface: str = "all", runner: Runner = subprocess.run, *, timeout: float = 10.0
) -> str:
    """`wg show IFACE dump` (all interfaces by default), for `parse_wg_dump`."""
    return run_command(["wg", "show", interface, "dump"], timeout, runner)


def is_wg_key(text: str) -> bool:
    """Whether `text` is a WireGuard public key (44 characters of base64, 32 bytes).

    >>> is_wg_key("hT1rnM0Tn0s4kTZWKbFeZ1bTVrUZ5nMZT0R7wo5S4lY="), is_wg_key("alice")
    (True, False)
    """
    return _WG_KEY.fullmatch(text) is not None


def parse_wg_allowed_ips(text: str) -> dict[str, tuple[str, ...]]:
    """Each peer's allowed IPs from `wg show IFACE allowed-ips`.

    One line per peer: the public key, a tab, then the networks separated by
    spaces, or `(none)` for a peer with none (kept, but passing no traffic).

    >>> a = "hT1rnM0Tn0s4kTZWKbFeZ1bTVrUZ5nMZT0R7wo5S4lY="
    >>> b = "9xBb9s+DPUUSgbmrZenA2HpgxVUx05YxHZodhr9XpFE="
    >>> parse_wg_allowed_ips(f"{a}\\t10.8.0.2/32 fd00::2/128\\n{b}\\t(none)\\n") == {
    ...     a: ("10.8.0.2/32", "fd00::2/128"), b: ()}
    True
    """
    peers: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, tab, rest = line.partition("\t")
        if not tab or not _WG_KEY.fullmatch(key):
            raise ParseError(f"wg allowed-ips line {number}: expected a public key and a tab")
        if key in peers:
            raise ParseError(f"wg allowed-ips line {number}: peer {key} listed twice")
        networks = tuple(rest.split())
        if networks == ("(none)",):
            networks = ()
        for network in networks:
            if not re.fullmatch(r"[0-9A-Fa-f.:]+/[0-9]{1,3}", network):
                raise ParseError(
                    f"wg allowed-ips line {number}: {network[:50]!r} is not a network"
                )
        peers[key] = networks
    return peers


def read_wg_allowed_ips(
    interface: str, runner: Runner = subprocess.run, *, timeout: float = 10.0
) -> dict[str, tuple[str, ...]]:
    """Each peer's allowed IPs on `interface` (`wg show IFACE allowed-ips`); no shell."""
    return parse_wg_allowed_ips(
        run_command(["wg", "show", interface, "allowed-ips"], timeout, runner)
    )


def set_wg_allowed_ips(
    interface: str,
    public_key: str,
    networks: Sequence[str],
    runner: Runner = subprocess.run,
    *,
    timeout: float = 10.0,
) -> None:
    """`wg set IFACE peer KEY allowed-ips A,B` (an empty list: the peer passes nothing).

    The peer keeps its endpoint, keys and transfer counters; `wg set ... peer KEY
    remove` would drop it and its counters. A peer not on the interface is
    created, so check with `read_wg_allowed_ips` first.
    """
    argv = ["wg", "set", interface, "peer", public_key, "allowed-ips", ",".join(networks)]
    run_command(argv, timeout, runner)


class WireGuardConfig(SourceConfigBase):
    """`wg show IFACE dump`; users are peer public keys."""

    type: Literal["wireguard"]
    interface: str = "all"
    epoch: Literal["constant", "boot"] = "boot"


def _collector(config: WireGuardConfig) -> ReadParseCollector:
    interface = config.interface
    return ReadParseCollector(
        lambda: read_wg_dump(interface), parse_wg_dump, config.user_map, config.epoch
    )


SOURCE = Source(name="wireguard", config=WireGuardConfig, collector=_collector, parse=parse_wg_dump)

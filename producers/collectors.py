"""Collectors: what the agent polls. Each one reads a source and returns a `Snapshot`.

A collector only reads (through `producers.sources`) and parses (through
`producers.parsers`); the agent stamps, stores and sends. Every collector returns
*cumulative* counters and decides its epoch, the time its counters started:

* v2ray / sing-box: the core's start time from its uptime (`V2RayStatsClient.epoch_ms`);
* iptables, wireguard: the host's boot time (a reboot zeroes the counters), read
  once per boot and kept, so that clock steps do not move it;
* openvpn: constant — an `OpenVpnAccumulator`, persisted with every report, keeps
  ended sessions' bytes so the counters never restart;
* ss-manager, prometheus, command: constant by default (`epoch = "boot"` chooses the
  boot time). A counter that goes down within an epoch is billed as restarted by
  the stream, so a constant epoch loses nothing.

A constant epoch is chosen once (the first start's time in ms) and kept in the
outbox through `state()`/`restore()`.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import orjson
from pydantic import BaseModel, ConfigDict, Field

from producers import parsers, sources
from quotaflow.contracts import Counter, validate_counter

__all__ = [
    "COMMAND_PARSERS",
    "Collector",
    "CollectorConfig",
    "Snapshot",
    "Stateful",
    "build_collector",
    "parse_counters_json",
]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One reading of a source: its epoch and every user's cumulative counters."""

    epoch: int
    counters: list[Counter]


class Collector(Protocol):
    """Anything the agent can poll."""

    def collect(self) -> Snapshot:
        """Read the source now; raise on any doubt rather than guess."""
        ...


@runtime_checkable
class Stateful(Protocol):
    """A collector with state to keep across agent restarts (saved with each report)."""

    def state(self) -> Any:
        """JSON-able state."""
        ...

    def restore(self, state: Any) -> None:
        """Take back what `state()` returned before a restart."""
        ...


def boot_time_ms() -> int:
    """The host's boot time in ms since 1970 (`btime` of /proc/stat)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1]) * 1000
    raise sources.SourceError("no btime in /proc/stat")


def boot_id() -> str | None:
    """The kernel's id of this boot, or None where /proc does not have it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def now_ms() -> int:
    """Wall-clock ms since 1970."""
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- config


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_id: str | None = Field(default=None, min_length=1, max_length=256)
    interval_s: float = Field(default=60.0, gt=0)
    user_map: dict[str, str] = Field(default_factory=dict)
    epoch: Literal["constant", "boot"] = "constant"


class V2RayConfig(_Base):
    """V2Ray / Xray / sing-box (with the v2ray API) StatsService over gRPC."""

    type: Literal["v2ray", "sing-box"]
    address: str
    service: str | None = None
    timeout_s: float = 5.0


class SsManagerConfig(_Base):
    """shadowsocks-libev ss-manager (UDP host:port or unix socket path); users are ports."""

    type: Literal["ss-manager"]
    address: str
    timeout_s: float = 2.0


class IptablesConfig(_Base):
    """An accounting chain read with `iptables -nvxL`; users are ports."""

    type: Literal["iptables"]
    chain: str
    table: str = "filter"
    binary: Literal["iptables", "ip6tables"] = "iptables"
    epoch: Literal["constant", "boot"] = "boot"


class OpenVpnConfig(_Base):
    """An OpenVPN `--status` file (versions 1-3); users are common names."""

    type: Literal["openvpn"]
    status_file: Path


class WireGuardConfig(_Base):
    """`wg show IFACE dump`; users are peer public keys."""

    type: Literal["wireguard"]
    interface: str = "all"
    epoch: Literal["constant", "boot"] = "boot"


class PrometheusConfig(_Base):
    """A Prometheus text endpoint (v2ray-exporter by default)."""

    type: Literal["prometheus"]
    url: str
    up_metric: str = parsers.V2RAY_EXPORTER_MAPPING.up_metric
    down_metric: str = parsers.V2RAY_EXPORTER_MAPPING.down_metric
    user_label: str = parsers.V2RAY_EXPORTER_MAPPING.user_label
    direction_label: str | None = None
    up_value: str | None = None
    down_value: str | None = None
    match: dict[str, str] = Field(
        default_factory=lambda: dict(parsers.V2RAY_EXPORTER_MAPPING.match)
    )
    timeout_s: float = 10.0


class CommandConfig(_Base):
    """Any command whose output one of `COMMAND_PARSERS` reads (argv, no shell)."""

    type: Literal["command"]
    command: list[str] = Field(min_length=1)
    parser: Literal["json", "v2ray-json", "ss-manager", "iptables", "wireguard", "openvpn"]
    timeout_s: float = 30.0


CollectorConfig = Annotated[
    V2RayConfig | SsManagerConfig | IptablesConfig | OpenVpnConfig | WireGuardConfig
    | PrometheusConfig | CommandConfig,
    Field(discriminator="type"),
]


# --------------------------------------------------------------------------- collectors


def parse_counters_json(text: str) -> list[Counter]:
    """`{"user": [up, down], ...}` or a list of `{"user_id", "up", "down"}` objects."""
    data = orjson.loads(text)
    if isinstance(data, dict):
        items = data.items()
        pairs = []
        for user, value in items:
            if not isinstance(value, list) or len(value) != 2:
                raise parsers.ParseError(f"counters of {user!r:.40} must be [up, down]")
            pairs.append(Counter(user_id=user, up=value[0], down=value[1]))
        return pairs
    if isinstance(data, list):
        return [validate_counter(item) for item in data]
    raise parsers.ParseError("expected a JSON object or list of counters")


COMMAND_PARSERS: Mapping[str, Callable[[str], list[Counter]]] = {
    "json": parse_counters_json,
    "v2ray-json": parsers.parse_v2ray_stats_json,
    "ss-manager": parsers.parse_ss_manager_stat,
    "iptables": parsers.parse_iptables,
    "wireguard": parsers.parse_wg_dump,
}
"""Parsers a `command` collector can name (plus "openvpn", which also accumulates)."""


class _EpochKeeper:
    """A constant epoch chosen at the first start, or the host's boot time.

    btime is the wall clock minus the uptime, so it moves whenever the clock is
    stepped (NTP after boot, a VM's time sync); a larger epoch would re-bill the
    whole counters, a smaller one make every report stale. So the boot epoch is
    read once per boot (`boot_id`) and kept, and a new boot's epoch is always
    larger than the last one.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._constant: int | None = None
        self._boot: tuple[str, int] | None = None  # (boot id, its epoch)

    def epoch(self) -> int:
        if self.mode == "boot":
            return self._boot_epoch()
        if self._constant is None:
            self._constant = now_ms()
        return self._constant

    def _boot_epoch(self) -> int:
        current = boot_id()
        if current is None:
            return boot_time_ms()
        if self._boot is not None and self._boot[0] == current:
            return self._boot[1]
        epoch = boot_time_ms()
        if self._boot is not None and epoch <= self._boot[1]:
            epoch = self._boot[1] + 1
        self._boot = (current, epoch)
        return epoch

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": self._constant}
        if self._boot is not None:
            out["boot"] = list(self._boot)
        return out

    def restore(self, state: Any) -> None:
        if isinstance(state, dict) and isinstance(state.get("epoch"), int):
            self._constant = state["epoch"]
        boot = state.get("boot") if isinstance(state, dict) else None
        if (
            isinstance(boot, list) and len(boot) == 2 and isinstance(boot[0], str)
            and isinstance(boot[1], int) and not isinstance(boot[1], bool)
        ):
            self._boot = (boot[0], boot[1])


class ReadParseCollector:
    """Reads text with `read`, parses it with `parse`, renames users, stamps the epoch."""

    def __init__(
        self,
        read: Callable[[], str],
        parse: Callable[[str], list[Counter]],
        user_map: Mapping[str, str],
        epoch: str = "constant",
    ) -> None:
        self._read, self._parse, self._user_map = read, parse, dict(user_map)
        self._epoch = _EpochKeeper(epoch)

    def collect(self) -> Snapshot:
        counters = parsers.apply_user_map(self._parse(self._read()), self._user_map)
        return Snapshot(self._epoch.epoch(), counters)

    def state(self) -> Any:
        return self._epoch.state()

    def restore(self, state: Any) -> None:
        self._epoch.restore(state)


class OpenVpnCollector:
    """OpenVPN status text through a persisted `OpenVpnAccumulator`; constant epoch."""

    def __init__(self, read: Callable[[], str], user_map: Mapping[str, str]) -> None:
        self._read, self._user_map = read, dict(user_map)
        self._acc = parsers.OpenVpnAccumulator()
        self._epoch = _EpochKeeper("constant")

    def collect(self) -> Snapshot:
        counters = self._acc.update(parsers.parse_openvpn_status(self._read()))
        return Snapshot(self._epoch.epoch(), parsers.apply_user_map(counters, self._user_map))

    def state(self) -> Any:
        return {**self._epoch.state(), "accumulator": self._acc.state()}

    def restore(self, state: Any) -> None:
        if isinstance(state, dict):
            self._epoch.restore(state)
            if state.get("accumulator") is not None:
                self._acc = parsers.OpenVpnAccumulator.from_state(state["accumulator"])


class _SteadyClock:
    """Wall-clock ms that clock steps do not move: the monotonic clock (system-wide,
    so it goes on across agent restarts) plus an offset taken once per boot."""

    def __init__(self) -> None:
        self._offset: tuple[str, int] | None = None  # (boot id, wall ms - monotonic ms)

    def now_ms(self) -> int:
        boot = boot_id()
        if boot is None:
            return now_ms()
        mono = time.monotonic_ns() // 1_000_000
        if self._offset is None or self._offset[0] != boot:
            self._offset = (boot, now_ms() - mono)
        return self._offset[1] + mono

    def state(self) -> list[Any] | None:
        return None if self._offset is None else list(self._offset)

    def restore(self, state: Any) -> None:
        if (
            isinstance(state, list) and len(state) == 2 and isinstance(state[0], str)
            and isinstance(state[1], int) and not isinstance(state[1], bool)
        ):
            self._offset = (state[0], state[1])


class V2RayCollector:
    """A V2Ray/Xray/sing-box core's user stats; the epoch is the core's start time.

    The start time is now - uptime, with "now" from a `_SteadyClock`: with the wall
    clock, a step of more than `sources.EPOCH_TOLERANCE_MS` (NTP, a VM's time sync)
    looked like a restart of the core and re-billed every user's whole counter.
    """

    def __init__(self, config: V2RayConfig) -> None:
        self.config = config
        self._client: sources.V2RayStatsClient | None = None
        self._epoch_hint: int | None = None
        self._clock = _SteadyClock()

    def _connect(self) -> sources.V2RayStatsClient:
        if self._client is None:
            self._client = sources.V2RayStatsClient(
                self.config.address, self.config.service, timeout=self.config.timeout_s,
                epoch_hint=self._epoch_hint,
            )
        return self._client

    def collect(self) -> Snapshot:
        client = self._connect()
        try:
            epoch = client.epoch_ms(self._clock.now_ms())
            counters = client.query_user_counters()
            # A restart between the two calls would mix epochs: ask again.
            if client.epoch_ms(self._clock.now_ms()) != epoch:
                raise sources.SourceError(f"{self.config.address} restarted while being read")
        except Exception:
            client.close()
            self._client = None
            raise
        self._epoch_hint = epoch
        return Snapshot(epoch, parsers.apply_user_map(counters, self.config.user_map))

    def state(self) -> Any:
        return {"epoch": self._epoch_hint, "clock": self._clock.state()}

    def restore(self, state: Any) -> None:
        if isinstance(state, dict) and isinstance(state.get("epoch"), int):
            self._epoch_hint = state["epoch"]
        if isinstance(state, dict):
            self._clock.restore(state.get("clock"))


def _run_command(argv: list[str], timeout: float) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise sources.SourceError(
            f"{argv[0]} exited {done.returncode}: {done.stderr.strip()[:300]}"
        )
    return done.stdout


def _fetch(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        body: bytes = answer.read()
    return body.decode("utf-8")


def build_collector(config: CollectorConfig) -> Collector:
    """The collector a config entry describes."""
    c = config
    if isinstance(c, V2RayConfig):
        return V2RayCollector(c)
    if isinstance(c, SsManagerConfig):
        client = sources.SsManagerClient(c.address, timeout=c.timeout_s)
        return ReadParseCollector(client.ping, parsers.parse_ss_manager_stat, c.user_map, c.epoch)
    if isinstance(c, IptablesConfig):
        chain, table, binary = c.chain, c.table, c.binary
        return ReadParseCollector(
            lambda: sources.read_iptables(chain, table=table, binary=binary),
            parsers.parse_iptables, c.user_map, c.epoch,
        )
    if isinstance(c, OpenVpnConfig):
        path = c.status_file
        return OpenVpnCollector(lambda: sources.read_openvpn_status(path), c.user_map)
    if isinstance(c, WireGuardConfig):
        iface = c.interface
        return ReadParseCollector(
            lambda: sources.read_wg_dump(iface), parsers.parse_wg_dump, c.user_map, c.epoch
        )
    if isinstance(c, PrometheusConfig):
        mapping = parsers.PrometheusMapping(
            up_metric=c.up_metric, down_metric=c.down_metric, user_label=c.user_label,
            direction_label=c.direction_label, up_value=c.up_value, down_value=c.down_value,
            match=c.match,
        )
        url, timeout = c.url, c.timeout_s
        return ReadParseCollector(
            lambda: _fetch(url, timeout), lambda text: parsers.parse_prometheus(text, mapping),
            c.user_map, c.epoch,
        )
    argv, timeout = c.command, c.timeout_s
    if c.parser == "openvpn":
        return OpenVpnCollector(lambda: _run_command(argv, timeout), c.user_map)
    return ReadParseCollector(
        lambda: _run_command(argv, timeout), COMMAND_PARSERS[c.parser], c.user_map, c.epoch
    )


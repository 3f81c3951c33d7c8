"""What every source shares at run time: the collector protocol, epochs, running commands.

A collector reads its program (through a `read` callable or a client) and parses
what it got; the agent stamps, stores and sends. Every collector returns
*cumulative* counters and decides its epoch, the time its counters started. A
constant epoch is chosen once (the first start's time in ms) and kept in the
outbox through `state()`/`restore()`; the boot epoch is the host's boot time.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from quotaflow.core.contracts import Counter
from quotaflow.producers.sources._parsing import apply_user_map

TextParser = Callable[[str], list[Counter]]
Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class SourceError(RuntimeError):
    """A proxy or VPN program could not be asked, or refused what was asked."""


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
    raise SourceError("no btime in /proc/stat")


def boot_id() -> str | None:
    """The kernel's id of this boot, or None where /proc does not have it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def now_ms() -> int:
    """Wall-clock ms since 1970."""
    return time.time_ns() // 1_000_000

class SourceConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_id: str | None = Field(default=None, min_length=1, max_length=256)
    interval_s: float = Field(default=60.0, gt=0)
    user_map: dict[str, str] = Field(default_factory=dict)
    epoch: Literal["constant", "boot"] = "constant"
    type: str


class EpochKeeper:
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
        self._epoch = EpochKeeper(epoch)

    def collect(self) -> Snapshot:
        counters = apply_user_map(self._parse(self._read()), self._user_map)
        return Snapshot(self._epoch.epoch(), counters)

    def state(self) -> Any:
        return self._epoch.state()

    def restore(self, state: Any) -> None:
        self._epoch.restore(state)


def run_command(
    argv: Sequence[str], timeout: float, runner: Runner = subprocess.run
) -> str:
    """The standard output of `argv` (no shell); `SourceError` if it fails or exits non-zero."""
    try:
        done = runner(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SourceError(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise SourceError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[:300]}")
    return str(done.stdout)


def fetch(url: str, timeout: float) -> str:
    """The body of an HTTP GET, as text."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        body: bytes = answer.read()
    return body.decode("utf-8")


@dataclass(frozen=True, slots=True)
class Source:
    """One kind of source, as the agent's config, the `command` source and `quotaflow parse` see it.

    `name` is the source's one name: the config's `type`, the `command` source's
    `parser`, the `--source` of `quotaflow parse` and the docs all use it.
    `config` is its config model, `collector` builds a live collector from one,
    and `parse` (where the source's program prints text) reads that text, for
    `quotaflow parse` and for the `command` source; `text_collector` turns a
    `read` callable into a collector (stateful sources such as OpenVPN's override it).
    """

    name: str
    config: type[SourceConfigBase]
    collector: Callable[[Any], Collector]
    parse: TextParser | None = None
    text_collector: Callable[[Callable[[], str], Mapping[str, str], str], Collector] | None = None

    def collector_from_text(
        self, read: Callable[[], str], user_map: Mapping[str, str], epoch: str
    ) -> Collector:
        """A collector that reads text with `read` and parses it as this source's output."""
        if self.text_collector is not None:
            return self.text_collector(read, user_map, epoch)
        if self.parse is None:
            raise ValueError(f"the {self.name} source has no text format")
        return ReadParseCollector(read, self.parse, user_map, epoch)

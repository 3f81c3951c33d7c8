"""Any command whose output another source's parser reads, or the counters JSON format.

The source named `command`: `command` is an argv (no shell), `parser` names the
format of its output: `json` (`{"user": [up, down]}`) or the name of a source
whose program prints text (`v2ray`, `ss-manager`, `iptables`, `wireguard`,
`openvpn`, `prometheus`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from quotaflow.producers.sources import iptables, openvpn, prometheus, ss_manager, v2ray, wireguard
from quotaflow.producers.sources._parsing import parse_counters_json
from quotaflow.producers.sources._runtime import (
    Collector,
    ReadParseCollector,
    Source,
    SourceConfigBase,
    run_command,
)

TEXT_SOURCES = {
    s.name: s for s in (
        v2ray.SOURCE, ss_manager.SOURCE, iptables.SOURCE, wireguard.SOURCE, openvpn.SOURCE,
        prometheus.SOURCE,
    )
}
"""The sources whose text a `command` can print, by name."""

class CommandConfig(SourceConfigBase):
    """Any command whose output `json` or a text source's parser reads (argv, no shell)."""

    type: Literal["command"]
    command: list[str] = Field(min_length=1)
    parser: Literal[
        "json", "v2ray", "ss-manager", "iptables", "wireguard", "openvpn", "prometheus"
    ]
    timeout_s: float = 30.0


def _collector(config: CommandConfig) -> Collector:
    argv, timeout = config.command, config.timeout_s

    def read() -> str:
        return run_command(argv, timeout)

    if config.parser == "json":
        return ReadParseCollector(read, parse_counters_json, config.user_map, config.epoch)
    return TEXT_SOURCES[config.parser].collector_from_text(read, config.user_map, config.epoch)


SOURCE = Source(
    name="command", config=CommandConfig, collector=_collector, parse=parse_counters_json
)

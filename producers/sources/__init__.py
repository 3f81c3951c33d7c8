"""The proxy and VPN programs quotaflow reads counters from: one module per source.

Each module holds its source's config model, the client or reader that asks the
program, the parser of what it answers and the collector the agent polls, and
ends with a `SOURCE` that registers them under the source's one name. `SOURCES`
is the registry the agent's config, the `command` source and `quotaflow parse`
all use:

>>> sorted(SOURCES)
['command', 'iptables', 'openvpn', 'prometheus', 'ss-manager', 'v2ray', 'wireguard']
>>> SOURCES["wireguard"].parse("wg0\\tPRIV\\tPUB\\t51820\\toff\\n").__len__()
0

Adding a source is one new module and one line in `SOURCES` (and in `SourceConfig`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from quotaflow.producers.sources import (
    command,
    iptables,
    openvpn,
    prometheus,
    ss_manager,
    v2ray,
    wireguard,
)
from quotaflow.producers.sources._parsing import ParseError, apply_user_map, parse_counters_json
from quotaflow.producers.sources._runtime import (
    Collector,
    Snapshot,
    Source,
    SourceError,
    Stateful,
)

__all__ = [
    "SOURCES",
    "Collector",
    "ParseError",
    "Snapshot",
    "Source",
    "SourceConfig",
    "SourceError",
    "Stateful",
    "apply_user_map",
    "build_collector",
    "parse_counters_json",
]

SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        v2ray.SOURCE,
        ss_manager.SOURCE,
        iptables.SOURCE,
        openvpn.SOURCE,
        wireguard.SOURCE,
        prometheus.SOURCE,
        command.SOURCE,
    )
}

SourceConfig = Annotated[
    v2ray.V2RayConfig
    | ss_manager.SsManagerConfig
    | iptables.IptablesConfig
    | openvpn.OpenVpnConfig
    | wireguard.WireGuardConfig
    | prometheus.PrometheusConfig
    | command.CommandConfig,
    Field(discriminator="type"),
]
"""One `[[collectors]]` entry of the agent config; `type` names the source."""


def build_collector(config: SourceConfig) -> Collector:
    """The live collector a config entry describes."""
    return SOURCES[config.type].collector(config)

"""The enforcement backends: one module per program, loaded by the `type` of a config entry.

Each module defines `Config` (a `BackendConfigBase` with its `type` literal and
options) and `build(config, credentials) -> Backend`. `BACKENDS` maps each type
to its module, so a node agent imports only the backends it is configured with:

>>> sorted(BACKENDS)
['command', 'openvpn', 'sing-box', 'ss-manager', 'v2ray', 'webhook', 'wireguard', 'xray']
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from quotaflow.producers.enforce.backends._base import (
    Applied,
    Backend,
    BackendConfigBase,
    EnforceError,
    PreparesDisable,
)
from quotaflow.producers.enforce.credentials import Credentials

__all__ = [
    "BACKENDS",
    "Applied",
    "Backend",
    "BackendConfigBase",
    "EnforceError",
    "PreparesDisable",
    "load_backend",
]

_HERE = "quotaflow.producers.enforce.backends"
BACKENDS: dict[str, str] = {
    "xray": f"{_HERE}.xray",  # Xray and V2Ray share one module: the same gRPC API
    "v2ray": f"{_HERE}.xray",
    "sing-box": f"{_HERE}.singbox",
    "ss-manager": f"{_HERE}.ss_manager",
    "wireguard": f"{_HERE}.wireguard",
    "openvpn": f"{_HERE}.openvpn",
    "webhook": f"{_HERE}.webhook",
    "command": f"{_HERE}.command",
}


def load_backend(entry: Mapping[str, Any], credentials: Credentials) -> Backend:
    """Build the backend an `[[enforce.backends]]` entry describes; ValueError if it is bad."""
    kind = entry.get("type")
    if kind not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise ValueError(f"unknown enforcement backend type {kind!r} (known: {known})")
    module = importlib.import_module(BACKENDS[kind])
    config = module.Config.model_validate(dict(entry))
    backend: Backend = module.build(config, credentials)
    return backend

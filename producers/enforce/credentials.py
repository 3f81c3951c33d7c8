"""The accounts enforcement needs to let a user back in: one file, read at start.

Disabling a user removes them from the program; enabling adds them back, and for
that the program needs the user's account (a UUID, a password, a port, a key).
They come from a credentials file, TOML or JSON, with one `accounts` entry per
user and place (an inbound, a port, an interface):

```toml
[[accounts]]
user_id = "alice"
backend = "xray"          # or v2ray
inbound = "vless-in"      # the inbound tag
protocol = "vless"        # vmess, vless, trojan, shadowsocks
id = "6f1c2b9e-7a4d-4f52-9c1e-0d8b3a5e2f10"
flow = "xtls-rprx-vision"

[[accounts]]
user_id = "alice"
backend = "ss-manager"
server_port = 8388
password = "alice-secret"
```

A panel export is the same structure as JSON (`{"accounts": [...]}`). Every
secret is a `SecretStr`: it never appears in logs or reprs.

>>> creds = Credentials.parse('''
... [[accounts]]
... user_id = "alice"
... backend = "wireguard"
... interface = "wg0"
... public_key = "hT1rnM0Tn0s4kTZWKbFeZ1bTVrUZ5nMZT0R7wo5S4lY="
... allowed_ips = ["10.8.0.2/32"]
... ''', "toml")
>>> [a.interface for a in creds.of("alice", "wireguard")]
['wg0']
>>> creds.of("bob", "wireguard")
[]
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from quotaflow.core.contracts import Identifier


class _Account(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: Identifier


class ProxyAccount(_Account):
    """A user on one Xray/V2Ray inbound."""

    backend: Literal["xray", "v2ray"]
    inbound: Annotated[str, Field(min_length=1)]
    protocol: Literal["vmess", "vless", "trojan", "shadowsocks"]
    email: str | None = None
    """The user's name in the proxy (stats and `RemoveUserOperation` use it); default user_id."""
    id: str | None = None
    """VMess/VLESS: the UUID."""
    flow: str = ""
    password: SecretStr | None = None
    """Trojan, Shadowsocks: the password (Shadowsocks 2022: the user key)."""
    method: str | None = None
    """Shadowsocks: the cipher."""
    level: int = 0

    @property
    def name(self) -> str:
        """The user's name in the proxy."""
        return self.email or self.user_id


class SsManagerAccount(_Account):
    """A user's port on ss-manager."""

    backend: Literal["ss-manager"]
    server_port: Annotated[int, Field(ge=1, le=65535)]
    password: SecretStr
    method: str | None = None


class SingBoxAccount(_Account):
    """A user of a sing-box Shadowsocks inbound managed through its SSM API."""

    backend: Literal["sing-box"]
    inbound: Annotated[str, Field(min_length=1)]
    """The managed inbound's SSM path (its `servers` key), such as `/ss`."""
    name: str | None = None
    password: SecretStr


class WireGuardAccount(_Account):
    """A WireGuard peer."""

    backend: Literal["wireguard"]
    interface: Annotated[str, Field(min_length=1)]
    public_key: Annotated[str, Field(min_length=1)]
    allowed_ips: tuple[str, ...]


class OpenVpnAccount(_Account):
    """An OpenVPN client by its certificate's common name."""

    backend: Literal["openvpn"]
    common_name: Annotated[str, Field(min_length=1)]


Account = Annotated[
    ProxyAccount | SsManagerAccount | SingBoxAccount | WireGuardAccount | OpenVpnAccount,
    Field(discriminator="backend"),
]


class Credentials(BaseModel):
    """Every account of a credentials file; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accounts: tuple[Account, ...] = ()

    def of(self, user_id: str, backend: str) -> list[Account]:
        """The accounts of a user for a backend type (xray and v2ray share theirs)."""
        family = {"xray", "v2ray"} if backend in ("xray", "v2ray") else {backend}
        return [a for a in self.accounts if a.user_id == user_id and a.backend in family]

    def users(self, backend: str) -> set[str]:
        """Every user with an account for a backend type."""
        family = {"xray", "v2ray"} if backend in ("xray", "v2ray") else {backend}
        return {a.user_id for a in self.accounts if a.backend in family}

    @classmethod
    def parse(cls, text: str, form: Literal["toml", "json"]) -> Credentials:
        """Read a credentials file's text; ValueError naming the entry that is wrong."""
        try:
            data = tomllib.loads(text) if form == "toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"credentials: not {form.upper()}: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)[:5]
            )
            raise ValueError(f"credentials: {problems}") from None

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """Read a credentials file (`.json` is JSON, anything else TOML)."""
        form: Literal["toml", "json"] = "json" if path.suffix == ".json" else "toml"
        return cls.parse(path.read_text(), form)

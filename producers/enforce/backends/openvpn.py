"""The `openvpn` backend: a client refused by its client-config-dir file and killed.

A user is one or more certificate common names (`OpenVpnAccount`). The server
must run with `--client-config-dir` set to `ccd_dir` and a `--management`
interface; the backend writes the files and speaks to the interface through the
source's `OpenVpnManagement` (`quotaflow.producers.sources.openvpn`).

* `disable`: a `disable` line is added to `ccd_dir/<CN>` (the file is created,
  or its other lines kept), written to a temporary file and renamed; then the
  management command `kill <CN>` ends the client's sessions. In that order: a
  client that reconnects at once already finds the file, and the server refuses
  it ("client has been rejected due to 'disable' directive", then `AUTH_FAILED`,
  on which a client exits unless it runs with `--auth-retry`). File already
  saying `disable` and no connected client (one with a tunnel address): `already`;
  a client not connected is fine.
* `enable`: the `disable` line is taken out of `ccd_dir/<CN>`, and the file is
  deleted when nothing else is left in it. The client may connect again; one
  that has exited on `AUTH_FAILED` must be started again by its user.
* `warn`: `skipped`.

Over UDP, `kill` ends the session on the server only: the client is not told,
its packets are dropped from then on, and it notices by its `ping-restart`
timeout (the server's `--keepalive`), then tries to reconnect and is refused.

```toml
[[enforce.backends]]
type = "openvpn"
management = "/run/openvpn/server.sock"   # --management PATH unix, or "127.0.0.1:7505"
management_password = "..."                # the first line of --management's password file
ccd_dir = "/etc/openvpn/server/ccd"
timeout_s = 5.0
```

>>> Config(type="openvpn", management="127.0.0.1:7505", ccd_dir="/etc/openvpn/ccd").timeout_s
5.0
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr

from quotaflow.core.plans import Command
from quotaflow.producers.enforce.backends._base import Applied, BackendConfigBase, EnforceError
from quotaflow.producers.enforce.credentials import Credentials, OpenVpnAccount
from quotaflow.producers.sources import SourceError
from quotaflow.producers.sources.openvpn import OpenVpnManagement

# The characters OpenVPN keeps in a common name; it remaps any other to "_".
_COMMON_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_DISABLE = "disable"


class Config(BackendConfigBase):
    """An OpenVPN server's management interface and client-config-dir."""

    type: Literal["openvpn"]
    management: Annotated[str, Field(min_length=1)]
    """`host:port` of `--management HOST PORT`, or the socket path of `--management PATH unix`."""
    management_password: SecretStr | None = None
    """The password of `--management`'s password file, when it has one."""
    ccd_dir: Path
    """The server's `--client-config-dir`."""
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    """How long one management session may take."""


def _common_names(config: Config, credentials: Credentials) -> dict[str, tuple[str, ...]]:
    """Every served user's common names; ValueError when one cannot name a ccd file."""
    users = set(config.users) if config.users is not None else credentials.users("openvpn")
    found: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for account in credentials.accounts:
        if not isinstance(account, OpenVpnAccount) or account.user_id not in users:
            continue
        cn = account.common_name
        if not _COMMON_NAME.fullmatch(cn) or cn in (".", ".."):
            raise ValueError(
                f"openvpn credentials of {account.user_id!r}: common name {cn[:80]!r} is not"
                " one OpenVPN keeps (letters, digits, _ . @ -; it remaps other characters"
                " to _, so give the name as OpenVPN shows it)"
            )
        if cn in owner:
            if owner[cn] != account.user_id:
                raise ValueError(
                    f"openvpn common name {cn!r} belongs to two users ({owner[cn]!r} and"
                    f" {account.user_id!r}): disabling one would disable the other"
                )
            continue
        owner[cn] = account.user_id
        found.setdefault(account.user_id, []).append(cn)
    if config.users is not None:
        missing = sorted(set(config.users) - set(found))
        if missing:
            raise ValueError(
                f"openvpn backend at {config.management}: no openvpn credentials for the"
                f" configured users: {', '.join(missing)}"
            )
    return {user: tuple(names) for user, names in found.items()}


def _disables(line: str) -> bool:
    """Whether a ccd line is the `disable` directive (comments start with # or ;)."""
    words = line.split()
    return bool(words) and words[0] == _DISABLE


class OpenVpnBackend:
    """Refuses and kills OpenVPN clients by common name; see the module docstring."""

    name = "openvpn"

    def __init__(
        self, config: Config, common_names: dict[str, tuple[str, ...]],
        management: OpenVpnManagement | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self._names = common_names
        password = config.management_password
        self._management = management or OpenVpnManagement(
            config.management,
            password.get_secret_value() if password is not None else None,
            timeout=config.timeout_s,
        )

    def serves(self, user_id: str) -> bool:
        return user_id in self._names

    def close(self) -> None:
        """Nothing to release: every call opens its own management session."""

    def apply(self, command: Command) -> Applied:
        if command.action == "warn":
            return Applied("skipped", "openvpn does not act on warn")
        names = self._names.get(command.user_id)
        if not names:
            return Applied("skipped", f"{command.user_id} has no openvpn common name")
        try:
            if command.action == "disable":
                return self._disable(names)
            return self._enable(names)
        except SourceError as exc:
            raise EnforceError(f"openvpn {command.action} {command.user_id}: {exc}") from exc
        except OSError as exc:
            where = exc.filename or self.config.ccd_dir
            raise EnforceError(
                f"openvpn {command.action} {command.user_id}: {where}: {exc.strerror or exc}"
            ) from exc

    def _disable(self, names: tuple[str, ...]) -> Applied:
        written = [cn for cn in names if self._write_disable(cn)]
        parts = []
        if written:
            parts.append(f"wrote disable to ccd/{', ccd/'.join(written)}")
        if len(written) < len(names):
            parts.append("ccd already disables " + ", ".join(n for n in names if n not in written))
        # Sessions with a tunnel address are connected clients; one without is a client
        # being refused (the server keeps it ~5 s to send AUTH_FAILED): killing that
        # one changes nothing, so it does not make the command `applied`.
        sessions = self._management.sessions()
        connected = False
        for cn in names:
            live = sum(1 for s in sessions if s.common_name == cn and s.virtual_address)
            count = self._management.kill(cn)
            connected = connected or live > 0
            if live:
                parts.append(f"killed {count} session(s) of {cn}")
            elif count:
                parts.append(f"killed {count} session(s) of {cn} being refused")
            else:
                parts.append(f"no session of {cn}")
        acted = bool(written) or connected
        return Applied("applied" if acted else "already", "; ".join(parts))

    def _enable(self, names: tuple[str, ...]) -> Applied:
        changed = [cn for cn in names if self._remove_disable(cn)]
        if not changed:
            return Applied("already", "no ccd file disables " + ", ".join(names))
        return Applied("applied", "took disable out of ccd/" + ", ccd/".join(changed))

    def _path(self, cn: str) -> Path:
        return self.config.ccd_dir / cn

    def _read(self, path: Path) -> str | None:
        try:
            return path.read_text(encoding="utf-8", errors="surrogateescape")
        except FileNotFoundError:
            return None

    def _write_disable(self, cn: str) -> bool:
        """Add `disable` to the CN's ccd file; False when it is there already."""
        path = self._path(cn)
        text = self._read(path)
        if text is not None and any(_disables(line) for line in text.splitlines()):
            return False
        before = text or ""
        if before and not before.endswith("\n"):
            before += "\n"
        self._replace(path, before + _DISABLE + "\n")
        return True

    def _remove_disable(self, cn: str) -> bool:
        """Take `disable` out of the CN's ccd file, deleting it when nothing is left."""
        path = self._path(cn)
        text = self._read(path)
        if text is None:
            return False
        lines = text.splitlines(keepends=True)
        kept = [line for line in lines if not _disables(line)]
        if len(kept) == len(lines):
            return False
        if "".join(kept).strip():
            self._replace(path, "".join(kept))
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return True

    def _replace(self, path: Path, text: str) -> None:
        """Write `path` whole or not at all (a temporary file renamed over it).

        The mode is the old file's, or 0644: OpenVPN reads the file after dropping
        its privileges (`--user nobody`).
        """
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
        fd, temporary = tempfile.mkstemp(prefix=".quotaflow-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, mode)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise


def build(config: Config, credentials: Credentials) -> OpenVpnBackend:
    """The backend for one `[[enforce.backends]]` entry; ValueError when the ccd folder is
    missing or a configured user has no common name."""
    if not config.ccd_dir.is_dir():
        raise ValueError(f"openvpn backend: ccd_dir {config.ccd_dir} is not a directory")
    return OpenVpnBackend(config, _common_names(config, credentials))

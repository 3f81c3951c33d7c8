"""The `sing-box` backend: users of managed Shadowsocks inbounds, over sing-box's SSM API.

sing-box (1.12 and later) serves the Shadowsocks Server Management API from a
`services` entry of type `ssm-api`, whose `servers` map HTTP paths to
Shadowsocks inbounds with `managed: true`. Such an inbound has no users of its
own: they are added and removed only through the API (and kept across restarts
only with the service's `cache_path`). Every account in the credentials file
(`SingBoxAccount`) names the path (`inbound`, such as `/ss`), the user's name
there (default: the user id) and their key (`password`: a Shadowsocks 2022
method's user PSK, base64).

* `disable`: `GET <path>/server/v1/users`; when the user is listed,
  `DELETE <path>/server/v1/users/<name>`, else `already` (a 404 on the DELETE,
  someone else removed them meanwhile, is `already` too).
* `enable`: `GET <path>/server/v1/users`; when the user is listed, `already`
  (whatever key they have: the key is not overwritten, the detail says when it
  differs from the credentials file); else `POST <path>/server/v1/users` with
  `{"username": name, "uPSK": key}`; "already exists" is `already`.
* `warn`: `skipped`.

What sing-box 1.14.1 does, measured (tests/producers/enforce/test_singbox.py):

* A removed user's new connections fail at once; **open connections are not cut**:
  they go on moving bytes until they end.
* `GET /server/v1/stats` lists the users' cumulative counters (`uplinkBytes`,
  `downlinkBytes`, ...). Removing a user **drops their counters**: they leave the
  list, and a user added back starts at 0. The bytes that connections left open
  move after the removal are counted nowhere in the SSM API. The V2Ray API's
  per-user counters (`experimental.v2ray_api`, what the `v2ray` collector reads)
  are not touched by either and keep counting.
* A user whose key the inbound refuses stays on sing-box's list, and from then on
  every change of that inbound answers 400 while its list still changes (a
  refused DELETE takes the user off the list, yet they still get in). So keys
  are checked at `build` (`method`), a refused POST is undone with a DELETE, and
  after a refused DELETE the name is put back on the list, so that the retry
  does not find the user gone and call it `already`.

```toml
[[enforce.backends]]
type = "sing-box"
url = "http://127.0.0.1:9000"   # the ssm-api service's listen address and port
servers = ["/ss"]               # the SSM paths it acts on (default: every path in the
                                # credentials file's sing-box accounts)
timeout_s = 5.0
```

>>> Config(type="sing-box").url
'http://127.0.0.1:9000'
>>> user_path("/ss", "a b/c?")
Traceback (most recent call last):
...
ValueError: a sing-box SSM user name cannot contain '/': 'a b/c?'
>>> user_path("/ss", "a b?#&")
'/ss/server/v1/users/a%20b%3F%23&'
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import Field, field_validator

from quotaflow.core.plans import Command
from quotaflow.producers.enforce.backends._base import Applied, BackendConfigBase, EnforceError
from quotaflow.producers.enforce.credentials import Credentials, SingBoxAccount

log = logging.getLogger("quotaflow.enforce.sing-box")

_API = "/server/v1"
# What Go's url.PathEscape-like path encoding leaves alone besides letters, digits and
# `-._~`: a name encoded so is read back as itself by sing-box's router (chi). Anything
# else, such as %2F for '/', it would look up still encoded, and not find.
_GO_PATH_SAFE = "$&+,:;=@"
_MAX_ANSWER = 1 << 20
KEY_BYTES = {
    "2022-blake3-aes-128-gcm": 16,
    "2022-blake3-aes-256-gcm": 32,
    "2022-blake3-chacha20-poly1305": 32,
}
"""The user key's size of each Shadowsocks 2022 method."""


class Config(BackendConfigBase):
    """A sing-box SSM API and the managed inbounds (paths) the backend acts on."""

    type: Literal["sing-box"]
    url: Annotated[str, Field(min_length=8)] = "http://127.0.0.1:9000"
    """The `ssm-api` service: `http://` (or `https://` with its `tls`) and its listen address."""
    servers: Annotated[tuple[str, ...], Field(min_length=1)] | None = None
    """The SSM paths (the service's `servers` keys) it acts on; None: every one in the
    credentials file."""
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    method: str | None = None
    """The managed inbounds' method, to check each key against before it is sent: a 2022
    method needs a key of its size (16 bytes for `2022-blake3-aes-128-gcm`, 32 for the
    others); another method, any password. None: a 2022 key of either size."""
    ca_file: Path | None = None
    """The CA bundle an https API's certificate is checked against (default: the system's)."""

    @field_validator("method")
    @classmethod
    def _known_2022(cls, method: str | None) -> str | None:
        if method is not None and method.startswith("2022-") and method not in KEY_BYTES:
            raise ValueError(f"unknown Shadowsocks 2022 method {method!r} (known: "
                             f"{', '.join(KEY_BYTES)})")
        return method

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http:// or https:// URL with a host")
        if parts.path.strip("/") or parts.query or parts.fragment:
            raise ValueError("url is the API's address alone; the paths go in `servers`")
        return url.rstrip("/")

    @field_validator("servers")
    @classmethod
    def _paths(cls, servers: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if servers is not None:
            for path in servers:
                server_path(path)
            if len({server_path(p) for p in servers}) != len(servers):
                raise ValueError("a path is listed twice in `servers`")
        return servers


def check_key(key: str, method: str | None) -> None:
    """ValueError unless `key` is a user key the method takes (see `Config.method`).

    sing-box 1.14.1 keeps a user whose key it refused on its list, and then refuses
    every later change of that inbound's users: a bad key must not reach it.

    >>> check_key("YWxpY2Uta2V5LTE2Ynl0ZQ==", None)
    >>> check_key("YWxpY2Uta2V5LTE2Ynl0ZQ==", "2022-blake3-aes-256-gcm")
    Traceback (most recent call last):
    ...
    ValueError: the key is 16 bytes; 2022-blake3-aes-256-gcm takes 32
    """
    if method is not None and not method.startswith("2022-"):
        return
    try:
        size = len(base64.b64decode(key, validate=True))
    except ValueError:
        raise ValueError("the key is not base64 (a Shadowsocks 2022 user key)") from None
    wanted = (16, 32) if method is None else (KEY_BYTES[method],)
    if size not in wanted:
        raise ValueError(f"the key is {size} bytes; "
                         + (f"{method} takes {wanted[0]}" if method else "16 or 32 are taken"))


def server_path(path: str) -> str:
    """An SSM path as the API serves it (`/ss`, or `` for `/`); ValueError when it is not one."""
    if not path.startswith("/") or any(c in path for c in "?#% \t\r\n"):
        raise ValueError(f"{path!r} is not an SSM server path (such as '/ss')")
    return path.rstrip("/")


def user_path(path: str, name: str) -> str:
    """The API path of one user; ValueError for a name sing-box cannot be asked about."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"a sing-box SSM user name cannot contain '/': {name!r}"
                         if "/" in name else f"{name!r} cannot be a sing-box SSM user name")
    return f"{server_path(path)}{_API}/users/{quote(name, safe=_GO_PATH_SAFE)}"


@dataclass(frozen=True, slots=True)
class _Place:
    """One account of a user: the SSM path, their name there and their key."""

    path: str
    name: str
    account: SingBoxAccount

    @property
    def key(self) -> str:
        return self.account.password.get_secret_value()


def _places(config: Config, credentials: Credentials) -> dict[str, tuple[_Place, ...]]:
    """Every served user's accounts on the configured paths; ValueError when one is wrong."""
    wanted = None if config.servers is None else {server_path(p) for p in config.servers}
    users = set(config.users) if config.users is not None else credentials.users("sing-box")
    found: dict[str, list[_Place]] = {}
    seen: dict[tuple[str, str], str] = {}  # (path, name) -> user
    for account in credentials.accounts:
        if not isinstance(account, SingBoxAccount) or account.user_id not in users:
            continue
        where = f"credentials of {account.user_id!r} on {account.inbound!r}"
        try:
            path = server_path(account.inbound)
            name = account.name if account.name is not None else account.user_id
            user_path(path, name)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if wanted is not None and path not in wanted:
            continue
        try:
            check_key(account.password.get_secret_value(), config.method)
        except ValueError as exc:
            raise ValueError(f"{where}: `password`: {exc}") from None
        if (path, name) in seen:
            raise ValueError(
                f"two accounts named {name!r} on {account.inbound!r} (users "
                f"{seen[(path, name)]!r} and {account.user_id!r}): removing one would remove "
                "the other"
            )
        seen[(path, name)] = account.user_id
        found.setdefault(account.user_id, []).append(_Place(path, name, account))
    if config.users is not None:
        missing = sorted(set(config.users) - set(found))
        if missing:
            paths = ", ".join(config.servers) if config.servers else "any SSM path"
            raise ValueError(
                f"sing-box backend at {config.url}: no sing-box credentials on {paths} for "
                f"the configured users: {', '.join(missing)}"
            )
    return {user: tuple(places) for user, places in found.items()}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is answered as it is, an error


class SingBoxBackend:
    """Removes and adds back users of sing-box managed Shadowsocks inbounds; see the module
    docstring."""

    name = "sing-box"

    def __init__(self, config: Config, places: dict[str, tuple[_Place, ...]]) -> None:
        self.config = config
        self._places = places
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.ProxyHandler({}),  # a node-local API: never through a proxy
            _NoRedirect(),
        ]
        if config.ca_file is not None:
            context = ssl.create_default_context(cafile=str(config.ca_file))
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def serves(self, user_id: str) -> bool:
        return user_id in self._places

    def close(self) -> None:
        pass

    def apply(self, command: Command) -> Applied:
        if command.action == "warn":
            return Applied("skipped", "sing-box does not act on warn")
        places = self._places.get(command.user_id)
        if not places:
            return Applied("skipped", f"{command.user_id} has no account on sing-box")
        if command.action == "disable":
            return self._disable(places)
        return self._enable(places)

    # ---------------------------------------------------------------------- HTTP

    def _call(
        self, method: str, path: str, body: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """(status, body) of one API call; EnforceError when there is no answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.config.url + path, data=data, method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with self._opener.open(request, timeout=self.config.timeout_s) as response:
                return response.status, response.read(_MAX_ANSWER)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read(_MAX_ANSWER)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise EnforceError(
                f"sing-box SSM API {self.config.url}: {method} {path}: {reason}"
            ) from None

    def _quietly(self, method: str, path: str, body: dict[str, str] | None = None) -> None:
        """An API call made to undo a refused change: its own failure is only logged."""
        try:
            status, _ = self._call(method, path, body)
        except EnforceError as exc:
            log.warning("sing-box: undoing a refused change: %s", exc)
            return
        if status >= 300:
            log.warning("sing-box: undoing a refused change: %s %s: HTTP %s", method, path, status)

    def _users(self, path: str) -> dict[str, str]:
        """The users of one managed inbound: {name: key}."""
        where = f"{server_path(path)}{_API}/users"
        status, answer = self._call("GET", where)
        if status != 200:
            raise EnforceError(f"sing-box SSM API: GET {where}: HTTP {status} {_said(answer)}")
        try:
            listed = json.loads(answer)["users"]
            return {str(u["username"]): str(u.get("uPSK", "")) for u in listed or ()}
        except (ValueError, KeyError, TypeError) as exc:
            raise EnforceError(
                f"sing-box SSM API: GET {where}: not a user list: {_said(answer)}"
            ) from exc

    # ------------------------------------------------------------------- actions

    def _disable(self, places: Sequence[_Place]) -> Applied:
        removed: list[str] = []
        absent: list[str] = []
        for place in places:
            if place.name not in self._users(place.path):
                absent.append(place.path or "/")
                continue
            where = user_path(place.path, place.name)
            status, answer = self._call("DELETE", where)
            if status in (200, 204):
                removed.append(place.path or "/")
            elif status == 404:
                absent.append(place.path or "/")  # removed meanwhile by someone else
            else:
                # sing-box takes the name off its list even when the inbound refuses the
                # change (it does while another user's key is bad), and the user still
                # gets in: put the name back, so that a retry does not take them for gone.
                self._quietly("POST", f"{place.path}{_API}/users",
                              {"username": place.name, "uPSK": place.key})
                raise EnforceError(
                    f"sing-box SSM API: DELETE {where}: HTTP {status} {_said(answer)}"
                    " (the user may still connect; does another user of this inbound have"
                    " a key it refuses?)"
                )
        return _outcome(removed, absent, "removed from", "not on")

    def _enable(self, places: Sequence[_Place]) -> Applied:
        added: list[str] = []
        present: list[str] = []
        for place in places:
            listed = self._users(place.path)
            if place.name in listed:
                differs = bool(listed[place.name]) and listed[place.name] != place.key
                present.append(
                    (place.path or "/") + (" (with a key other than the credentials file's)"
                                           if differs else "")
                )
                continue
            where = f"{place.path}{_API}/users"
            status, answer = self._call(
                "POST", where, {"username": place.name, "uPSK": place.key}
            )
            if status in (200, 201, 204):
                added.append(place.path or "/")
            elif status == 400 and b"already exists" in answer:
                present.append(place.path or "/")  # added meanwhile by someone else
            else:
                # sing-box keeps a refused user on its list, and then refuses every change
                # of this inbound: take the name off again.
                self._quietly("DELETE", user_path(place.path, place.name))
                raise EnforceError(  # the answer may quote the key: leave it out
                    f"sing-box SSM API: POST {where} ({place.name!r}): HTTP {status} "
                    f"{_said(answer.replace(place.key.encode(), b'***'))}"
                )
        return _outcome(added, present, "added to", "already on")


def _outcome(done: list[str], already: list[str], did: str, was: str) -> Applied:
    parts = []
    if done:
        parts.append(f"{did} {', '.join(done)}")
    if already:
        parts.append(f"{was} {', '.join(already)}")
    return Applied("applied" if done else "already", "; ".join(parts))


def _said(answer: bytes) -> str:
    return answer.decode("utf-8", errors="replace").strip()[:300]


def build(config: Config, credentials: Credentials) -> SingBoxBackend:
    """The backend for one `[[enforce.backends]]` entry; ValueError when a configured user
    has no sing-box account on its paths, or an account cannot be used."""
    return SingBoxBackend(config, _places(config, credentials))

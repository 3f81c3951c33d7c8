"""The `webhook` backend: each command POSTed as JSON to a URL, signed with HMAC-SHA256.

The body is the command's wire form (`Command.encode()`, every field present).
The request carries

* `X-Quotaflow-Timestamp: <unix seconds>`, the time of this attempt;
* `X-Quotaflow-Signature: sha256=<hex>`, the HMAC-SHA256 with the shared secret of
  `f"{timestamp}.".encode() + body`: the timestamp is signed with the body, so it
  cannot be swapped for a fresher one;
* `X-Quotaflow-Command-Id`, the body's `command_id`, and `Content-Type: application/json`.

A receiver checks them with `verify()` (or its ten lines, in docs/enforcement.md):
the signature in constant time, and the timestamp within `max_age_s` of its own
clock either way, which turns an old request replayed later away. A retry of
the same command is signed anew (a new timestamp) with the same body: receivers
deduplicate on `command_id`, which also covers a replay inside the window.

The answer:

| answer | result |
|---|---|
| 2xx, any body | `applied` |
| 2xx, JSON `{"outcome": "already" or "skipped" or "applied", "detail": "..."}` | that outcome |
| 2xx, JSON with another `outcome` | `EnforceError` |
| 408, 429, 5xx, 3xx (redirects are not followed), timeout, no connection | `EnforceError` |
| any other 4xx | `WebhookRejected` (an `EnforceError`, `permanent = True`) |

The consumer retries every `EnforceError` alike; `permanent` says that the
receiver turned the request itself down, so retrying will not help.

```toml
[[enforce.backends]]
type = "webhook"
url = "https://panel.example/quotaflow/hook"
secret = "at least 16 characters, shared with the receiver"
timeout_s = 10
actions = ["warn", "disable", "enable"]   # the default: every action
headers = { Authorization = "Bearer ..." }  # optional, secrets too
```

>>> sign(b"{}", "s" * 16, 1700000000)
'sha256=8145b6bbe655be9ac8ceb50795128d861d3a8e4ff497f6921df314ee9c647ce3'
>>> body = b'{"command_id":"c1"}'
>>> headers = {"X-Quotaflow-Timestamp": "1700000000",
...            "X-Quotaflow-Signature": sign(body, "s" * 16, 1700000000)}
>>> verify(body, headers, "s" * 16, now=1700000100), verify(body, headers, "s" * 16, 1700000400)
(True, False)
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from quotaflow.core.plans import Action, Command
from quotaflow.producers.enforce.backends._base import (
    Applied,
    BackendConfigBase,
    Done,
    EnforceError,
)
from quotaflow.producers.enforce.credentials import Credentials

log = logging.getLogger("quotaflow.enforce.webhook")

SIGNATURE_HEADER = "X-Quotaflow-Signature"
TIMESTAMP_HEADER = "X-Quotaflow-Timestamp"
COMMAND_ID_HEADER = "X-Quotaflow-Command-Id"
_OWN_HEADERS = {h.lower() for h in (
    SIGNATURE_HEADER, TIMESTAMP_HEADER, COMMAND_ID_HEADER, "Content-Type", "Content-Length",
    "Host",
)}
_RETRIED = {408, 429}
_MAX_ANSWER = 65536  # bytes of an answer read
_OUTCOMES: frozenset[str] = frozenset(get_args(Done))


class Config(BackendConfigBase):
    """A receiver's URL and the secret shared with it; see the module docstring."""

    type: Literal["webhook"]
    url: Annotated[str, Field(min_length=8)]
    secret: SecretStr
    """The HMAC key, shared with the receiver: at least 16 characters."""
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    actions: Annotated[tuple[Action, ...], Field(min_length=1)] = ("warn", "disable", "enable")
    """The actions passed on; the others are `skipped`."""
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    """Extra request headers, such as `Authorization` (secrets: never logged)."""
    ca_file: Path | None = None
    """The CA bundle an https receiver's certificate is checked against (default: the system's)."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError("url must not carry credentials; use `headers`")
        if parts.fragment:
            raise ValueError("url must not have a #fragment")
        return url

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, secret: SecretStr) -> SecretStr:
        if len(secret.get_secret_value()) < 16:
            raise ValueError("the webhook secret must have at least 16 characters")
        return secret

    @field_validator("headers")
    @classmethod
    def _not_ours(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name in headers:
            if name.lower() in _OWN_HEADERS:
                raise ValueError(f"headers: {name!r} is set by the webhook backend itself")
            if not name or any(c in name for c in ":\r\n ") or not name.isascii():
                raise ValueError(f"headers: {name!r} is not a header name")
            if any(c in headers[name].get_secret_value() for c in "\r\n"):
                raise ValueError(f"headers: the value of {name!r} has a line break")
        return headers


def _key(secret: str | bytes | SecretStr) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    return secret.encode() if isinstance(secret, str) else secret


def sign(body: bytes, secret: str | bytes | SecretStr, timestamp: int) -> str:
    """The `X-Quotaflow-Signature` value: `sha256=` and the HMAC of `"<timestamp>." + body`."""
    mac = hmac.new(_key(secret), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secret: str | bytes | SecretStr,
    now: float | None = None,
    max_age_s: float = 300,
) -> bool:
    """Whether a request is signed with `secret` and was sent within `max_age_s` of `now`.

    `headers` may be any mapping of header names (in any case) to values, such as
    `http.server`'s `self.headers` or a dict. The signature is compared in
    constant time; a timestamp more than `max_age_s` from `now` (default: this
    clock), in the past or the future, fails, so an old request replayed fails.
    Within the window, deduplicate on the body's `command_id`.
    """
    lowered = {str(name).lower(): str(value) for name, value in headers.items()}
    stamp = lowered.get(TIMESTAMP_HEADER.lower(), "").strip()
    given = lowered.get(SIGNATURE_HEADER.lower(), "").strip()
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        return False
    timestamp = int(stamp)
    if abs((time.time() if now is None else now) - timestamp) > max_age_s:
        return False
    expected = sign(body, secret, timestamp)
    return hmac.compare_digest(given.encode(), expected.encode())


class WebhookRejected(EnforceError):
    """The receiver turned the request down (a 4xx other than 408 and 429): retrying the
    same command will not change its answer."""

    permanent = True

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _answer(status: int, body: bytes) -> Applied:
    """What a 2xx answer says: its `outcome` and `detail` when it is such JSON, else applied."""
    try:
        data: Any = json.loads(body) if body.strip() else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or "outcome" not in data:
        return Applied("applied", f"HTTP {status}")
    outcome, detail = data["outcome"], data.get("detail", "")
    if outcome not in _OUTCOMES:
        raise EnforceError(
            f"webhook: the receiver answered HTTP {status} with outcome {str(outcome)[:60]!r}"
            f" (known: {', '.join(sorted(_OUTCOMES))})"
        )
    text = detail if isinstance(detail, str) else json.dumps(detail)
    return Applied(outcome, text[:500] or f"HTTP {status}")


class WebhookBackend:
    """POSTs each command, signed, to the configured URL; see the module docstring."""

    name = "webhook"

    def __init__(self, config: Config) -> None:
        self.config = config
        self._users = None if config.users is None else frozenset(config.users)
        parts = urlsplit(config.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._where = f"{parts.scheme}://{parts.netloc}{parts.path}"  # no query: it may hold a key
        self._tls: ssl.SSLContext | None = None
        if self._https:
            self._tls = ssl.create_default_context(
                cafile=str(config.ca_file) if config.ca_file else None
            )

    def serves(self, user_id: str) -> bool:
        return self._users is None or user_id in self._users

    def close(self) -> None:
        pass

    def apply(self, command: Command, now: float | None = None) -> Applied:
        if command.action not in self.config.actions:
            return Applied("skipped", f"webhook does not pass {command.action}")
        body = command.encode()
        timestamp = int(time.time() if now is None else now)
        headers = {
            name: value.get_secret_value() for name, value in self.config.headers.items()
        }
        headers.update({
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(body, self.config.secret, timestamp),
            COMMAND_ID_HEADER: command.command_id,
            "User-Agent": "quotaflow-enforce",
        })
        what = f"webhook {self._where} ({command.action} {command.user_id})"
        status, reason, answer = self._post(body, headers, what)
        if 200 <= status < 300:
            return _answer(status, answer)
        said = answer.decode("utf-8", errors="replace").strip()[:300]
        message = f"{what}: HTTP {status} {reason}" + (f": {said}" if said else "")
        if 400 <= status < 500 and status not in _RETRIED:
            raise WebhookRejected(message + " (the receiver refuses it: permanent)", status)
        if 300 <= status < 400:
            message += " (redirects are not followed: configure the final URL)"
        raise EnforceError(message)

    def _post(self, body: bytes, headers: dict[str, str], what: str) -> tuple[int, str, bytes]:
        connection: http.client.HTTPConnection
        if self._https:
            connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.config.timeout_s, context=self._tls
            )
        else:
            connection = http.client.HTTPConnection(
                self._host, self._port, timeout=self.config.timeout_s
            )
        try:
            connection.request("POST", self._target, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.reason, response.read(_MAX_ANSWER)
        except (OSError, http.client.HTTPException) as exc:
            # TimeoutError, ConnectionRefusedError, ssl.SSLError are OSErrors
            raise EnforceError(f"{what}: {type(exc).__name__}: {exc}") from None
        finally:
            connection.close()


def build(config: Config, credentials: Credentials) -> WebhookBackend:
    """The backend for one `[[enforce.backends]]` entry; it needs no credentials."""
    del credentials
    return WebhookBackend(config)

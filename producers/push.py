"""The panel push receiver: Xboard/V2Board's UniProxy API, for XrayR, V2bX and kin.

Node backends POST `{"<user id>": [up, down], ...}` — bytes since their last
accepted push — to `/api/v1/server/UniProxy/push?node_type=..&node_id=..&token=..`.
Each billed push becomes one `delta` report with the node's next seq, stored in
the outbox (fsynced) *before* the backend gets its 2xx, so a push answered 2xx is
never lost; the agent's sender publishes it. The node's epoch is the time of its
first push, kept in the outbox. The billing node is `<node_type>-<node_id>` (or
what `node_map` says), with `node_type` normalised as Xboard does: lower-case,
`v2ray` is `vmess`, `hysteria2` is `hysteria`.

Two modes
---------
* **Standalone** (no `upstream`): quotaflow is the only receiver. Every valid
  push is stored and answered `{"data": true}`. The panel's GETs (`config`,
  `user`, `alivelist`) are not served (404 with a hint), so this fits only
  backends and scripts that do not need them. Tokens: the panel-wide `token`,
  or a node's own in `tokens`.
* **Gateway** (`upstream = "https://panel.example"`), for Xboard/V2Board and the
  backends made for them: every request to `/api/v1/server/UniProxy/...` other
  than a push goes to the panel unchanged (method, path, query, headers, body)
  and the panel's answer comes back unchanged (status, headers, body: ETag and
  304 included). A push is held in the outbox (fsynced) first, then forwarded;
  the panel's status and body are the backend's answer. Only a push the panel
  accepted with a 2xx becomes a report (in the transaction that drops it from
  the held ones), so the panel and quotaflow bill the same pushes; a push the
  panel refused is dropped, and the backend does what it does when its panel
  refuses. A panel that cannot be reached (refused, reset, timed out after
  `upstream_timeout_s`) gets the backend a 502/504 and nothing is billed: for the
  backend that is the failed request it would have got without quotaflow. Held
  pushes found at start (the gateway died while the panel decided) are dropped
  with a WARNING: their 2xx never reached the backend, which sends their bytes
  again (XrayR) or has lost them (backends that reset counters before pushing).
  Kafka being down changes nothing here: reports wait in the outbox. Tokens are
  the panel's: a configured `token` is checked as well (a wrong one is refused
  without asking the panel); per-node `tokens` exist only in standalone mode.

Retries: bill every push, dedupe only after an undelivered 2xx
-------------------------------------------------------------
Identical bodies are normal (the same download in consecutive intervals), so
every push is billed. The one real duplicate is a push that was billed but
whose 2xx the backend never got, because it had disconnected (its timeout, 5 s
in XrayR, ran out first): it sends the same body again. So when the 2xx of a
billed push cannot be delivered, the push is remembered (in the outbox), and
the next push from the same sender (`<node_type>-<node_id>`) with the same body
(canonical JSON) within `dedup_window_s` is answered `{"data": true}` without
being billed — and, in gateway mode, without being forwarded, so the panel does
not bill it twice either. A resend that comes while its first copy is still
being decided waits for that outcome. Undelivered means the connection was gone
when the answer was written; an answer lost after it left this process is not
seen, and its resend is billed again, as the panel would bill it.

What no receiver can mend: a backend that reads its counters with reset before
it pushes (V2bX) loses a push's bytes when that push fails, whether quotaflow is
there or not. The gateway adds no loss of its own: it bills exactly what the
panel accepted.

Answers of the receiver itself follow Xboard: `{"data": true}`; errors are
`{"message": ...}` with 400 (malformed, or a user or node id the contracts
refuse, see `identifier_problem` in quotaflow.core.contracts; in gateway mode
such a push is not forwarded either), 403 (bad or missing token, unknown node),
413 (body larger than `max_body_bytes`), 503 with `Retry-After` (busy, below),
502/504 (gateway: the panel cannot be reached).

Memory: a push of a few MB becomes hundreds of thousands of Python objects while
it is parsed and stored, some tens of bytes of memory per byte of body. At most
`max_concurrent_bodies` pushes are past authorisation at once (reading their
body, waiting with it read, or being forwarded), and only one of them is parsed
or stored at a time (in a thread, off the event loop): that work is serial
anyway, under the GIL and the outbox's lock. A push over the limit waits before
its body is read (costing only its socket buffer) up to `busy_wait_s` and is then
answered 503 with `Retry-After`. The body is read once, parsed once by orjson (a
key given twice is still refused, see `load_counters_json`), and its retry
digest is taken from that parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from yarl import URL

from quotaflow.core.contracts import Counter, check_identifier, identifier_problem
from quotaflow.producers.outbox import Outbox
from quotaflow.producers.sources import ParseError
from quotaflow.producers.sources._parsing import load_counters_json

log = logging.getLogger(__name__)

UNIPROXY = "/api/v1/server/UniProxy"
PUSH_PATH = f"{UNIPROXY}/push"
ALIVE_PATH = f"{UNIPROXY}/alive"
DATA_TRUE = b'{"data":true}'

_NODE_TYPE_ALIASES = {"v2ray": "vmess", "hysteria2": "hysteria"}


def normalise_node_type(node_type: str) -> str:
    """A node type as Xboard reads it (its `Server` middleware): `v2ray` is `vmess`,
    `hysteria2` is `hysteria`, lower-case. Xboard looks the aliases up before it
    lower-cases, so there only `v2ray` itself becomes `vmess` (`V2ray` stays
    `v2ray`, a type it has no nodes of); here any case does.

    >>> [normalise_node_type(t) for t in ("V2ray", "vmess", "Hysteria2", "vless")]
    ['vmess', 'vmess', 'hysteria', 'vless']
    """
    lowered = node_type.lower()
    return _NODE_TYPE_ALIASES.get(lowered, lowered)


def normalise_node_key(key: str) -> str:
    """A `"<node_type>-<node_id>"` key with its node type normalised.

    >>> normalise_node_key("V2ray-12")
    'vmess-12'
    """
    node_type, sep, node_id = key.partition("-")
    return f"{normalise_node_type(node_type)}{sep}{node_id}"


V = TypeVar("V")


def _normalised_keys(table: dict[str, V]) -> dict[str, V]:
    out: dict[str, V] = {}
    for key, value in table.items():
        normal = normalise_node_key(key)
        if normal in out:
            raise ValueError(f"{key!r} names the same node as another key ({normal!r})")
        out[normal] = value
    return out


class PushConfig(BaseModel):
    """The `[push]` table of the agent config."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Gateway mode: the panel's address (scheme, host, port, optional path prefix).
    upstream: str | None = None
    upstream_timeout_s: float = Field(default=30.0, gt=0)
    token: SecretStr | None = None  # the panel-wide server token, for nodes not in `tokens`
    tokens: dict[str, SecretStr] = Field(default_factory=dict)  # "<node_type>-<node_id>" -> token
    # "<node_type>-<node_id>" -> node id
    node_map: dict[str, Annotated[str, AfterValidator(check_identifier)]] = Field(
        default_factory=dict
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=2)
    # After a billed push whose 2xx could not be delivered: how long its resend is recognised.
    dedup_window_s: float = Field(default=30.0, ge=0)
    # Bodies read, parsed and stored at once (each can take ~20x its size), and how
    # long a push over that waits for its turn before a 503.
    max_concurrent_bodies: int = Field(default=4, ge=1)
    busy_wait_s: float = Field(default=3.0, ge=0)

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host or url.query_string:
            raise ValueError("upstream must be an http:// or https:// address with no query")
        return value.rstrip("/")

    @field_validator("tokens", "node_map")
    @classmethod
    def _normalise(cls, table: dict[str, Any]) -> dict[str, Any]:
        return _normalised_keys(table)

    @model_validator(mode="after")
    def _tokens_only_standalone(self) -> PushConfig:
        if self.upstream is not None and self.tokens:
            raise ValueError(
                "per-node tokens are for standalone mode; with an upstream the panel checks "
                "its own token (set `token` to the panel-wide one, or leave it out)"
            )
        return self

    def expected_token(self, node_key: str) -> str | None:
        """The token a node must present, or None if the node is unknown."""
        secret = self.tokens.get(node_key, self.token)
        return None if secret is None else secret.get_secret_value()


class PushError(Exception):
    """A request refused with an HTTP status and a message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


_OBJECT_START = re.compile(rb"\s*\{")


def parse_push_body(body: bytes) -> tuple[list[Counter], str]:
    """The `{"uid": [up, down]}` body's counters (zeros too) and its digest.

    The digest is the SHA-256 of the body's canonical JSON (keys sorted, no
    spaces), the same for a retry that lists the users in another order. Raises
    PushError(400) on anything but such an object.

    >>> counters, digest = parse_push_body(b'{"7": [10, 20], "8": [0, 0]}')
    >>> counters
    [Counter(user_id='7', up=10, down=20), Counter(user_id='8', up=0, down=0)]
    >>> digest == parse_push_body(b'{"8":[0,0],"7":[10,20]}')[1]
    True
    """
    if _OBJECT_START.match(body) is None:
        raise PushError(400, 'body must be a JSON object {"<user id>": [up, down], ...}')
    try:
        counters, data = load_counters_json(body)
    except ParseError as exc:
        raise PushError(400, str(exc)) from None
    # The parsed value itself, not a copy: its values are [up, down] lists of ints.
    digest = hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return counters, digest


# --------------------------------------------------------------------------- the panel


@dataclass(frozen=True, slots=True)
class PanelAnswer:
    """What the panel (or the receiver in its place) answers: status, headers, body."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    @classmethod
    def data_true(cls) -> PanelAnswer:
        """Xboard's success answer."""
        return cls(200, CIMultiDict({"Content-Type": "application/json"}), DATA_TRUE)

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300


class PanelUnreachable(Exception):
    """No answer from the panel; `status` is what the backend gets (502, or 504 on a timeout)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Per connection, never passed on (RFC 9110 7.6.1), and what aiohttp sets itself.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
})


def _end_to_end(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """`headers` without the hop-by-hop ones (and those its `Connection` header names)."""
    named = {h.strip().lower() for v in headers.getall("Connection", []) for h in v.split(",")}
    return CIMultiDict(
        (k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP | named
    )


class Panel:
    """The one way to the panel: an HTTP request passed on as it is, its answer as it is.

    `send` raises `PanelUnreachable` when no answer comes. The session is made on the
    serving loop at first use; bodies are passed on undecoded (`auto_decompress`
    off, no headers added), so a gzip answer reaches the backend as the panel sent it.
    """

    _AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

    def __init__(self, base: str, timeout_s: float) -> None:
        self.base = base
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, method: str, path_qs: str, headers: CIMultiDict[str],
                   body: bytes) -> PanelAnswer:
        """Pass one request on; the panel's answer, or `PanelUnreachable`."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False, timeout=self.timeout,
                skip_auto_headers=self._AUTO_HEADERS, cookie_jar=aiohttp.DummyCookieJar(),
            )
        url = URL(self.base + path_qs, encoded=True)
        try:
            async with self._session.request(
                method, url, headers=_end_to_end(headers), data=body or None,
                allow_redirects=False,
            ) as answer:
                return PanelAnswer(answer.status, _end_to_end(answer.headers), await answer.read())
        except TimeoutError:
            raise PanelUnreachable(504, f"the panel did not answer within "
                                        f"{self.timeout.total}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise PanelUnreachable(502, f"the panel cannot be reached: {exc!r:.200}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --------------------------------------------------------------------------- the receiver


def _error(exc: PushError) -> web.Response:
    return web.json_response({"message": exc.message}, status=exc.status, headers=exc.headers)


async def _answer(request: web.Request, answer: PanelAnswer) -> tuple[web.StreamResponse, bool]:
    """Send `answer`; the response and whether it was handed to a live connection."""
    response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
    transport = request.transport
    if transport is None or transport.is_closing():
        return response, False
    try:
        await response.prepare(request)
        await response.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        return response, False
    return response, True


T = TypeVar("T")


class PushReceiver:
    """The request handlers, bound to one outbox (and in gateway mode, one panel)."""

    def __init__(
        self,
        config: PushConfig,
        outbox: Outbox,
        on_stored: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        panel: Panel | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.on_stored = on_stored
        self.clock = clock
        if panel is None and config.upstream is not None:
            panel = Panel(config.upstream, config.upstream_timeout_s)
        self.panel = panel
        self.accepted = 0  # pushes billed
        self.retries = 0  # resends of an undelivered 2xx, not billed again
        self.undelivered = 0  # billed pushes whose 2xx could not be delivered
        self.declined = 0  # gateway: pushes the panel refused or did not answer
        self.refused = 0
        self.busy = 0  # pushes answered 503
        # Bodies being read, parsed, stored or forwarded (binds to the serving loop at first use).
        self._bodies = asyncio.Semaphore(config.max_concurrent_bodies)
        self._one_at_a_time = asyncio.Lock()
        # One push with a given (sender, body) at a time: a resend waits for its first copy.
        self._deciding: dict[str, tuple[asyncio.Lock, int]] = {}
        # Always the same thread: each thread that allocates gets its own malloc
        # arena, which keeps the memory it once held (hundreds of MB over a pool's
        # threads after a burst of large pushes).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-receiver")

    def _authorise(self, request: web.Request) -> tuple[str, str]:
        """(sender key, billing node id) of an authorised request."""
        node_type = normalise_node_type(request.query.get("node_type", ""))
        node_id = request.query.get("node_id", "")
        token = request.query.get("token", "")
        if not node_type or not node_id:
            raise PushError(400, "node_type and node_id are required")
        key = f"{node_type}-{node_id}"
        expected = self.config.expected_token(key)
        if self.panel is not None and expected is None:
            pass  # gateway without a local token: the panel decides
        elif not token or expected is None or not hmac.compare_digest(
            token.encode(), expected.encode()
        ):
            raise PushError(403, "token is error")
        node = self.config.node_map.get(key, key)
        problem = identifier_problem(node)
        if problem is not None:
            raise PushError(400, f"node id {node[:60]!r} {problem}")
        return key, node

    async def push(self, request: web.Request) -> web.StreamResponse:
        """POST .../push: bill it (gateway: if the panel accepts it), or recognise a resend."""
        try:
            key, node = self._authorise(request)
            if request.content_length is not None and (
                request.content_length > self.config.max_body_bytes
            ):
                raise PushError(413, f"body larger than {self.config.max_body_bytes} bytes")
            await self._turn()
        except PushError as exc:
            return self._refuse(exc)
        try:
            return await self._push(request, key, node)
        except PushError as exc:
            return self._refuse(exc)
        finally:
            self._bodies.release()

    async def _turn(self) -> None:
        """Wait for one of the `max_concurrent_bodies` places; PushError(503) if none frees."""
        if not self._bodies.locked():
            await self._bodies.acquire()
            return
        try:
            async with asyncio.timeout(self.config.busy_wait_s):
                await self._bodies.acquire()
        except TimeoutError:
            retry_after = str(max(1, math.ceil(self.config.busy_wait_s)))
            raise PushError(503, "busy: too many pushes at once, try again later",
                            {"Retry-After": retry_after}) from None

    def _refuse(self, exc: PushError) -> web.Response:
        self.refused += 1
        if exc.status == 503:
            self.busy += 1
            log.info("push refused (503): %s", exc.message)
        else:
            log.warning("push refused (%d): %s", exc.status, exc.message)
        return _error(exc)

    async def _work(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` in the worker thread, one at a time: parsing and the outbox."""
        # One body at a time: parsing and storing are CPU work under the GIL and the
        # outbox's lock, so running several at once gains no speed, only memory
        # (each holds ~20 objects per user at its peak).
        async with self._one_at_a_time:
            return await asyncio.get_running_loop().run_in_executor(self._worker, call, *args)

    @contextlib.asynccontextmanager
    async def _one_decision(self, mark: str) -> AsyncIterator[None]:
        """Pushes with the same mark are decided one after the other."""
        lock, users = self._deciding.get(mark, (asyncio.Lock(), 0))
        self._deciding[mark] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._deciding[mark]
            if users == 1:
                del self._deciding[mark]
            else:
                self._deciding[mark] = (lock, users - 1)

    async def _push(self, request: web.Request, key: str, node: str) -> web.StreamResponse:
        body = await self._read_body(request)
        counters, digest = await self._work(parse_push_body, body)
        counters = [c for c in counters if c.up or c.down]
        mark = f"push:{key}:{digest}"
        async with self._one_decision(mark):
            window = self.config.dedup_window_s
            if counters and window > 0 and await self._work(
                self.outbox.take_mark, mark, self.clock(), window
            ):
                self.retries += 1
                log.info("push from %s resends one whose 2xx was not delivered: "
                         "answered, not billed again%s", key,
                         " nor forwarded" if self.panel is not None else "")
                return (await _answer(request, PanelAnswer.data_true()))[0]
            answer, billed = await self._decide(request, key, node, body, counters)
            response, delivered = await _answer(request, answer)
            if billed and not delivered:
                self.undelivered += 1
                log.warning("push from %s was billed, but its %d answer could not be "
                            "delivered: a resend within %ss is not billed again",
                            key, answer.status, window)
                if window > 0:
                    await self._work(self.outbox.mark, mark, self.clock(), window)
            return response

    async def _decide(self, request: web.Request, key: str, node: str, body: bytes,
                      counters: list[Counter]) -> tuple[PanelAnswer, bool]:
        """The answer for the backend and whether the push was billed."""
        if self.panel is None:
            if counters:
                await self._work(self._store, node, counters, None)
            return PanelAnswer.data_true(), bool(counters)
        held = await self._work(self.outbox.hold, key, body, self.clock()) if counters else None
        try:
            answer = await self.panel.send(request.method, request.raw_path,
                                           CIMultiDict(request.headers), body)
        except PanelUnreachable as exc:
            if held is not None:
                await self._work(self.outbox.drop_held, held)
                self.declined += 1
            log.warning("push from %s not billed: %s", key, exc)
            return _unreachable(exc), False
        if held is None:
            return answer, False
        if answer.accepted:
            await self._work(self._store, node, counters, held)
            return answer, True
        await self._work(self.outbox.drop_held, held)
        self.declined += 1
        log.warning("push from %s not billed: the panel answered %d", key, answer.status)
        return answer, False

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, read once (not kept on the request as `read()` would)."""
        limit = self.config.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise PushError(413, f"body larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _store(self, node: str, counters: list[Counter], held: int | None) -> None:
        """Record the push as the node's next delta report (releasing `held`, if given)."""
        now = self.clock()
        epoch_key = f"push-epoch:{node}"
        epoch = self.outbox.get_state(epoch_key)
        if not isinstance(epoch, int):
            epoch = int(now * 1000)
        self.outbox.record(
            node_id=node, epoch=epoch, observed_at=datetime.fromtimestamp(now, UTC),
            counters=counters, kind="delta", state={epoch_key: epoch}, release=held,
        )
        self.accepted += 1
        if self.on_stored is not None:
            self.on_stored()

    async def relay(self, request: web.Request) -> web.StreamResponse:
        """Gateway: any other UniProxy request, to the panel and back, unchanged."""
        assert self.panel is not None
        body = await request.read()
        try:
            answer = await self.panel.send(request.method, request.raw_path,
                                           CIMultiDict(request.headers), body)
        except PanelUnreachable as exc:
            log.warning("%s %s: %s", request.method, request.path, exc)
            answer = _unreachable(exc)
        return (await _answer(request, answer))[0]

    async def alive(self, request: web.Request) -> web.Response:
        """Standalone: POST .../alive (online IPs) is accepted and ignored."""
        try:
            self._authorise(request)
        except PushError as exc:
            return _error(exc)
        return web.json_response({"data": True})

    async def not_served(self, request: web.Request) -> web.Response:
        """Standalone: the panel's other requests need the panel's data."""
        return _error(PushError(404, (
            f"{request.path} is not served: this quotaflow push receiver is standalone "
            "(the only receiver, no panel behind it); for XrayR, V2bX and other backends "
            "of an Xboard/V2Board panel set [push] upstream to the panel's address"
        )))

    async def start(self) -> None:
        """At start: drop the pushes held when the process last stopped (see the module doc)."""
        for sender, at, size in await self._work(self.outbox.drop_held, None):
            log.warning(
                "dropped a push from %s (%d bytes) held since %s: the process stopped before "
                "the panel's answer was seen, so it is not billed (its 2xx never reached "
                "the backend)", sender, size, datetime.fromtimestamp(at, UTC).isoformat())

    async def close(self) -> None:
        """Close the panel's connections and stop the worker thread (after its work)."""
        if self.panel is not None:
            await self.panel.close()
        self._worker.shutdown(wait=True)


def _unreachable(exc: PanelUnreachable) -> PanelAnswer:
    return PanelAnswer(exc.status, CIMultiDict({"Content-Type": "application/json"}),
                       orjson.dumps({"message": str(exc)}))


RECEIVER = web.AppKey("receiver", PushReceiver)
"""Where `make_app` keeps its `PushReceiver` (for its counters)."""


def make_app(
    config: PushConfig,
    outbox: Outbox,
    on_stored: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.time,
    panel: Panel | None = None,
) -> web.Application:
    """The aiohttp application of the push receiver (a gateway if `config.upstream`)."""
    receiver = PushReceiver(config, outbox, on_stored, clock, panel)
    app = web.Application(client_max_size=config.max_body_bytes)
    app[RECEIVER] = receiver

    async def start(_: web.Application) -> None:
        await receiver.start()

    async def stop(_: web.Application) -> None:
        await receiver.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post(PUSH_PATH, receiver.push)
    if receiver.panel is not None:
        app.router.add_route("*", UNIPROXY + "/{name}", receiver.relay)
    else:
        app.router.add_post(ALIVE_PATH, receiver.alive)
        app.router.add_route("*", UNIPROXY + "/{name}", receiver.not_served)
    return app


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 picks a free port); returns the runner and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server: Any = site._server
    bound = int(server.sockets[0].getsockname()[1]) if server is not None else port
    return runner, bound

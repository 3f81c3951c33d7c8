"""The panel push receiver: Xboard/V2Board's UniProxy push endpoint, for XrayR, V2bX and kin.

Node backends POST `{"<user id>": [up, down], ...}` — bytes since their last
push — to `/api/v1/server/UniProxy/push?node_type=..&node_id=..&token=..`. Every
accepted push becomes one `delta` report with the node's next seq, stored in the
outbox (fsynced) *before* the 200 answer, so an accepted push is never lost; the
agent's sender publishes it. The node's epoch is the time of its first push, kept
in the outbox.

Backends re-send the same body when an answer times out (and the panel then bills
it twice, XrayR #106). Here an identical body (same canonical JSON) from the same
node within `dedup_window_s` (120 s by default, 0 disables) is answered 200 and
not stored again. The limitation: two genuinely identical pushes within the
window count once. Backends push every 60 s, and the same non-empty deltas twice
in a row are rare, but a quiet user with a steady tiny keep-alive could do it:
shorten the window if that matters more than retries.

Answers follow Xboard: `{"data": true}` on success; errors are `{"message": ...}`
with 400 (malformed, or a user or node id the contracts refuse, see
`identifier_problem` in quotaflow.core.contracts), 403 (bad or missing token,
unknown node), 413 (body larger than `max_body_bytes`), 503 with `Retry-After`
(busy, see below). Nothing is stored on an error.

Memory: a push of a few MB becomes hundreds of thousands of Python objects while
it is parsed and stored, some tens of bytes of memory per byte of body. At most
`max_concurrent_bodies` pushes are past authorisation at once (reading their
body, or waiting with it read), and only one of them is parsed and stored at a
time (in a thread, off the event loop): that work is serial anyway, under the
GIL and the outbox's lock. A push over the limit waits before its body is read
(costing only its socket buffer) up to `busy_wait_s` and is then answered 503
with `Retry-After`. A 503 loses nothing: XrayR and V2bX keep the traffic of a
failed push and send it with the next one. The wait is short because XrayR's
panel requests time out after 5 s by default; a push whose body arrived is
stored even if its sender gave up waiting, and the resend is then recognised as
a retry. The body is read once, parsed once by orjson (a key given twice is
still refused, see `load_counters_json`), and its retry digest is taken from
that parse.

`POST .../alive` is accepted and ignored; the panel's GETs (`/config`, `/user`)
are not served — those need the panel's own data.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from quotaflow.core.contracts import Counter, check_identifier, identifier_problem
from quotaflow.producers.outbox import Outbox
from quotaflow.producers.sources import ParseError
from quotaflow.producers.sources._parsing import load_counters_json

log = logging.getLogger(__name__)

PUSH_PATH = "/api/v1/server/UniProxy/push"
ALIVE_PATH = "/api/v1/server/UniProxy/alive"


class PushConfig(BaseModel):
    """The `[push]` table of the agent config."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    token: SecretStr | None = None  # the panel-wide server token, for nodes not in `tokens`
    tokens: dict[str, SecretStr] = Field(default_factory=dict)  # "<node_type>-<node_id>" -> token
    # "<node_type>-<node_id>" -> node id
    node_map: dict[str, Annotated[str, AfterValidator(check_identifier)]] = Field(
        default_factory=dict
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=2)
    dedup_window_s: float = Field(default=120.0, ge=0)
    # Bodies read, parsed and stored at once (each can take ~20x its size), and how
    # long a push over that waits for its turn before a 503.
    max_concurrent_bodies: int = Field(default=4, ge=1)
    busy_wait_s: float = Field(default=3.0, ge=0)

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


def _error(exc: PushError) -> web.Response:
    return web.json_response({"message": exc.message}, status=exc.status, headers=exc.headers)


class PushReceiver:
    """The request handlers, bound to one outbox."""

    def __init__(
        self,
        config: PushConfig,
        outbox: Outbox,
        on_stored: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.on_stored = on_stored
        self.clock = clock
        self.accepted = 0
        self.retries = 0
        self.refused = 0
        self.busy = 0  # pushes answered 503
        # Bodies being read, parsed or stored (binds to the serving loop at first use).
        self._bodies = asyncio.Semaphore(config.max_concurrent_bodies)
        self._one_at_a_time = asyncio.Lock()
        # Always the same thread: each thread that allocates gets its own malloc
        # arena, which keeps the memory it once held (hundreds of MB over a pool's
        # threads after a burst of large pushes).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-receiver")

    def _authorise(self, request: web.Request) -> tuple[str, str]:
        """(node key, billing node id) of an authorised request."""
        node_type = request.query.get("node_type", "")
        node_id = request.query.get("node_id", "")
        token = request.query.get("token", "")
        if not node_type or not node_id:
            raise PushError(400, "node_type and node_id are required")
        key = f"{node_type}-{node_id}"
        expected = self.config.expected_token(key)
        if not token or expected is None or not hmac.compare_digest(
            token.encode(), expected.encode()
        ):
            raise PushError(403, "token is error")
        node = self.config.node_map.get(key, key)
        problem = identifier_problem(node)
        if problem is not None:
            raise PushError(400, f"node id {node[:60]!r} {problem}")
        return key, node

    async def push(self, request: web.Request) -> web.Response:
        """POST .../push: store the deltas as one report, or recognise a retry."""
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

    async def _push(self, request: web.Request, key: str, node: str) -> web.Response:
        body = await self._read_body(request)
        # One body at a time past this point: parsing and storing are CPU work
        # under the GIL and the outbox's lock, so running several at once gains
        # no speed, only memory (each holds ~20 objects per user at its peak).
        async with self._one_at_a_time:
            stored = await asyncio.get_running_loop().run_in_executor(
                self._worker, self._parse_and_store, body, key, node
            )
        if stored:
            self.accepted += 1
            if self.on_stored is not None:
                self.on_stored()
        elif stored is not None:
            self.retries += 1
            log.info("push from %s repeats one within %ss: not billed again",
                     key, self.config.dedup_window_s)
        return web.json_response({"data": True})

    def _parse_and_store(self, body: bytes, key: str, node: str) -> bool | None:
        """Stored (True), a retry (False), or nothing to store (None); PushError if malformed."""
        counters, digest = parse_push_body(body)
        counters = [c for c in counters if c.up or c.down]
        if not counters:
            return None
        return self._store(key, node, digest, counters)

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

    def _store(self, key: str, node: str, digest: str, counters: list[Counter]) -> bool:
        now = self.clock()
        epoch_key = f"push-epoch:{node}"
        epoch = self.outbox.get_state(epoch_key)
        if not isinstance(epoch, int):
            epoch = int(now * 1000)
        window = self.config.dedup_window_s
        # Keyed by the sender, not the billing node: two backends mapped to one node
        # pushing the same body are two pushes, not a retry.
        once = (f"push:{key}:{digest}", now, window) if window > 0 else None
        report = self.outbox.record(
            node_id=node, epoch=epoch, observed_at=datetime.fromtimestamp(now, UTC),
            counters=counters, kind="delta", state={epoch_key: epoch}, once=once,
        )
        return report is not None

    def close(self) -> None:
        """Stop the worker thread (after the pushes it has begun)."""
        self._worker.shutdown(wait=True)

    async def alive(self, request: web.Request) -> web.Response:
        """POST .../alive (online IPs): accepted and ignored."""
        try:
            self._authorise(request)
        except PushError as exc:
            return _error(exc)
        return web.json_response({"data": True})


RECEIVER = web.AppKey("receiver", PushReceiver)
"""Where `make_app` keeps its `PushReceiver` (for its counters)."""


def make_app(
    config: PushConfig,
    outbox: Outbox,
    on_stored: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The aiohttp application of the push receiver."""
    receiver = PushReceiver(config, outbox, on_stored, clock)
    app = web.Application(client_max_size=config.max_body_bytes)
    app[RECEIVER] = receiver

    async def stop_worker(_: web.Application) -> None:
        receiver.close()

    app.on_cleanup.append(stop_worker)
    app.router.add_post(PUSH_PATH, receiver.push)
    app.router.add_post(ALIVE_PATH, receiver.alive)
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

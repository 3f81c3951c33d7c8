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
unknown node), 413 (body larger than `max_body_bytes`). Nothing is stored on an
error. `POST .../alive` is accepted and ignored; the panel's GETs (`/config`,
`/user`) are not served — those need the panel's own data.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from quotaflow.core.contracts import Counter, check_identifier, identifier_problem
from quotaflow.producers.outbox import Outbox
from quotaflow.producers.sources import ParseError, parse_counters_json

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

    def expected_token(self, node_key: str) -> str | None:
        """The token a node must present, or None if the node is unknown."""
        secret = self.tokens.get(node_key, self.token)
        return None if secret is None else secret.get_secret_value()


class PushError(Exception):
    """A request refused with an HTTP status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_push_body(body: bytes) -> dict[str, tuple[int, int]]:
    """The `{"uid": [up, down]}` body as a dict; raises PushError(400) on anything else.

    >>> parse_push_body(b'{"7": [10, 20]}')
    {'7': (10, 20)}
    """
    if not body.lstrip().startswith(b"{"):
        raise PushError(400, 'body must be a JSON object {"<user id>": [up, down], ...}')
    try:
        counters = parse_counters_json(body)
    except ParseError as exc:
        raise PushError(400, str(exc)) from None
    return {c.user_id: (c.up, c.down) for c in counters}


def _body_digest(traffic: dict[str, tuple[int, int]]) -> str:
    canonical = orjson.dumps({u: list(t) for u, t in traffic.items()}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def _error(exc: PushError) -> web.Response:
    return web.json_response({"message": exc.message}, status=exc.status)


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
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise PushError(413, f"body larger than {self.config.max_body_bytes} bytes") \
                    from None
            traffic = parse_push_body(body)
        except PushError as exc:
            self.refused += 1
            log.warning("push refused (%d): %s", exc.status, exc.message)
            return _error(exc)
        counters = [Counter(user_id=u, up=a, down=b) for u, (a, b) in traffic.items() if a or b]
        if not counters:
            return web.json_response({"data": True})
        stored = await asyncio.to_thread(self._store, key, node, traffic, counters)
        if stored:
            self.accepted += 1
            if self.on_stored is not None:
                self.on_stored()
        else:
            self.retries += 1
            log.info("push from %s repeats one within %ss: not billed again",
                     key, self.config.dedup_window_s)
        return web.json_response({"data": True})

    def _store(
        self, key: str, node: str, traffic: dict[str, tuple[int, int]], counters: list[Counter]
    ) -> bool:
        now = self.clock()
        epoch_key = f"push-epoch:{node}"
        epoch = self.outbox.get_state(epoch_key)
        if not isinstance(epoch, int):
            epoch = int(now * 1000)
        window = self.config.dedup_window_s
        # Keyed by the sender, not the billing node: two backends mapped to one node
        # pushing the same body are two pushes, not a retry.
        once = (f"push:{key}:{_body_digest(traffic)}", now, window) if window > 0 else None
        report = self.outbox.record(
            node_id=node, epoch=epoch, observed_at=datetime.fromtimestamp(now, UTC),
            counters=counters, kind="delta", state={epoch_key: epoch}, once=once,
        )
        return report is not None

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

"""A panel stand-in that answers the UniProxy API the way Xboard's UniProxyController does.

A real aiohttp server on loopback. One panel-wide server token (403 `token is
error` otherwise); `node_type` normalised as Xboard does (lower-case, `v2ray` is
`vmess`, `hysteria2` is `hysteria`); `config` and `user` carry an ETag (the SHA-1
of the JSON answer, quoted) and are answered 304 with no body when the request's
`If-None-Match` holds it; `alivelist` and `alive` as Xboard. Every push the
stand-in answers 2xx is billed into `ledger`, before any scripted delay (a panel
that billed and then answered too late). Pushes can be scripted to fail
(`push_statuses`) or to answer late (`push_delays`); `requests` keeps what
arrived (method, path, raw query, headers, body) to compare with what was sent.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from quotaflow.producers.push import normalise_node_type

TOKEN = "panel-token"


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class PanelStandIn:
    ledger: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # node -> uid -> [u, d]
    push_statuses: list[int] = field(default_factory=list)  # the next pushes' statuses
    push_delays: list[float] = field(default_factory=list)  # the next pushes' delays
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ the node's data

    @staticmethod
    def config_of(node: str) -> dict[str, object]:
        return {"server_port": 10086, "network": "tcp", "networkSettings": None, "tls": 0,
                "node": node, "base_config": {"push_interval": 10, "pull_interval": 10}}

    @staticmethod
    def users_of(node: str) -> dict[str, object]:
        return {"users": [{"id": 1, "uuid": "b831381d-6324-4d53-ad4f-8cda48b30811",
                           "speed_limit": None},
                          {"id": 2, "uuid": "c6b0d1c5-3b0e-4a64-8f43-bb1c0a2a6b51",
                           "speed_limit": None}]}

    @staticmethod
    def etag_of(data: object) -> str:
        return hashlib.sha1(orjson.dumps(data)).hexdigest()

    # ------------------------------------------------------------------ handlers

    def _node(self, request: web.Request) -> str:
        if request.query.get("token") != TOKEN:
            raise web.HTTPForbidden(text='{"message": "token is error"}',
                                    content_type="application/json")
        node_type = normalise_node_type(request.query.get("node_type", ""))
        node_id = request.query.get("node_id", "")
        if not node_type or not node_id:
            raise web.HTTPBadRequest(text='{"message": "server is not exist"}',
                                     content_type="application/json")
        return f"{node_type}-{node_id}"

    async def _seen(self, request: web.Request) -> bytes:
        body = await request.read()
        self.requests.append(Seen(request.method, request.path, request.raw_path.partition("?")[2],
                                  dict(request.headers), body))
        return body

    async def _with_etag(self, request: web.Request, data: object) -> web.Response:
        etag = self.etag_of(data)
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304)
        return web.Response(body=orjson.dumps(data), content_type="application/json",
                            headers={"ETag": f'"{etag}"'})

    async def config(self, request: web.Request) -> web.Response:
        await self._seen(request)
        return await self._with_etag(request, self.config_of(self._node(request)))

    async def user(self, request: web.Request) -> web.Response:
        await self._seen(request)
        return await self._with_etag(request, self.users_of(self._node(request)))

    async def alivelist(self, request: web.Request) -> web.Response:
        await self._seen(request)
        self._node(request)
        return web.json_response({"alive": {}})

    async def alive(self, request: web.Request) -> web.Response:
        await self._seen(request)
        self._node(request)
        return web.json_response({"data": True})

    async def push(self, request: web.Request) -> web.Response:
        body = await self._seen(request)
        node = self._node(request)
        status = self.push_statuses.pop(0) if self.push_statuses else 200
        delay = self.push_delays.pop(0) if self.push_delays else 0.0
        if not 200 <= status < 300:
            await asyncio.sleep(delay)
            return web.json_response({"message": "the panel failed"}, status=status)
        data = orjson.loads(body)
        bill = self.ledger.setdefault(node, {})
        for uid, (up, down) in data.items():
            total = bill.setdefault(uid, [0, 0])
            total[0] += up
            total[1] += down
        await asyncio.sleep(delay)
        return web.json_response({"data": True}, status=status)

    async def compressed(self, request: web.Request) -> web.Response:
        """Not Xboard's: a gzip body with two Set-Cookie headers, to see them passed on as is."""
        import gzip

        await self._seen(request)
        return web.Response(
            body=gzip.compress(orjson.dumps(self.users_of("any")), mtime=0),
            headers=[("Content-Type", "application/json"), ("Content-Encoding", "gzip"),
                     ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Panel", "yes")],
        )

    # ------------------------------------------------------------------ running

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        base = "/api/v1/server/UniProxy"
        app.router.add_get(f"{base}/config", self.config)
        app.router.add_get(f"{base}/user", self.user)
        app.router.add_get(f"{base}/alivelist", self.alivelist)
        app.router.add_post(f"{base}/alive", self.alive)
        app.router.add_post(f"{base}/push", self.push)
        app.router.add_get(f"{base}/compressed", self.compressed)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def billed(self) -> dict[str, dict[str, tuple[int, int]]]:
        return {n: {u: (t[0], t[1]) for u, t in users.items()} for n, users in self.ledger.items()}

"""The push receiver as a gateway in front of a panel, against what real XrayR and V2bX sent.

The recordings in `recordings/` are the requests real XrayR v25.3.6 and V2bX made
to a panel (their README says how they were made). They are replayed, request by
request, against the real agent (`Agent.run`, its push site and its sender to the
session's real Kafka) with `[push] upstream` pointing at a panel stand-in that
answers like Xboard (tests/producers/panel.py). What the stand-in billed is
compared with what reached Kafka.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from yarl import URL

from quotaflow.core.contracts import CounterReport
from quotaflow.core.settings import Settings
from quotaflow.producers.agent import Agent, AgentConfig
from quotaflow.producers.outbox import Outbox
from quotaflow.producers.push import (
    PUSH_PATH,
    RECEIVER,
    PushConfig,
    make_app,
    normalise_node_type,
    start_site,
)
from tests.producers.panel import TOKEN, PanelStandIn

RECORDINGS = Path(__file__).parent / "recordings"
UNREACHABLE_KAFKA = "127.0.0.1:9"  # nothing listens there


def recording(name: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (RECORDINGS / name).read_bytes().splitlines() if line]


def node_of(query: dict[str, str]) -> str:
    return f"{normalise_node_type(query['node_type'])}-{query['node_id']}"


def add(ledger: dict[str, dict[str, tuple[int, int]]], node: str, body: bytes) -> None:
    users = ledger.setdefault(node, {})
    for uid, (up, down) in orjson.loads(body).items():
        before = users.get(uid, (0, 0))
        users[uid] = (before[0] + up, before[1] + down)


# --------------------------------------------------------------------------- the real agent


@asynccontextmanager
async def gateway(tmp_path: Path, settings: Settings, upstream: str, *,
                  kafka: str | None = None, drain_s: float = 30.0,
                  **push: Any) -> AsyncIterator[Agent]:
    """The agent with only `[push] upstream = ...` (no collectors), running on this loop."""
    config = AgentConfig(
        node_id="gateway", outbox=tmp_path / "gateway-outbox.db", ensure_topics=True,
        drain_timeout_s=drain_s, push=PushConfig(port=0, upstream=upstream, **push),
    )
    agent = Agent(config, settings=settings if kafka is None
                  else settings.model_copy(update={"kafka_bootstrap": kafka}))
    task = asyncio.create_task(agent.run(collect=False))
    while agent.push_port is None:
        assert not task.done(), task
        await asyncio.sleep(0.02)
    try:
        yield agent
    finally:
        agent.stop.set()
        await task


async def drained(agent: Agent, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(agent.outbox):
        assert time.monotonic() < deadline, f"{len(agent.outbox)} reports not sent"
        await asyncio.sleep(0.1)


def kafka_billed(settings: Settings) -> dict[str, dict[str, tuple[int, int]]]:
    """Every user's bytes per node in the raw topic, each (node, epoch, seq) counted once."""
    reader = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(settings.topics.raw, p) for p in range(settings.partitions)]
        reader.assign(tps)
        ends = reader.end_offsets(tps)
        reader.seek_to_beginning()
        seen: dict[tuple[str, int, int, str], tuple[int, int]] = {}
        deadline = time.monotonic() + 30
        while any(reader.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline
            for records in reader.poll(timeout_ms=500).values():
                for record in records:
                    report = CounterReport.decode(record.value)
                    assert report.kind == "delta"
                    for c in report.counters:
                        seen[(report.node_id, report.epoch, report.seq, c.user_id)] = (c.up,
                                                                                       c.down)
    finally:
        reader.close()
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for (node, _, _, user), (up, down) in seen.items():
        before = out.setdefault(node, {}).get(user, (0, 0))
        out[node][user] = (before[0] + up, before[1] + down)
    return out


@pytest.fixture
async def panel() -> AsyncIterator[PanelStandIn]:
    stand_in = PanelStandIn()
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await stand_in.stop()


# --------------------------------------------------------------------------- replaying


async def replay(base: str, lines: list[dict[str, Any]], panel: PanelStandIn) -> \
        dict[str, dict[str, tuple[int, int]]]:
    """Send every recorded request through `base`; check each answer; the pushes accepted.

    Each push is answered by the stand-in with the status the panel gave in the
    recording. A recorded `If-None-Match` is sent as the stand-in's current ETag of
    that resource (the recorded ones are of another panel's data), so the statuses
    must be the recorded ones: 200 with the ETag first, then 304.
    """
    accepted: dict[str, dict[str, tuple[int, int]]] = {}
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent",)) as session:
        for i, line in enumerate(lines):
            node = node_of(line["query"])
            name = line["path"].rsplit("/", 1)[1]
            headers = {"User-Agent": line["ua"]}
            etag = None
            if name in ("config", "user"):
                data = panel.config_of(node) if name == "config" else panel.users_of(node)
                etag = f'"{panel.etag_of(data)}"'
            if line["if_none_match"] is not None:
                headers["If-None-Match"] = etag if line["if_none_match"] else ""
            if name == "push":
                panel.push_statuses[:] = [line["status"]]
            body = line["body"].encode()
            if body:
                headers["Content-Type"] = "application/json"
            query = urlencode(line["query"])
            before = len(panel.requests)
            async with session.request(line["method"], f"{base}{line['path']}?{query}",
                                       headers=headers, data=body or None) as answer:
                got = await answer.read()
                assert answer.status == line["status"], (i, line, answer.status, got)
                if answer.status == 200 and etag is not None:
                    assert answer.headers["ETag"] == etag, (i, line)
                    assert orjson.loads(got) == data
                if answer.status == 304:
                    assert got == b""
            # The panel saw the request as the backend sent it.
            [seen] = panel.requests[before:]
            assert (seen.method, seen.path, seen.query, seen.body) == (
                line["method"], line["path"], query, body), (i, line)
            for header, value in headers.items():
                assert seen.headers.get(header) == value, (i, header, seen.headers)
            if name == "push" and 200 <= line["status"] < 300:
                add(accepted, node, body)
    return accepted


@pytest.mark.integration
@pytest.mark.parametrize(
    "name", ["xrayr-v25.3.6-uniproxy.jsonl", "v2bx-uniproxy.jsonl", "v2bx-uniproxy-tee.jsonl"]
)
async def test_recordings_pass_through_and_the_panel_and_kafka_agree(
    name: str, panel: PanelStandIn, settings: Settings, tmp_path: Path
) -> None:
    lines = recording(name)
    async with gateway(tmp_path, settings, panel.url) as agent:
        accepted = await replay(f"http://127.0.0.1:{agent.push_port}", lines, panel)
        await drained(agent)
    assert panel.billed() == accepted
    assert kafka_billed(settings) == accepted
    pushes = [line for line in lines if line["path"] == PUSH_PATH]
    failed = [line for line in pushes if line["status"] >= 300]
    if name.startswith("xrayr"):
        # 502, 502, then 200 with the same body: billed once, by both.
        assert [line["status"] for line in failed] == [502, 502]
        assert accepted == {"vmess-1": {"1": (86 + 88, 3000205 + 777981),
                                        "2": (88 * 2, 777981 * 2)}}
    if name == "v2bx-uniproxy.jsonl":
        # Three identical genuine pushes, a push interval apart: billed three times.
        same = [line for line in pushes if line["body"] == '{"2":[88,777981]}']
        assert len(same) == 3 and all(line["status"] == 200 for line in same)
        assert accepted["vmess-2"]["2"] == (88 * 4, 777981 * 4)
    # The tee recording's own `panel_ledger` is not compared: from its second push on
    # it holds one {"1": [88, 777981]} more than the pushes the recording lists (one
    # push between its first two is not in the file).


# --------------------------------------------------------------------------- resends


async def _post(session: aiohttp.ClientSession, url: str, body: bytes,
                timeout_s: float = 10.0, node: str = "1") -> tuple[int, object] | None:
    """One push as XrayR sends it: (status, JSON answer); None when its timeout ran out."""
    params = {"node_id": node, "node_type": "v2ray", "token": TOKEN}
    try:
        async with session.post(url + PUSH_PATH, params=params, data=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as answer:
            return answer.status, orjson.loads(await answer.read())
    except TimeoutError:
        return None


def _pushes_seen(panel: PanelStandIn) -> int:
    return sum(1 for r in panel.requests if r.path == PUSH_PATH)


@pytest.mark.integration
async def test_a_resend_after_a_timeout_is_billed_once_by_both(
    panel: PanelStandIn, settings: Settings, tmp_path: Path
) -> None:
    """XrayR gives up after its timeout and sends the same body again (resty retries).

    The panel billed the first copy and answered too late; the resend is answered
    by the gateway itself, not forwarded, so neither bills it twice. Later, the same
    body again is a genuine push and billed by both.
    """
    body = b'{"1":[88,777981]}'
    async with (
        gateway(tmp_path, settings, panel.url, dedup_window_s=30) as agent,
        aiohttp.ClientSession() as session,
    ):
        url = f"http://127.0.0.1:{agent.push_port}"
        receiver = agent_receiver(agent)
        # 1. The resend comes while the panel is still deciding on the first copy.
        panel.push_delays[:] = [2.0]
        assert await _post(session, url, body, timeout_s=1.0) is None
        assert await _post(session, url, body) == (200, {"data": True})
        assert _pushes_seen(panel) == 1
        # 2. The resend comes after the panel's late answer was found undeliverable.
        panel.push_delays[:] = [1.5]
        assert await _post(session, url, body, timeout_s=0.5) is None
        await asyncio.sleep(1.5)
        assert await _post(session, url, body) == (200, {"data": True})
        assert _pushes_seen(panel) == 2
        # 3. The same body once more: a genuine push, billed.
        assert (await _post(session, url, body) or (0,))[0] == 200
        assert _pushes_seen(panel) == 3
        assert (receiver.accepted, receiver.undelivered, receiver.retries) == (3, 2, 2)
        await drained(agent)
    expected = {"vmess-1": {"1": (88 * 3, 777981 * 3)}}
    assert panel.billed() == expected
    assert kafka_billed(settings) == expected


def agent_receiver(agent: Agent) -> Any:
    """The running agent's push receiver (for its counters)."""
    return agent.push_app[RECEIVER] if agent.push_app is not None else None


# --------------------------------------------------------------------------- outages


@pytest.mark.integration
async def test_kafka_down_the_gateway_serves_and_loses_nothing(
    panel: PanelStandIn, settings: Settings, tmp_path: Path
) -> None:
    lines = recording("v2bx-uniproxy.jsonl")
    async with gateway(tmp_path, settings, panel.url, kafka=UNREACHABLE_KAFKA,
                       drain_s=0) as agent:
        accepted = await replay(f"http://127.0.0.1:{agent.push_port}", lines, panel)
        assert len(agent.outbox) == 4  # every accepted push, waiting for Kafka
    # Kafka is reachable again (the next start of the gateway sees it): all of it goes out.
    async with gateway(tmp_path, settings, panel.url) as agent:
        await drained(agent)
    assert panel.billed() == accepted
    assert kafka_billed(settings) == accepted


@pytest.mark.integration
async def test_a_kafka_outage_while_the_gateway_runs_loses_nothing(
    services: Any, panel: PanelStandIn, settings: Settings, tmp_path: Path
) -> None:
    """The session's Kafka stopped while the gateway runs: the backend is served as usual,
    and once Kafka is back the gateway's sender publishes every accepted push, once."""
    lines = recording("xrayr-v25.3.6-uniproxy.jsonl")
    async with gateway(tmp_path, settings, panel.url) as agent:
        await asyncio.to_thread(services.stop_kafka)
        try:
            accepted = await replay(f"http://127.0.0.1:{agent.push_port}", lines, panel)
            assert len(agent.outbox) == 3  # the accepted pushes, waiting
        finally:
            await asyncio.to_thread(services.start_kafka)
        await drained(agent, timeout_s=180)
    assert panel.billed() == accepted
    assert kafka_billed(settings) == accepted


@pytest.mark.integration
async def test_panel_down_the_backend_gets_an_error_and_nothing_is_billed(
    panel: PanelStandIn, settings: Settings, tmp_path: Path
) -> None:
    """Panel down: 502 for every request, nothing billed or held; its resend, once it is
    back, is billed once by both (XrayR keeps the counters of a failed push)."""
    body = b'{"1":[86,3000205],"2":[88,777981]}'
    async with (
        gateway(tmp_path, settings, panel.url, upstream_timeout_s=5) as agent,
        aiohttp.ClientSession() as session,
    ):
        url = f"http://127.0.0.1:{agent.push_port}"
        await panel.stop()
        failed = await _post(session, url, body)
        assert failed is not None and failed[0] == 502, failed
        assert "cannot be reached" in str(failed[1])
        params = {"node_id": "1", "node_type": "v2ray", "token": TOKEN}
        async with session.get(f"{url}/api/v1/server/UniProxy/config", params=params) as answer:
            assert answer.status == 502
        assert len(agent.outbox) == 0 and agent.outbox.drop_held() == []
        await panel.start(panel.port)
        assert await _post(session, url, body) == (200, {"data": True})
        await drained(agent)
    expected = {"vmess-1": {"1": (86, 3000205), "2": (88, 777981)}}
    assert panel.billed() == expected
    assert kafka_billed(settings) == expected


# --------------------------------------------------------------------------- without Kafka


async def test_a_refused_push_is_not_billed_and_its_answer_is_the_panels(
    panel: PanelStandIn, tmp_path: Path
) -> None:
    config = PushConfig(port=0, upstream=panel.url)
    with Outbox(tmp_path / "o.db") as outbox:
        app = make_app(config, outbox)
        runner, port = await start_site(app, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{port}"
                params = {"node_id": "1", "node_type": "vless", "token": "wrong"}
                async with session.post(url + PUSH_PATH, params=params,
                                        data=b'{"1":[1,2]}') as answer:
                    assert (answer.status, await answer.json()) == (
                        403, {"message": "token is error"})
                panel.push_statuses[:] = [500]
                assert await _post(session, url, b'{"1":[1,2]}') == (
                    500, {"message": "the panel failed"})
        finally:
            await runner.cleanup()
        assert len(outbox) == 0 and outbox.drop_held() == []
        assert app[RECEIVER].declined == 2 and app[RECEIVER].accepted == 0
    assert panel.billed() == {}


async def test_held_pushes_found_at_start_are_dropped(
    panel: PanelStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        outbox.hold("vmess-1", b'{"1":[1,2]}', 1_790_000_000.0)
    with Outbox(tmp_path / "o.db") as outbox:
        runner, _ = await start_site(make_app(PushConfig(port=0, upstream=panel.url), outbox),
                                     "127.0.0.1", 0)
        await runner.cleanup()
        assert outbox.drop_held() == [] and len(outbox) == 0
    assert "dropped a push from vmess-1 (11 bytes)" in caplog.text


async def test_answers_pass_through_byte_for_byte(panel: PanelStandIn, tmp_path: Path) -> None:
    """A gzip body stays compressed, repeated headers stay repeated, the query as it came."""
    with Outbox(tmp_path / "o.db") as outbox:
        runner, port = await start_site(make_app(PushConfig(port=0, upstream=panel.url), outbox),
                                        "127.0.0.1", 0)
        try:
            query = "node_id=1&node_type=V2ray&token=panel-token&x=%2F%20a"
            path = f"/api/v1/server/UniProxy/compressed?{query}"
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                async with session.get(URL(panel.url + path, encoded=True),
                                       headers={"Accept-Encoding": "gzip"}) as direct:
                    expected = (direct.status, await direct.read(),
                                direct.headers.getall("Set-Cookie"),
                                direct.headers["Content-Encoding"], direct.headers["X-Panel"])
                async with session.get(URL(f"http://127.0.0.1:{port}{path}", encoded=True),
                                       headers={"Accept-Encoding": "gzip"}) as relayed:
                    got = (relayed.status, await relayed.read(),
                           relayed.headers.getall("Set-Cookie"),
                           relayed.headers["Content-Encoding"], relayed.headers["X-Panel"])
        finally:
            await runner.cleanup()
    assert got == expected and expected[2] == ["a=1", "b=2"]
    assert panel.requests[-1].query == panel.requests[-2].query == query
    assert panel.requests[-1].headers.get("Accept-Encoding") == "gzip"


def test_gateway_config() -> None:
    from pydantic import SecretStr, ValidationError

    assert PushConfig(upstream="https://panel.example/").upstream == "https://panel.example"
    assert PushConfig(node_map={"V2ray-1": "fra-1"}).node_map == {"vmess-1": "fra-1"}
    with pytest.raises(ValidationError, match="standalone"):
        PushConfig(upstream="https://panel.example", tokens={"vless-1": SecretStr("x")})
    for bad in ("panel.example", "ftp://panel.example", "https://panel.example/?a=1"):
        with pytest.raises(ValidationError):
            PushConfig(upstream=bad)
    with pytest.raises(ValidationError, match="same node"):
        PushConfig(node_map={"v2ray-1": "a", "vmess-1": "b"})

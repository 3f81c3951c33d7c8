"""The push receiver over real HTTP on loopback: format, retries, tokens, bad bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from pydantic import SecretStr

from quotaflow.producers.outbox import Outbox
from quotaflow.producers.push import PUSH_PATH, PushConfig, make_app, start_site


@dataclass
class Receiver:
    url: str
    outbox: Outbox
    session: aiohttp.ClientSession
    clock: list[float]

    async def push(self, body: bytes | object, token: str = "t0k3n", node: str = "7",
                   node_type: str = "vless") -> tuple[int, object]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        params = {"node_type": node_type, "node_id": node, "token": token}
        async with self.session.post(self.url + PUSH_PATH, params=params, data=data,
                                     headers={"Content-Type": "application/json"}) as answer:
            return answer.status, await answer.json()


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    config = PushConfig(
        port=0, token=SecretStr("t0k3n"), tokens={"trojan-9": SecretStr("other")},
        node_map={"vless-7": "fra-1"}, max_body_bytes=1024, dedup_window_s=120,
    )
    clock = [1_790_000_000.0]
    with Outbox(tmp_path / "push.db") as outbox:
        runner, port = await start_site(make_app(config, outbox, clock=lambda: clock[0]),
                                        "127.0.0.1", 0)
        async with aiohttp.ClientSession() as session:
            yield Receiver(f"http://127.0.0.1:{port}", outbox, session, clock)
        await runner.cleanup()


async def test_push_becomes_one_delta_report(receiver: Receiver) -> None:
    status, answer = await receiver.push({"1": [100, 2000], "2": [0, 0], "3": [5, 0]})
    assert (status, answer) == (200, {"data": True})
    [(_, report)] = receiver.outbox.pending()
    assert report.node_id == "fra-1" and report.kind == "delta" and report.seq == 0
    assert report.epoch == 1_790_000_000_000
    assert [(c.user_id, c.up, c.down) for c in report.counters] == [("1", 100, 2000), ("3", 5, 0)]


async def test_retry_is_not_billed_twice(receiver: Receiver) -> None:
    body = {"1": [100, 2000], "2": [7, 8]}
    assert (await receiver.push(body))[0] == 200
    receiver.clock[0] += 30
    assert (await receiver.push(b'{"2": [7, 8], "1": [100, 2000]}'))[0] == 200  # same, reordered
    assert len(receiver.outbox) == 1
    receiver.clock[0] += 60
    assert (await receiver.push({"1": [1, 1]}))[0] == 200  # a new push
    receiver.clock[0] += 200  # past the window: the same body again is new traffic
    assert (await receiver.push(body))[0] == 200
    reports = [r for _, r in receiver.outbox.pending()]
    assert [r.seq for r in reports] == [0, 1, 2]
    assert {r.epoch for r in reports} == {1_790_000_000_000}


async def test_other_nodes_and_their_tokens(receiver: Receiver) -> None:
    assert (await receiver.push({"1": [1, 2]}, token="other", node="9", node_type="trojan"))[0] \
        == 200
    assert (await receiver.push({"1": [1, 2]}, token="t0k3n", node="9", node_type="trojan"))[0] \
        == 403  # this node has its own token
    assert (await receiver.push({"1": [1, 2]}, node="8"))[0] == 200  # the panel-wide token
    assert {r.node_id for _, r in receiver.outbox.pending()} == {"trojan-9", "vless-8"}


@pytest.mark.parametrize("token", ["", "wrong", "t0k3n-"])
async def test_bad_token_is_refused(receiver: Receiver, token: str) -> None:
    status, answer = await receiver.push({"1": [1, 2]}, token=token)
    assert status == 403 and "message" in answer  # type: ignore[operator]
    assert len(receiver.outbox) == 0


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"1": [1]}', b'{"1": [-1, 2]}', b'{"1": [1.5, 2]}',
     b'{"1": [true, 2]}', b'{"1": {"up": 1}}', b'{"": [1, 2]}', b'{"1": [1, 9223372036854775808]}',
     b""],
)
async def test_malformed_body_is_refused(receiver: Receiver, body: bytes) -> None:
    status, answer = await receiver.push(body)
    assert status == 400 and "message" in answer  # type: ignore[operator]
    assert len(receiver.outbox) == 0


async def test_oversized_body_is_refused(receiver: Receiver) -> None:
    body = {str(i): [i, i] for i in range(200)}
    status, _ = await receiver.push(body)
    assert status == 413
    assert len(receiver.outbox) == 0


async def test_missing_node_is_refused(receiver: Receiver) -> None:
    async with receiver.session.post(receiver.url + PUSH_PATH, params={"token": "t0k3n"},
                                     data=b"{}") as answer:
        assert answer.status == 400
    assert len(receiver.outbox) == 0


async def test_dedup_disabled(tmp_path: Path) -> None:
    config = PushConfig(port=0, token=SecretStr("x"), dedup_window_s=0)
    with Outbox(tmp_path / "p.db") as outbox:
        runner, port = await start_site(make_app(config, outbox), "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(2):
                    async with session.post(
                        f"http://127.0.0.1:{port}{PUSH_PATH}",
                        params={"node_type": "v2ray", "node_id": "1", "token": "x"},
                        data=b'{"5": [1, 1]}',
                    ) as answer:
                        assert answer.status == 200
        finally:
            await runner.cleanup()
        assert [r.seq for _, r in outbox.pending()] == [0, 1]


async def test_identical_push_after_the_clock_went_back_is_stored(receiver: Receiver) -> None:
    """A mark from the "future" (the wall clock was stepped back an hour) is no retry."""
    body = {"1": [5, 5]}
    assert (await receiver.push(body))[0] == 200
    receiver.clock[0] -= 3600
    assert (await receiver.push(body))[0] == 200
    receiver.clock[0] += 5  # and a retry of that one is still recognised
    assert (await receiver.push(body))[0] == 200
    assert len(receiver.outbox) == 2


async def test_two_backends_billed_as_one_node_are_not_retries(tmp_path: Path) -> None:
    """Two panel nodes mapped to one billing node push the same body: two pushes, not a retry."""
    config = PushConfig(port=0, token=SecretStr("x"),
                        node_map={"vless-7": "fra-1", "vmess-8": "fra-1"})
    with Outbox(tmp_path / "p.db") as outbox:
        runner, port = await start_site(make_app(config, outbox), "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                for node_type, node in (("vless", "7"), ("vmess", "8"), ("vless", "7")):
                    async with session.post(
                        f"http://127.0.0.1:{port}{PUSH_PATH}",
                        params={"node_type": node_type, "node_id": node, "token": "x"},
                        data=b'{"5": [1, 1]}',
                    ) as answer:
                        assert answer.status == 200
        finally:
            await runner.cleanup()
        assert [(r.node_id, r.seq) for _, r in outbox.pending()] == [("fra-1", 0), ("fra-1", 1)]


@pytest.mark.parametrize(
    "user_id", ["a\x00b", "tab\there", "a\x7f", "a\x85", "a\u2028b", "trailing\\", "a\\ b",
                "x" * 257],
)
async def test_user_id_outside_the_contract_is_refused(receiver: Receiver, user_id: str) -> None:
    status, answer = await receiver.push({user_id: [1, 2], "ok": [3, 4]})
    assert status == 400, answer
    assert "user id" in answer["message"]  # type: ignore[index]
    assert len(receiver.outbox) == 0


@pytest.mark.parametrize("node", ["7\x00", "8\n", "9\u2029", "10\\", "11\\ x", "n" * 300])
async def test_node_id_outside_the_contract_is_refused(receiver: Receiver, node: str) -> None:
    status, answer = await receiver.push({"1": [1, 2]}, node=node)
    assert status == 400, answer
    assert "node id" in answer["message"]  # type: ignore[index]
    assert len(receiver.outbox) == 0


async def test_awkward_but_valid_ids_are_accepted(receiver: Receiver) -> None:
    body = {"DOMAIN\\alice": [1, 2], "bob smith": [3, 4], "c,d=e": [5, 6], "ü'\"": [7, 8]}
    assert (await receiver.push(body, node="eu\\1"))[0] == 200
    [(_, report)] = receiver.outbox.pending()
    assert report.node_id == "vless-eu\\1"
    assert sorted(c.user_id for c in report.counters) == sorted(body)


def test_node_map_is_checked_at_startup() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        PushConfig(node_map={"vless-7": "fra-1\\"})
    with pytest.raises(ValidationError):
        PushConfig(node_map={"vless-7": "fra\n1"})

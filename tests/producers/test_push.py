"""The push receiver over real HTTP on loopback: format, retries, tokens, bad bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from quotaflow.dev.local import free_ports
from quotaflow.producers.outbox import Outbox
from quotaflow.producers.push import PUSH_PATH, RECEIVER, PushConfig, make_app, start_site


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


async def test_identical_pushes_are_each_billed(receiver: Receiver) -> None:
    """The same download in consecutive intervals gives the same body: each is traffic."""
    body = {"1": [88, 777981]}
    for _ in range(3):
        assert (await receiver.push(body))[0] == 200
        receiver.clock[0] += 10
    assert [r.seq for _, r in receiver.outbox.pending()] == [0, 1, 2]


async def _push_and_hang_up(port: int, body: bytes, node: str = "7") -> None:
    """Send a push and close the connection without waiting for the answer (a timeout)."""
    import asyncio
    from urllib.parse import urlencode

    query = urlencode({"node_type": "vless", "node_id": node, "token": "t0k3n"})
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {PUSH_PATH}?{query} HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


@dataclass
class SlowReceiver:
    """A receiver whose store takes 0.3 s, time for a backend to give up and hang up."""

    port: int
    outbox: Outbox
    clock: list[float]
    app: web.Application

    async def until_undelivered(self, count: int) -> None:
        import asyncio

        for _ in range(100):
            if self.app[RECEIVER].undelivered >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the answer was delivered")

    async def push(self, body: bytes) -> int:
        params = {"node_type": "vless", "node_id": "7", "token": "t0k3n"}
        async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{self.port}{PUSH_PATH}", params=params, data=body
        ) as answer:
            return answer.status


@pytest.fixture
async def slow(tmp_path: Path) -> AsyncIterator[SlowReceiver]:
    import time

    config = PushConfig(port=0, token=SecretStr("t0k3n"), dedup_window_s=30)
    clock = [1_790_000_000.0]
    with Outbox(tmp_path / "push.db") as outbox:
        app = make_app(config, outbox, on_stored=lambda: time.sleep(0.3),
                       clock=lambda: clock[0])
        runner, port = await start_site(app, "127.0.0.1", 0)
        yield SlowReceiver(port, outbox, clock, app)
        await runner.cleanup()


async def test_a_resend_after_an_undelivered_answer_is_billed_once(slow: SlowReceiver) -> None:
    body = b'{"1": [100, 2000], "2": [7, 8]}'
    await _push_and_hang_up(slow.port, body)
    await slow.until_undelivered(1)
    slow.clock[0] += 5
    assert await slow.push(b'{"2": [7, 8], "1": [100, 2000]}') == 200  # the same, reordered
    assert len(slow.outbox) == 1
    slow.clock[0] += 10  # the same body again: a new push, billed (the mark is used up)
    assert await slow.push(body) == 200
    assert [r.seq for _, r in slow.outbox.pending()] == [0, 1]
    assert (slow.app[RECEIVER].accepted, slow.app[RECEIVER].retries) == (2, 1)


async def test_a_resend_after_the_window_is_billed(slow: SlowReceiver) -> None:
    body = b'{"1": [1, 2]}'
    await _push_and_hang_up(slow.port, body)
    await slow.until_undelivered(1)
    slow.clock[0] += 31
    assert await slow.push(body) == 200
    assert len(slow.outbox) == 2


async def test_identical_push_after_the_clock_went_back_is_billed(slow: SlowReceiver) -> None:
    """A mark from the "future" (the wall clock was stepped back an hour) is no resend."""
    body = b'{"1": [5, 5]}'
    await _push_and_hang_up(slow.port, body)
    await slow.until_undelivered(1)
    slow.clock[0] -= 3600
    assert await slow.push(body) == 200
    assert len(slow.outbox) == 2


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
    import time

    config = PushConfig(port=0, token=SecretStr("t0k3n"), dedup_window_s=0)
    with Outbox(tmp_path / "p.db") as outbox:
        app = make_app(config, outbox, on_stored=lambda: time.sleep(0.3))
        runner, port = await start_site(app, "127.0.0.1", 0)
        try:
            await _push_and_hang_up(port, b'{"5": [1, 1]}')
            await SlowReceiver(port, outbox, [], app).until_undelivered(1)
            assert await SlowReceiver(port, outbox, [], app).push(b'{"5": [1, 1]}') == 200
        finally:
            await runner.cleanup()
        assert [r.seq for _, r in outbox.pending()] == [0, 1]


async def test_standalone_serves_no_panel_data(receiver: Receiver) -> None:
    """Standalone: config/user/alivelist are the panel's; 404 with what to do instead."""
    params = {"node_type": "vless", "node_id": "7", "token": "t0k3n"}
    for name in ("config", "user", "alivelist"):
        async with receiver.session.get(f"{receiver.url}/api/v1/server/UniProxy/{name}",
                                        params=params) as answer:
            assert answer.status == 404
            assert "upstream" in (await answer.json())["message"]
    async with receiver.session.post(f"{receiver.url}/api/v1/server/UniProxy/alive",
                                     params=params, data=b'{"1": ["127.0.0.1"]}') as answer:
        assert (answer.status, await answer.json()) == (200, {"data": True})


async def test_node_type_is_normalised_like_xboard(receiver: Receiver) -> None:
    assert (await receiver.push({"1": [1, 2]}, node="3", node_type="V2ray"))[0] == 200
    assert (await receiver.push({"1": [1, 2]}, node="4", node_type="Hysteria2"))[0] == 200
    assert [r.node_id for _, r in receiver.outbox.pending()] == ["vmess-3", "hysteria-4"]


async def test_two_backends_billed_as_one_node_are_not_retries(tmp_path: Path) -> None:
    """Two panel nodes mapped to one billing node push the same body: two pushes, not a
    resend; a resend is recognised by its sender."""
    import time

    config = PushConfig(port=0, token=SecretStr("t0k3n"),
                        node_map={"vless-7": "fra-1", "vmess-8": "fra-1"})
    with Outbox(tmp_path / "p.db") as outbox:
        app = make_app(config, outbox, on_stored=lambda: time.sleep(0.3))
        runner, port = await start_site(app, "127.0.0.1", 0)
        try:
            await _push_and_hang_up(port, b'{"5": [1, 1]}', node="7")  # vless-7, undelivered
            await SlowReceiver(port, outbox, [], app).until_undelivered(1)
            async with aiohttp.ClientSession() as session:
                for node_type, node in (("vmess", "8"), ("vless", "7")):
                    async with session.post(
                        f"http://127.0.0.1:{port}{PUSH_PATH}",
                        params={"node_type": node_type, "node_id": node, "token": "t0k3n"},
                        data=b'{"5": [1, 1]}',
                    ) as answer:
                        assert answer.status == 200
        finally:
            await runner.cleanup()
        assert [(r.node_id, r.seq) for _, r in outbox.pending()] == [("fra-1", 0), ("fra-1", 1)]
        assert app[RECEIVER].retries == 1


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



# --------------------------------------------------------------------------- bounded bodies


async def _post(session: aiohttp.ClientSession, port: int, node: str,
                data: object) -> tuple[int, dict[str, str], object]:
    params = {"node_type": "vless", "node_id": node, "token": "x"}
    async with session.post(f"http://127.0.0.1:{port}{PUSH_PATH}", params=params,
                            data=data) as answer:
        return answer.status, dict(answer.headers), await answer.json()


async def test_a_push_over_the_limit_waits_for_its_turn(tmp_path: Path) -> None:
    import asyncio

    config = PushConfig(port=0, token=SecretStr("x"), max_concurrent_bodies=1, busy_wait_s=60)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"1": '
        await release.wait()
        yield b"[1, 2]}"

    with Outbox(tmp_path / "p.db") as outbox:
        app = make_app(config, outbox)
        runner, port = await start_site(app, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                first = asyncio.create_task(_post(session, port, "1", slow_body()))
                await asyncio.sleep(0.2)  # reading its body: it holds the one place
                second = asyncio.create_task(_post(session, port, "2", b'{"2": [3, 4]}'))
                await asyncio.sleep(0.2)
                assert not second.done() and len(outbox) == 0  # waiting, not read
                release.set()
                assert (await first)[0] == 200
                assert (await second)[0] == 200
        finally:
            await runner.cleanup()
        assert sorted(r.node_id for _, r in outbox.pending()) == ["vless-1", "vless-2"]
        assert app[RECEIVER].busy == 0


async def test_a_push_that_waited_too_long_gets_503_with_retry_after(tmp_path: Path) -> None:
    """Backends keep a failed push's traffic and send it with the next: a 503 loses nothing."""
    import asyncio

    config = PushConfig(port=0, token=SecretStr("x"), max_concurrent_bodies=1, busy_wait_s=0)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"1": '
        await release.wait()
        yield b"[1, 2]}"

    with Outbox(tmp_path / "p.db") as outbox:
        app = make_app(config, outbox)
        runner, port = await start_site(app, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                first = asyncio.create_task(_post(session, port, "1", slow_body()))
                await asyncio.sleep(0.2)
                status, headers, answer = await _post(session, port, "2", b'{"2": [3, 4]}')
                assert status == 503 and headers["Retry-After"] == "1"
                assert "message" in answer  # type: ignore[operator]
                assert len(outbox) == 0
                release.set()
                assert (await first)[0] == 200
                # The place is free again: the retry goes through.
                assert (await _post(session, port, "2", b'{"2": [3, 4]}'))[0] == 200
        finally:
            await runner.cleanup()
        assert sorted(r.node_id for _, r in outbox.pending()) == ["vless-1", "vless-2"]
        assert app[RECEIVER].busy == 1


async def test_a_chunked_body_over_the_limit_is_refused(receiver: Receiver) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"1": [1, 2]'
        for i in range(200):
            yield b', "%d": [1, 2]' % (i + 2)
        yield b"}"

    params = {"node_type": "vless", "node_id": "7", "token": "t0k3n"}
    async with receiver.session.post(receiver.url + PUSH_PATH, params=params,
                                     data=chunks()) as answer:
        assert answer.status == 413
    assert len(receiver.outbox) == 0


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"1": [1, 2], "1": [3, 4]}', "twice"),
        (b'{"1": [1, 2], "2": [3, 4], "1": [1, 2]}', "twice"),
        (b'{"1": {"a": 1, "a": 2}, "1": [1, 2]}', "twice"),
        (b'{"a:b": [1, 2], "a:b": [1, 2]}', "twice"),
        (b'{"\\u0031": [1, 2], "1": [3, 4]}', "twice"),  # the same key, escaped
        (b'{"1": [18446744073709551616, 2]}', "out of range"),  # orjson: a float
        (b'{"1": [NaN, 2]}', "whole numbers"),
        (b'{"\\ud800": [1, 2]}', "surrogate"),
    ],
)
async def test_duplicate_keys_and_orjson_edge_cases_are_refused(
    receiver: Receiver, body: bytes, problem: str
) -> None:
    status, answer = await receiver.push(body)
    assert status == 400, answer
    assert problem in answer["message"], answer  # type: ignore[index]
    assert len(receiver.outbox) == 0


async def test_keys_with_colons_and_quotes_are_not_taken_for_duplicates(
    receiver: Receiver,
) -> None:
    body = b'{"a:b": [1, 2], "c\\":d": [3, 4], "e\\\\f": [0, 0], " \\u00fc:": [5, 6]}'
    assert (await receiver.push(body))[0] == 200
    [(_, report)] = receiver.outbox.pending()
    assert {c.user_id: (c.up, c.down) for c in report.counters} == {
        "a:b": (1, 2), 'c":d': (3, 4), " \u00fc:": (5, 6)}


@pytest.mark.parametrize(
    "text",
    [b'{"1": [1, 2], "1": [3, 4]}', b'{"a:b": [1, 2]}', b'{"a": [1, 2]} ', b"\xef\xbb\xbf{}",
     '{"1": [1, 2]}'.encode("utf-16"), b'[{"user_id": "a", "up": 1, "down": 2}]',
     b'[{"user_id": "a", "up": 1, "down": 2, "up": 3}]', b'[{"user_id": "a:", "up": 1, "down": 2}]',
     b'{"1": [1e2, 2]}', b'{"1": [-0, 2]}', b'{"1": [9223372036854775808, 0]}', b"[]", b"7",
     '{"\u00fc": [1, 2]}', '{"x": [1, 2], "x": [1, 2]}', b'{"a\\u0000": [1, 2]}'],
)
def test_lean_parsing_answers_as_the_strict_reader(text: str | bytes) -> None:
    """`parse_counters_json` (orjson and counting) gives what the strict reader gives."""
    from quotaflow.producers.sources import _parsing

    def strict() -> object:
        return _parsing._counters_from_json(_parsing.loads_strict(text, "counters JSON"))

    def lean() -> object:
        return _parsing.parse_counters_json(text)

    outcomes = []
    for parse in (strict, lean):
        try:
            outcomes.append(parse())
        except _parsing.ParseError as exc:
            outcomes.append(("ParseError", str(exc)))
    assert outcomes[0] == outcomes[1]


# --------------------------------------------------------------------------- memory under load


def _big_body(size: int, salt: int) -> bytes:
    """A push of about `size` bytes, 19 bytes a user: `{"1000000":[17,423],...}`."""
    users = size // 19
    return orjson.dumps({str(1_000_000 + i): [salt + i % 97, i % 1009] for i in range(users)})


async def _send_load(url: str, big: list[bytes], small: int) -> dict[str, int]:
    """`big` bodies and then `small` small pushes, each batch at once; 503s are retried."""
    import asyncio

    answers: dict[str, int] = {}

    async def one(session: aiohttp.ClientSession, node: str, body: bytes) -> None:
        params = {"node_type": "vless", "node_id": node, "token": "t0k3n"}
        for _ in range(60):
            async with session.post(url + PUSH_PATH, params=params, data=body) as answer:
                await answer.read()
                key = f"status_{answer.status}"
                answers[key] = answers.get(key, 0) + 1
                if answer.status != 503:
                    return
                await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        await asyncio.gather(*(one(session, f"big-{i}", b) for i, b in enumerate(big)))
        await asyncio.gather(*(one(session, f"small-{i}", b'{"%d": [%d, 1]}' % (i, i + 1))
                               for i in range(small)))
    return answers


_RUN_CLI = "from quotaflow.cli import main; main()"  # `quotaflow ...`
_RUN_CLI_WITHOUT_SENDER = (
    "from quotaflow.producers import agent\n"
    "agent.Sender.step = lambda self: (0, True)  # nothing pending, as far as it knows\n"
    + _RUN_CLI
)


def measure_push_memory(
    tmp: Path, *, big: int = 10, big_bytes: int = 3_500_000, small: int = 200,
    one_billing_node: bool = False, with_sender: bool = True, extra_push: str = "",
    pythonpath: str | None = None,
) -> dict[str, object]:
    """Run `quotaflow push-receiver` as a subprocess, load it, and report its peak RSS.

    `big` pushes of `big_bytes` from as many nodes at once, then `small` small ones
    at once (each from its own node). Kafka is a closed loopback port: the receiver
    stores without it, and its sender keeps every push in the outbox. The sender
    decodes each node's oldest pending report every round, a cost of the sender;
    `one_billing_node` maps the big pushers to one billing node (so the sender
    holds one big report), and `with_sender=False` stubs the sender's round out
    to see the receiver's share alone. `pythonpath` runs another source tree (e.g.
    an export of the commit before a change).
    """
    import asyncio
    import os
    import socket
    import sqlite3
    import subprocess
    import sys
    import time

    tmp.mkdir(parents=True, exist_ok=True)
    port = free_ports(1)[0]
    outbox = tmp / "push-outbox.db"
    config = tmp / "agent.toml"
    node_map = ", ".join(f'"vless-big-{i}" = "big"' for i in range(big)) if one_billing_node \
        else ""
    config.write_text(
        f'node_id = "n1"\noutbox = "{outbox}"\ndrain_timeout_s = 0\nlog_level = "WARNING"\n'
        f'[kafka]\nbootstrap = "127.0.0.1:9"\n'
        f'[push]\nport = {port}\ntoken = "t0k3n"\nmax_body_bytes = 4194304\n'
        f'node_map = {{{node_map}}}\n{extra_push}\n'
    )
    bodies = [_big_body(big_bytes, salt + 1) for salt in range(big)]
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    log_path = tmp / "receiver.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", _RUN_CLI if with_sender else _RUN_CLI_WITHOUT_SENDER,
             "push-receiver", "--config", str(config)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        status = Path(f"/proc/{process.pid}/status").read_text()
        idle_kb = int(status.split("VmHWM:")[1].split()[0])
        started = time.monotonic()
        answers = asyncio.run(_send_load(f"http://127.0.0.1:{port}", bodies, small))
        elapsed = time.monotonic() - started
        status = Path(f"/proc/{process.pid}/status").read_text()
        peak_kb = int(status.split("VmHWM:")[1].split()[0])
    finally:
        process.terminate()
        process.wait(timeout=30)
    with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT node_id, COUNT(*) FROM reports GROUP BY node_id").fetchall()
    return {
        "idle_rss_mb": idle_kb // 1024, "peak_rss_mb": peak_kb // 1024,
        "growth_mb": round((peak_kb - idle_kb) / 1024, 1),
        "seconds": round(elapsed, 1), "answers": answers,
        "big_bytes": len(bodies[0]) if bodies else 0, "stored": dict(rows),
    }



@pytest.mark.integration
def test_large_pushes_at_once_stay_within_a_memory_bound(tmp_path: Path) -> None:
    """16 pushes of 3.5 MB at once, then 200 small ones: every one stored once, and the
    receiver grows by no more than `max_concurrent_bodies` (4) pushes of 3.5 MB alone cost.

    The bound is the configured limit times the growth of the same process over its idle
    size for one such push, measured here: the whole process's peak RSS also holds the
    interpreter and its imports, and the share of the load a loaded machine happens to
    let overlap. With 4 times as many pushes at once as the limit lets in, a limit that
    does not hold costs well over it (`python -m tests.producers.test_push --big 16
    --limit 16` against `--big 1`).
    """
    limit = PushConfig(port=0).max_concurrent_bodies
    one = measure_push_memory(tmp_path / "one", big=1, big_bytes=3_500_000, small=0)
    result = measure_push_memory(tmp_path / "load", big=4 * limit, big_bytes=3_500_000, small=200)
    stored = result["stored"]
    assert isinstance(stored, dict)
    assert all(stored.get(f"vless-big-{i}") == 1 for i in range(4 * limit)), stored
    assert all(stored.get(f"vless-small-{i}") == 1 for i in range(200)), stored
    assert len(stored) == 4 * limit + 200
    answers = result["answers"]
    assert isinstance(answers, dict) and answers.get("status_200") == 4 * limit + 200, result
    assert set(answers) <= {"status_200", "status_503"}, result
    growth, one_growth = result["growth_mb"], one["growth_mb"]
    assert isinstance(growth, float) and isinstance(one_growth, float) and one_growth > 0, one
    assert growth < limit * one_growth, (result, one)


if __name__ == "__main__":
    # python -m tests.producers.test_push [--one-billing-node] [--without-sender]
    #     [--tree DIR] [--limit N] [--big N] [--small N]
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description="peak RSS of a loaded push receiver")
    parser.add_argument("--big", type=int, default=10)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--one-billing-node", action="store_true")
    parser.add_argument("--without-sender", action="store_true")
    parser.add_argument("--tree", help="PYTHONPATH of another source tree to run")
    parser.add_argument("--limit", type=int, help="max_concurrent_bodies")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        result = measure_push_memory(
            Path(scratch), big=args.big, small=args.small,
            one_billing_node=args.one_billing_node, with_sender=not args.without_sender,
            pythonpath=args.tree,
            extra_push="" if args.limit is None else f"max_concurrent_bodies = {args.limit}",
        )
        stored = result.pop("stored")
        assert isinstance(stored, dict)
        result["stored_reports"] = sum(stored.values())
        result["small_nodes_not_stored_once"] = sum(
            1 for i in range(args.small) if stored.get(f"vless-small-{i}") != 1)
        print(json.dumps(result))

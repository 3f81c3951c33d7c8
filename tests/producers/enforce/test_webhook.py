"""The `webhook` enforcement backend against real HTTP receivers on loopback: the receiver
of docs/enforcement.md run as it is written, one in the test that records what it gets
and answers as told, and an https one with a certificate made for the test."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from quotaflow.core.plans import Command
from quotaflow.producers.enforce.backends import EnforceError, load_backend
from quotaflow.producers.enforce.backends.webhook import (
    Config,
    WebhookBackend,
    WebhookRejected,
    sign,
    verify,
)
from quotaflow.producers.enforce.credentials import Credentials
from tests.producers.enforce.helpers import command
from tests.producers.sources.helpers import LOCAL, free_port, listening, wait_until

DOCS = Path(__file__).resolve().parents[3] / "docs" / "enforcement.md"
SECRET = "correct horse battery staple"
NO_CREDENTIALS = Credentials()


def backend(url: str, **options: Any) -> WebhookBackend:
    built = load_backend({"type": "webhook", "url": url, "secret": SECRET, **options},
                         NO_CREDENTIALS)
    assert isinstance(built, WebhookBackend)
    return built


# --------------------------------------------------------------------------- a receiver


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    path: str


@dataclass
class Receiver:
    """A loopback HTTP server that records each request and answers as `answer` says."""

    port: int = 0
    requests: list[Received] = field(default_factory=list)
    status: int = 200
    reply: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    check: bool = False
    """Answer 401 unless `verify()` accepts the request (as a real receiver does)."""

    @property
    def url(self) -> str:
        return f"http://{LOCAL}:{self.port}/hook?token=abc"

    def answer(self, status: int, reply: bytes = b"", **headers: str) -> None:
        self.status, self.reply, self.headers = status, reply, headers


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = dict(self.headers.items())
            receiver.requests.append(Received(body, headers, self.path))
            if receiver.delay_s:
                time.sleep(receiver.delay_s)
            status, reply = receiver.status, receiver.reply
            if receiver.check and not verify(body, self.headers, SECRET):
                status, reply = 401, b"bad signature"
            self.send_response(status)
            for name, value in receiver.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a slow handler does not hold up the teardown

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (the timeout test) is no error of the receiver's


def _serve(server: ThreadingHTTPServer) -> None:
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    server = _Server((LOCAL, 0), _handler(state))
    state.port = server.server_address[1]
    _serve(server)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def post(port: int, body: bytes, headers: dict[str, str]) -> int:
    """Send a request as an attacker would, with chosen headers; the status."""
    import http.client

    connection = http.client.HTTPConnection(LOCAL, port, timeout=5)
    try:
        connection.request("POST", "/hook", body=body, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


# --------------------------------------------------------------------------- signing


def test_every_action_arrives_signed_with_the_command_as_body(receiver: Receiver) -> None:
    hook = backend(receiver.url)
    sent = [command(action) for action in ("warn", "disable", "enable")]
    for each in sent:
        assert hook.apply(each).outcome == "applied"
    assert [r.body for r in receiver.requests] == [c.encode() for c in sent]
    for got, each in zip(receiver.requests, sent, strict=True):
        assert got.path == "/hook?token=abc"
        assert got.headers["Content-Type"] == "application/json"
        assert got.headers["X-Quotaflow-Command-Id"] == each.command_id
        stamp = got.headers["X-Quotaflow-Timestamp"]
        assert abs(int(stamp) - time.time()) < 10
        assert re.fullmatch(r"sha256=[0-9a-f]{64}", got.headers["X-Quotaflow-Signature"])
        assert verify(got.body, got.headers, SECRET)
        # the scheme as documented, recomputed by hand
        mac = hmac.new(SECRET.encode(), stamp.encode() + b"." + got.body, hashlib.sha256)
        assert got.headers["X-Quotaflow-Signature"] == "sha256=" + mac.hexdigest()
        assert Command.decode(got.body).command_id == each.command_id


def test_tampering_and_replays_are_rejected(receiver: Receiver) -> None:
    receiver.check = True
    hook = backend(receiver.url)
    assert hook.apply(command()).outcome == "applied"
    got = receiver.requests[-1]
    body, headers = got.body, got.headers
    stamp = int(headers["X-Quotaflow-Timestamp"])
    now = time.time()
    assert verify(body, headers, SECRET, now)
    assert verify(body, {k.lower(): v for k, v in headers.items()}, SECRET, now)  # any case
    assert not verify(body.replace(b'"disable"', b'"enable"'), headers, SECRET, now)
    assert not verify(body + b" ", headers, SECRET, now)
    for other in (stamp + 1, stamp - 1):  # another timestamp under the same signature
        assert not verify(body, {**headers, "X-Quotaflow-Timestamp": str(other)}, SECRET, now)
    assert not verify(body, headers, "another secret of some length", now)
    for missing in ("X-Quotaflow-Timestamp", "X-Quotaflow-Signature"):
        assert not verify(body, {k: v for k, v in headers.items() if k != missing}, SECRET, now)
    for bad in ("", "-5", "1e9", " 17", "\uff11\uff17" + "\uff10" * 8):
        assert not verify(body, {**headers, "X-Quotaflow-Timestamp": bad}, SECRET, now)
    # replays: the same request later than the window, and one signed long ago
    assert verify(body, headers, SECRET, stamp + 300)
    assert not verify(body, headers, SECRET, stamp + 301)
    assert not verify(body, headers, SECRET, stamp - 301)  # from the future
    assert post(receiver.port, body, headers) == 200  # fresh: the receiver takes it
    forged = {**headers, "X-Quotaflow-Timestamp": str(int(time.time()) + 1)}
    assert post(receiver.port, body, forged) == 401  # a fresher timestamp, same signature
    with pytest.raises(WebhookRejected, match="HTTP 401") as caught:
        hook.apply(command(), now=time.time() - 1000)  # signed 1000 s ago
    assert caught.value.permanent and caught.value.status == 401
    with pytest.raises(WebhookRejected):
        hook.apply(command(), now=time.time() + 301)  # from the future
    wrong = backend(receiver.url, secret="not the receiver's secret")
    with pytest.raises(WebhookRejected):
        wrong.apply(command())


def test_sign_and_verify_agree() -> None:
    body = b'{"command_id":"x"}'
    headers = {"X-Quotaflow-Timestamp": "1800000000",
               "X-Quotaflow-Signature": sign(body, SECRET, 1800000000)}
    assert verify(body, headers, SECRET, 1800000000)
    assert verify(body, headers, SECRET.encode(), 1800000000)
    assert verify(body, headers, Config.model_validate(
        {"type": "webhook", "url": "http://x/", "secret": SECRET}).secret, 1800000000)
    assert verify(body, headers, SECRET, 1800000010, max_age_s=10)
    assert not verify(body, headers, SECRET, 1800000011, max_age_s=10)
    upper = {**headers, "X-Quotaflow-Signature": headers["X-Quotaflow-Signature"].upper()}
    assert not verify(body, upper, SECRET, 1800000000)


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("status", "reply", "outcome", "detail"),
    [
        (200, b"", "applied", "HTTP 200"),
        (204, b"", "applied", "HTTP 204"),
        (202, b"queued", "applied", "HTTP 202"),
        (200, b'{"ok": true}', "applied", "HTTP 200"),
        (200, b'["already"]', "applied", "HTTP 200"),
        (200, b'{"outcome": "already"}', "already", "HTTP 200"),
        (200, b'{"outcome": "skipped", "detail": "no such user"}', "skipped", "no such user"),
        (201, b'{"outcome": "applied", "detail": "blocked"}', "applied", "blocked"),
    ],
)
def test_2xx_answers(
    receiver: Receiver, status: int, reply: bytes, outcome: str, detail: str
) -> None:
    receiver.answer(status, reply)
    done = backend(receiver.url).apply(command())
    assert (done.outcome, done.detail) == (outcome, detail)


def test_an_unknown_outcome_is_an_error(receiver: Receiver) -> None:
    receiver.answer(200, b'{"outcome": "failed"}')
    with pytest.raises(EnforceError, match="outcome 'failed'") as caught:
        backend(receiver.url).apply(command())
    assert not isinstance(caught.value, WebhookRejected)


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
def test_retryable_statuses_raise_enforce_error(receiver: Receiver, status: int) -> None:
    receiver.answer(status, b"try later")
    with pytest.raises(EnforceError, match=f"HTTP {status} .*: try later") as caught:
        backend(receiver.url).apply(command())
    assert not isinstance(caught.value, WebhookRejected)
    assert "token=abc" not in str(caught.value)  # the query may hold a key


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_are_permanent(receiver: Receiver, status: int) -> None:
    receiver.answer(status, b"no")
    with pytest.raises(WebhookRejected, match="permanent") as caught:
        backend(receiver.url).apply(command())
    assert caught.value.status == status and caught.value.permanent


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    receiver.answer(302, Location=f"http://{LOCAL}:{free_port()}/elsewhere")
    with pytest.raises(EnforceError, match=r"HTTP 302 .*redirects are not followed"):
        backend(receiver.url).apply(command())
    assert len(receiver.requests) == 1


def test_a_slow_receiver_times_out(receiver: Receiver) -> None:
    receiver.delay_s = 2.0
    started = time.monotonic()
    with pytest.raises(EnforceError, match=r"TimeoutError|timed out"):
        backend(receiver.url, timeout_s=0.5).apply(command())
    assert time.monotonic() - started < 1.9


def test_no_receiver_is_an_error() -> None:
    with pytest.raises(EnforceError, match="ConnectionRefusedError"):
        backend(f"http://{LOCAL}:{free_port()}/hook").apply(command())


# --------------------------------------------------------------------------- config


def test_actions_and_users() -> None:
    hook = backend("http://127.0.0.1:9/", actions=["disable", "enable"])
    assert hook.apply(command("warn")).outcome == "skipped"  # no request made
    assert hook.serves("anyone")
    only = backend("http://127.0.0.1:9/", users=["alice"])
    assert only.serves("alice") and not only.serves("bob")


@pytest.mark.parametrize(
    "options",
    [
        {"url": "ftp://127.0.0.1/"},
        {"url": "http:///nohost"},
        {"url": "http://user:pw@127.0.0.1/"},
        {"secret": "short"},
        {"headers": {"X-Quotaflow-Signature": "x"}},
        {"headers": {"Content-Length": "1"}},
        {"headers": {"Bad Name": "x"}},
        {"headers": {"X-Ok": "line\r\nInjected: 1"}},
        {"actions": []},
        {"actions": ["delete"]},
        {"timeout_s": 0},
        {"unknown": True},
    ],
)
def test_config_refuses(options: dict[str, Any]) -> None:
    entry = {"type": "webhook", "url": "http://127.0.0.1:9/", "secret": SECRET, **options}
    with pytest.raises(ValueError):
        load_backend(entry, NO_CREDENTIALS)


def test_secrets_never_show(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    token = "Bearer very-secret-token-123"
    caplog.set_level(logging.DEBUG)
    hook = backend(receiver.url, headers={"Authorization": token})
    assert hook.apply(command()).outcome == "applied"
    assert receiver.requests[-1].headers["Authorization"] == token
    receiver.answer(500, b"")
    with pytest.raises(EnforceError) as caught:
        hook.apply(command())
    shown = " ".join([repr(hook.config), str(hook.config), caplog.text, str(caught.value)])
    assert SECRET not in shown and token not in shown
    assert "**********" in repr(hook.config)


# --------------------------------------------------------------------------- the docs' receiver


def _docs_receiver() -> str:
    text = DOCS.read_text()
    section = text[text.index("\n## Webhook\n"):]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


@pytest.fixture
def docs_receiver(tmp_path: Path) -> Iterator[int]:
    script = tmp_path / "receiver.py"
    script.write_text(_docs_receiver())
    port = free_port()
    env = {**os.environ, "QUOTAFLOW_WEBHOOK_SECRET": SECRET, "PORT": str(port)}
    with (tmp_path / "receiver.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=log, stderr=log)
    try:
        wait_until("the docs' receiver", lambda: listening(port))
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_documented_receiver(docs_receiver: int) -> None:
    url = f"http://{LOCAL}:{docs_receiver}/"
    hook = backend(url)
    for action in ("warn", "disable", "enable"):
        each = command(action)
        first = hook.apply(each)
        assert (first.outcome, first.detail) == ("applied", action)
        assert hook.apply(each).outcome == "already"  # a retry: the same command_id
    with pytest.raises(WebhookRejected, match="HTTP 401"):
        backend(url, secret="the wrong secret, long enough").apply(command())
    with pytest.raises(WebhookRejected, match="HTTP 401"):
        hook.apply(command(), now=time.time() - 1000)  # an old request
    with pytest.raises(WebhookRejected, match="HTTP 401"):
        hook.apply(command(), now=time.time() + 1000)  # one from the future
    body = command().encode()
    stamp = int(time.time())
    good = {"X-Quotaflow-Timestamp": str(stamp), "X-Quotaflow-Signature": sign(body, SECRET, stamp),
            "Content-Type": "application/json"}
    assert post(docs_receiver, body.replace(b'"disable"', b'"enable"'), good) == 401
    assert post(docs_receiver, body, {**good, "X-Quotaflow-Timestamp": str(stamp + 1)}) == 401
    assert post(docs_receiver, body, good) == 200


# --------------------------------------------------------------------------- https


@pytest.fixture
def tls_receiver(tmp_path: Path, receiver: Receiver) -> Iterator[tuple[str, Path]]:
    """An https proxy of the receiver: a TLS server with a certificate made for 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the https test needs the openssl command (Debian's openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = _Server((LOCAL, 0), _handler(receiver))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    _serve(server)
    try:
        yield f"https://{LOCAL}:{server.server_address[1]}/hook", cert
    finally:
        server.shutdown()
        server.server_close()


def test_https_with_its_own_ca(tls_receiver: tuple[str, Path], receiver: Receiver) -> None:
    url, cert = tls_receiver
    receiver.check = True
    assert backend(url, ca_file=str(cert)).apply(command()).outcome == "applied"
    assert verify(receiver.requests[-1].body, receiver.requests[-1].headers, SECRET)
    with pytest.raises(EnforceError, match=r"CERTIFICATE_VERIFY_FAILED|SSLCertVerificationError"):
        backend(url).apply(command())  # the system's CAs do not know it


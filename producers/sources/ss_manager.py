"""shadowsocks-libev's `ss-manager`: per-port byte counts over its datagram protocol.

The source named `ss-manager`; users are server ports (rename them with `user_map`).

>>> parse_ss_manager_stat('stat: {"8388": 500, "8389": 70}')
[Counter(user_id='8388', up=0, down=500), Counter(user_id='8389', up=0, down=70)]
>>> parse_ss_manager_list('[\\n\\t{"server_port":"8388","password":"x","method":"aes-256-gcm"}\\n]')
[8388]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Collection, Iterator
from typing import Any, Literal

from quotaflow.core.contracts import Counter
from quotaflow.producers.sources._parsing import (
    ParseError,
    counters_of,
    json_uint,
    reject_duplicate_keys,
)
from quotaflow.producers.sources._runtime import (
    ReadParseCollector,
    Source,
    SourceConfigBase,
    SourceError,
)


def parse_ss_manager_stat(text: str) -> list[Counter]:
    """Per-port counters from ss-manager's answer to `ping`: `stat: {"8388": 12345, ...}`.

    The bare JSON object is accepted too. ss-manager reports one combined figure
    per port (both directions together), so it goes in `down` and `up` is 0; the
    port (as a string) is the user id, to be renamed with `apply_user_map`.
    With very many ports ss-manager splits its answer over several datagrams, and
    the later ones lack the `stat: {` prefix; pass them joined by newlines and they
    are read as one answer.
    """
    decoder = json.JSONDecoder(object_pairs_hook=reject_duplicate_keys)
    rest = text.strip().strip("\x00").strip()
    totals: dict[str, tuple[int, int]] = {}
    chunks = 0
    while rest:
        if rest.startswith("stat:"):
            rest = rest[len("stat:") :].lstrip()
        elif chunks and rest.startswith('"'):
            rest = "{" + rest  # a continuation datagram
        try:
            obj, end = decoder.raw_decode(rest)
        except ParseError:
            raise
        except (ValueError, RecursionError) as exc:
            raise ParseError(f"ss-manager stat: not a JSON object: {exc}") from exc
        if not isinstance(obj, dict):
            raise ParseError("ss-manager stat: expected a JSON object of port -> bytes")
        for port, value in obj.items():
            if not re.fullmatch(r"[1-9][0-9]{0,4}", port) or int(port) > 65535:
                raise ParseError(f"ss-manager stat: {port[:20]!r} is not a port number")
            if port in totals:
                raise ParseError(f"ss-manager stat: port {port} appears twice")
            totals[port] = (0, json_uint(value, f"ss-manager stat port {port}"))
        chunks += 1
        rest = rest[end:].strip().strip("\x00").strip()
    if not chunks:
        raise ParseError("ss-manager stat: empty input")
    return counters_of(totals)


_LIST_ENTRY = re.compile(r'\{\s*"server_port"\s*:\s*"?([0-9]{1,5})"?\s*[,}]')


def parse_ss_manager_list(text: str) -> list[int]:
    """The server ports in ss-manager's answer to `list` (datagrams joined), sorted.

    ss-manager 3.3.x answers `[\\n\\t{"server_port":"8388","password":"...","method":
    "..."},...\\n]`, split over several datagrams when long; it writes the passwords
    unescaped, so a password with a quote makes the answer invalid JSON. The ports
    are read from the start of each entry, which ss-manager writes itself; the
    passwords are never kept, and never quoted in an error.
    """
    body = text.replace("\x00", "").strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise ParseError("ss-manager list: expected a JSON array of ports")
    ports: list[int] = []
    for match in _LIST_ENTRY.finditer(body):
        port = int(match.group(1))
        if not 1 <= port <= 65535 or match.group(1).startswith("0"):
            raise ParseError("ss-manager list: a server_port is not a port number")
        ports.append(port)
    if len(ports) != body.count('"server_port"'):
        raise ParseError("ss-manager list: an entry does not start with its server_port")
    if len(set(ports)) != len(ports):
        raise ParseError("ss-manager list: a port is listed twice")
    return sorted(ports)


class SsManagerClient:
    """shadowsocks-libev `ss-manager`'s control protocol, one datagram per command.

    `address` is `host:port` (UDP; `[v6]:port` too) or the path of ss-manager's unix
    datagram socket. Each call uses a fresh socket so a late answer to an earlier
    command can never be read as this one's.
    """

    def __init__(self, address: str, *, timeout: float = 2.0, settle: float = 0.2) -> None:
        self.address = address
        self.timeout = timeout
        self.settle = settle

    @contextlib.contextmanager
    def _socket(self) -> Iterator[socket.socket]:
        if self.address.startswith("/") or ":" not in self.address:
            with tempfile.TemporaryDirectory(prefix="qf-ssm-") as folder:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    sock.bind(os.path.join(folder, "client.sock"))  # to receive answers
                    sock.connect(self.address)
                    yield sock
                finally:
                    sock.close()
            return
        host, _, port = self.address.rpartition(":")
        host = host.strip("[]")
        info = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(info[0], socket.SOCK_DGRAM)
        try:
            sock.connect(info[4])
            yield sock
        finally:
            sock.close()

    def command(self, text: str) -> list[str]:
        """Send one command; return the answer datagrams (several for a long `ping`).

        The first datagram is awaited up to `timeout`; later ones while they keep
        coming within `settle` seconds, as ss-manager marks no last datagram.
        """
        with self._socket() as sock:
            try:
                sock.send(text.encode())
                sock.settimeout(self.timeout)
                answers = [sock.recv(65536).decode()]
                sock.settimeout(self.settle)
                while True:
                    try:
                        answers.append(sock.recv(65536).decode())
                    except TimeoutError:
                        return answers
            except OSError as exc:
                raise SourceError(
                    f"ss-manager {self.address}: {text.split(':')[0]}: {exc}"
                ) from exc

    def ping(self) -> str:
        """The `stat: {"PORT": BYTES, ...}` answer (datagrams joined by newlines).

        ss-manager 3.3.x answers `ping` with the stat itself (no `pong`). BYTES is
        both directions together, as each ss-server last pushed it to ss-manager
        (every 5 s), so a figure lags traffic by up to that long.
        """
        return "\n".join(self.command("ping"))

    def query_port_counters(self) -> list[Counter]:
        """Per-port counters: the port is the user id, its figure goes in `down`."""
        return parse_ss_manager_stat(self.ping())

    def figures(self) -> dict[int, int]:
        """Each port's last pushed figure (`ping`), by port number."""
        return {int(c.user_id): c.down for c in self.query_port_counters()}

    def wait_for_push(
        self, ports: Collection[int], *, within: float = 5.5, poll: float = 0.05
    ) -> dict[int, bool]:
        """Wait for the next stat push of each of `ports` that ss-manager reports.

        Reads `ping` until each port's figure changes (its ss-server just pushed the
        bytes it had moved) or `within` seconds pass (just over the ss-servers' 5 s
        push interval: a figure that stayed the same through a push means nothing
        moved since the push before). Returns, for each port reported at the start,
        whether its figure changed (a port that disappears counts as changed); ports
        ss-manager does not report are left out. A snapshot read right after this
        lacks at most the bytes moved since the push was seen.
        """
        wanted = set(ports)
        start = {p: f for p, f in self.figures().items() if p in wanted}
        waiting = set(start)
        deadline = time.monotonic() + within
        while waiting and time.monotonic() < deadline:
            time.sleep(poll)
            now = self.figures()
            waiting = {p for p in waiting if now.get(p) == start[p]}
        return {p: p not in waiting for p in sorted(start)}

    def list_ports(self) -> list[int]:
        """The ports ss-manager runs an ss-server for now (`list`), sorted.

        The answer holds every port's password: it is parsed here and dropped.
        """
        return parse_ss_manager_list("".join(self.command("list")))

    def _ok(self, text: str) -> None:
        answers = self.command(text)
        if answers[:1] != ["ok"]:
            raise SourceError(f"ss-manager {self.address} refused {text.split(':')[0]}: {answers}")

    def add(self, port: int, password: str, method: str | None = None, **extra: Any) -> None:
        """Start an ss-server for `port` (`add: {"server_port": ..., "password": ...}`).

        On a port it already runs, ss-manager first stops that ss-server and then
        checks the port is free, racing the old process: the add can fail ("port is
        not available") or start a server that cannot bind, leaving the port down.
        Add only ports that `list_ports` does not show. ss-manager keeps at most 127
        bytes of a password and writes it unescaped into the ss-server's JSON config.
        """
        spec: dict[str, Any] = {"server_port": port, "password": password, **extra}
        if method is not None:
            spec["method"] = method
        self._ok("add: " + json.dumps(spec))

    def remove(self, port: int) -> None:
        """Stop the ss-server of `port`; ss-manager forgets its figure.

        ss-manager answers `ok` whether or not the port was there: ask `list_ports`
        to know. The ss-server gets SIGTERM and sends no last figure, so the bytes
        since its last stat push (at most 5 s of them) are never reported.
        """
        self._ok("remove: " + json.dumps({"server_port": port}))


class SsManagerConfig(SourceConfigBase):
    """shadowsocks-libev ss-manager (UDP host:port or unix socket path); users are ports."""

    type: Literal["ss-manager"]
    address: str
    timeout_s: float = 2.0


def _collector(config: SsManagerConfig) -> ReadParseCollector:
    client = SsManagerClient(config.address, timeout=config.timeout_s)
    return ReadParseCollector(client.ping, parse_ss_manager_stat, config.user_map, config.epoch)


SOURCE = Source(
    name="ss-manager", config=SsManagerConfig, collector=_collector, parse=parse_ss_manager_stat
)

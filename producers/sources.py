"""Live collectors: ask running proxy and VPN software for its counters.

Each collector here talks to one real program and hands back the raw answer or,
through `producers.parsers`, `Counter` readings. Nothing here ever resets a
counter on read: readings stay cumulative, so a reading lost on the way costs
nothing (see `producers.parsers`).

* `V2RayStatsClient`: V2Ray / Xray / sing-box `StatsService` and `HandlerService`
  over gRPC, with a tiny hand-written protobuf codec (no generated code).
* `SsManagerClient`: shadowsocks-libev `ss-manager`'s datagram protocol.
* `read_iptables`, `read_wg_dump`, `read_openvpn_status`: the text that the
  parsers read, from `iptables`, `wg` and OpenVPN's status file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import grpc

from producers.parsers import parse_ss_manager_stat, parse_v2ray_stats
from quotaflow.contracts import Counter

__all__ = [
    "SourceError",
    "SsManagerClient",
    "TypedMessage",
    "V2RayStatsClient",
    "derive_epoch_ms",
    "read_iptables",
    "read_openvpn_status",
    "read_wg_dump",
]


class SourceError(RuntimeError):
    """A proxy or VPN program could not be asked, or refused what was asked."""


# --------------------------------------------------------------------------- protobuf

_VARINT: Final = 0
_I64: Final = 1
_LEN: Final = 2
_I32: Final = 5


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int64 values take their 64-bit two's complement."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field_uint(number: int, value: int) -> bytes:
    """A varint field; proto3 leaves zero out."""
    return _varint(number << 3 | _VARINT) + _varint(value) if value else b""


def _field_bytes(number: int, value: bytes | str) -> bytes:
    """A length-delimited field (string, bytes or sub-message); proto3 leaves empty out."""
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | _LEN) + _varint(len(data)) + data if data else b""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise SourceError("protobuf: truncated or oversized varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field; varints as int, length-delimited as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
            yield number, value
        elif wire == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise SourceError("protobuf: truncated length-delimited field")
            yield number, data[pos : pos + size]
            pos += size
        elif wire in (_I64, _I32):
            width = 8 if wire == _I64 else 4
            if pos + width > len(data):
                raise SourceError("protobuf: truncated fixed-width field")
            yield number, int.from_bytes(data[pos : pos + width], "little")
            pos += width
        else:
            raise SourceError(f"protobuf: unsupported wire type {wire}")


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _encode_query_stats(pattern: str, reset: bool) -> bytes:
    """QueryStatsRequest{string pattern = 1; bool reset = 2}."""
    return _field_bytes(1, pattern) + _field_uint(2, int(reset))


def _decode_query_stats(data: bytes) -> list[tuple[str, int]]:
    """QueryStatsResponse{repeated Stat stat = 1}, Stat{string name = 1; int64 value = 2}."""
    pairs: list[tuple[str, int]] = []
    for number, value in _fields(data):
        if number != 1 or not isinstance(value, bytes):
            continue
        name, amount = "", 0
        for sub, item in _fields(value):
            if sub == 1 and isinstance(item, bytes):
                name = item.decode("utf-8", "replace")
            elif sub == 2 and isinstance(item, int):
                amount = _int64(item)
        pairs.append((name, amount))
    return pairs


# SysStatsResponse's fields, by number (app/stats/command/command.proto).
_SYS_STATS_FIELDS: Final = {
    1: "NumGoroutine",
    2: "NumGC",
    3: "Alloc",
    4: "TotalAlloc",
    5: "Sys",
    6: "Mallocs",
    7: "Frees",
    8: "LiveObjects",
    9: "PauseTotalNs",
    10: "Uptime",
}


def _decode_sys_stats(data: bytes) -> dict[str, int]:
    stats = dict.fromkeys(_SYS_STATS_FIELDS.values(), 0)
    for number, value in _fields(data):
        name = _SYS_STATS_FIELDS.get(number)
        if name is not None and isinstance(value, int):
            stats[name] = value
    return stats


@dataclass(frozen=True, slots=True)
class TypedMessage:
    """`common.serial.TypedMessage{string type = 1; bytes value = 2}`: a message and its name.

    `type_name` is written without the V2Ray/Xray package prefix (`proxy.vmess.Account`);
    the client adds `v2ray.core.` or `xray.` to match the server it talks to.
    """

    type_name: str
    value: bytes

    def encode(self, prefix: str) -> bytes:
        """The message bytes, with `prefix` put before the type name."""
        return _field_bytes(1, prefix + self.type_name) + _field_bytes(2, self.value)

    @staticmethod
    def vmess_account(user_uuid: str, alter_id: int = 0) -> TypedMessage:
        """`proxy.vmess.Account{string id = 1; uint32 alter_id = 2}`."""
        return TypedMessage(
            "proxy.vmess.Account", _field_bytes(1, user_uuid) + _field_uint(2, alter_id)
        )

    @staticmethod
    def vless_account(user_uuid: str, flow: str = "") -> TypedMessage:
        """`proxy.vless.Account{string id = 1; string flow = 2}` (not tested live here)."""
        return TypedMessage(
            "proxy.vless.Account", _field_bytes(1, user_uuid) + _field_bytes(2, flow)
        )

    @staticmethod
    def trojan_account(password: str) -> TypedMessage:
        """`proxy.trojan.Account{string password = 1}` (not tested live here)."""
        return TypedMessage("proxy.trojan.Account", _field_bytes(1, password))


# --------------------------------------------------------------------------- V2Ray / Xray

# StatsService names, tried in this order when none is given, with the package prefix
# of the same server's HandlerService and account messages ("" where there is none:
# sing-box's V2Ray API has stats only).
_FLAVOURS: Final = (
    ("v2ray.core.app.stats.command.StatsService", "v2ray.core."),
    ("xray.app.stats.command.StatsService", "xray."),
    ("experimental.v2rayapi.StatsService", ""),
)
EPOCH_ROUNDING_MS: Final = 10_000
EPOCH_TOLERANCE_MS: Final = 10_000


def derive_epoch_ms(
    now_ms: int,
    uptime_s: int,
    previous: int | None = None,
    previous_uptime_s: int | None = None,
) -> int:
    """The counters' start time in ms since 1970, stable from one poll to the next.

    `now_ms - uptime_s * 1000` overestimates the start by under a second plus the
    call's latency (Uptime is whole seconds, truncated), so on its own it jitters.
    With no `previous` epoch the estimate is floored to 10 s. With one, it is kept
    while the estimate stays within 10 s of it and uptime has not gone down, so
    the epoch does not flap on a 10 s boundary: keep the last epoch (across agent
    restarts too) and pass it back. A restart gives a later start, hence a larger
    epoch, which is what tells the ledger that the counters began again.

    >>> derive_epoch_ms(1_761_000_123_456, 100)
    1761000020000
    >>> derive_epoch_ms(1_761_000_124_999, 101, previous=1_761_000_020_000, previous_uptime_s=100)
    1761000020000
    >>> derive_epoch_ms(1_761_000_130_000, 3, previous=1_761_000_020_000, previous_uptime_s=100)
    1761000120000
    """
    estimate = now_ms - uptime_s * 1000
    restarted = previous_uptime_s is not None and uptime_s < previous_uptime_s
    if previous is not None and not restarted and abs(estimate - previous) <= EPOCH_TOLERANCE_MS:
        return previous
    epoch = estimate - estimate % EPOCH_ROUNDING_MS
    if previous is not None and epoch <= previous:
        epoch = previous + 1
    return epoch


class V2RayStatsClient:
    """A V2Ray, Xray or sing-box API client (`StatsService`, and `HandlerService` for users).

    `address` is the API inbound's `host:port`. `service` is the full StatsService
    name; left out, `v2ray.core.app.stats.command.StatsService` (V2Ray) is tried
    first, then on UNIMPLEMENTED `xray.app.stats.command.StatsService` (Xray) and
    `experimental.v2rayapi.StatsService` (sing-box, stats only), and the one that
    answers is kept. Counters are always read with reset=false.
    """

    def __init__(
        self,
        address: str,
        service: str | None = None,
        *,
        timeout: float = 5.0,
        epoch_hint: int | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address)
        self._service = service
        self._prefix: str | None = None
        if service is not None:
            self._prefix = next(
                (prefix for name, prefix in _FLAVOURS if name == service), "v2ray.core."
            )
        self._epoch = epoch_hint
        self._uptime: int | None = None

    @property
    def service(self) -> str | None:
        """The StatsService name in use, once known."""
        return self._service

    def close(self) -> None:
        """Close the gRPC channel."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _unary(self, path: str, request: bytes) -> bytes:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(path)
        response: bytes = call(request, timeout=self.timeout)
        return response

    def _stats_call(self, method: str, request: bytes) -> bytes:
        if self._service is not None:
            return self._guarded(f"/{self._service}/{method}", request)
        last: grpc.RpcError | None = None
        for service, prefix in _FLAVOURS:
            try:
                response = self._unary(f"/{service}/{method}", request)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise SourceError(f"{self.address} {method}: {_rpc_text(exc)}") from exc
                last = exc
                continue
            self._service, self._prefix = service, prefix
            return response
        detail = _rpc_text(last) if last is not None else "no service"
        raise SourceError(f"{self.address}: no StatsService answered ({detail})")

    def _guarded(self, path: str, request: bytes) -> bytes:
        try:
            return self._unary(path, request)
        except grpc.RpcError as exc:
            raise SourceError(f"{self.address} {path}: {_rpc_text(exc)}") from exc

    def query_stats(self, pattern: str = "user>>>") -> list[tuple[str, int]]:
        """(name, value) of every stat whose name contains `pattern`; never resets."""
        return _decode_query_stats(
            self._stats_call("QueryStats", _encode_query_stats(pattern, reset=False))
        )

    def query_user_counters(self) -> list[Counter]:
        """Per-user cumulative counters (`user>>>EMAIL>>>traffic>>>uplink|downlink`)."""
        return parse_v2ray_stats(self.query_stats("user>>>"))

    def sys_stats(self) -> dict[str, int]:
        """GetSysStats: `Uptime` (seconds), `NumGoroutine`, `Alloc`, ... (0 when absent)."""
        return _decode_sys_stats(self._stats_call("GetSysStats", b""))

    def epoch_ms(self, now_ms: int | None = None) -> int:
        """The counters' epoch from the server's uptime, kept stable as `derive_epoch_ms` says.

        Pass the last epoch to a new client as `epoch_hint` after an agent restart.
        """
        uptime = self.sys_stats()["Uptime"]
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        self._epoch = derive_epoch_ms(now, uptime, self._epoch, self._uptime)
        self._uptime = uptime
        return self._epoch

    # ------------------------------------------------------------------ HandlerService

    def _flavour_prefix(self) -> str:
        """`v2ray.core.` or `xray.`, learning which one answers if not known yet."""
        if self._prefix is None:
            self.sys_stats()
        if not self._prefix:
            raise SourceError(f"{self.address}: {self._service} comes with no HandlerService")
        return self._prefix

    def _alter_inbound(self, tag: str, operation: TypedMessage) -> None:
        prefix = self._flavour_prefix()
        request = _field_bytes(1, tag) + _field_bytes(2, operation.encode(prefix))
        self._guarded(f"/{prefix}app.proxyman.command.HandlerService/AlterInbound", request)

    def add_user(self, inbound_tag: str, email: str, account: TypedMessage, level: int = 0) -> None:
        """Add a user to an inbound (AlterInbound + AddUserOperation); the email names its stats."""
        prefix = self._flavour_prefix()
        user = _field_uint(1, level) + _field_bytes(2, email)
        user += _field_bytes(3, account.encode(prefix))
        operation = TypedMessage("app.proxyman.command.AddUserOperation", _field_bytes(1, user))
        self._alter_inbound(inbound_tag, operation)

    def remove_user(self, inbound_tag: str, email: str) -> None:
        """Remove a user from an inbound by email (AlterInbound + RemoveUserOperation)."""
        operation = TypedMessage("app.proxyman.command.RemoveUserOperation", _field_bytes(1, email))
        self._alter_inbound(inbound_tag, operation)


def _rpc_text(exc: grpc.RpcError) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code()}: {details()}"
    return str(exc)


# --------------------------------------------------------------------------- ss-manager


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

    def _ok(self, text: str) -> None:
        answers = self.command(text)
        if answers[:1] != ["ok"]:
            raise SourceError(f"ss-manager {self.address} refused {text.split(':')[0]}: {answers}")

    def add(self, port: int, password: str, method: str | None = None, **extra: Any) -> None:
        """Start an ss-server for `port` (`add: {"server_port": ..., "password": ...}`)."""
        spec: dict[str, Any] = {"server_port": port, "password": password, **extra}
        if method is not None:
            spec["method"] = method
        self._ok("add: " + json.dumps(spec))

    def remove(self, port: int) -> None:
        """Stop the ss-server of `port`; ss-manager forgets its figure."""
        self._ok("remove: " + json.dumps({"server_port": port}))


# --------------------------------------------------------------------------- commands and files

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def _run(runner: Runner, argv: Sequence[str], timeout: float) -> str:
    try:
        done = runner(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SourceError(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise SourceError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[:300]}")
    return str(done.stdout)


def read_iptables(
    chain: str,
    runner: Runner = subprocess.run,
    *,
    table: str = "filter",
    binary: str = "iptables",
    timeout: float = 10.0,
) -> str:
    """`iptables -w -t TABLE -nvxL CHAIN`: exact counters, never zeroed; or `binary="ip6tables"`."""
    return _run(runner, [binary, "-w", "-t", table, "-nvxL", chain], timeout)


def read_wg_dump(
    interface: str = "all", runner: Runner = subprocess.run, *, timeout: float = 10.0
) -> str:
    """`wg show IFACE dump` (all interfaces by default), for `parse_wg_dump`."""
    return _run(runner, ["wg", "show", interface, "dump"], timeout)


def read_openvpn_status(path: str | Path) -> str:
    """The text of an OpenVPN `--status` file, for `parse_openvpn_status`."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SourceError(f"OpenVPN status {path}: {exc}") from exc

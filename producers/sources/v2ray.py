"""V2Ray, Xray and sing-box (built with its V2Ray API): per-user stats over gRPC.

The source named `v2ray`. `V2RayStatsClient` talks to the core's `StatsService`
(and `HandlerService`, to add and remove users); `parse_v2ray_stats` reads the
`user>>>EMAIL>>>traffic>>>uplink|downlink` stats; `V2RayCollector` polls them and
derives the epoch from the core's uptime (`derive_epoch_ms`).

>>> parse_v2ray_stats([
...     ("user>>>alice@example.com>>>traffic>>>uplink", 1200),
...     ("user>>>alice@example.com>>>traffic>>>downlink", 56000),
...     ("inbound>>>vless-in>>>traffic>>>uplink", 99999),
... ])
[Counter(user_id='alice@example.com', up=1200, down=56000)]
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self

import grpc

from quotaflow.core.contracts import Counter
from quotaflow.producers.sources._parsing import (
    ParseError,
    add_traffic,
    apply_user_map,
    counters_of,
    json_uint,
    loads_strict,
)
from quotaflow.producers.sources._runtime import (
    Snapshot,
    Source,
    SourceConfigBase,
    SourceError,
    boot_id,
    now_ms,
)

_V2RAY_USER_PREFIX: Final = "user>>>"
_V2RAY_TRAFFIC: Final = ">>>traffic>>>"


def parse_v2ray_stats(pairs: Iterable[tuple[str, int]]) -> list[Counter]:
    """Per-user counters from V2Ray/Xray/sing-box stats, given as (name, value) pairs.

    User stats are named `user>>>EMAIL>>>traffic>>>uplink|downlink` (uplink is what
    the user sent). `inbound>>>`/`outbound>>>` stats and other per-user stats (such
    as Xray's `user>>>EMAIL>>>online`) are not per-user traffic and are skipped. A
    user with only one direction present gets 0 for the other, as protobuf leaves
    zero values out. A name given twice is refused: summing or picking one could
    both be wrong.
    """
    seen: set[str] = set()
    totals: dict[str, tuple[int, int]] = {}
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ParseError(f"expected (name, value) pairs, got {pair!r:.80}")
        name, value = pair
        if not isinstance(name, str):
            raise ParseError(f"stat name must be a string, got {name!r:.60}")
        amount = json_uint(value, f"stat {name[:80]!r}")
        if ">>>" not in name:
            raise ParseError(f"not a V2Ray stat name: {name[:80]!r}")
        if name in seen:
            raise ParseError(f"stat {name[:80]!r} appears twice")
        seen.add(name)
        if not name.startswith(_V2RAY_USER_PREFIX):
            continue  # inbound>>>, outbound>>> and any future non-user dimension
        rest = name[len(_V2RAY_USER_PREFIX) :]
        email, sep, direction = rest.rpartition(_V2RAY_TRAFFIC)
        if not sep:
            continue  # a per-user stat that is not traffic, e.g. user>>>EMAIL>>>online
        if direction == "uplink":
            add_traffic(totals, email, amount, 0)
        elif direction == "downlink":
            add_traffic(totals, email, 0, amount)
        else:
            raise ParseError(f"stat {name[:80]!r}: unknown traffic direction {direction[:20]!r}")
    return counters_of(totals)


def parse_v2ray_stats_json(text: str) -> list[Counter]:
    """Per-user counters from the JSON that `xray api statsquery` (or V2Ray's stats query) prints.

    The shape is `{"stat": [{"name": "user>>>EMAIL>>>traffic>>>uplink", "value": "123"}]}`.
    Values may be numbers or strings (protobuf JSON writes int64 as strings); a
    missing `value` means 0, because protobuf JSON omits zeros; `{}` and
    `{"stat": []}` mean no readings. Query without `-reset`: counters must stay cumulative.
    """
    data = loads_strict(text, "V2Ray stats")
    if not isinstance(data, dict):
        raise ParseError("V2Ray stats: expected a JSON object with a 'stat' list")
    stats = data.get("stat")
    if stats is None:
        return []
    if not isinstance(stats, list):
        raise ParseError("V2Ray stats: 'stat' must be a list")
    pairs: list[tuple[str, int]] = []
    for entry in stats:
        if not isinstance(entry, dict):
            raise ParseError(f"V2Ray stats: each stat must be an object, got {entry!r:.60}")
        name = entry.get("name")
        if not isinstance(name, str):
            raise ParseError(f"V2Ray stats: stat without a string 'name': {entry!r:.80}")
        pairs.append((name, json_uint(entry.get("value", 0), f"stat {name[:80]!r}")))
    return parse_v2ray_stats(pairs)


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


class V2RayConfig(SourceConfigBase):
    """V2Ray / Xray / sing-box (with the v2ray API) StatsService over gRPC."""

    type: Literal["v2ray"]
    address: str
    service: str | None = None
    timeout_s: float = 5.0


class SteadyClock:
    """Wall-clock ms that clock steps do not move: the monotonic clock (system-wide,
    so it goes on across agent restarts) plus an offset taken once per boot."""

    def __init__(self) -> None:
        self._offset: tuple[str, int] | None = None  # (boot id, wall ms - monotonic ms)

    def now_ms(self) -> int:
        boot = boot_id()
        if boot is None:
            return now_ms()
        mono = time.monotonic_ns() // 1_000_000
        if self._offset is None or self._offset[0] != boot:
            self._offset = (boot, now_ms() - mono)
        return self._offset[1] + mono

    def state(self) -> list[Any] | None:
        return None if self._offset is None else list(self._offset)

    def restore(self, state: Any) -> None:
        if (
            isinstance(state, list) and len(state) == 2 and isinstance(state[0], str)
            and isinstance(state[1], int) and not isinstance(state[1], bool)
        ):
            self._offset = (state[0], state[1])


class V2RayCollector:
    """A V2Ray/Xray/sing-box core's user stats; the epoch is the core's start time.

    The start time is now - uptime, with "now" from a `SteadyClock`: with the wall
    clock, a step of more than `EPOCH_TOLERANCE_MS` (NTP, a VM's time sync)
    looked like a restart of the core and re-billed every user's whole counter.
    """

    def __init__(self, config: V2RayConfig) -> None:
        self.config = config
        self._client: V2RayStatsClient | None = None
        self._epoch_hint: int | None = None
        self._clock = SteadyClock()

    def _connect(self) -> V2RayStatsClient:
        if self._client is None:
            self._client = V2RayStatsClient(
                self.config.address, self.config.service, timeout=self.config.timeout_s,
                epoch_hint=self._epoch_hint,
            )
        return self._client

    def collect(self) -> Snapshot:
        client = self._connect()
        try:
            epoch = client.epoch_ms(self._clock.now_ms())
            counters = client.query_user_counters()
            # A restart between the two calls would mix epochs: ask again.
            if client.epoch_ms(self._clock.now_ms()) != epoch:
                raise SourceError(f"{self.config.address} restarted while being read")
        except Exception:
            client.close()
            self._client = None
            raise
        self._epoch_hint = epoch
        return Snapshot(epoch, apply_user_map(counters, self.config.user_map))

    def state(self) -> Any:
        return {"epoch": self._epoch_hint, "clock": self._clock.state()}

    def restore(self, state: Any) -> None:
        if isinstance(state, dict) and isinstance(state.get("epoch"), int):
            self._epoch_hint = state["epoch"]
        if isinstance(state, dict):
            self._clock.restore(state.get("clock"))


SOURCE = Source(
    name="v2ray",
    config=V2RayConfig,
    collector=V2RayCollector,
    parse=parse_v2ray_stats_json,
)

"""V2Ray, Xray and sing-box (built with its V2Ray API): per-user stats over gRPC.

The source named `v2ray`. `V2RayStatsClient` talks to the core's `StatsService`
(and `HandlerService`, to add, remove and, on Xray, list users; the enforcement
backend `xray`/`v2ray` drives it); `parse_v2ray_stats` reads the
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

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType, TracebackType
from typing import Any, Final, Literal, Protocol, Self, TypeVar

import grpc
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import Message

from quotaflow.core.contracts import Counter
from quotaflow.producers.sources._parsing import (
    ParseError,
    add_traffic,
    apply_user_map,
    counters_of,
    json_uint,
    loads_strict,
)
from quotaflow.producers.sources._pb.singbox.experimental.v2rayapi import (
    stats_pb2 as singbox_stats,
)
from quotaflow.producers.sources._pb.v2ray.core.app.proxyman.command import (
    command_pb2 as v2ray_handler,
)
from quotaflow.producers.sources._pb.v2ray.core.app.stats.command import (
    command_pb2 as v2ray_stats,
)
from quotaflow.producers.sources._pb.v2ray.core.common.protocol import user_pb2 as v2ray_protocol
from quotaflow.producers.sources._pb.v2ray.core.common.serial import (
    typed_message_pb2 as v2ray_serial,
)
from quotaflow.producers.sources._pb.v2ray.core.proxy.shadowsocks import (
    account_pb2 as v2ray_shadowsocks,
)
from quotaflow.producers.sources._pb.v2ray.core.proxy.trojan import account_pb2 as v2ray_trojan
from quotaflow.producers.sources._pb.v2ray.core.proxy.vless import account_pb2 as v2ray_vless
from quotaflow.producers.sources._pb.v2ray.core.proxy.vmess import account_pb2 as v2ray_vmess
from quotaflow.producers.sources._pb.xray.app.proxyman.command import command_pb2 as xray_handler
from quotaflow.producers.sources._pb.xray.app.stats.command import command_pb2 as xray_stats
from quotaflow.producers.sources._pb.xray.common.protocol import user_pb2 as xray_protocol
from quotaflow.producers.sources._pb.xray.common.serial import typed_message_pb2 as xray_serial
from quotaflow.producers.sources._pb.xray.proxy.shadowsocks import (
    account_pb2 as xray_shadowsocks,
)
from quotaflow.producers.sources._pb.xray.proxy.shadowsocks_2022 import (
    account_pb2 as xray_shadowsocks_2022,
)
from quotaflow.producers.sources._pb.xray.proxy.trojan import account_pb2 as xray_trojan
from quotaflow.producers.sources._pb.xray.proxy.vless import account_pb2 as xray_vless
from quotaflow.producers.sources._pb.xray.proxy.vmess import account_pb2 as xray_vmess
from quotaflow.producers.sources._runtime import (
    Snapshot,
    Source,
    SourceConfigBase,
    SourceError,
    boot_id,
    now_ms,
)

_V2RAY_USER_PREFIX: Final = "user>>>"
_Response = TypeVar("_Response")
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

# The messages come from quotaflow's own .proto files (producers/sources/proto/, built
# into _pb/ by `make proto`), one set per server family: V2Ray's `v2ray.core.*`
# packages, Xray's `xray.*` and sing-box's `experimental.v2rayapi` (stats only).


class _Stat(Protocol):
    """`Stat{string name = 1; int64 value = 2}`, whichever family's."""

    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...


class _QueryStatsResponse(Protocol):
    """`QueryStatsResponse{repeated Stat stat = 1}`, whichever family's."""

    @property
    def stat(self) -> Sequence[_Stat]: ...


class _User(Protocol):
    """`common.protocol.User{uint32 level = 1; string email = 2; TypedMessage account = 3}`."""

    @property
    def email(self) -> str: ...


class _InboundUsersResponse(Protocol):
    """Xray's `GetInboundUserResponse{repeated User users = 1}`."""

    @property
    def users(self) -> Sequence[_User]: ...


class _OnlineIpListResponse(Protocol):
    """Xray's `GetStatsOnlineIpListResponse{string name = 1; map<string, int64> ips = 2}`."""

    @property
    def ips(self) -> Mapping[str, int]: ...


@dataclass(frozen=True, slots=True)
class _Flavour:
    """One server family's StatsService (and HandlerService) messages.

    `prefix` is the family's package prefix, put before the short type names of
    `TypedMessage` ("" for sing-box, which has no HandlerService). Constructors are
    typed loosely (generated messages take keyword arguments only); what they build
    is checked by protobuf at run time.
    """

    name: str
    stats_service: str
    prefix: str
    query_stats_request: Callable[..., Message]
    query_stats_response: Callable[[bytes], _QueryStatsResponse]
    sys_stats_request: Callable[[], Message]
    sys_stats_response: Callable[[bytes], Message]
    handler_service: str = ""
    alter_inbound_request: Callable[..., Message] | None = None
    alter_inbound_response: Callable[[bytes], Message] | None = None
    typed_message: Callable[..., Message] | None = None
    user: Callable[..., Message] | None = None
    add_user_operation: Callable[..., Message] | None = None
    remove_user_operation: Callable[..., Message] | None = None
    # account messages by short type name (`proxy.vless.Account`)
    accounts: Mapping[str, Callable[..., Message]] = field(default_factory=dict)
    # Xray only: HandlerService.GetInboundUsers and StatsService.GetStatsOnlineIpList
    get_inbound_user_request: Callable[..., Message] | None = None
    get_inbound_user_response: Callable[[bytes], _InboundUsersResponse] | None = None
    get_stats_request: Callable[..., Message] | None = None
    online_ip_list_response: Callable[[bytes], _OnlineIpListResponse] | None = None


def _service_name(module: ModuleType, service: str) -> str:
    descriptor: FileDescriptor = module.DESCRIPTOR
    return descriptor.services_by_name[service].full_name


def _short_names(prefix: str, *classes: type[Message]) -> dict[str, Callable[..., Message]]:
    names: dict[str, Callable[..., Message]] = {}
    for cls in classes:
        full_name = cls.DESCRIPTOR.full_name
        assert full_name.startswith(prefix), full_name
        names[full_name[len(prefix) :]] = cls
    return names


def _with_handler(
    name: str,
    prefix: str,
    stats: ModuleType,
    handler: ModuleType,
    serial: ModuleType,
    protocol: ModuleType,
    *accounts: type[Message],
) -> _Flavour:
    """A server with StatsService and HandlerService, from its generated modules."""
    return _Flavour(
        name=name,
        stats_service=_service_name(stats, "StatsService"),
        prefix=prefix,
        query_stats_request=stats.QueryStatsRequest,
        query_stats_response=stats.QueryStatsResponse.FromString,
        sys_stats_request=stats.SysStatsRequest,
        sys_stats_response=stats.SysStatsResponse.FromString,
        handler_service=_service_name(handler, "HandlerService"),
        alter_inbound_request=handler.AlterInboundRequest,
        alter_inbound_response=handler.AlterInboundResponse.FromString,
        typed_message=serial.TypedMessage,
        user=protocol.User,
        add_user_operation=handler.AddUserOperation,
        remove_user_operation=handler.RemoveUserOperation,
        accounts=_short_names(prefix, *accounts),
    )


_V2RAY: Final = _with_handler(
    "V2Ray", "v2ray.core.", v2ray_stats, v2ray_handler, v2ray_serial, v2ray_protocol,
    v2ray_vmess.Account, v2ray_vless.Account, v2ray_trojan.Account, v2ray_shadowsocks.Account,
)
_XRAY: Final = dataclasses.replace(
    _with_handler(
        "Xray", "xray.", xray_stats, xray_handler, xray_serial, xray_protocol,
        xray_vmess.Account, xray_vless.Account, xray_trojan.Account, xray_shadowsocks.Account,
        xray_shadowsocks_2022.Account,
    ),
    get_inbound_user_request=xray_handler.GetInboundUserRequest,
    get_inbound_user_response=xray_handler.GetInboundUserResponse.FromString,
    get_stats_request=xray_stats.GetStatsRequest,
    online_ip_list_response=xray_stats.GetStatsOnlineIpListResponse.FromString,
)
_SING_BOX: Final = _Flavour(
    name="sing-box",
    stats_service=_service_name(singbox_stats, "StatsService"),
    prefix="",
    query_stats_request=singbox_stats.QueryStatsRequest,
    query_stats_response=singbox_stats.QueryStatsResponse.FromString,
    sys_stats_request=singbox_stats.SysStatsRequest,
    sys_stats_response=singbox_stats.SysStatsResponse.FromString,
)
# Tried in this order when no StatsService is named.
_FLAVOURS: Final = (_V2RAY, _XRAY, _SING_BOX)


def _flavour_of_prefix(prefix: str) -> _Flavour:
    for flavour in _FLAVOURS:
        if flavour.prefix == prefix and flavour.typed_message is not None:
            return flavour
    raise ValueError(f"no V2Ray/Xray package prefix: {prefix!r}")


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _sys_stats_of(message: Message) -> dict[str, int]:
    """SysStatsResponse as {field name: value}; protobuf reads an absent field as 0."""
    return {item.name: int(getattr(message, item.name)) for item in message.DESCRIPTOR.fields}


# Shadowsocks methods, as the servers' JSON configs spell them, and their CipherType.
_SS_CIPHERS: Final = {
    "aes-128-gcm": "AES_128_GCM",
    "aes-256-gcm": "AES_256_GCM",
    "chacha20-poly1305": "CHACHA20_POLY1305",
    "chacha20-ietf-poly1305": "CHACHA20_POLY1305",
    "xchacha20-poly1305": "XCHACHA20_POLY1305",
    "xchacha20-ietf-poly1305": "XCHACHA20_POLY1305",
    "none": "NONE",
    "plain": "NONE",
}
_SS_2022: Final = (
    "2022-blake3-aes-128-gcm",
    "2022-blake3-aes-256-gcm",
    "2022-blake3-chacha20-poly1305",
)


@dataclass(frozen=True, slots=True)
class TypedMessage:
    """A proxy's `Account` message for `add_user`: its short type name and field values.

    `type_name` is written without the V2Ray/Xray package prefix (`proxy.vmess.Account`);
    the client builds the account with the generated message of the server it talks
    to (`v2ray.core.proxy.vmess.Account` or `xray.proxy.vmess.Account`) and wraps it
    in that server's `common.serial.TypedMessage{string type = 1; bytes value = 2}`,
    whose `type` is the message's full name. Enum fields may be given by value name.
    """

    type_name: str
    fields: Mapping[str, str | int]

    def message(self, prefix: str) -> Message:
        """The account message of the server whose packages start with `prefix`."""
        flavour = _flavour_of_prefix(prefix)
        make = flavour.accounts.get(self.type_name)
        if make is None:
            raise SourceError(f"{flavour.name} has no {self.type_name} message")
        try:
            return make(**self.fields)
        except (ValueError, TypeError) as exc:  # a field or an enum value it lacks
            raise SourceError(f"{flavour.name} {self.type_name}: {exc}") from exc

    def typed(self, prefix: str) -> Message:
        """The `common.serial.TypedMessage` carrying `message(prefix)`."""
        account = self.message(prefix)
        typed_message = _flavour_of_prefix(prefix).typed_message
        assert typed_message is not None
        return typed_message(type=account.DESCRIPTOR.full_name, value=account.SerializeToString())

    def encode(self, prefix: str) -> bytes:
        """The `common.serial.TypedMessage` bytes for the server whose packages start so."""
        return self.typed(prefix).SerializeToString()

    @staticmethod
    def vmess_account(user_uuid: str, alter_id: int = 0) -> TypedMessage:
        """`proxy.vmess.Account{string id = 1; uint32 alter_id = 2}` (Xray has no alter_id)."""
        fields: dict[str, str | int] = {"id": user_uuid}
        if alter_id:
            fields["alter_id"] = alter_id
        return TypedMessage("proxy.vmess.Account", fields)

    @staticmethod
    def vless_account(user_uuid: str, flow: str = "") -> TypedMessage:
        """`proxy.vless.Account{string id = 1; string flow = 2}`."""
        return TypedMessage("proxy.vless.Account", {"id": user_uuid, "flow": flow})

    @staticmethod
    def trojan_account(password: str) -> TypedMessage:
        """`proxy.trojan.Account{string password = 1}` (not tested live here)."""
        return TypedMessage("proxy.trojan.Account", {"password": password})

    @staticmethod
    def shadowsocks_account(password: str, method: str) -> TypedMessage:
        """A Shadowsocks user: `proxy.shadowsocks.Account{password = 1; cipher_type = 2}`.

        A `2022-blake3-*` method gives Xray's `proxy.shadowsocks_2022.Account{key = 1}`
        instead, for a multi-user Shadowsocks 2022 inbound (`password` is the user's key).
        V2Ray and Xray number the ciphers differently: the client picks the right enum.

        >>> account = TypedMessage.shadowsocks_account("secret", "aes-256-gcm")
        >>> account.message("v2ray.core.").cipher_type, account.message("xray.").cipher_type
        (2, 6)
        """
        name = method.lower()
        if name in _SS_2022:
            return TypedMessage("proxy.shadowsocks_2022.Account", {"key": password})
        cipher = _SS_CIPHERS.get(name)
        if cipher is None:
            raise ValueError(f"unknown Shadowsocks method {method!r}")
        fields: dict[str, str | int] = {"password": password, "cipher_type": cipher}
        return TypedMessage("proxy.shadowsocks.Account", fields)


# --------------------------------------------------------------------------- V2Ray / Xray

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
    while uptime has not gone down and the estimate stays within 10 s of the
    10 s window that starts at it (flooring put the epoch up to 10 s before the
    estimate it came from), so the epoch does not flap on a 10 s boundary: keep
    the last epoch (across agent restarts too) and pass it back. A restart gives a
    later start, hence a larger epoch, which is what tells the ledger that the
    counters began again.

    >>> derive_epoch_ms(1_761_000_123_456, 100)
    1761000020000
    >>> derive_epoch_ms(1_761_000_124_999, 101, previous=1_761_000_020_000, previous_uptime_s=100)
    1761000020000
    >>> derive_epoch_ms(1_761_000_130_000, 3, previous=1_761_000_020_000, previous_uptime_s=100)
    1761000120000

    A first estimate just before a 10 s mark is floored almost 10 s down; the same
    start estimated 0.7 s later (Uptime truncated) keeps that epoch, not a restart's:

    >>> first = derive_epoch_ms(1_761_000_129_900, 100)
    >>> first, derive_epoch_ms(1_761_000_130_600, 100, first, 100)
    (1761000020000, 1761000020000)
    """
    estimate = now_ms - uptime_s * 1000
    restarted = previous_uptime_s is not None and uptime_s < previous_uptime_s
    if (
        previous is not None
        and not restarted
        and -EPOCH_TOLERANCE_MS <= estimate - previous <= EPOCH_ROUNDING_MS + EPOCH_TOLERANCE_MS
    ):
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
    `experimental.v2rayapi.StatsService` (sing-box's generated name, stats only),
    and the one that answers is kept. Xray answers to V2Ray's names as well, but
    its HandlerService only knows `xray.*` messages: a server that answers to both
    is taken for Xray. A real sing-box (1.14.1, measured) registers its StatsService
    under V2Ray's name, whose messages it shares, so it is found first and spoken
    to as V2Ray; it ignores the `pattern` of QueryStats (every counter comes back,
    `parse_v2ray_stats` keeps the per-user ones) and has per-user counters only for
    the names in its `stats.users`. Each family is spoken to with its own generated
    messages. Counters are always read with reset=false.
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
        self._flavour: _Flavour | None = None
        if service is not None:
            # a StatsService of another name speaks V2Ray's messages (as before)
            self._flavour = next((f for f in _FLAVOURS if f.stats_service == service), _V2RAY)
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

    def _unary(
        self, path: str, request: Message, response: Callable[[bytes], _Response]
    ) -> _Response:
        call = self._channel.unary_unary(
            path, request_serializer=_serialize, response_deserializer=response
        )
        return call(request, timeout=self.timeout)

    def _guarded(
        self, path: str, request: Message, response: Callable[[bytes], _Response]
    ) -> _Response:
        try:
            return self._unary(path, request, response)
        except grpc.RpcError as exc:
            raise ApiError(f"{self.address} {path}: {_rpc_text(exc)}", exc) from exc

    def _stats_call(
        self, method: str, call: Callable[[_Flavour], tuple[Message, Callable[[bytes], _Response]]]
    ) -> _Response:
        """Call a StatsService method; `call` gives the request and the response parser
        for a family, so each family is spoken to with its own messages."""
        if self._flavour is not None:
            return self._guarded(f"/{self._service}/{method}", *call(self._flavour))
        last: grpc.RpcError | None = None
        for flavour in _FLAVOURS:
            try:
                answer = self._unary(f"/{flavour.stats_service}/{method}", *call(flavour))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise SourceError(f"{self.address} {method}: {_rpc_text(exc)}") from exc
                last = exc
                continue
            if flavour is _V2RAY and self._answers_as(_XRAY):
                flavour = _XRAY  # Xray serves V2Ray's names too, but wants its own accounts
            self._service, self._flavour = flavour.stats_service, flavour
            return answer
        detail = _rpc_text(last) if last is not None else "no service"
        raise SourceError(f"{self.address}: no StatsService answered ({detail})")

    def _answers_as(self, flavour: _Flavour) -> bool:
        """Whether the server also answers to `flavour`'s StatsService name."""
        try:
            path = f"/{flavour.stats_service}/GetSysStats"
            self._unary(path, flavour.sys_stats_request(), flavour.sys_stats_response)
        except grpc.RpcError:
            return False
        return True

    def query_stats(self, pattern: str = "user>>>") -> list[tuple[str, int]]:
        """(name, value) of every stat whose name contains `pattern`; never resets."""
        response = self._stats_call(
            "QueryStats",
            lambda f: (f.query_stats_request(pattern=pattern, reset=False), f.query_stats_response),
        )
        return [(stat.name, stat.value) for stat in response.stat]

    def query_user_counters(self) -> list[Counter]:
        """Per-user cumulative counters (`user>>>EMAIL>>>traffic>>>uplink|downlink`)."""
        return parse_v2ray_stats(self.query_stats("user>>>"))

    def sys_stats(self) -> dict[str, int]:
        """GetSysStats: `Uptime` (seconds), `NumGoroutine`, `Alloc`, ... (0 when absent)."""
        response = self._stats_call(
            "GetSysStats", lambda f: (f.sys_stats_request(), f.sys_stats_response)
        )
        return _sys_stats_of(response)

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

    def _handler_flavour(self) -> _Flavour:
        """V2Ray's or Xray's messages, learning which server answers if not known yet."""
        if self._flavour is None:
            self.sys_stats()
        assert self._flavour is not None
        if not self._flavour.handler_service:
            raise SourceError(f"{self.address}: {self._service} comes with no HandlerService")
        return self._flavour

    def _alter_inbound(self, flavour: _Flavour, tag: str, operation: Message) -> None:
        assert flavour.typed_message and flavour.alter_inbound_request
        assert flavour.alter_inbound_response
        typed = flavour.typed_message(
            type=operation.DESCRIPTOR.full_name, value=operation.SerializeToString()
        )
        request = flavour.alter_inbound_request(tag=tag, operation=typed)
        path = f"/{flavour.handler_service}/AlterInbound"
        self._guarded(path, request, flavour.alter_inbound_response)

    def add_user(self, inbound_tag: str, email: str, account: TypedMessage, level: int = 0) -> None:
        """Add a user to an inbound (AlterInbound + AddUserOperation); the email names its stats."""
        flavour = self._handler_flavour()
        assert flavour.user and flavour.add_user_operation
        user = flavour.user(level=level, email=email, account=account.typed(flavour.prefix))
        self._alter_inbound(flavour, inbound_tag, flavour.add_user_operation(user=user))

    def remove_user(self, inbound_tag: str, email: str) -> None:
        """Remove a user from an inbound by email (AlterInbound + RemoveUserOperation)."""
        flavour = self._handler_flavour()
        assert flavour.remove_user_operation
        self._alter_inbound(flavour, inbound_tag, flavour.remove_user_operation(email=email))

    @property
    def family(self) -> str:
        """`V2Ray`, `Xray` or `sing-box`, asking the server if not known yet."""
        if self._flavour is None:
            self.sys_stats()
        assert self._flavour is not None
        return self._flavour.name

    def inbound_users(self, inbound_tag: str, email: str = "") -> list[str]:
        """Xray's GetInboundUsers: the email of each user of an inbound, in its order.

        With `email`, only that user: [email] when the inbound holds it, else []
        (Xray answers an absent user with one empty User). Without, every user; an
        email appears as often as the inbound holds it, since Xray's old-style
        Shadowsocks inbound accepts the same email twice. V2Ray has no such call
        (SourceError).
        """
        flavour = self._handler_flavour()
        if flavour.get_inbound_user_request is None or flavour.get_inbound_user_response is None:
            raise SourceError(f"{self.address}: {flavour.name} cannot list an inbound's users")
        path = f"/{flavour.handler_service}/GetInboundUsers"
        request = flavour.get_inbound_user_request(tag=inbound_tag, email=email)
        answer = self._guarded(path, request, flavour.get_inbound_user_response)
        emails = [user.email for user in answer.users]
        return [e for e in emails if e] if email else emails

    def online_ips(self, email: str) -> dict[str, int]:
        """Xray's GetStatsOnlineIpList: the client addresses of a user's open connections.

        Address -> when last seen (Unix seconds). Xray keeps them only with the
        policy's `statsUserOnline`, and never lists 127.0.0.1 or ::1; a user it has
        no list for gives {}. V2Ray and sing-box have no such call (SourceError).
        """
        if self._flavour is None:
            self.sys_stats()
        flavour = self._flavour
        assert flavour is not None
        if flavour.get_stats_request is None or flavour.online_ip_list_response is None:
            raise SourceError(f"{self.address}: {flavour.name} keeps no online addresses")
        path = f"/{flavour.stats_service}/GetStatsOnlineIpList"
        request = flavour.get_stats_request(name=f"user>>>{email}>>>online", reset=False)
        try:
            answer = self._guarded(path, request, flavour.online_ip_list_response)
        except ApiError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return {}
            raise
        return dict(answer.ips)


class ApiError(SourceError):
    """A call the server answered with an error status (or that did not get through).

    `code` is the gRPC status code and `details` the server's message, such as Xray's
    and V2Ray's `User x not found.` and `User x already exists.`
    """

    def __init__(self, message: str, rpc: grpc.RpcError) -> None:
        super().__init__(message)
        code, details = getattr(rpc, "code", None), getattr(rpc, "details", None)
        self.code: grpc.StatusCode | None = code() if callable(code) else None
        self.details: str = (details() or "") if callable(details) else str(rpc)


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

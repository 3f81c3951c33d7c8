"""Pure parsers that turn what proxy and VPN servers print into per-user byte counters.

Every function here takes text (or already-decoded pairs) and returns
`quotaflow.contracts.Counter` readings; none of them opens a file, a socket or a
process, so collectors stay thin and every format can be tested from sample files.
All sources are read as *cumulative* counters: never ask a server to reset its
counters on read (`xray api statsquery -reset`, `iptables -Z`), because a reading
lost on the way would then be traffic lost for good.

Direction follows the contracts: `up` is what the user sent, `down` what the user
received. Input that cannot be read with certainty raises `ParseError` (a
`ValueError`) with a message that says what was wrong; a parser never guesses,
because a wrong reading would be billed.

>>> parse_v2ray_stats([
...     ("user>>>alice@example.com>>>traffic>>>uplink", 1200),
...     ("user>>>alice@example.com>>>traffic>>>downlink", 56000),
...     ("inbound>>>vless-in>>>traffic>>>uplink", 99999),
... ])
[Counter(user_id='alice@example.com', up=1200, down=56000)]
>>> apply_user_map(parse_ss_manager_stat('stat: {"8388": 500, "8389": 70}'),
...                {"8388": "alice", "8389": "alice"})
[Counter(user_id='alice', up=0, down=570)]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from quotaflow.contracts import MAX_COUNTER, Counter

__all__ = [
    "V2RAY_EXPORTER_MAPPING",
    "OpenVpnAccumulator",
    "OpenVpnSession",
    "ParseError",
    "PrometheusMapping",
    "apply_user_map",
    "openvpn_counters",
    "parse_iptables",
    "parse_openvpn_status",
    "parse_prometheus",
    "parse_ss_manager_stat",
    "parse_v2ray_stats",
    "parse_v2ray_stats_json",
    "parse_wg_dump",
]

MAX_USER_ID_LENGTH: Final = 256  # the contracts' Identifier limit
_MAX_EXACT_FLOAT: Final = 2**53  # larger float values may not be exact byte counts
_DIGITS = re.compile(r"[0-9]{1,19}")


class ParseError(ValueError):
    """The input is not in the expected format, or holds a value that cannot be billed."""


# --------------------------------------------------------------------------- helpers


def _uint(text: str, what: str) -> int:
    """A decimal byte count, checked to fit the contracts' 63-bit counters."""
    if not _DIGITS.fullmatch(text):
        raise ParseError(f"{what}: expected a non-negative decimal integer, got {text[:60]!r}")
    value = int(text)
    if value > MAX_COUNTER:
        raise ParseError(f"{what}: {value} is larger than the largest counter ({MAX_COUNTER})")
    return value


def _counter(user_id: str, up: int, down: int) -> Counter:
    """Build a Counter, turning every validation failure into a ParseError."""
    if not user_id:
        raise ParseError("empty user id")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise ParseError(
            f"user id longer than {MAX_USER_ID_LENGTH} characters: {user_id[:60]!r}..."
        )
    if up > MAX_COUNTER or down > MAX_COUNTER:
        raise ParseError(f"{user_id!r}: counter larger than {MAX_COUNTER} (up={up}, down={down})")
    try:
        return Counter(user_id=user_id, up=up, down=down)
    except ValidationError as exc:  # e.g. lone surrogates from undecodable bytes
        raise ParseError(f"{user_id!r}: not a valid counter: {exc}") from exc


def _counters(totals: Mapping[str, tuple[int, int]]) -> list[Counter]:
    """Counters from a user -> (up, down) mapping, sorted by user id for stable output."""
    return [_counter(user, up, down) for user, (up, down) in sorted(totals.items())]


def _add(totals: dict[str, tuple[int, int]], user: str, up: int, down: int) -> None:
    old_up, old_down = totals.get(user, (0, 0))
    totals[user] = (old_up + up, old_down + down)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice makes the object ambiguous."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ParseError(f"JSON object has the key {key!r} twice")
        result[key] = value
    return result


def _loads(text: str, what: str) -> Any:
    """json.loads with duplicate keys refused and every failure as a ParseError."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except ParseError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ParseError(f"{what}: not valid JSON: {exc}") from exc


def _json_uint(value: object, what: str) -> int:
    """A byte count from JSON: an integer or (protobuf JSON's int64 form) a decimal string."""
    if isinstance(value, bool):
        raise ParseError(f"{what}: expected a byte count, got {value!r}")
    if isinstance(value, int):
        if value < 0 or value > MAX_COUNTER:
            raise ParseError(f"{what}: byte count {value} out of range")
        return value
    if isinstance(value, str):
        return _uint(value, what)
    raise ParseError(f"{what}: expected an integer or a decimal string, got {value!r:.60}")


# --------------------------------------------------------------------------- V2Ray / Xray

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
        amount = _json_uint(value, f"stat {name[:80]!r}")
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
            _add(totals, email, amount, 0)
        elif direction == "downlink":
            _add(totals, email, 0, amount)
        else:
            raise ParseError(f"stat {name[:80]!r}: unknown traffic direction {direction[:20]!r}")
    return _counters(totals)


def parse_v2ray_stats_json(text: str) -> list[Counter]:
    """Per-user counters from the JSON that `xray api statsquery` (or V2Ray's stats query) prints.

    The shape is `{"stat": [{"name": "user>>>EMAIL>>>traffic>>>uplink", "value": "123"}]}`.
    Values may be numbers or strings (protobuf JSON writes int64 as strings); a
    missing `value` means 0, because protobuf JSON omits zeros; `{}` and
    `{"stat": []}` mean no readings. Query without `-reset`: counters must stay cumulative.
    """
    data = _loads(text, "V2Ray stats")
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
        pairs.append((name, _json_uint(entry.get("value", 0), f"stat {name[:80]!r}")))
    return parse_v2ray_stats(pairs)


# --------------------------------------------------------------------------- OpenVPN


@dataclass(frozen=True)
class OpenVpnSession:
    """One client connection in an OpenVPN status report.

    `bytes_received` is what the server received from the client (the user's
    upload), `bytes_sent` what it sent to the client. Both restart at 0 with every
    connection. `connected_since` is the connection's start in Unix seconds where
    the status format gives it (versions 2 and 3), else None; `connected_since_text`
    is the start as printed, which identifies the connection in version 1.
    """

    common_name: str
    real_address: str
    bytes_received: int
    bytes_sent: int
    connected_since: int | None
    connected_since_text: str = ""

    @property
    def key(self) -> tuple[str, str, int | str]:
        """What identifies one connection: common name, real address and start time."""
        since = (
            self.connected_since if self.connected_since is not None else self.connected_since_text
        )
        return (self.common_name, self.real_address, since)


_OPENVPN_NO_USER: Final = frozenset({"", "UNDEF"})  # not (yet) authenticated clients
_OPENVPN_TAGS: Final = frozenset(
    {"TITLE", "TIME", "HEADER", "CLIENT_LIST", "ROUTING_TABLE", "GLOBAL_STATS", "END", "ERRORS"}
)
_V1_CLIENT_HEADER: Final = "Common Name,Real Address,Bytes Received,Bytes Sent,Connected Since"
_CN, _REAL, _RX, _TX = "Common Name", "Real Address", "Bytes Received", "Bytes Sent"
_SINCE, _SINCE_T = "Connected Since", "Connected Since (time_t)"
# CLIENT_LIST columns of OpenVPN releases whose status files may lack a HEADER row,
# by column count: 2.3, 2.4, and 2.5 onwards.
_V2_LAYOUTS: Final[dict[int, tuple[str, ...]]] = {
    8: (_CN, _REAL, "Virtual Address", _RX, _TX, _SINCE, _SINCE_T, "Username"),
    11: (_CN, _REAL, "Virtual Address", "Virtual IPv6 Address", _RX, _TX, _SINCE, _SINCE_T,
         "Username", "Client ID", "Peer ID"),
    12: (_CN, _REAL, "Virtual Address", "Virtual IPv6 Address", _RX, _TX, _SINCE, _SINCE_T,
         "Username", "Client ID", "Peer ID", "Data Channel Cipher"),
}  # fmt: skip


def parse_openvpn_status(text: str) -> list[OpenVpnSession]:
    """The client sessions in an OpenVPN server status file (status-version 1, 2 or 3).

    Version 1 is the "OpenVPN CLIENT LIST" layout; version 2 is comma-separated
    `HEADER,CLIENT_LIST,...` / `CLIENT_LIST,...` rows; version 3 is version 2 with
    tabs. In versions 2 and 3, columns are found by name from the HEADER row, or by
    their count for older releases that print none. The same text is what the
    management interface answers to `status`, `status 2` and `status 3`.

    The closing `END` line is required: OpenVPN rewrites the file in place, so a
    reader can catch it half written, and a missing session would look like an
    ended one. Clients that have not authenticated yet are returned with the
    common name `UNDEF`; `openvpn_counters` and `OpenVpnAccumulator` skip them.
    """
    lines = [line.rstrip("\r") for line in text.splitlines()]
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise ParseError("OpenVPN status: empty input")
    if first.strip() == "OpenVPN CLIENT LIST":
        sessions = _openvpn_v1(lines)
    else:
        tab_tag = first.split("\t", 1)[0]
        comma_tag = first.split(",", 1)[0]
        if "\t" in first and tab_tag in _OPENVPN_TAGS:
            sessions = _openvpn_v23(lines, "\t")
        elif "," in first and comma_tag in _OPENVPN_TAGS:
            sessions = _openvpn_v23(lines, ",")
        else:
            raise ParseError(f"OpenVPN status: unknown format, first line {first[:80]!r}")
    addresses: set[str] = set()
    for session in sessions:
        if session.real_address in addresses:
            raise ParseError(f"OpenVPN status: real address {session.real_address!r} listed twice")
        addresses.add(session.real_address)
    return sessions


def _openvpn_v1(lines: list[str]) -> list[OpenVpnSession]:
    sessions: list[OpenVpnSession] = []
    state = "title"  # title -> clients -> rest -> end
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if state == "title":
            if line.strip() == "OpenVPN CLIENT LIST":
                state = "header"
            continue
        if state == "end":
            raise ParseError(f"OpenVPN status line {number}: text after END")
        if line == "END":
            if state != "rest":
                raise ParseError(f"OpenVPN status line {number}: END before the ROUTING TABLE")
            state = "end"
        elif state == "header":
            if line.startswith("Updated,"):
                continue
            if line != _V1_CLIENT_HEADER:
                raise ParseError(f"OpenVPN status line {number}: expected the client header")
            state = "clients"
        elif state == "clients":
            if line == "ROUTING TABLE":
                state = "rest"
                continue
            fields = line.split(",")
            if len(fields) != 5:
                raise ParseError(
                    f"OpenVPN status line {number}: a client row has 5 fields, found {len(fields)}"
                )
            cn, real, received, sent, since = fields
            sessions.append(
                OpenVpnSession(
                    common_name=cn,
                    real_address=real,
                    bytes_received=_uint(received, f"OpenVPN status line {number}: {_RX}"),
                    bytes_sent=_uint(sent, f"OpenVPN status line {number}: {_TX}"),
                    connected_since=None,
                    connected_since_text=since,
                )
            )
        # state "rest": routing table and global stats carry no traffic.
    if state != "end":
        raise ParseError("OpenVPN status: no END line (truncated or half-written file?)")
    return sessions


def _openvpn_v23(lines: list[str], sep: str) -> list[OpenVpnSession]:
    columns: tuple[str, ...] | None = None
    sessions: list[OpenVpnSession] = []
    ended = False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if ended:
            raise ParseError(f"OpenVPN status line {number}: text after END")
        fields = line.split(sep)
        tag = fields[0]
        if tag == "END" and len(fields) == 1:
            ended = True
        elif tag == "HEADER" and len(fields) >= 2 and fields[1] == "CLIENT_LIST":
            if columns is not None or sessions:
                raise ParseError(f"OpenVPN status line {number}: a second CLIENT_LIST header")
            columns = tuple(fields[2:])
            missing = [c for c in (_CN, _REAL, _RX, _TX) if c not in columns]
            if missing or len(set(columns)) != len(columns):
                raise ParseError(
                    f"OpenVPN status line {number}: CLIENT_LIST header lacks {missing} "
                    "or repeats a column"
                )
        elif tag == "CLIENT_LIST":
            values = fields[1:]
            layout = columns if columns is not None else _V2_LAYOUTS.get(len(values))
            if layout is None or len(values) != len(layout):
                raise ParseError(
                    f"OpenVPN status line {number}: CLIENT_LIST row with {len(values)} fields "
                    "does not match the header"
                )
            row = dict(zip(layout, values, strict=True))
            where = f"OpenVPN status line {number}"
            since_t = row.get(_SINCE_T)
            since = None if since_t is None else _uint(since_t, f"{where}: {_SINCE_T}")
            sessions.append(
                OpenVpnSession(
                    common_name=row[_CN],
                    real_address=row[_REAL],
                    bytes_received=_uint(row[_RX], f"{where}: {_RX}"),
                    bytes_sent=_uint(row[_TX], f"{where}: {_TX}"),
                    connected_since=since,
                    connected_since_text=row.get(_SINCE, ""),
                )
            )
        elif not re.fullmatch(r"[A-Z][A-Z_]*", tag):
            raise ParseError(f"OpenVPN status line {number}: unexpected line {line[:80]!r}")
        # other tagged rows (TITLE, TIME, ROUTING_TABLE, GLOBAL_STATS, ...) carry no traffic
    if not ended:
        raise ParseError("OpenVPN status: no END line (truncated or half-written file?)")
    return sessions


def openvpn_counters(sessions: Iterable[OpenVpnSession]) -> list[Counter]:
    """The live sessions' bytes summed per common name (up = bytes received from the client).

    These counters drop whenever a session ends, so they are not cumulative on
    their own: feed the sessions to an `OpenVpnAccumulator` to get counters that
    keep ended sessions' bytes. Unauthenticated clients (`UNDEF`) are skipped.
    """
    totals: dict[str, tuple[int, int]] = {}
    for session in sessions:
        if session.common_name in _OPENVPN_NO_USER:
            continue
        _add(totals, session.common_name, session.bytes_received, session.bytes_sent)
    return _counters(totals)


_SessionKey = tuple[str, str, int | str]


class OpenVpnAccumulator:
    """Turns OpenVPN's per-connection counters into one ever-growing counter per common name.

    OpenVPN's counters restart at 0 with every connection and vanish when the
    client disconnects. The accumulator remembers each live session (by common
    name, real address and start time) and, when a session disappears, adds its
    last bytes to the common name's "ended" total, so the reported counter is
    `ended + live sessions` and never goes down. A session whose counters went
    down is a new connection under the same key: the old one's bytes are kept.
    Recently ended sessions are remembered (up to `max_remembered`) so that a
    session missing from one report and back in the next, with counters not
    lower, is recognised and not counted twice.

    It is pure state, no I/O: persist `state()` (JSON-able) after every update and
    restore it with `from_state()`; losing it loses the ended sessions' bytes.

    >>> acc = OpenVpnAccumulator()
    >>> s = OpenVpnSession("alice", "198.51.100.7:50000", 100, 2000, 1761000000)
    >>> acc.update([s])
    [Counter(user_id='alice', up=100, down=2000)]
    >>> acc.update([])   # alice disconnected: her bytes stay counted
    [Counter(user_id='alice', up=100, down=2000)]
    >>> acc.update([OpenVpnSession("alice", "198.51.100.7:50001", 5, 7, 1761000300)])
    [Counter(user_id='alice', up=105, down=2007)]
    """

    STATE_VERSION: Final = 1

    def __init__(self, max_remembered: int = 10_000) -> None:
        if max_remembered < 0:
            raise ValueError("max_remembered must be >= 0")
        self.max_remembered = max_remembered
        self._ended: dict[str, tuple[int, int]] = {}
        self._live: dict[_SessionKey, tuple[int, int]] = {}
        self._gone: dict[_SessionKey, tuple[int, int]] = {}  # oldest first

    def update(self, sessions: Iterable[OpenVpnSession]) -> list[Counter]:
        """Take one complete status report's sessions; return every known user's counter.

        Users whose sessions have all ended are still reported, with their total.
        On error (duplicate sessions, counters too large) the state is unchanged.
        """
        current: dict[_SessionKey, tuple[int, int]] = {}
        for session in sessions:
            if session.common_name in _OPENVPN_NO_USER:
                continue
            if session.key in current:
                raise ParseError(f"OpenVPN session {session.key!r} given twice")
            for value in (session.bytes_received, session.bytes_sent):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ParseError(f"OpenVPN session {session.key!r}: bad byte count {value!r}")
            current[session.key] = (session.bytes_received, session.bytes_sent)

        ended = dict(self._ended)
        gone = dict(self._gone)
        previous = dict(self._live)
        for key, (up, down) in current.items():
            last = previous.pop(key, None)
            if last is None:
                remembered = gone.pop(key, None)
                old_up, old_down = ended.get(key[0], (0, 0))
                if (
                    remembered is not None
                    and remembered[0] <= min(up, old_up)
                    and remembered[1] <= min(down, old_down)
                ):
                    # The session was missing from a report but goes on: take its
                    # bytes out of the ended total again, it is live once more.
                    ended[key[0]] = (old_up - remembered[0], old_down - remembered[1])
            elif up < last[0] or down < last[1]:
                # Counters went down: the old connection ended, a new one has its key.
                _add(ended, key[0], *last)
        for key, last in previous.items():  # sessions no longer listed have ended
            _add(ended, key[0], *last)
            gone.pop(key, None)
            gone[key] = last
        while len(gone) > self.max_remembered:
            del gone[next(iter(gone))]

        totals = dict(ended)
        for key, (up, down) in current.items():
            _add(totals, key[0], up, down)
        result = _counters(totals)  # raises before any state changes
        self._ended, self._live, self._gone = ended, current, gone
        return result

    def counters(self) -> list[Counter]:
        """The current counter of every known user, without taking a new report."""
        totals = dict(self._ended)
        for key, (up, down) in self._live.items():
            _add(totals, key[0], up, down)
        return _counters(totals)

    def state(self) -> dict[str, Any]:
        """Everything the accumulator knows, as JSON-able plain data."""
        return {
            "version": self.STATE_VERSION,
            "max_remembered": self.max_remembered,
            "ended": {user: [up, down] for user, (up, down) in sorted(self._ended.items())},
            "live": [[*key, up, down] for key, (up, down) in self._live.items()],
            "gone": [[*key, up, down] for key, (up, down) in self._gone.items()],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> OpenVpnAccumulator:
        """Rebuild an accumulator from `state()`; malformed state raises ParseError."""
        if not isinstance(state, Mapping) or state.get("version") != cls.STATE_VERSION:
            raise ParseError("OpenVPN accumulator state: missing or unknown version")
        max_remembered = state.get("max_remembered")
        if isinstance(max_remembered, bool) or not isinstance(max_remembered, int):
            raise ParseError("OpenVPN accumulator state: bad max_remembered")
        if max_remembered < 0:
            raise ParseError("OpenVPN accumulator state: bad max_remembered")
        acc = cls(max_remembered)
        ended = state.get("ended")
        if not isinstance(ended, Mapping):
            raise ParseError("OpenVPN accumulator state: 'ended' must be an object")
        for user, pair in ended.items():
            if not isinstance(user, str) or not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ParseError(f"OpenVPN accumulator state: bad ended entry {user!r:.60}")
            acc._ended[user] = (_state_uint(pair[0]), _state_uint(pair[1]))
        acc._live = _state_sessions(state.get("live"), "live")
        acc._gone = _state_sessions(state.get("gone"), "gone")
        return acc


def _state_uint(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNTER:
        raise ParseError(f"OpenVPN accumulator state: bad byte count {value!r:.40}")
    return value


def _state_sessions(rows: object, name: str) -> dict[_SessionKey, tuple[int, int]]:
    if not isinstance(rows, list):
        raise ParseError(f"OpenVPN accumulator state: {name!r} must be a list")
    sessions: dict[_SessionKey, tuple[int, int]] = {}
    for row in rows:
        if not isinstance(row, list | tuple) or len(row) != 5:
            raise ParseError(f"OpenVPN accumulator state: bad {name} row {row!r:.80}")
        cn, real, since, up, down = row
        since_ok = isinstance(since, str) or (
            isinstance(since, int) and not isinstance(since, bool)
        )
        if not isinstance(cn, str) or not isinstance(real, str) or not since_ok:
            raise ParseError(f"OpenVPN accumulator state: bad {name} row {row!r:.80}")
        sessions[(cn, real, since)] = (_state_uint(up), _state_uint(down))
    return sessions


# --------------------------------------------------------------------------- shadowsocks-libev


def parse_ss_manager_stat(text: str) -> list[Counter]:
    """Per-port counters from ss-manager's answer to `ping`: `stat: {"8388": 12345, ...}`.

    The bare JSON object is accepted too. ss-manager reports one combined figure
    per port (both directions together), so it goes in `down` and `up` is 0; the
    port (as a string) is the user id, to be renamed with `apply_user_map`.
    With very many ports ss-manager splits its answer over several datagrams, and
    the later ones lack the `stat: {` prefix; pass them joined by newlines and they
    are read as one answer.
    """
    decoder = json.JSONDecoder(object_pairs_hook=_reject_duplicate_keys)
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
            totals[port] = (0, _json_uint(value, f"ss-manager stat port {port}"))
        chunks += 1
        rest = rest[end:].strip().strip("\x00").strip()
    if not chunks:
        raise ParseError("ss-manager stat: empty input")
    return _counters(totals)


# --------------------------------------------------------------------------- iptables

_IPTABLES_COMMENT = re.compile(r"/\*.*?\*/")
_IPTABLES_DPT = re.compile(r"(?<!\w)dpt:([0-9]+)(?![\w:])")
_IPTABLES_SPT = re.compile(r"(?<!\w)spt:([0-9]+)(?![\w:])")


def parse_iptables(text: str) -> list[Counter]:
    """Per-port counters from `iptables -nvxL CHAIN` (or ip6tables) accounting rules.

    A rule matching `dpt:PORT` counts traffic to the server port, which is the
    user's upload; `spt:PORT` counts the download. Rules of the same port are
    summed (tcp and udp, and any repeats), so list only the accounting chain.
    Rules without a single port match (jumps, multiport, ranges) are skipped; a
    rule with both dpt and spt is refused as ambiguous. `-x` is required: without
    it iptables rounds big counts (`12K`), which are refused. The port is the user id.
    Rules are read by the columns of the header line above them (`pkts bytes ...`,
    or `num pkts bytes ...` with `--line-numbers`), so rule lines without their
    header (say, filtered through grep) are refused rather than misread.
    """
    totals: dict[str, tuple[int, int]] = {}
    skip: int | None = None  # columns before `pkts`, known once the header is seen
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("Zeroing chain"):
            raise ParseError("iptables: counters were zeroed on read (-Z); list them without -Z")
        if re.fullmatch(r"Chain \S+ \(.*\)", line):
            skip = None
            continue
        fields = line.split()
        if fields[:2] == ["pkts", "bytes"]:
            skip = 0
            continue
        if fields[:3] == ["num", "pkts", "bytes"]:
            skip = 1
            continue
        if skip is None:
            raise ParseError(f"iptables line {number}: rule or text before the column header")
        if len(fields) < skip + 8:
            raise ParseError(f"iptables line {number}: not a rule: {line[:80]!r}")
        if not all(_DIGITS.fullmatch(f) for f in fields[: skip + 2]):
            raise ParseError(
                f"iptables line {number}: packet/byte counts must be exact integers "
                f"(list with -x): {line[:80]!r}"
            )
        size = _uint(fields[skip + 1], f"iptables line {number}: bytes")
        matches = _IPTABLES_COMMENT.sub(" ", " ".join(fields[skip + 2 :]))
        dpts = _IPTABLES_DPT.findall(matches)
        spts = _IPTABLES_SPT.findall(matches)
        if len(dpts) + len(spts) > 1:
            raise ParseError(
                f"iptables line {number}: rule matches more than one port: {line[:80]!r}"
            )
        if not dpts and not spts:
            continue
        port_text = (dpts or spts)[0]
        port = int(port_text)
        if not 0 < port <= 65535 or str(port) != port_text:
            raise ParseError(f"iptables line {number}: bad port {port_text!r}")
        if dpts:
            _add(totals, port_text, size, 0)
        else:
            _add(totals, port_text, 0, size)
    return _counters(totals)


# --------------------------------------------------------------------------- WireGuard

_WG_KEY = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")


def parse_wg_dump(text: str) -> list[Counter]:
    """Per-peer counters from `wg show all dump` (or `wg show IFACE dump`).

    In the `all` form interface lines have 5 tab-separated fields and peer lines 9;
    for one interface the interface column is missing (4 and 8). `transfer-rx` is
    what the server received from the peer, the user's upload. The peer's public
    key is the user id; a key present on several interfaces is summed.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    rows = [line.split("\t") for line in lines]
    lengths = {len(row) for row in rows}
    if not rows:
        return []
    if lengths <= {5, 9}:
        with_iface = True
    elif lengths <= {4, 8}:
        with_iface = False
    else:
        raise ParseError(f"wg dump: unexpected field counts {sorted(lengths)}; expected 5/9 or 4/8")
    interfaces: set[str] = set()
    seen: set[tuple[str, str]] = set()
    totals: dict[str, tuple[int, int]] = {}
    current = ""
    for number, row in enumerate(rows, 1):
        if with_iface:
            iface, fields = row[0], row[1:]
        else:
            iface, fields = "", row
        if len(fields) == 4:  # private-key, public-key, listen-port, fwmark
            if with_iface and (not iface or iface in interfaces):
                raise ParseError(f"wg dump row {number}: bad or repeated interface {iface[:20]!r}")
            if not with_iface and interfaces:
                raise ParseError(
                    f"wg dump row {number}: a second interface in a one-interface dump"
                )
            interfaces.add(iface)
            current = iface
            continue
        if iface not in interfaces or (with_iface and iface != current):
            raise ParseError(f"wg dump row {number}: peer before its interface line")
        key, _psk, _endpoint, _ips, handshake, rx, tx, _keepalive = fields
        if not _WG_KEY.fullmatch(key):
            raise ParseError(f"wg dump row {number}: {key[:50]!r} is not a WireGuard public key")
        if (iface, key) in seen:
            raise ParseError(f"wg dump row {number}: peer {key} listed twice on {iface!r}")
        seen.add((iface, key))
        _uint(handshake, f"wg dump row {number}: latest-handshake")
        up = _uint(rx, f"wg dump row {number}: transfer-rx")
        down = _uint(tx, f"wg dump row {number}: transfer-tx")
        _add(totals, key, up, down)
    return _counters(totals)


# --------------------------------------------------------------------------- Prometheus


def _metric_names(metric: str) -> frozenset[str]:
    """The sample names a configured metric name stands for."""
    if metric.endswith("_total"):
        return frozenset({metric})
    return frozenset({metric, metric + "_total"})


@dataclass(frozen=True)
class PrometheusMapping:
    """Which samples of a Prometheus exposition hold per-user traffic.

    Either two metrics (`up_metric`, `down_metric`), or one metric for both with a
    `direction_label` whose values `up_value`/`down_value` tell the directions (then
    `up_metric` and `down_metric` may be the same). The user is the value of
    `user_label`; `match` keeps only samples whose labels have these values.
    Metric names match with or without the `_total` suffix of counters, since
    prometheus_client adds or strips it.
    """

    up_metric: str
    down_metric: str
    user_label: str = "user"
    direction_label: str | None = None
    up_value: str | None = None
    down_value: str | None = None
    match: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.up_metric or not self.down_metric or not self.user_label:
            raise ValueError("PrometheusMapping needs up_metric, down_metric and user_label")
        if self.direction_label is None:
            if self.up_value is not None or self.down_value is not None:
                raise ValueError("up_value/down_value need a direction_label")
            if _metric_names(self.up_metric) & _metric_names(self.down_metric):
                raise ValueError("up_metric and down_metric are the same: set a direction_label")
        elif self.up_value is None or self.down_value is None or self.up_value == self.down_value:
            raise ValueError("a direction_label needs two different up_value and down_value")


V2RAY_EXPORTER_MAPPING: Final = PrometheusMapping(
    up_metric="v2ray_traffic_uplink_bytes_total",
    down_metric="v2ray_traffic_downlink_bytes_total",
    user_label="target",
    match={"dimension": "user"},
)
"""The mapping for v2ray-exporter, which serves Xray/V2Ray user stats as
`v2ray_traffic_uplink_bytes_total{dimension="user",target="EMAIL"}`."""


def _sample_bytes(value: object, what: str) -> int:
    """A sample value as an exact byte count."""
    if isinstance(value, bool):
        raise ParseError(f"{what}: not a byte count: {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_COUNTER:
            raise ParseError(f"{what}: byte count {value} out of range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or not value.is_integer():
            raise ParseError(f"{what}: not a byte count: {value!r}")
        if value > _MAX_EXACT_FLOAT:
            raise ParseError(f"{what}: {value!r} is too large to be an exact float byte count")
        return int(value)
    raise ParseError(f"{what}: not a number: {value!r:.40}")


def parse_prometheus(text: str, mapping: PrometheusMapping) -> list[Counter]:
    """Per-user counters from a Prometheus text exposition, picked out by `mapping`.

    Parsing is prometheus_client's; samples of the same user are summed (say, one
    per inbound). Samples without the user label, or with an empty one, are
    skipped (exporters often add totals without it). Values must be whole, finite
    and non-negative; a series listed twice, or a metric present both with and
    without `_total`, is refused as ambiguous.
    """
    up_names = _metric_names(mapping.up_metric)
    down_names = _metric_names(mapping.down_metric)
    wanted = up_names | down_names
    totals: dict[str, tuple[int, int]] = {}
    series: set[tuple[str, frozenset[tuple[str, str]]]] = set()
    names_seen: set[str] = set()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises assorted exceptions on bad input
        raise ParseError(f"Prometheus exposition: cannot parse: {exc!r:.200}") from exc
    for family in families:
        for sample in family.samples:
            if sample.name not in wanted:
                continue
            labels = sample.labels
            if any(labels.get(k) != v for k, v in mapping.match.items()):
                continue
            identity = (sample.name, frozenset(labels.items()))
            if identity in series:
                raise ParseError(
                    f"Prometheus exposition: series {sample.name}{labels} listed twice"
                )
            series.add(identity)
            user = labels.get(mapping.user_label, "")
            if not user:
                continue
            if mapping.direction_label is None:
                is_up, is_down = sample.name in up_names, sample.name in down_names
            else:
                direction = labels.get(mapping.direction_label)
                is_up = sample.name in up_names and direction == mapping.up_value
                is_down = sample.name in down_names and direction == mapping.down_value
            if not is_up and not is_down:
                continue
            names_seen.add(sample.name)
            amount = _sample_bytes(sample.value, f"Prometheus sample {sample.name}{labels}")
            _add(totals, user, amount if is_up else 0, amount if is_down else 0)
    for metric in (mapping.up_metric, mapping.down_metric):
        if len(_metric_names(metric) & names_seen) > 1:
            raise ParseError(
                f"Prometheus exposition: both {metric} and {metric}_total are present; "
                "name the one meant"
            )
    return _counters(totals)


# --------------------------------------------------------------------------- renaming


def apply_user_map(
    counters: Iterable[Counter], user_map: Mapping[str, str] | None
) -> list[Counter]:
    """Rename source ids (ports, public keys, common names) to user ids, summing merges.

    Counters whose ids map to the same user are added together. Ids the map does
    not name keep their own id: dropping them would silently lose traffic, and a
    source id that reaches the ledger is easy to spot and fix in the map. With no
    map the counters are returned as they are (combined by id, sorted).
    """
    totals: dict[str, tuple[int, int]] = {}
    for counter in counters:
        user = user_map.get(counter.user_id, counter.user_id) if user_map else counter.user_id
        _add(totals, user, counter.up, counter.down)
    return _counters(totals)

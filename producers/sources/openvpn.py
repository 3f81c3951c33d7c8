"""OpenVPN: the server's `--status` file (versions 1-3); users are common names.

The source named `openvpn`. An `OpenVpnAccumulator`, persisted with every report,
keeps ended sessions' bytes, so a user's counters never restart and the epoch is
constant.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from quotaflow.core.contracts import MAX_COUNTER, Counter
from quotaflow.producers.sources._parsing import (
    ParseError,
    add_traffic,
    apply_user_map,
    counters_of,
    decimal_uint,
)
from quotaflow.producers.sources._runtime import (
    EpochKeeper,
    Snapshot,
    Source,
    SourceConfigBase,
    SourceError,
)


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
    virtual_address: str = ""
    """The tunnel address(es) the server gave the client (versions 2 and 3; IPv4 and IPv6
    joined by a space), empty while it has none yet, as for a client being refused."""

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
                    bytes_received=decimal_uint(received, f"OpenVPN status line {number}: {_RX}"),
                    bytes_sent=decimal_uint(sent, f"OpenVPN status line {number}: {_TX}"),
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
            since = None if since_t is None else decimal_uint(since_t, f"{where}: {_SINCE_T}")
            sessions.append(
                OpenVpnSession(
                    common_name=row[_CN],
                    real_address=row[_REAL],
                    bytes_received=decimal_uint(row[_RX], f"{where}: {_RX}"),
                    bytes_sent=decimal_uint(row[_TX], f"{where}: {_TX}"),
                    connected_since=since,
                    connected_since_text=row.get(_SINCE, ""),
                    virtual_address=" ".join(
                        a for a in (row.get("Virtual Address"), row.get("Virtual IPv6 Address"))
                        if a
                    ),
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
        add_traffic(totals, session.common_name, session.bytes_received, session.bytes_sent)
    return counters_of(totals)


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
                add_traffic(ended, key[0], *last)
        for key, last in previous.items():  # sessions no longer listed have ended
            add_traffic(ended, key[0], *last)
            gone.pop(key, None)
            gone[key] = last
        while len(gone) > self.max_remembered:
            del gone[next(iter(gone))]

        totals = dict(ended)
        for key, (up, down) in current.items():
            add_traffic(totals, key[0], up, down)
        result = counters_of(totals)  # raises before any state changes
        self._ended, self._live, self._gone = ended, current, gone
        return result

    def counters(self) -> list[Counter]:
        """The current counter of every known user, without taking a new report."""
        totals = dict(self._ended)
        for key, (up, down) in self._live.items():
            add_traffic(totals, key[0], up, down)
        return counters_of(totals)

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


def read_openvpn_status(path: str | Path) -> str:
    """The text of an OpenVPN `--status` file, for `parse_openvpn_status`."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SourceError(f"OpenVPN status {path}: {exc}") from exc


class OpenVpnManagement:
    """An OpenVPN server's management interface (`--management`), one connection per call.

    `address` is `host:port` (TCP; `[v6]:port` too) or the path of a unix socket
    (`--management PATH unix`). With `password` (the first line of the
    `--management` password file) it answers the `ENTER PASSWORD:` prompt.
    OpenVPN serves one management client at a time and keeps later ones waiting
    without a word, so each call connects, asks, says `quit` and goes; a program
    that stays connected blocks every other one, which then times out.
    """

    PROMPT: Final = b"ENTER PASSWORD:"

    def __init__(self, address: str, password: str | None = None, *, timeout: float = 5.0) -> None:
        self.address = address
        self._password = password
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        if self.address.startswith("/") or ":" not in self.address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
            return sock
        host, _, port = self.address.rpartition(":")
        return socket.create_connection((host.strip("[]"), int(port)), timeout=self.timeout)

    def commands(self, *texts: str) -> list[list[str]]:
        """Send each command in one session; each one's answer lines (`>` notices left out).

        A command's answer ends with its `SUCCESS:`/`ERROR:` line, or with `END` for
        the multi-line ones (`status`, `help`, ...). `SourceError` when the interface
        cannot be reached, refuses the password or does not answer within `timeout`.
        """
        for text in texts:
            if "\n" in text or "\r" in text:
                raise ValueError("a management command is one line")
        try:
            with contextlib.closing(self._connect()) as sock:
                session = _ManagementSession(sock, time.monotonic() + self.timeout)
                session.login(self._password)
                answers = [session.ask(text) for text in texts]
                with contextlib.suppress(OSError):
                    sock.sendall(b"quit\n")
                return answers
        except TimeoutError as exc:
            raise SourceError(
                f"OpenVPN management {self.address}: no answer within {self.timeout:g} s"
                " (OpenVPN serves one management client at a time: is another one connected?)"
            ) from exc
        except (OSError, ValueError) as exc:
            raise SourceError(f"OpenVPN management {self.address}: {exc}") from exc

    def sessions(self) -> list[OpenVpnSession]:
        """The server's client sessions now (`status 2`)."""
        [answer] = self.commands("status 2")
        try:
            return parse_openvpn_status("\n".join(answer))
        except ParseError as exc:
            raise SourceError(f"OpenVPN management {self.address}: status: {exc}") from exc

    def kill(self, common_name: str) -> int:
        """`kill CN`: end every session of a common name; how many there were (0: none).

        The server forgets the sessions at once. Over UDP the client is not told and
        notices only by its `ping-restart` timeout; then it connects again, unless
        something (a `disable` in its client-config-dir file) refuses it.
        """
        if not re.fullmatch(r"[^\s\"\\:]+", common_name):
            raise ValueError(f"cannot name the common name {common_name[:60]!r} to `kill`")
        [answer] = self.commands(f'kill "{common_name}"')
        last = answer[-1] if answer else ""
        found = re.fullmatch(r"SUCCESS: common name '.*' found, ([0-9]+) client\(s\) killed", last)
        if found:
            return int(found.group(1))
        if re.fullmatch(r"ERROR: common name '.*' not found", last):
            return 0
        raise SourceError(f"OpenVPN management {self.address}: kill: {last[:200]!r}")


class _ManagementSession:
    """The reading side of one management connection, with one deadline for all of it."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline, self._buffer = sock, deadline, b""

    def _more(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("management deadline")
        self._sock.settimeout(left)
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ValueError("the management interface closed the connection")
        self._buffer += chunk

    def _line(self) -> str:
        while b"\n" not in self._buffer:
            self._more()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", errors="replace").rstrip("\r")

    def login(self, password: str | None) -> None:
        """Wait for the greeting; answer the password prompt when there is one."""
        while not self._buffer.startswith((OpenVpnManagement.PROMPT, b">INFO:")):
            if b"\n" in self._buffer:
                self._line()  # anything else before the greeting
                continue
            self._more()
        if not self._buffer.startswith(OpenVpnManagement.PROMPT):
            self._line()  # the >INFO: banner: no password asked
            return
        if password is None:
            raise ValueError("the interface asks for a password and none is configured")
        self._buffer = self._buffer[len(OpenVpnManagement.PROMPT) :]
        self._sock.sendall(password.encode() + b"\n")
        while True:
            while not self._buffer.startswith(OpenVpnManagement.PROMPT) and b"\n" not in (
                self._buffer
            ):
                self._more()
            if self._buffer.startswith(OpenVpnManagement.PROMPT):
                raise ValueError("the interface refused the password")
            line = self._line()
            if line.startswith("SUCCESS:"):
                return
            if line.startswith("ERROR:"):
                raise ValueError("the interface refused the password")

    def ask(self, text: str) -> list[str]:
        self._sock.sendall(text.encode() + b"\n")
        lines: list[str] = []
        while True:
            line = self._line()
            if line.startswith(">"):
                continue  # a real-time notice (>INFO, >LOG, >CLIENT, ...), not the answer
            lines.append(line)
            if line == "END" or (len(lines) == 1 and line.startswith(("SUCCESS:", "ERROR:"))):
                return lines


class OpenVpnConfig(SourceConfigBase):
    """An OpenVPN `--status` file (versions 1-3); users are common names."""

    type: Literal["openvpn"]
    status_file: Path


class OpenVpnCollector:
    """OpenVPN status text through a persisted `OpenVpnAccumulator`; constant epoch."""

    def __init__(self, read: Callable[[], str], user_map: Mapping[str, str]) -> None:
        self._read, self._user_map = read, dict(user_map)
        self._acc = OpenVpnAccumulator()
        self._epoch = EpochKeeper("constant")

    def collect(self) -> Snapshot:
        counters = self._acc.update(parse_openvpn_status(self._read()))
        return Snapshot(self._epoch.epoch(), apply_user_map(counters, self._user_map))

    def state(self) -> Any:
        return {**self._epoch.state(), "accumulator": self._acc.state()}

    def restore(self, state: Any) -> None:
        if isinstance(state, dict):
            self._epoch.restore(state)
            if state.get("accumulator") is not None:
                self._acc = OpenVpnAccumulator.from_state(state["accumulator"])


def _openvpn_text_collector(
    read: Callable[[], str], user_map: Mapping[str, str], epoch: str
) -> OpenVpnCollector:
    return OpenVpnCollector(read, user_map)


SOURCE = Source(
    name="openvpn",
    config=OpenVpnConfig,
    collector=lambda c: OpenVpnCollector(lambda: read_openvpn_status(c.status_file), c.user_map),
    parse=lambda text: openvpn_counters(parse_openvpn_status(text)),
    text_collector=_openvpn_text_collector,
)

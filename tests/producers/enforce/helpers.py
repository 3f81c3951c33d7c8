"""Shared by the enforcement tests: commands, loopback TCP servers, and a fetch through a tunnel."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from quotaflow.core.plans import Action, Command, Reason

LOCAL = "127.0.0.1"

# The reason the worker gives each action when a quota decides it (docs/contracts.md).
REASONS: dict[Action, Reason] = {"warn": "threshold", "disable": "quota", "enable": "operator"}


def command(
    action: Action = "disable",
    user: str = "alice",
    *,
    used_bytes: int = 10,
    issued_at: datetime | None = None,
) -> Command:
    """A command of a 10-byte allowance, issued now unless `issued_at` is given."""
    return Command(
        command_id=str(uuid.uuid4()), user_id=user, action=action, reason=REASONS[action],
        period_start=datetime(2026, 11, 1, tzinfo=UTC), period_end=None,
        used_bytes=used_bytes, allowance_bytes=10, threshold=0.8 if action == "warn" else None,
        issued_at=issued_at or datetime.now(UTC),
    )  # fmt: skip


class TcpServer:
    """A TCP server on loopback that gives each connection to `serve` on a thread of its own."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self._serve = serve
        self._listener = socket.create_server((LOCAL, 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._guarded, args=(conn,), daemon=True).start()

    def _guarded(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._serve(conn)

    def close(self) -> None:
        self._listener.close()


def echo(conn: socket.socket) -> None:
    """Send back what the connection sends, until it closes."""
    while data := conn.recv(65536):
        conn.sendall(data)


# Run in a client network namespace: POST `size` bytes to host:port over HTTP/1.0, retrying
# the connection until `deadline` seconds pass, and write the response body to stdout.
FETCH = """
import socket, sys, time
host, port, size, deadline = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
upload = (b"quotaflow-" * (size // 10 + 1))[:size]
until = time.monotonic() + deadline
while True:
    try:
        sock = socket.create_connection((host, port), timeout=max(0.1, until - time.monotonic()))
        break
    except OSError:
        if time.monotonic() > until:
            sys.exit(3)
        time.sleep(0.2)
sock.settimeout(30)
sock.sendall(b"POST / HTTP/1.0\\r\\nContent-Length: %d\\r\\n\\r\\n" % size + upload)
data = b""
while chunk := sock.recv(65536):
    data += chunk
sys.stdout.buffer.write(data.partition(b"\\r\\n\\r\\n")[2])
"""

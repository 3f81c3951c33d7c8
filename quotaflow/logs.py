"""Logging for quotaflow's long-running processes, with repeated warnings held back.

During a Kafka outage the Kafka clients log the same error many times a second
(about 75 lines per second per process were seen). `RepeatFilter` lets one
record of a kind (logger, level, message template) through per interval and
says, with the next one it lets through, how many it held back.

>>> now = [0.0]
>>> repeats = RepeatFilter(every_s=10.0, clock=lambda: now[0])
>>> def record(msg):
...     return logging.LogRecord("aiokafka", logging.ERROR, "", 0, msg, None, None)
>>> [repeats.filter(record("Unable connect to %s")) for _ in range(3)]
[True, False, False]
>>> now[0] = 11.0
>>> passed = record("Unable connect to %s")
>>> repeats.filter(passed), passed.msg
(True, 'Unable connect to %s (2 more like it in the last 11 s)')
>>> repeats.filter(record("Another problem"))
True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

_Key = tuple[str, int, str]


class RepeatFilter(logging.Filter):
    """At most one WARNING-or-worse record of a kind per `every_s`; lower levels all pass."""

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._last: dict[_Key, tuple[float, int]] = {}  # kind -> (when let through, held)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self.every_s:
            self._last[key] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} ({seen[1]} more like it in the last {now - seen[0]:.0f} s)"
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = (now, 0)
        return True


def hold_back_repeats(logger: logging.Logger | None = None, every_s: float = 10.0) -> None:
    """Put a `RepeatFilter` on every handler of `logger` (default: the root logger)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter(every_s))


def setup(level: str | int = "INFO", every_s: float = 10.0) -> None:
    """Log to stderr at `level`, with repeated warnings held back.

    Where logging is configured already (an embedding program, a test runner),
    its handlers are left as they are, as `logging.basicConfig` does.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    hold_back_repeats(root, every_s)

"""Which raw offsets the worker may bill: exactness must not depend on Faust delivering every one.

Offsets in `<prefix>.raw` are contiguous: the topic is neither compacted nor
written in transactions, so every offset holds a message. Faust 0.15.3 can fail
to hand the worker some of them after a restart or a rebalance, and it treats a
missing offset as a gap it may commit past (meant for compacted topics). Billing
the messages after such a hole would move the ledger on (a delta node's later
epochs, a cumulative node's later seq) before the skipped message is billed, and
committing past it would lose it.

`OffsetGuard` keeps, per partition, the next offset the worker must handle. A
message at that offset is handled. A message further on means a hole: the
worker neither bills nor acknowledges it, and rewinds the partition to the
hole; until the hole's message arrives, later messages are skipped the same way
(they come again after the rewind). A message before it was handled already and
is handled again: billing is idempotent, and acknowledging it keeps Faust's
commits going whatever it redelivers.

>>> guard = OffsetGuard(retry_s=5.0)
>>> guard.assign(0, 10)                 # the partition's committed offset is 10
>>> guard.check(0, 10, now=0.0), guard.check(0, 11, now=0.0)
('handle', 'handle')
>>> guard.check(0, 14, now=1.0)         # 12 and 13 never arrived
'rewind'
>>> guard.expected(0)
12
>>> guard.check(0, 15, now=2.0)         # fetched before the rewind took effect
'skip'
>>> guard.check(0, 16, now=7.0)         # still no 12 after retry_s: rewind again
'rewind'
>>> [guard.check(0, offset, now=8.0) for offset in (12, 13, 14, 11)]
['handle', 'handle', 'handle', 'handle']
>>> guard.expected(0)
15
>>> guard.holes, guard.stuck(now=8.0, limit_s=60.0)
(1, [])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Verdict = Literal["handle", "skip", "rewind"]


@dataclass(slots=True)
class OffsetGuard:
    """Per raw partition, the next offset to handle; see the module docstring."""

    retry_s: float = 5.0
    holes: int = 0  # holes found since start, for the status line
    _next: dict[int, int] = field(default_factory=dict)
    _rewound_at: dict[int, float] = field(default_factory=dict)
    _hole_since: dict[int, float] = field(default_factory=dict)

    def assign(self, partition: int, offset: int) -> None:
        """The partition is ours from `offset` on (its committed offset, or the log start)."""
        self._next[partition] = offset
        self._rewound_at.pop(partition, None)
        self._hole_since.pop(partition, None)

    def forget_all(self) -> None:
        """A rebalance: every partition starts again from its committed offset."""
        self._next.clear()
        self._rewound_at.clear()
        self._hole_since.clear()

    def knows(self, partition: int) -> bool:
        """True once `assign` gave the partition's starting offset."""
        return partition in self._next

    def expected(self, partition: int) -> int:
        """The next offset the worker must handle in the partition."""
        return self._next[partition]

    def check(self, partition: int, offset: int, now: float) -> Verdict:
        """What to do with the message at `offset`.

        `handle`: bill and acknowledge it. `skip`: neither bill nor acknowledge
        it. `rewind`: skip it too, and seek the partition back to `expected()`.
        """
        expected = self._next[partition]
        if offset == expected:
            self._next[partition] = offset + 1
            if self._rewound_at:
                self._rewound_at.pop(partition, None)
                self._hole_since.pop(partition, None)
            return "handle"
        if offset < expected:
            return "handle"  # a redelivery: billing it again changes nothing
        rewound = self._rewound_at.get(partition)
        if rewound is not None and now - rewound < self.retry_s:
            return "skip"
        if rewound is None:
            self.holes += 1
            self._hole_since[partition] = now
        self._rewound_at[partition] = now
        return "rewind"

    def stuck(self, now: float, limit_s: float) -> list[int]:
        """Partitions whose hole rewinding has not filled for `limit_s` seconds."""
        return [p for p, since in self._hole_since.items() if now - since >= limit_s]

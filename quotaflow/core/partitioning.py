"""Which partition owns a user, and how a report is cut into per-partition fragments.

Every reading of a user lands in the partition that owns the user, so the user's
ledger state and totals live in one place. The owner is chosen exactly
as Kafka's default partitioner places a record keyed by the user id (murmur2), so
any Kafka tool agrees with quotaflow about it.

>>> partition_of("alice", 4), partition_of("bob", 4)
(1, 2)
"""

from __future__ import annotations

from quotaflow.core.contracts import Counter, CounterReport

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 hash (seed 0x9747b28c), as a signed int like Java's."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    tail = length & ~3
    for i in range(0, tail, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


class Owners(dict[str, int]):
    """User id -> the partition that owns it among `partitions`, computed once per user.

    A lookup of a known user is a plain dict lookup, with no Python call: the hot
    path's routing check looks up every reading.

    >>> owners = Owners(4)
    >>> owners["alice"], owners["bob"], len(owners)
    (1, 2, 2)
    """

    __slots__ = ("partitions",)
    MAX_USERS = 1 << 21  # then it starts again, so that it cannot grow without bound

    def __init__(self, partitions: int) -> None:
        super().__init__()
        self.partitions = partitions

    def __missing__(self, user_id: str) -> int:
        if len(self) >= self.MAX_USERS:
            self.clear()
        found = self[user_id] = (murmur2(user_id.encode()) & 0x7FFFFFFF) % self.partitions
        return found


_owners: dict[int, Owners] = {}


def owners(partitions: int) -> Owners:
    """The `Owners` of `partitions` partitions, shared by every caller."""
    found = _owners.get(partitions)
    if found is None:
        found = _owners[partitions] = Owners(partitions)
    return found


def partition_of(user_id: str, partitions: int) -> int:
    """The partition that owns `user_id` among `partitions` partitions (memoised)."""
    return owners(partitions)[user_id]


def split_report(report: CounterReport, partitions: int) -> dict[int, CounterReport]:
    """Cut a report into one fragment per partition that owns some of its users.

    A fragment is itself a valid report with the same header. Delta reports get a
    fragment, empty where no user belongs, on every partition: the worker's record
    of billed (epoch, seq) pairs per partition then has no gaps and stays small.
    """
    groups: dict[int, list[Counter]] = {}
    if report.kind == "delta":
        groups = {p: [] for p in range(partitions)}
    for counter in report.counters:
        groups.setdefault(partition_of(counter.user_id, partitions), []).append(counter)
    if not groups:  # an empty cumulative report still says the node is alive
        groups[0] = []
    return {
        p: report.model_copy(update={"counters": tuple(counters)})
        for p, counters in sorted(groups.items())
    }

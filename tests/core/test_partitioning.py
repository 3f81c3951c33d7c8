"""Partitioning agrees with Kafka's default partitioner, and fragments cover a report exactly."""

from __future__ import annotations

from collections import Counter as Multiset
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner.default import murmur2 as kafka_murmur2

from quotaflow.core.contracts import Counter, CounterReport, identifier_problem
from quotaflow.core.partitioning import murmur2, partition_of, split_report

SETTINGS = settings(max_examples=300, deadline=None)


def kafka_partition(key: bytes, partitions: int) -> int:
    """What kafka-python's DefaultPartitioner picks for a keyed record."""
    return (kafka_murmur2(key) & 0x7FFFFFFF) % partitions


@SETTINGS
@given(st.binary(max_size=64))
def test_murmur2_equals_kafka_python(data: bytes) -> None:
    ours = murmur2(data)
    assert -(2**31) <= ours < 2**31
    assert ours & 0xFFFFFFFF == kafka_murmur2(data)


def test_murmur2_known_values() -> None:
    # Values from Kafka's own test suite (org.apache.kafka.common.utils.UtilsTest).
    assert murmur2(b"21") == -973932308
    assert murmur2(b"foobar") == -790332482
    assert murmur2(b"a-little-bit-long-string") == -985981536
    assert murmur2(b"a-little-bit-longer-string") == -1486304829
    assert murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") == -58897971
    assert murmur2(b"abc") == 479470107


@SETTINGS
@given(st.text(min_size=1, max_size=40), st.integers(min_value=1, max_value=64))
def test_partition_of_equals_kafka(user_id: str, partitions: int) -> None:
    assert partition_of(user_id, partitions) == kafka_partition(user_id.encode(), partitions)


users = st.lists(
    st.text(min_size=1, max_size=12).filter(lambda u: identifier_problem(u) is None),
    unique=True, max_size=12,
)


def make_report(kind: str, user_ids: list[str], baseline: bool = False) -> CounterReport:
    return CounterReport(
        node_id="node-a", epoch=3, seq=7, kind=kind, baseline=baseline,
        observed_at=datetime(2026, 5, 1, 12, tzinfo=UTC),
        counters=tuple(
            Counter(user_id=u, up=i, down=2 * i + 1) for i, u in enumerate(user_ids)
        ),
    )


@SETTINGS
@given(users, st.integers(min_value=1, max_value=12), st.sampled_from(["cumulative", "delta"]),
       st.booleans())
def test_split_covers_every_counter_once(
    user_ids: list[str], partitions: int, kind: str, baseline: bool
) -> None:
    report = make_report(kind, user_ids, baseline)
    fragments = split_report(report, partitions)
    assert fragments, "every report yields at least one fragment"
    seen: Multiset[Counter] = Multiset()
    for p, fragment in fragments.items():
        assert 0 <= p < partitions
        # Same header, only the counters differ; still a valid report.
        assert fragment.model_dump(exclude={"counters"}) == report.model_dump(exclude={"counters"})
        CounterReport.model_validate(fragment.model_dump())
        for counter in fragment.counters:
            assert partition_of(counter.user_id, partitions) == p
        seen.update(fragment.counters)
    assert seen == Multiset(report.counters)
    if kind == "delta":
        assert sorted(fragments) == list(range(partitions))
    elif user_ids:
        assert all(fragment.counters for fragment in fragments.values())
        assert set(fragments) == {partition_of(u, partitions) for u in user_ids}
    else:
        assert list(fragments) == [0]  # an empty cumulative report still reaches one partition


def test_split_keeps_counter_order_within_fragment() -> None:
    ids = [f"user-{i}" for i in range(30)]
    report = make_report("cumulative", ids)
    for fragment in split_report(report, 4).values():
        got = [c.user_id for c in fragment.counters]
        assert got == [u for u in ids if u in got]


def test_delta_fragments_on_every_partition_even_when_empty() -> None:
    report = make_report("delta", ["alice"])
    fragments = split_report(report, 5)
    assert sorted(fragments) == [0, 1, 2, 3, 4]
    owner = partition_of("alice", 5)
    for p, fragment in fragments.items():
        assert (len(fragment.counters) == 1) == (p == owner)
        assert (fragment.epoch, fragment.seq, fragment.kind) == (3, 7, "delta")
    assert list(split_report(make_report("delta", []), 3)) == [0, 1, 2]

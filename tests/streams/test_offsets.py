"""OffsetGuard against a flaky deliverer: whatever Faust drops, nothing is billed past a hole."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.streams.offsets import OffsetGuard


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 60),
    start=st.integers(0, 5),
    drops=st.lists(st.booleans(), max_size=200),
)
def test_handles_every_offset_once_in_order_whatever_is_dropped(
    size: int, start: int, drops: list[bool]
) -> None:
    """A deliverer that drops messages at will (as Faust did after restarts) and re-reads
    from wherever the guard rewinds it: the handled offsets are start..end, in order."""
    guard = OffsetGuard(retry_s=1.0)
    guard.assign(0, start)
    end = start + size
    position, now, handled, step = start, 0.0, [], 0
    while step < 10_000:
        if position >= end:  # nothing more arrives: the idle check rewinds to the hole
            if guard.expected(0) >= end:
                break
            position = guard.expected(0)
        dropped = drops[step % len(drops)] if drops and step < 5 * len(drops) else False
        step += 1
        now += 0.3
        if dropped:
            position += 1  # Faust never hands this offset over
            continue
        verdict = guard.check(0, position, now)
        if verdict == "handle":
            handled.append(position)
            position += 1
        elif verdict == "rewind":
            position = guard.expected(0)
        else:
            position += 1
    assert handled == list(range(start, end))


def test_a_redelivery_after_a_rebalance_is_handled_again() -> None:
    guard = OffsetGuard()
    guard.assign(3, 100)
    assert [guard.check(3, o, 0.0) for o in (100, 101, 102)] == ["handle"] * 3
    guard.forget_all()  # a rebalance; the commit was at 101
    guard.assign(3, 101)
    assert [guard.check(3, o, 1.0) for o in (101, 102, 103)] == ["handle"] * 3
    assert guard.holes == 0


def test_a_hole_that_never_fills_is_reported_stuck() -> None:
    guard = OffsetGuard(retry_s=5.0)
    guard.assign(0, 0)
    assert guard.check(0, 2, now=0.0) == "rewind"
    assert guard.stuck(now=59.0, limit_s=60.0) == []
    assert guard.check(0, 2, now=6.0) == "rewind"  # still missing: the hole dates from 0.0
    assert guard.stuck(now=61.0, limit_s=60.0) == [0]
    assert guard.check(0, 0, now=62.0) == "handle"
    assert guard.stuck(now=63.0, limit_s=60.0) == []

"""The outbox: order, acks, restart survival, and compaction that bills exactly the same."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotaflow.core.contracts import Counter, CounterReport
from quotaflow.core.ledger import BillingPolicy, NodeLedger
from quotaflow.producers.outbox import Outbox, OutboxLocked, OutboxUnusable, outbox_broken

POLICY = BillingPolicy(timezone=ZoneInfo("UTC"))
T0 = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)


def _counters(**users: tuple[int, int]) -> list[Counter]:
    return [Counter(user_id=u, up=a, down=b) for u, (a, b) in users.items()]


def _bill(reports: list[CounterReport]) -> dict[tuple[str, str, int], int]:
    """(node, user, day-start) -> up*1e12+down... kept as two keys, summed over reports."""
    ledgers: dict[str, NodeLedger] = {}
    out: dict[tuple[str, str, int], int] = defaultdict(int)
    for report in reports:
        ledger = ledgers.setdefault(report.node_id, NodeLedger(report.node_id))
        billing = ledger.update(report, POLICY)
        assert not billing.refused
        day = int(report.observed_at.timestamp()) // 86400
        for user, up, down in billing.billed:
            out[(report.node_id, f"{user}/up", day)] += up
            out[(report.node_id, f"{user}/down", day)] += down
    return {k: v for k, v in out.items() if v}


def test_order_ack_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        for i in range(5):
            box.record(node_id="n1", epoch=7, observed_at=T0, counters=_counters(a=(i, i)))
        assert box.last_seq("n1", 7) == 4
        ids = [i for i, _ in box.pending()]
        assert [r.seq for _, r in box.pending()] == [0, 1, 2, 3, 4]
        box.ack(ids[:2])
        assert [r.seq for _, r in box.pending(2)] == [2, 3]
        box.set_state("collector", {"x": 1})
        with pytest.raises(OutboxLocked):
            Outbox(path)
    with Outbox(path) as box:  # restart: pending, seq and state survive
        assert len(box) == 3
        assert [r.seq for _, r in box.pending()] == [2, 3, 4]
        assert box.next_seq("n1", 7) == 5
        assert box.next_seq("n1", 8) == 0
        assert box.last_epoch("n1") == 8
        assert box.get_state("collector") == {"x": 1}
        report = CounterReport(node_id="n2", epoch=1, seq=41, observed_at=T0)
        box.put(report)
        assert box.next_seq("n2", 1) == 42


def test_heads_one_per_node(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        for node in ("a", "b", "a", "c", "b"):
            box.record(node_id=node, epoch=1, observed_at=T0, counters=[])
        assert [(r.node_id, r.seq) for _, r in box.heads()] == [("a", 0), ("b", 0), ("c", 0)]
        box.ack([box.heads()[0][0]])
        assert [(r.node_id, r.seq) for _, r in box.heads()] == [("b", 0), ("a", 1), ("c", 0)]


def test_marks_are_used_once_and_forgotten(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        box.mark("p:abc", 1000.0, 120.0)
        assert box.take_mark("p:abc", 1100.0, 120.0)
        assert not box.take_mark("p:abc", 1101.0, 120.0)  # used up
        box.mark("p:abc", 1000.0, 120.0)
        assert not box.take_mark("p:abc", 1121.0, 120.0)  # too old
        box.mark("p:old", 1000.0, 120.0)
        box.mark("p:new", 1200.0, 120.0)  # forgets what is older than 120 s
        assert not box.take_mark("p:old", 1000.0, 1e9)


def test_a_held_push_becomes_a_report_or_goes(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        first = box.hold("vmess-1", b'{"1": [1, 2]}', 1000.0)
        second = box.hold("vmess-1", b'{"1": [3, 4]}', 1001.0)
        assert len(box) == 0 and box.heads() == []  # not reports: the sender sees none
        report = box.record(node_id="vmess-1", epoch=1, observed_at=T0, kind="delta",
                            counters=_counters(a=(1, 2)), release=first)
        assert report.seq == 0 and len(box) == 1
        with pytest.raises(KeyError):  # released once only, and the report is not stored
            box.record(node_id="vmess-1", epoch=1, observed_at=T0, kind="delta",
                       counters=_counters(a=(1, 2)), release=first)
        assert len(box) == 1 and box.last_seq("vmess-1", 1) == 0
        assert box.drop_held(second) == [("vmess-1", 1001.0, 13)]
        assert box.drop_held() == []


def test_compaction_is_logged_and_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Outbox(tmp_path / "o.db", max_reports=10) as box, caplog.at_level(logging.WARNING):
        for i in range(40):
            box.record(node_id="n", epoch=1, observed_at=T0 + timedelta(seconds=i),
                       counters=_counters(a=(i, 2 * i)))
        assert box.compactions >= 1
        assert len(box) <= 10
        assert "more than its bound" in caplog.text
        seqs = [r.seq for _, r in box.pending()]
        assert seqs == list(range(len(seqs)))  # renumbered, gap-free
        assert box.last_seq("n", 1) == seqs[-1]
        assert box.next_seq("n", 1) == seqs[-1] + 1


def test_in_flight_reports_are_never_merged(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        for i in range(6):
            box.record(node_id="n", epoch=1, observed_at=T0, counters=_counters(a=(0, i)),
                       kind="delta")
        sent = [i for i, _ in box.pending(2)]
        box.mark_in_flight(sent)
        box.compact()
        pending = box.pending()
        assert [i for i, _ in pending[:2]] == sent
        assert [(r.seq, r.counters[0].down) for _, r in pending] == [(0, 0), (1, 1), (2, 14)]


# ------------------------------------------------------------------ property tests

_PROPERTY = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_reading = st.tuples(st.integers(0, 50), st.integers(0, 50))


@st.composite
def _cumulative_history(draw: st.DrawFn) -> list[tuple[int, int, dict[str, tuple[int, int]]]]:
    """(epoch, seconds, {user: (up, down)}) per report: counters grow, sometimes drop or restart."""
    out: list[tuple[int, int, dict[str, tuple[int, int]]]] = []
    epoch, t = 1, 0
    current: dict[str, tuple[int, int]] = {}
    for _ in range(draw(st.integers(1, 30))):
        event = draw(st.sampled_from(["grow", "grow", "grow", "drop", "restart"]))
        if event == "restart":
            epoch += 1
            current = {}
        t += draw(st.sampled_from([1, 60, 500, 3000]))
        for user in draw(st.lists(st.sampled_from("abcd"), unique=True, max_size=4)):
            up, down = current.get(user, (0, 0))
            du, dd = draw(_reading)
            current[user] = (du, dd) if event == "drop" else (up + du, down + dd)
        out.append((epoch, t, dict(current)))
    return out


@_PROPERTY
@given(history=_cumulative_history(), in_flight=st.integers(0, 3), baseline=st.booleans())
def test_cumulative_compaction_bills_the_same(
    tmp_path_factory: pytest.TempPathFactory,
    history: list[tuple[int, int, dict[str, tuple[int, int]]]],
    in_flight: int,
    baseline: bool,
) -> None:
    with Outbox(tmp_path_factory.mktemp("o") / "o.db") as box:
        for n, (epoch, t, users) in enumerate(history):
            box.record(node_id="n", epoch=epoch, observed_at=T0 + timedelta(seconds=t),
                       counters=_counters(**users), baseline=baseline and n == 0)
        before = [r for _, r in box.pending()]
        box.mark_in_flight([i for i, _ in box.pending(in_flight)])
        box.compact()
        after = [r for _, r in box.pending()]
        assert len(after) <= len(before)
        assert _bill(after) == _bill(before)
        # Every (epoch, seq) on the wire is unique and rises in send order.
        keys = [(r.epoch, r.seq) for r in after]
        assert keys == sorted(set(keys))


@_PROPERTY
@given(
    deltas=st.lists(
        st.tuples(st.integers(1, 2), st.sampled_from([1, 30, 900]),
                  st.dictionaries(st.sampled_from("abc"), _reading, max_size=3)),
        min_size=1, max_size=30,
    ),
    in_flight=st.integers(0, 3),
    acked=st.integers(0, 3),
)
def test_delta_compaction_is_exact_and_gap_free(
    tmp_path_factory: pytest.TempPathFactory,
    deltas: list[tuple[int, int, dict[str, tuple[int, int]]]],
    in_flight: int,
    acked: int,
) -> None:
    with Outbox(tmp_path_factory.mktemp("o") / "o.db", max_merged_bytes=60) as box:
        delivered: list[CounterReport] = []
        epoch, t = 1, 0
        for bump, dt, users in deltas:
            epoch = max(epoch, bump)
            t += dt
            box.record(node_id="p", epoch=epoch, observed_at=T0 + timedelta(seconds=t),
                       counters=_counters(**users), kind="delta")
        everything = [r for _, r in box.pending()]
        done = box.pending(acked)  # delivered and acked before the outage
        delivered += [r for _, r in done]
        box.ack([i for i, _ in done])
        flying = box.pending(in_flight)  # handed to Kafka, fate unknown: delivered twice here
        box.mark_in_flight([i for i, _ in flying])
        delivered += [r for _, r in flying]
        box.compact()
        after = [r for _, r in box.pending()]
        assert _bill(delivered + after) == _bill(everything)
        seqs: dict[int, list[int]] = defaultdict(list)
        for r in [r for _, r in done] + after:
            seqs[r.epoch].append(r.seq)
        for got in seqs.values():
            assert got == list(range(got[0], got[0] + len(got)))


# --------------------------------------------------------------------------- identity


def _fill(path: Path, reports: int = 1, users: int = 1) -> None:
    with Outbox(path) as box:
        for i in range(reports):
            box.record(node_id="n1", epoch=7, observed_at=T0,
                       counters=[Counter(user_id=f"u{k}", up=i, down=i) for k in range(users)])


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_first_start_leaves_a_marker_and_a_lost_outbox_refuses_to_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 2: a missing or empty outbox where one existed is not a first start."""
    path = tmp_path / "o.db"
    _fill(path)
    marker = Path(f"{path}.id")
    first_id = marker.read_text().strip()
    assert first_id
    with Outbox(path) as box:  # a restart: the same outbox, nothing to say
        assert len(box) == 1 and box.outbox_id == first_id and box.reset_at is None
    for lose in ("delete", "truncate to zero"):
        _remove(path)
        if lose == "truncate to zero":
            path.write_bytes(b"")
        with pytest.raises(OutboxUnusable) as refused:
            Outbox(path)
        message = str(refused.value)
        assert str(path) in message and "--reset-outbox" in message
        assert "not billed" in message and "baseline" in message
        assert not path.exists() or path.stat().st_size == 0  # nothing was created
        with caplog.at_level(logging.WARNING), Outbox(path, reset=True) as box:
            assert len(box) == 0 and box.reset_at is not None
            assert box.outbox_id != first_id
            assert box.outbox_id == marker.read_text().strip()
            box.record(node_id="n1", epoch=7, observed_at=T0, counters=[])
        assert "--reset-outbox" in caplog.text and "not billed" in caplog.text
        with Outbox(path) as box:  # and from now on it starts as usual
            assert len(box) == 1 and box.reset_at is not None
        first_id = marker.read_text().strip()


def _corrupt_garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def _corrupt_truncated(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("corrupt", [_corrupt_garbage, _corrupt_truncated])
def test_a_corrupt_outbox_names_the_file_and_the_flag(tmp_path: Path, corrupt: object) -> None:
    path = tmp_path / "o.db"
    _fill(path, reports=300, users=50)
    assert callable(corrupt)
    corrupt(path)
    with pytest.raises(OutboxUnusable) as refused:
        Outbox(path)
    assert str(path) in str(refused.value) and "--reset-outbox" in str(refused.value)
    broken = path.read_bytes()
    with Outbox(path, reset=True) as box:
        assert len(box) == 0 and box.reset_at is not None
    kept = [p for p in tmp_path.iterdir() if ".broken-" in p.name and not p.name.endswith(
        ("-wal", "-shm"))]
    assert len(kept) == 1 and kept[0].read_bytes() == broken  # moved aside, never deleted
    with Outbox(path), pytest.raises(OutboxLocked):  # the lock is still one process's
        Outbox(path)


def test_reset_of_a_sound_outbox_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    _fill(path, reports=3)
    with Outbox(path, reset=True) as box:
        assert len(box) == 3 and box.reset_at is None


def test_an_outbox_from_before_markers_gets_one(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    _fill(path, reports=2)
    Path(f"{path}.id").unlink()
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM state")  # no id inside either: an old outbox
    with Outbox(path) as box:
        assert len(box) == 2
        assert Path(f"{path}.id").read_text().strip() == box.outbox_id


def test_an_outbox_that_is_not_the_marked_one_refuses(tmp_path: Path) -> None:
    path, other = tmp_path / "o.db", tmp_path / "other" / "o.db"
    _fill(path)
    _fill(other)
    _remove(path)
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{other}{suffix}").exists():
            os.replace(f"{other}{suffix}", f"{path}{suffix}")
    with pytest.raises(OutboxUnusable, match="--reset-outbox"):
        Outbox(path)


def test_first_seq_of_an_epoch(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        seqs = [
            box.record(node_id="n", epoch=e, observed_at=T0, counters=[], first_seq=1000 * e)
            for e in (1, 1, 2)
        ]
        assert [(r.epoch, r.seq) for r in seqs if r is not None] == [
            (1, 1000), (1, 1001), (2, 2000),
        ]


def test_outbox_broken_tells_corruption_from_a_full_disk(tmp_path: Path) -> None:
    garbage = tmp_path / "g.db"
    garbage.write_bytes(b"x" * 4096)
    with pytest.raises(sqlite3.DatabaseError) as caught:
        sqlite3.connect(garbage).execute("SELECT * FROM sqlite_master")
    assert outbox_broken(caught.value)
    assert not outbox_broken(sqlite3.OperationalError("database or disk is full"))
    assert not outbox_broken(ValueError("x"))

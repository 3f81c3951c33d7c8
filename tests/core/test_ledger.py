"""The billing rules of `NodeLedger`: one small test per rule, then property tests
against an independent reference implementation of the rules."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.core.contracts import Counter, CounterReport, TotalsBatch
from quotaflow.core.ledger import Billing, BillingPolicy, NodeLedger
from quotaflow.core.partitioning import split_report
from quotaflow.core.periods import Calendar

BERLIN = ZoneInfo("Europe/Berlin")
POLICY = BillingPolicy(timezone=BERLIN)
T0 = datetime(2026, 5, 12, 10, 0, tzinfo=UTC)  # 12:00 in Berlin


def report(
    seq: int,
    *counters: tuple[str, int, int],
    epoch: int = 1,
    at: datetime | None = None,
    kind: str = "cumulative",
    baseline: bool = False,
    node: str = "node-a",
) -> CounterReport:
    return CounterReport(
        node_id=node, epoch=epoch, seq=seq, kind=kind, baseline=baseline,  # type: ignore[arg-type]
        observed_at=at if at is not None else T0 + timedelta(minutes=seq),
        counters=tuple(Counter(user_id=u, up=up, down=down) for u, up, down in counters),
    )


def delta(seq: int, *counters: tuple[str, int, int], epoch: int = 1, **kw: object) -> CounterReport:
    return report(seq, *counters, epoch=epoch, kind="delta", **kw)  # type: ignore[arg-type]


def unix(at: datetime) -> int:
    return int(at.timestamp())


def emitted(billing: Billing) -> list[tuple[str, str, int, int, int]]:
    """The totals an update emitted, as (user, period, start, up, down) rows."""
    out: list[tuple[str, str, int, int, int]] = []
    for user, day_up, day_down, month_up, month_down, *_ in billing.totals:
        out.append((user, "day", billing.day, day_up, day_down))
        out.append((user, "month", billing.month, month_up, month_down))
    return out


# --- cumulative rules ---------------------------------------------------------------------


def test_first_report_bills_counters_as_they_are() -> None:
    ledger = NodeLedger("node-a")
    billing = ledger.update(report(5, ("alice", 100, 1000), ("bob", 0, 7)), POLICY)
    assert billing.billed == [("alice", 100, 1000), ("bob", 0, 7)]
    assert not billing.refused and not billing.duplicate


def test_baseline_records_then_growth_is_billed() -> None:
    ledger = NodeLedger("node-a")
    first = ledger.update(report(1, ("alice", 5000, 90000), baseline=True), POLICY)
    assert first.billed == [] and first.refused == []
    assert ledger.update(report(2, ("alice", 5100, 90050)), POLICY).billed == [("alice", 100, 50)]
    # A user the baseline did not name is billed from zero.
    assert ledger.update(report(3, ("alice", 5100, 90050), ("bob", 3, 4)), POLICY).billed == [
        ("bob", 3, 4)
    ]


def test_duplicate_report_is_ignored() -> None:
    ledger = NodeLedger("node-a")
    ledger.update(report(1, ("alice", 100, 200)), POLICY)
    again = ledger.update(report(1, ("alice", 100, 200)), POLICY)
    assert again.billed == [] and again.refused == []
    assert ledger.total("alice", "day", Calendar(BERLIN).day_start(unix(T0))) == (100, 200)
    # The same (epoch, seq) is a duplicate even if its counters differ.
    assert ledger.update(report(1, ("alice", 150, 900)), POLICY).billed == []
    assert ledger.update(report(2, ("alice", 160, 210)), POLICY).billed == [("alice", 60, 10)]


def test_stale_seq_is_ignored() -> None:
    ledger = NodeLedger("node-a")
    ledger.update(report(1, ("alice", 100, 100)), POLICY)
    ledger.update(report(3, ("alice", 300, 300)), POLICY)
    # seq 2 arrives late, even with different numbers: ignored.
    assert ledger.update(report(2, ("alice", 250, 999)), POLICY).billed == []
    # The next one is billed against seq 3, not seq 2.
    assert ledger.update(report(4, ("alice", 310, 320)), POLICY).billed == [("alice", 10, 20)]


def test_older_epoch_after_newer_is_ignored() -> None:
    ledger = NodeLedger("node-a")
    ledger.update(report(9, ("alice", 100, 100), epoch=1), POLICY)
    ledger.update(report(1, ("alice", 10, 10), epoch=2), POLICY)
    # epoch 1, even with a higher seq and bigger counters, is from before the restart.
    assert ledger.update(report(10, ("alice", 500, 500), epoch=1), POLICY).billed == []
    assert ledger.update(report(2, ("alice", 15, 11), epoch=2), POLICY).billed == [("alice", 5, 1)]


def test_restart_newer_epoch_bills_as_is() -> None:
    ledger = NodeLedger("node-a")
    ledger.update(report(7, ("alice", 1000, 2000), epoch=1), POLICY)
    # Counters restarted: smaller or bigger, they are billed as they are; seq may restart.
    assert ledger.update(report(0, ("alice", 30, 4000), epoch=2), POLICY).billed == [
        ("alice", 30, 4000)
    ]
    assert ledger.update(report(1, ("alice", 40, 4000), epoch=2), POLICY).billed == [
        ("alice", 10, 0)
    ]


def test_counter_went_down_in_one_direction_only() -> None:
    ledger = NodeLedger("node-a")
    ledger.update(report(1, ("alice", 100, 1000)), POLICY)
    # up restarted (100 -> 30: bill 30), down kept counting (1000 -> 1500: bill 500).
    assert ledger.update(report(2, ("alice", 30, 1500)), POLICY).billed == [("alice", 30, 500)]
    assert ledger.update(report(3, ("alice", 35, 20)), POLICY).billed == [("alice", 5, 20)]


def test_unchanged_counters_bill_nothing() -> None:
    ledger = NodeLedger("node-a")
    ledger.update(report(1, ("alice", 100, 1000)), POLICY)
    billing = ledger.update(report(2, ("alice", 100, 1000)), POLICY)
    assert billing.billed == [] and billing.refused == []
    assert [(period, up, down) for _, period, _, up, down in emitted(billing)] == [
        ("day", 100, 1000), ("month", 100, 1000)
    ]


def test_users_have_independent_state() -> None:
    ledger = NodeLedger("node-a")
    ledger.update(report(1, ("alice", 100, 100)), POLICY)
    ledger.update(report(2, ("bob", 50, 50)), POLICY)
    # alice's last state is seq 1, bob's is seq 2: a seq-2 duplicate still carries alice news.
    billing = ledger.update(report(2, ("alice", 150, 100), ("bob", 50, 50)), POLICY)
    assert billing.billed == [("alice", 50, 0)]


# --- delta reports ------------------------------------------------------------------------


def test_delta_duplicate_is_ignored() -> None:
    ledger = NodeLedger("node-a")
    assert ledger.update(delta(1, ("alice", 10, 20)), POLICY).billed == [("alice", 10, 20)]
    again = ledger.update(delta(1, ("alice", 10, 20)), POLICY)
    assert again.billed == [] and again.duplicate


def test_delta_out_of_order_each_billed_once() -> None:
    ledger = NodeLedger("node-a")
    billed = []
    for seq in (3, 1, 5, 2, 1, 4, 3, 0, 5):
        billed += ledger.update(delta(seq, ("alice", seq + 1, 10 * (seq + 1))), POLICY).billed
    assert sorted(billed) == [("alice", s + 1, 10 * (s + 1)) for s in range(6)]


def test_delta_across_epochs() -> None:
    ledger = NodeLedger("node-a")
    assert ledger.update(delta(1, ("alice", 1, 1), epoch=1), POLICY).billed == [("alice", 1, 1)]
    # The same seq in another epoch is another report.
    assert ledger.update(delta(1, ("alice", 2, 2), epoch=2), POLICY).billed == [("alice", 2, 2)]
    # An older epoch's new seq still counts; its repeat does not.
    assert ledger.update(delta(2, ("alice", 3, 3), epoch=1), POLICY).billed == [("alice", 3, 3)]
    assert ledger.update(delta(1, ("alice", 1, 1), epoch=1), POLICY).duplicate


def test_delta_baseline_is_recorded_not_billed() -> None:
    ledger = NodeLedger("node-a")
    assert ledger.update(delta(1, ("alice", 10, 10), baseline=True), POLICY).billed == []
    assert ledger.update(delta(1, ("alice", 10, 10)), POLICY).duplicate


def test_delta_seqs_are_kept_for_the_lateness_window_however_many_epochs_pass() -> None:
    """A redelivered delta fragment of an old epoch must be a duplicate, not billed again
    nor dead-lettered as unbilled, as long as it could still be billed at all."""
    ledger = NodeLedger("node-a")
    for epoch in range(1, 40):  # a node that restarts very often
        ledger.update(delta(1, ("alice", 1, 1), epoch=epoch), POLICY)
    again = ledger.update(delta(1, ("alice", 1, 1), epoch=1), POLICY)
    assert again.duplicate and again.billed == [] and again.refused == []


def test_delta_epoch_seen_before_the_lateness_window_is_set_aside_without_readings() -> None:
    """Once the window has moved past an epoch, its seqs are gone: a report of it may or may
    not have been billed, so its dead letter lists no readings (nobody bills them twice)."""
    ledger = NodeLedger("node-a")
    assert ledger.update(delta(1, ("alice", 5, 5), epoch=1, at=T0), POLICY).billed
    later = T0 + timedelta(days=POLICY.lateness_days + 2)
    ledger.update(delta(1, ("bob", 1, 1), epoch=2, at=later), POLICY)
    redelivered = ledger.update(delta(1, ("alice", 5, 5), epoch=1, at=T0), POLICY)
    assert redelivered.billed == [] and redelivered.refused == []
    assert redelivered.set_aside is not None and redelivered.set_aside[0] == "stale-epoch"
    # A new seq of a known epoch that is late was never billed: listed as late.
    ledger.update(delta(2, ("bob", 1, 1), epoch=2, at=later), POLICY)
    late = ledger.update(delta(3, ("bob", 7, 8), epoch=2, at=T0), POLICY)
    assert [(r.reason, r.up, r.down) for r in late.refused] == [("late", 7, 8)]


def test_a_cumulative_seq_that_goes_back_with_higher_counters_is_flagged() -> None:
    """A node reinstalled without its outbox restarts seq in the same epoch."""
    ledger = NodeLedger("node-a")
    ledger.update(report(500, ("alice", 100, 100)), POLICY)
    plain_retry = ledger.update(report(499, ("alice", 90, 90)), POLICY)
    assert not plain_retry.seq_went_back and plain_retry.billed == []
    reinstalled = ledger.update(report(0, ("alice", 150, 100)), POLICY)
    assert reinstalled.seq_went_back and reinstalled.billed == []


def test_old_ledger_records_without_last_seen_still_load() -> None:
    ledger = NodeLedger("node-a")
    ledger.update(delta(1, ("alice", 1, 1)), POLICY)
    record = orjson.loads(ledger.to_bytes())
    record["deltas"] = {e: v[:2] for e, v in record["deltas"].items()}
    loaded = NodeLedger.from_bytes(orjson.dumps(record))
    assert loaded.update(delta(1, ("alice", 1, 1)), POLICY).duplicate


def test_records_with_every_total_as_four_numbers_still_load() -> None:
    """Records written before a total billed alike was (up, down) hold (up, down, up, down)."""
    straight = NodeLedger("node-a")
    straight.update(report(1, ("alice", 100, 200), ("bob", 5, 6)), POLICY)
    straight.update(report(2, ("bob", 9, 9)), POLICY, rate=15_000)
    record = orjson.loads(straight.to_bytes())
    day = next(iter(record["totals"]["day"].values()))
    assert day == {"alice": [100, 200], "bob": [9, 9, 11, 10]}  # alice: billed alike
    for starts in record["totals"].values():
        for users in starts.values():
            for user, total in users.items():
                users[user] = total * 2 if len(total) == 2 else total
    old = NodeLedger.from_bytes(orjson.dumps(record))
    assert old.to_bytes() == straight.to_bytes()
    more = report(3, ("alice", 160, 270), ("bob", 10, 10))
    assert outcome(old.update(more, POLICY)) == outcome(straight.update(more, POLICY))
    assert old.to_bytes() == straight.to_bytes()


def test_a_loaded_ledger_shares_what_a_reports_users_share() -> None:
    ledger = NodeLedger("node-a")
    ledger.update(report(10**6, ("alice", 10**6, 10**7), ("bob", 10**6, 10**7),
                         epoch=1_700_000_000_000), POLICY)
    loaded = NodeLedger.from_bytes(ledger.to_bytes())
    alice, bob = loaded.users["alice"], loaded.users["bob"]
    assert alice == bob == ledger.users["alice"]
    assert alice[0] is bob[0] and alice[1] is bob[1] and alice[4] is bob[4]  # epoch, seq, seen


# --- anomalies and late data --------------------------------------------------------------

SMALL = BillingPolicy(timezone=BERLIN, max_rate_bytes_per_s=1000, min_interval_s=60)


def test_anomaly_refused_and_next_reading_billed_normally() -> None:
    ledger = NodeLedger("node-a")
    t = T0
    assert ledger.update(report(1, ("alice", 1000, 1000), at=t), SMALL).billed == [
        ("alice", 1000, 1000)
    ]
    # 60 s later, 60_001 bytes down: above 1000 B/s * 60 s.
    spike = ledger.update(report(2, ("alice", 1500, 61_001), at=t + timedelta(seconds=60)), SMALL)
    assert spike.billed == []
    assert [(r.reason, r.user_id, r.up, r.down) for r in spike.refused] == [
        ("anomaly", "alice", 500, 60_001)
    ]
    # State advanced: the next reading is billed against the refused one.
    after = ledger.update(report(3, ("alice", 1600, 61_101), at=t + timedelta(seconds=120)), SMALL)
    assert after.billed == [("alice", 100, 100)] and after.refused == []
    day = Calendar(BERLIN).day_start(unix(t))
    assert ledger.total("alice", "day", day) == (1100, 1100)


def test_anomaly_allowance_grows_with_interval() -> None:
    ledger = NodeLedger("node-a")
    ledger.update(report(1, ("alice", 0, 0), at=T0), SMALL)
    # 120 s allows 120_000 bytes; the minimum interval does not apply.
    ok = ledger.update(report(2, ("alice", 120_000, 0), at=T0 + timedelta(seconds=120)), SMALL)
    assert ok.billed == [("alice", 120_000, 0)]
    # 10 s still allows the minimum interval's 60_000, not more.
    ledger.update(report(3, ("alice", 180_000, 0), at=T0 + timedelta(seconds=130)), SMALL)
    bad = ledger.update(report(4, ("alice", 240_001, 0), at=T0 + timedelta(seconds=140)), SMALL)
    assert [r.reason for r in bad.refused] == ["anomaly"] and bad.billed == []


def test_first_report_of_plausible_epoch_uses_time_since_epoch() -> None:
    ledger = NodeLedger("node-a")
    epoch_ms = unix(T0) * 1000 - 1000 * 1000  # the counters started 1000 s before
    ok = ledger.update(report(1, ("alice", 1_000_000, 0), epoch=epoch_ms, at=T0), SMALL)
    assert ok.billed == [("alice", 1_000_000, 0)]
    ledger2 = NodeLedger("node-a")
    bad = ledger2.update(report(1, ("alice", 1_000_001, 0), epoch=epoch_ms, at=T0), SMALL)
    assert [r.reason for r in bad.refused] == ["anomaly"]


def test_delta_anomaly_refused() -> None:
    ledger = NodeLedger("node-a")
    billing = ledger.update(delta(1, ("alice", 60_001, 0), ("bob", 60_000, 0)), SMALL)
    assert billing.billed == [("bob", 60_000, 0)]
    assert [(r.reason, r.user_id) for r in billing.refused] == [("anomaly", "alice")]


def test_late_reading_is_refused() -> None:
    ledger = NodeLedger("node-a")
    now = datetime(2026, 5, 20, 12, tzinfo=UTC)
    ledger.update(report(10, ("alice", 100, 100), at=now, node="node-a"), POLICY)
    cal = Calendar(BERLIN)
    # lateness_days=3: the 17th (local) is still in, the 16th is out.
    old = datetime(2026, 5, 16, 21, 59, 59, tzinfo=UTC)  # 23:59:59 on the 16th in Berlin
    late = ledger.update(delta(1, ("bob", 5, 6), at=old), POLICY)
    assert late.billed == [] and late.totals == []
    assert [(r.reason, r.user_id, r.up, r.down) for r in late.refused] == [("late", "bob", 5, 6)]
    assert ledger.total("bob", "day", cal.day_start(unix(old))) is None
    assert ledger.total("bob", "month", cal.month_start(unix(old))) is None
    in_time = old + timedelta(seconds=1)  # 00:00:00 on the 17th
    ok = ledger.update(delta(2, ("bob", 5, 6), at=in_time), POLICY)
    assert ok.billed == [("bob", 5, 6)] and ok.refused == []
    assert ledger.total("bob", "month", cal.month_start(unix(in_time))) == (5, 6)


# --- period totals ------------------------------------------------------------------------


def test_totals_of_day_and_month() -> None:
    cal = Calendar(BERLIN)
    ledger = NodeLedger("node-a")
    moments = [
        datetime(2026, 5, 30, 12, tzinfo=BERLIN),
        datetime(2026, 5, 31, 23, 59, 59, tzinfo=BERLIN),
        datetime(2026, 6, 1, 0, 0, 0, tzinfo=BERLIN),
        datetime(2026, 6, 1, 9, tzinfo=BERLIN),
    ]
    counters = [(10, 100), (30, 300), (60, 600), (100, 1000)]
    seen = []
    for seq, (at, (up, down)) in enumerate(zip(moments, counters, strict=True), start=1):
        billing = ledger.update(report(seq, ("alice", up, down), at=at), POLICY)
        assert all(t[0] == "alice" for t in emitted(billing))
        seen.append([t[1:] for t in emitted(billing)])
        batch = TotalsBatch.model_validate_json(
            TotalsBatch.encode("node-a", billing.day, billing.month, billing.totals)
        )
        assert (batch.day, batch.month) == cal.starts(unix(at))
    may30, may31, jun1 = (cal.day_start(unix(m)) for m in moments[:3])
    may, june = cal.month_start(unix(moments[0])), cal.month_start(unix(moments[2]))
    assert may31 - may30 == 86400 and jun1 == june
    assert seen == [
        [("day", may30, 10, 100), ("month", may, 10, 100)],
        [("day", may31, 20, 200), ("month", may, 30, 300)],
        [("day", jun1, 30, 300), ("month", june, 30, 300)],
        [("day", jun1, 70, 700), ("month", june, 70, 700)],
    ]
    assert ledger.total("alice", "day", may30) == (10, 100)
    assert ledger.total("alice", "month", may) == (30, 300)
    assert ledger.total("alice", "month", june) == (70, 700)


def test_totals_follow_local_day_not_utc() -> None:
    cal = Calendar(BERLIN)
    ledger = NodeLedger("node-a")
    at = datetime(2026, 5, 12, 22, 30, tzinfo=UTC)  # 00:30 on the 13th in Berlin
    billing = ledger.update(report(1, ("alice", 1, 2), at=at), POLICY)
    day = emitted(billing)[0][2]
    assert day == unix(datetime(2026, 5, 13, tzinfo=BERLIN)) == cal.day_start(unix(at))


def test_totals_on_a_25_hour_day() -> None:
    ledger = NodeLedger("node-a")
    first = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST
    second = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)  # 02:30 CET, the second time
    ledger.update(report(1, ("alice", 1, 1), at=first), POLICY)
    ledger.update(report(2, ("alice", 3, 3), at=second), POLICY)
    start = unix(datetime(2026, 10, 25, tzinfo=BERLIN))
    assert ledger.total("alice", "day", start) == (3, 3)


def test_old_totals_are_forgotten_but_recent_months_kept() -> None:
    ledger = NodeLedger("node-a")
    cal = Calendar(BERLIN)
    early = datetime(2026, 5, 2, 12, tzinfo=UTC)
    ledger.update(delta(1, ("alice", 1, 1), at=early), POLICY)
    ledger.update(delta(2, ("alice", 1, 1), at=early + timedelta(days=10)), POLICY)
    assert ledger.total("alice", "day", cal.day_start(unix(early))) is None
    assert ledger.total("alice", "month", cal.month_start(unix(early))) == (2, 2)


# --- persistence --------------------------------------------------------------------------


def mixed_stream() -> list[CounterReport]:
    out = [report(1, ("alice", 10, 10), ("bob", 5, 5), baseline=True)]
    for seq in range(2, 12):
        out.append(report(seq, ("alice", 10 + seq * 7, 10 + seq * 3), ("bob", 5 + seq, 5)))
    out.append(report(3, ("alice", 1, 1)))  # stale
    out.append(report(0, ("alice", 4, 4), ("bob", 1, 0), epoch=2))  # restart
    out.append(report(1, ("alice", 2, 9), ("bob", 2, 0), epoch=2))  # alice's up went down
    out += [delta(s, ("carol", s, 2 * s), epoch=e) for e, s in [(1, 3), (1, 1), (2, 1), (1, 3)]]
    return out


def outcome(billing: Billing) -> tuple[object, ...]:
    return (billing.billed, emitted(billing), billing.refused, billing.duplicate)


def test_serialise_mid_stream_and_continue_identically() -> None:
    stream = mixed_stream()
    for cut in range(len(stream) + 1):
        straight, resumed = NodeLedger("node-a"), NodeLedger("node-a")
        expected = [outcome(straight.update(r, POLICY)) for r in stream]
        got = [outcome(resumed.update(r, POLICY)) for r in stream[:cut]]
        data = resumed.to_bytes()
        resumed = NodeLedger.from_bytes(data)
        assert resumed.to_bytes() == data
        got += [outcome(resumed.update(r, POLICY)) for r in stream[cut:]]
        assert got == expected
        assert resumed.to_bytes() == straight.to_bytes()
        assert resumed.watermark == straight.watermark and resumed.node_id == "node-a"


# --- property tests -----------------------------------------------------------------------

USERS = ["alice", "bob", "carol", "dave"]
START = datetime(2026, 3, 28, 21, 0, tzinfo=BERLIN)  # crosses midnight and the DST switch


def reference_billing(stream: list[CounterReport]) -> dict[str, list[int]]:
    """The rules of the product issue, literally, per (node, user), each direction apart."""
    state: dict[tuple[str, str], tuple[int, int, int, int]] = {}
    billed: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for rep in stream:
        for c in rep.counters:
            key = (rep.node_id, c.user_id)
            last = state.get(key)
            if last is None:
                bill = (0, 0) if rep.baseline else (c.up, c.down)
            else:
                epoch, seq, up, down = last
                if rep.epoch < epoch or (rep.epoch == epoch and rep.seq <= seq):
                    continue
                if rep.epoch > epoch:
                    bill = (c.up, c.down)
                else:
                    bill = (
                        c.up - up if c.up >= up else c.up,
                        c.down - down if c.down >= down else c.down,
                    )
            state[key] = (rep.epoch, rep.seq, c.up, c.down)
            billed[c.user_id][0] += bill[0]
            billed[c.user_id][1] += bill[1]
    return billed


class Fleet:
    """Generates cumulative reports of a few nodes, and the traffic they really carried."""

    def __init__(self, draw: st.DrawFn, lossless: bool) -> None:
        self.draw = draw
        self.lossless = lossless
        self.reports: list[CounterReport] = []
        self.truth: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.clock = START
        n_nodes = draw(st.integers(1, 3))
        self.nodes = [f"node-{i}" for i in range(n_nodes)]
        self.users = USERS[: draw(st.integers(1, len(USERS)))]
        self.epoch = {n: draw(st.integers(0, 3)) for n in self.nodes}
        self.seq = dict.fromkeys(self.nodes, 0)
        self.counters = {(n, u): [0, 0] for n in self.nodes for u in self.users}
        self.reported: dict[tuple[str, str], list[int]] = {}
        self.after_reset: dict[tuple[str, str], list[int]] = {}
        for node in self.nodes:
            if draw(st.booleans()):  # a busy node the agent sees first: its traffic is not ours
                for user in self.users:
                    self.counters[node, user] = [draw(st.integers(0, 10**9)) for _ in "ud"]
                self.emit(node, self.users, baseline=True)

    def emit(self, node: str, users: list[str], baseline: bool = False) -> None:
        self.clock += timedelta(minutes=7)
        self.seq[node] += 1
        counters = []
        for user in users:
            up, down = self.counters[node, user]
            counters.append(Counter(user_id=user, up=up, down=down))
            self.reported[node, user] = [up, down]
            self.after_reset.pop((node, user), None)
        self.reports.append(
            CounterReport(
                node_id=node, epoch=self.epoch[node], seq=self.seq[node], baseline=baseline,
                observed_at=self.clock.astimezone(UTC), counters=tuple(counters),
            )
        )

    def traffic(self, node: str, user: str, up: int, down: int) -> None:
        key = (node, user)
        counter = self.counters[key]
        amounts = [up, down]
        if self.lossless and key in self.after_reset:
            # After a user reset, the next report must show each restarted direction lower
            # than the last report did, or the restart is invisible (and the rules say so).
            for i, before in enumerate(self.after_reset[key]):
                if before:
                    amounts[i] = min(amounts[i], before - 1 - counter[i])
        for i in (0, 1):
            counter[i] += amounts[i]
            self.truth[user][i] += amounts[i]

    def restart(self, node: str) -> None:
        if self.lossless:
            self.emit(node, self.users)
        self.epoch[node] += self.draw(st.integers(1, 2))
        self.seq[node] = self.draw(st.integers(-1, 2))
        for user in self.users:
            self.counters[node, user] = [0, 0]
            self.after_reset.pop((node, user), None)
            self.reported.pop((node, user), None)

    def reset_user(self, node: str, user: str) -> None:
        if self.lossless:
            self.emit(node, [user])
        self.counters[node, user] = [0, 0]
        if (node, user) in self.reported:
            self.after_reset[node, user] = list(self.reported[node, user])

    def run(self) -> None:
        draw = self.draw
        for _ in range(draw(st.integers(1, 30))):
            node = draw(st.sampled_from(self.nodes))
            op = draw(st.sampled_from(["traffic", "traffic", "traffic", "report", "report",
                                       "restart", "reset"]))
            if op == "traffic":
                user = draw(st.sampled_from(self.users))
                self.traffic(node, user, draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)))
            elif op == "report":
                users = draw(st.lists(st.sampled_from(self.users), unique=True, min_size=1))
                self.emit(node, sorted(users))
            elif op == "restart":
                self.restart(node)
            else:
                self.reset_user(node, draw(st.sampled_from(self.users)))
        if self.lossless:
            for node in self.nodes:
                self.emit(node, self.users)


@st.composite
def fleets(draw: st.DrawFn, lossless: bool = False) -> Fleet:
    fleet = Fleet(draw, lossless)
    fleet.run()
    return fleet


@st.composite
def perturbed(draw: st.DrawFn, reports: list[CounterReport]) -> list[CounterReport]:
    """The reports with random duplicates and random reorderings."""
    stream = list(reports)
    if not stream:
        return stream
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(stream) - 1))
        j = draw(st.integers(i, min(len(stream), i + 8)))
        stream.insert(j, stream[i])
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(stream) - 1))
        moved = stream.pop(i)
        stream.insert(draw(st.integers(0, len(stream))), moved)
    return stream


class Fleetledgers:
    """What the stream worker does: one ledger per (node, partition), fragments routed."""

    def __init__(self, partitions: int, policy: BillingPolicy = POLICY) -> None:
        self.partitions = partitions
        self.policy = policy
        self.ledgers: dict[tuple[str, int], NodeLedger] = {}
        self.billed: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.outcomes: list[tuple[object, ...]] = []

    def apply(self, rep: CounterReport, round_trip: bool = False) -> int:
        billed = 0
        for p, fragment in split_report(rep, self.partitions).items():
            key = (rep.node_id, p)
            ledger = self.ledgers.setdefault(key, NodeLedger(rep.node_id))
            if round_trip:
                ledger = self.ledgers[key] = NodeLedger.from_bytes(ledger.to_bytes())
            billing = ledger.update(fragment, self.policy)
            assert billing.refused == []
            self.outcomes.append(outcome(billing))
            for user, up, down in billing.billed:
                self.billed[user][0] += up
                self.billed[user][1] += down
                billed += up + down
        return billed

    def period_totals(self, stream: list[CounterReport], period: str) -> dict[str, list[int]]:
        cal = Calendar(self.policy.timezone)
        index = 0 if period == "day" else 1
        starts = {cal.starts(int(r.observed_at.timestamp()))[index] for r in stream}
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for ledger in self.ledgers.values():
            for user in USERS:
                for start in starts:
                    found = ledger.total(user, period, start)  # type: ignore[arg-type]
                    if found:
                        out[user][0] += found[0]
                        out[user][1] += found[1]
        return out


def nonzero(billed: dict[str, list[int]]) -> dict[str, list[int]]:
    return {user: v for user, v in billed.items() if v != [0, 0]}


PROPERTY = settings(max_examples=100, deadline=None)


@settings(max_examples=60, deadline=None)
@given(st.data(), fleets(), st.integers(1, 3))
def test_property_ledger_follows_reference(
    data: st.DataObject, fleet: Fleet, partitions: int
) -> None:
    stream = data.draw(perturbed(fleet.reports))
    fleet_ledgers = Fleetledgers(partitions)
    for rep in stream:
        fleet_ledgers.apply(rep)
    expected = nonzero(reference_billing(stream))
    assert nonzero(fleet_ledgers.billed) == expected
    assert nonzero(fleet_ledgers.period_totals(stream, "day")) == expected
    assert nonzero(fleet_ledgers.period_totals(stream, "month")) == expected

    # Full redelivery bills nothing more.
    for rep in stream:
        assert fleet_ledgers.apply(rep) == 0
    assert nonzero(fleet_ledgers.billed) == expected

    # Persisting and restoring the ledgers at random points changes nothing.
    cuts = data.draw(st.lists(st.booleans(), min_size=len(stream), max_size=len(stream)))
    straight, resumed = Fleetledgers(partitions), Fleetledgers(partitions)
    for rep, cut in zip(stream, cuts, strict=True):
        straight.apply(rep)
        resumed.apply(rep, round_trip=cut)
    assert resumed.outcomes == straight.outcomes
    assert {k: v.to_bytes() for k, v in resumed.ledgers.items()} == {
        k: v.to_bytes() for k, v in straight.ledgers.items()
    }


@PROPERTY
@given(st.data(), fleets(lossless=True), st.integers(1, 3))
def test_property_in_order_lossless_stream_bills_true_traffic(
    data: st.DataObject, fleet: Fleet, partitions: int
) -> None:
    # Immediate redeliveries are allowed: they do not reorder anything.
    repeats = data.draw(st.lists(st.integers(1, 3), min_size=len(fleet.reports),
                                 max_size=len(fleet.reports)))
    stream = [rep for rep, n in zip(fleet.reports, repeats, strict=True) for _ in range(n)]
    fleet_ledgers = Fleetledgers(partitions)
    for rep in stream:
        fleet_ledgers.apply(rep)
    assert nonzero(fleet_ledgers.billed) == nonzero(fleet.truth)
    assert nonzero(reference_billing(stream)) == nonzero(fleet.truth)


@st.composite
def delta_reports(draw: st.DrawFn) -> list[CounterReport]:
    keys = draw(
        st.lists(
            st.tuples(st.sampled_from(["node-a", "node-b"]), st.integers(0, 3), st.integers(0, 40)),
            unique=True, min_size=1, max_size=25,
        )
    )
    out = []
    for node, epoch, seq in keys:
        users = draw(st.lists(st.sampled_from(USERS), unique=True, max_size=4))
        out.append(
            CounterReport(
                node_id=node, epoch=epoch, seq=seq, kind="delta",
                baseline=draw(st.booleans()) and draw(st.booleans()),
                observed_at=(START + timedelta(minutes=draw(st.integers(0, 600)))).astimezone(UTC),
                counters=tuple(
                    Counter(user_id=u, up=draw(st.integers(0, 10**6)),
                            down=draw(st.integers(0, 10**6)))
                    for u in users
                ),
            )
        )
    return out


@PROPERTY
@given(st.data(), delta_reports(), st.integers(1, 3))
def test_property_delta_reports_billed_exactly_once(
    data: st.DataObject, reports: list[CounterReport], partitions: int
) -> None:
    arrival = data.draw(st.permutations(reports))
    repeats = data.draw(st.lists(st.sampled_from(reports), max_size=20))
    for rep in repeats:
        arrival.insert(data.draw(st.integers(0, len(arrival))), rep)
    expected: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for rep in reports:
        if not rep.baseline:
            for c in rep.counters:
                expected[c.user_id][0] += c.up
                expected[c.user_id][1] += c.down
    fleet_ledgers = Fleetledgers(partitions)
    for rep in arrival:
        fleet_ledgers.apply(rep, round_trip=data.draw(st.booleans()))
    assert nonzero(fleet_ledgers.billed) == nonzero(expected)
    assert nonzero(fleet_ledgers.period_totals(reports, "day")) == nonzero(expected)
    for rep in reports:
        assert fleet_ledgers.apply(rep) == 0


# --- totals that would overflow int64 -----------------------------------------------------

MAX_TOTAL = 2**63 - 1  # InfluxDB integers; total_bytes = up + down must fit too
HUGE = BillingPolicy(timezone=BERLIN, max_rate_bytes_per_s=10**17)  # allows 6e18 per reading


def test_totals_never_exceed_int64() -> None:
    """Five restarts of 10**18 each way pass the rate check; the fifth would overflow up+down."""
    ledger = NodeLedger("node-a")
    since_2000 = 946_684_800_000  # millisecond epochs: the interval is the time since then
    billed, refused = [], []
    for i in range(5):
        billing = ledger.update(
            report(1, ("alice", 10**18, 10**18), epoch=since_2000 + i), POLICY
        )
        billed += billing.billed
        refused += billing.refused
    assert billed == [("alice", 10**18, 10**18)] * 4
    assert [(r.reason, r.user_id, r.up, r.down) for r in refused] == [
        ("anomaly", "alice", 10**18, 10**18)
    ]
    assert "2**63" in refused[0].detail or str(MAX_TOTAL) in refused[0].detail
    cal = Calendar(BERLIN)
    assert ledger.total("alice", "day", cal.day_start(unix(T0))) == (4 * 10**18, 4 * 10**18)
    assert ledger.total("alice", "month", cal.month_start(unix(T0))) == (4 * 10**18, 4 * 10**18)
    # The refused counters are still recorded: the next small growth is billed.
    after = ledger.update(report(2, ("alice", 10**18 + 5, 10**18), epoch=since_2000 + 4), POLICY)
    assert after.billed == [("alice", 5, 0)] and after.refused == []
    assert after.totals == [("alice", *(4 * 10**18 + 5, 4 * 10**18) * 2)]


def test_one_reading_above_int64_in_total_is_refused() -> None:
    unlimited = BillingPolicy(timezone=BERLIN, max_rate_bytes_per_s=MAX_TOTAL)
    ledger = NodeLedger("node-a")
    billing = ledger.update(
        delta(1, ("alice", MAX_TOTAL, 1), ("bob", MAX_TOTAL - 1, 1)), unlimited
    )
    assert billing.billed == [("bob", MAX_TOTAL - 1, 1)]
    assert [(r.reason, r.user_id, r.up, r.down) for r in billing.refused] == [
        ("anomaly", "alice", MAX_TOTAL, 1)
    ]
    assert billing.totals == [("bob", *(MAX_TOTAL - 1, 1) * 2)]
    assert ledger.update(delta(2, ("bob", 0, 1)), unlimited).refused[0].reason == "anomaly"
    assert ledger.update(delta(3, ("bob", 0, 0), ("alice", 1, 0)), unlimited).billed == [
        ("alice", 1, 0)
    ]


def test_the_month_total_is_bounded_across_days() -> None:
    """Each day alone fits, but the month total would not: refused on the day it overflows."""
    ledger = NodeLedger("node-a")
    cal = Calendar(BERLIN)
    days = [datetime(2026, 5, d, 12, tzinfo=UTC) for d in (10, 11, 12)]
    third = MAX_TOTAL // 3 + 1
    outcomes = [ledger.update(delta(i, ("alice", third, 0), at=at), HUGE)
                for i, at in enumerate(days)]
    assert [len(b.billed) for b in outcomes] == [1, 1, 0]
    assert [r.reason for r in outcomes[2].refused] == ["anomaly"]
    assert ledger.total("alice", "month", cal.month_start(unix(days[0]))) == (2 * third, 0)
    assert ledger.total("alice", "day", cal.day_start(unix(days[2]))) is None


@st.composite
def huge_deltas(draw: st.DrawFn) -> list[CounterReport]:
    out = []
    start = datetime(2026, 5, 10, 12, tzinfo=UTC)
    for seq in range(draw(st.integers(1, 12))):
        users = draw(st.lists(st.sampled_from(USERS[:2]), unique=True, min_size=1))
        big = st.one_of(
            st.sampled_from([0, 10**18, 4 * 10**18, MAX_TOTAL // 2, MAX_TOTAL // 2 + 1]),
            st.integers(0, 5 * 10**18), st.integers(0, 10**6),
        )
        out.append(delta(
            seq, *((u, draw(big), draw(big)) for u in users),
            at=start + timedelta(hours=draw(st.integers(0, 3)) * 24 * (seq % 2)),
        ))
    return sorted(out, key=lambda r: r.observed_at)


@PROPERTY
@given(huge_deltas())
def test_property_totals_are_bounded_like_the_reference(stream: list[CounterReport]) -> None:
    """Reference: a reading is billed only if its user's month total stays <= 2**63-1 up+down."""
    cal = Calendar(BERLIN)
    ledger = NodeLedger("node-a")
    month: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    day: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for rep in stream:
        billing = ledger.update(rep, HUGE)
        assert billing.billed_bytes + sum(r.up + r.down for r in billing.refused) == sum(
            c.up + c.down for c in rep.counters
        )
        expect_billed, expect_refused = [], []
        d = cal.day_start(unix(rep.observed_at))
        for c in rep.counters:
            if not (c.up or c.down):
                continue
            too_fast = c.up > HUGE.allowance(None) or c.down > HUGE.allowance(None)
            if too_fast or sum(month[c.user_id]) + c.up + c.down > MAX_TOTAL:
                expect_refused.append(c.user_id)
            else:
                expect_billed.append((c.user_id, c.up, c.down))
                for totals in (month[c.user_id], day[c.user_id, d]):
                    totals[0] += c.up
                    totals[1] += c.down
        assert billing.billed == expect_billed
        assert [r.user_id for r in billing.refused] == expect_refused
        assert all(r.reason == "anomaly" for r in billing.refused)
        for user, day_up, day_down, month_up, month_down, *_ in billing.totals:
            assert [day_up, day_down] == day[user, d] and [month_up, month_down] == month[user]
            assert day_up + day_down <= MAX_TOTAL and month_up + month_down <= MAX_TOTAL


# ---------------------------------------------------------------------------- node rates


@settings(max_examples=200, deadline=None)
@given(
    changes=st.lists(st.tuples(st.integers(0, 24 * 60), st.integers(0, 40_000)), max_size=5,
                     unique_by=lambda c: c[0]),
    steps=st.lists(st.tuples(st.integers(1, 90), st.integers(0, 10**6), st.integers(0, 10**6)),
                   min_size=1, max_size=30),
)
def test_rates_changing_mid_day_bill_each_reading_at_its_own_rate(
    changes: list[tuple[int, int]], steps: list[tuple[int, int, int]]
) -> None:
    """Billed totals are the sum of each reading's delta times the rate at its observed_at,
    rounded down per reading and direction; raw totals are untouched by rates."""
    from quotaflow.core.plans import NodeRates, Rate, rate_at

    day_start = datetime(2026, 5, 12, tzinfo=UTC)
    rates = NodeRates(node_id="node-a", rates=tuple(
        Rate(from_=day_start + timedelta(minutes=m), rate=f"{units // 10_000}.{units % 10_000:04d}")
        for m, units in changes
    ))

    def reference_rate(t: datetime) -> int:  # the latest change at or before t, else 1
        in_force = [(m, units) for m, units in changes if day_start + timedelta(minutes=m) <= t]
        return max(in_force)[1] if in_force else 10_000

    ledger = NodeLedger("node-a")
    policy = BillingPolicy(timezone=ZoneInfo("UTC"), max_rate_bytes_per_s=10**9)
    at, up, down = day_start, 0, 0
    raw = [0, 0]
    billed = [0, 0]
    for seq, (minutes, more_up, more_down) in enumerate(steps, start=1):
        at = min(at + timedelta(minutes=minutes), day_start + timedelta(hours=23, minutes=59))
        up, down = up + more_up, down + more_down
        rate = rate_at(rates, at)
        assert rate == reference_rate(at)
        billing = ledger.update(report(seq, ("alice", up, down), at=at), policy, rate)
        for user, bill_up, bill_down in billing.billed:
            assert user == "alice"
            raw[0] += bill_up
            raw[1] += bill_down
            billed[0] += bill_up * rate // 10_000
            billed[1] += bill_down * rate // 10_000
    day = unix(day_start)
    assert raw == [up, down]
    if up or down:
        assert ledger.total("alice", "day", day) == (up, down)
        assert ledger.billed_total("alice", "day", day) == (billed[0], billed[1])
    else:
        assert ledger.total("alice", "day", day) is None


# ---------------------------------------------------------------------- totals rows


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(
    st.sampled_from(["cumulative", "delta"]),
    st.integers(1, 2),  # epoch
    st.lists(st.tuples(st.sampled_from(["alice", "bob", "cy"]),
                       st.sampled_from([0, 7, 10**6, MAX_TOTAL // 2]),
                       st.sampled_from([0, 3, 10**6])),
             max_size=3, unique_by=lambda c: c[0]),
    st.sampled_from([10_000, 15_000, 5_000]),  # the node's rate
    st.integers(0, 6 * 24 * 60),  # minutes after T0: some reports fall out of the window
), min_size=1, max_size=25))
def test_totals_rows_give_each_named_user_with_a_day_total_its_sums(
    steps: list[tuple[str, int, list[tuple[str, int, int]], int, int]],
) -> None:
    """A billing's rows are, in the report's order, every user it names that has a total
    for the report's day: that day's and month's sums, with the billed ones when they
    differ; none for a report older than the lateness window. However many of the
    report's readings were billed, refused or unchanged."""
    ledger = NodeLedger("node-a")
    calendar = Calendar(BERLIN)
    policy = BillingPolicy(timezone=BERLIN, max_rate_bytes_per_s=2**62)  # totals can overflow
    watermark = 0
    for seq, (kind, epoch, counters, rate, minutes) in enumerate(steps, start=1):
        at = T0 + timedelta(minutes=minutes)
        billing = ledger.update(
            report(seq, *counters, epoch=epoch, kind=kind, at=at), policy, rate)
        watermark = max(watermark, unix(at))
        day, month = calendar.starts(unix(at))
        if day < calendar.days_back(watermark, policy.lateness_days):
            assert billing.totals == []
            continue
        expected = []
        for user, _, _ in counters:
            day_total = ledger.total(user, "day", day)
            if day_total is None:
                continue
            month_total = ledger.total(user, "month", month)
            billed_day = ledger.billed_total(user, "day", day)
            billed_month = ledger.billed_total(user, "month", month)
            assert month_total is not None and billed_day and billed_month
            if billed_day == day_total and billed_month == month_total:
                expected.append((user, *day_total, *month_total))
            else:
                expected.append((user, *day_total, *month_total, *billed_day, *billed_month))
        assert billing.totals == expected

"""The worker's per-message logic, driven without Kafka or Faust: a dict is the table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from quotaflow.core.contracts import Counter, CounterReport, DeadLetter, TotalsBatch
from quotaflow.core.ledger import NodeLedger
from quotaflow.core.partitioning import partition_of
from quotaflow.core.settings import Settings
from quotaflow.streams.billing import Outcome, RawHandler

SETTINGS = Settings(timezone="UTC", partitions=4, topic_prefix="unit")
AT = datetime(2026, 3, 8, 10, tzinfo=UTC)
NOW = AT.timestamp() + 60.0
DAY = int(datetime(2026, 3, 8, tzinfo=UTC).timestamp())
MONTH = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp())
EPOCH = 1_761_000_000_000


def users_of(partition: int, count: int = 3) -> list[str]:
    """`count` user ids that partition `partition` owns."""
    found = [u for u in (f"user-{i}" for i in range(1000))
             if partition_of(u, SETTINGS.partitions) == partition]
    return found[:count]


def report(
    seq: int, counters: list[tuple[str, int, int]], *, at: datetime = AT, node: str = "n1"
) -> CounterReport:
    return CounterReport(
        node_id=node, epoch=EPOCH, seq=seq, observed_at=at,
        counters=tuple(Counter(user_id=u, up=up, down=down) for u, up, down in counters),
    )


def handler(table: dict[bytes, bytes] | None = None) -> RawHandler:
    return RawHandler(SETTINGS, {} if table is None else table, now=lambda: NOW)


def totals_of(outcome: Outcome) -> list[TotalsBatch]:
    return [TotalsBatch.decode(t.value) for t in outcome.totals]


def test_a_valid_report_gives_totals() -> None:
    table: dict[bytes, bytes] = {}
    users = users_of(1)
    message = report(1, [(u, 100 * (i + 1), 1000) for i, u in enumerate(users)]).encode()
    billing = handler(table)
    outcome = billing.handle(message, 1, 7, key=b"n1")
    assert outcome.dead == () and outcome.rerouted == ()
    [record] = outcome.totals
    assert (record.partition, record.key) == (1, b"n1")
    batch = TotalsBatch.decode(record.value)
    assert (batch.node_id, batch.day, batch.month) == ("n1", DAY, MONTH)
    assert sorted(batch.totals) == sorted(  # at rate 1: no billed bytes of their own
        (u, *(100 * (i + 1), 1000) * 2) for i, u in enumerate(users)
    )
    # the ledger is written at the checkpoint, under node|partition, one record
    assert table == {}
    assert billing.checkpoint() == 1
    assert list(table) == [b"n1|1"]
    assert NodeLedger.from_bytes(table[b"n1|1"]).total(users[0], "day", DAY) == (100, 1000)


def test_invalid_json_is_dead_lettered_with_its_payload() -> None:
    table: dict[bytes, bytes] = {}
    biller = handler(table)
    outcome = biller.handle(b"{not json", 2, 41)
    assert outcome.totals == () and outcome.rerouted == ()
    [dead] = outcome.dead
    assert dead.partition == 2
    letter = DeadLetter.decode(dead.value)
    assert (letter.reason, letter.topic, letter.partition, letter.offset) == (
        "invalid", SETTINGS.topics.raw, 2, 41
    )
    assert letter.original() == b"{not json"
    assert table == {} and biller.stats.dead == 1


def test_a_report_that_breaks_the_contract_is_invalid() -> None:
    bad = (b'{"node_id": "n1", "epoch": 1, "seq": 1, "observed_at": "2026-03-08T10:00:00Z",'
           b' "counters": [{"user_id": "a", "up": -1, "down": 0}]}')
    [dead] = handler().handle(bad, 0, 0).dead
    letter = DeadLetter.decode(dead.value)
    assert letter.reason == "invalid" and "counters" in letter.detail
    assert "-1" not in letter.detail  # the report's values stay out of the reason


def test_a_future_observed_at_is_refused() -> None:
    table: dict[bytes, bytes] = {}
    biller = handler(table)
    users = users_of(0)
    future = report(1, [(users[0], 5, 5)], at=AT + timedelta(days=2)).encode()
    outcome = biller.handle(future, 0, 3)
    assert outcome.totals == ()
    [dead] = outcome.dead
    letter = DeadLetter.decode(dead.value)
    assert letter.reason == "invalid" and "in the future" in letter.detail
    assert letter.original() == future
    assert table == {}
    # ahead of the clock by less than QUOTAFLOW_MAX_CLOCK_SKEW_S is fine
    soon = report(2, [(users[0], 5, 5)], at=AT + timedelta(hours=2)).encode()
    assert biller.handle(soon, 0, 4).totals


def test_a_misrouted_report_is_split_and_rerouted() -> None:
    table: dict[bytes, bytes] = {}
    biller = handler(table)
    mine, other, third = users_of(0, 2), users_of(2, 2), users_of(3, 1)
    everyone = [(u, 10, 20) for u in mine + other + third]
    message = report(1, everyone).encode()
    outcome = biller.handle(message, 0, 5, key=b"n1")
    assert outcome.dead == ()
    assert [(r.partition, r.key) for r in outcome.rerouted] == [(2, b"n1"), (3, b"n1")]
    fragments = {r.partition: CounterReport.decode(r.value) for r in outcome.rerouted}
    assert [c.user_id for c in fragments[2].counters] == other
    assert [c.user_id for c in fragments[3].counters] == third
    assert (fragments[2].seq, fragments[2].observed_at) == (1, AT)
    # only partition 0's part is billed here
    [batch] = totals_of(outcome)
    assert sorted(row[0] for row in batch.totals) == sorted(mine)
    biller.checkpoint()
    assert list(table) == [b"n1|0"]
    assert biller.stats.rerouted == 2
    # each fragment is billed where it arrives
    again = biller.handle(outcome.rerouted[0].value, 2, 0, key=b"n1")
    assert again.rerouted == ()
    assert sorted(row[0] for row in totals_of(again)[0].totals) == sorted(other)
    biller.checkpoint()
    assert sorted(table) == [b"n1|0", b"n1|2"]


def test_users_billed_in_the_partition_are_not_looked_up_again_and_hide_no_stranger() -> None:
    """A user with counters in the node's ledger of a partition was routed there: the
    routing check looks up only the others (the ledger's map is the one billing reads)."""
    biller = handler()
    mine, stranger = users_of(0, 2), users_of(3, 1)
    assert biller.handle(report(1, [(u, 10, 20) for u in mine]).encode(), 0, 0).rerouted == ()
    biller.biller.owners = {stranger[0]: 3}  # type: ignore[assignment]  # knows no one else
    again = biller.handle(report(2, [(u, 30, 40) for u in mine + stranger]).encode(), 0, 1)
    assert [r.partition for r in again.rerouted] == [3]
    assert sorted(row[0] for row in totals_of(again)[0].totals) == sorted(mine)


def test_a_report_with_nothing_for_its_partition_is_only_rerouted() -> None:
    table: dict[bytes, bytes] = {}
    outcome = handler(table).handle(report(1, [(users_of(1)[0], 1, 2)]).encode(), 0, 0)
    assert outcome.totals == () and outcome.dead == ()
    assert [r.partition for r in outcome.rerouted] == [1]
    assert table == {}


def test_a_redelivered_message_bills_nothing_twice_but_resends_the_totals() -> None:
    table: dict[bytes, bytes] = {}
    biller = handler(table)
    users = users_of(3)
    first = report(1, [(u, 100, 1000) for u in users]).encode()
    second = report(2, [(u, 150, 1500) for u in users]).encode()
    biller.handle(first, 3, 0)
    sent = biller.handle(second, 3, 1)
    biller.checkpoint()
    billed, stored = biller.stats.billed_bytes, table[b"n1|3"]
    assert billed == len(users) * 1650
    again = biller.handle(second, 3, 1)  # a redelivery
    assert again.totals == sent.totals  # the same running totals, sent again
    assert again.dead == ()
    assert biller.stats.billed_bytes == billed
    biller.checkpoint()
    assert table[b"n1|3"] == stored
    # also after a rebalance, when the ledger comes from the table
    biller.forget_live()
    assert totals_of(handler(table).handle(first, 3, 0))[0].totals == totals_of(sent)[0].totals
    assert totals_of(sent)[0].rows()[0][1:] == (150, 1500, 150, 1500) * 2


def test_refusals_are_dead_lettered_per_reason_with_their_readings() -> None:
    users = users_of(0, 2)
    biller = handler()
    biller.handle(report(1, [(users[0], 1, 1)]).encode(), 0, 8)
    huge = 10**15  # far more than a minute allows
    message = report(2, [(users[0], huge, 1), (users[1], 5, 6)],
                     at=AT + timedelta(minutes=1)).encode()
    outcome = biller.handle(message, 0, 9)
    [batch] = totals_of(outcome)
    assert sorted(row[:5] for row in batch.totals) == sorted(
        [(users[0], 1, 1, 1, 1), (users[1], 5, 6, 5, 6)]
    )
    [dead] = outcome.dead
    letter = DeadLetter.decode(dead.value)
    assert (letter.reason, letter.offset, letter.original()) == ("anomaly", 9, message)
    assert letter.readings == ({"user_id": users[0], "up": huge - 1, "down": 0},)


def test_an_error_while_billing_is_dead_lettered_and_only_that_message_is_undone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table: dict[bytes, bytes] = {}
    biller = handler(table)
    users = users_of(2)
    biller.handle(report(1, [(u, 100, 1000) for u in users]).encode(), 2, 0)
    biller.checkpoint()
    stored = table[b"n1|2"]
    # a message kept since the checkpoint, a rerouted one, and one that fails half way
    biller.handle(report(2, [(u, 200, 2000) for u in users]).encode(), 2, 1)
    mixed = report(3, [(u, 250, 2500) for u in users] + [(users_of(1)[0], 1, 1)]).encode()
    assert [r.partition for r in biller.handle(mixed, 2, 2).rerouted] == [1]
    update = NodeLedger.update

    def half_done(ledger: NodeLedger, fragment: CounterReport, *args: object) -> object:
        done = update(ledger, fragment, *args)  # type: ignore[arg-type]
        if fragment.seq == 4:
            raise OSError("disk on fire")
        return done

    monkeypatch.setattr(NodeLedger, "update", half_done)
    message = report(4, [(u, 300, 3000) for u in users]).encode()
    outcome = biller.handle(message, 2, 3)
    monkeypatch.setattr(NodeLedger, "update", update)
    assert outcome.totals == ()
    [dead] = outcome.dead
    letter = DeadLetter.decode(dead.value)
    assert (letter.reason, letter.partition, letter.offset) == ("error", 2, 3)
    assert letter.detail == "OSError: disk on fire"
    assert letter.original() == message
    assert table[b"n1|2"] == stored  # nothing written before the checkpoint
    # seq 4 was applied to the ledger in memory: undone, with seqs 2 and 3 kept
    billed = biller.stats.billed_bytes
    [batch] = totals_of(biller.handle(message, 2, 3))  # a redelivery bills it
    assert biller.stats.billed_bytes == billed + len(users) * 550
    assert batch.rows()[0][1:] == (300, 3000) * 4
    biller.checkpoint()
    assert NodeLedger.from_bytes(table[b"n1|2"]).total(users[0], "day", DAY) == (300, 3000)


def test_a_crash_bills_again_exactly_what_came_after_the_last_checkpoint() -> None:
    """A worker acknowledges only what a checkpoint holds: after a crash it handles the
    messages since then again, against the ledgers written then, and bills them once."""
    users = users_of(0, 5)
    messages = [
        report(seq, [(u, 10 * seq * (i + 1), 100 * seq) for i, u in enumerate(users)
                     if (seq + i) % 3],
               at=AT + timedelta(minutes=seq), node=f"n{seq % 2}").encode()
        for seq in range(1, 13)
    ]
    truth = handler()
    sent, billed = {}, {}
    for offset, message in enumerate(messages):
        before = truth.stats.billed_bytes
        sent[offset] = totals_of(truth.handle(message, 0, offset))
        billed[offset] = truth.stats.billed_bytes - before
    assert all(billed.values())
    for checkpoint_at in range(len(messages)):
        table: dict[bytes, bytes] = {}
        crashed = handler(table)
        for offset, message in enumerate(messages):
            crashed.handle(message, 0, offset)
            if offset == checkpoint_at:
                crashed.checkpoint()
        restarted = handler(table)  # the unwritten ledgers are gone with the process
        # Kafka redelivers from the last committed offset, which may be below the checkpoint
        # (those bill nothing, and send the totals as they are)
        again = {o: totals_of(restarted.handle(messages[o], 0, o))
                 for o in range(max(0, checkpoint_at - 2), len(messages))}
        later = range(checkpoint_at + 1, len(messages))
        assert [again[o] for o in later] == [sent[o] for o in later]
        assert restarted.stats.billed_bytes == sum(billed[o] for o in later)


def test_an_error_after_rerouting_still_sends_the_fragments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    biller = handler()

    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(NodeLedger, "update", broken)
    message = report(1, [(users_of(0)[0], 1, 1), (users_of(1)[0], 1, 1)]).encode()
    outcome = biller.handle(message, 0, 0)
    assert [r.partition for r in outcome.rerouted] == [1]
    assert [DeadLetter.decode(d.value).reason for d in outcome.dead] == ["error"]
    assert outcome.totals == ()


def test_a_node_whose_seq_went_back_is_dead_lettered_once_per_epoch() -> None:
    """A reinstall without the outbox restarts seq in the same epoch: the reports are not
    billed then (their seqs are below one billed), and that must not pass silently."""
    billing = handler()
    user = users_of(0, 1)[0]
    billing.handle(report(500, [(user, 100, 100)]).encode(), 0, 0)
    reasons = []
    for seq in (0, 1):
        outcome = billing.handle(report(seq, [(user, 150 + seq, 100)]).encode(), 0, 1 + seq)
        reasons += [DeadLetter.decode(letter.value).reason for letter in outcome.dead]
    assert reasons == ["stale-seq"]
    assert billing.stats.stale == 2


def test_totals_carry_the_report_they_came_from() -> None:
    """Each billed fragment's totals say which report they came from (the node's status),
    also when no total changed (an idle node is alive), with its epoch: the sinks count
    the node's restarts from the epochs."""
    table: dict[bytes, bytes] = {}
    biller = handler(table)
    user = users_of(1, 1)[0]
    first = report(1, [(user, 100, 1000)]).encode()
    [batch] = totals_of(biller.handle(first, 1, 0, appended=NOW - 5.25))
    assert batch.report is not None
    assert batch.report.model_dump() == {
        "epoch": EPOCH, "seq": 1, "observed_at": int(AT.timestamp() * 1000),
        "received_at": int((NOW - 5.25) * 1000), "readings": 1}
    idle = CounterReport(node_id="n1", epoch=EPOCH, seq=2, observed_at=AT + timedelta(minutes=1))
    [batch] = totals_of(biller.handle(idle.encode(), 1, 1))
    assert batch.totals == () and batch.report is not None
    assert (batch.report.seq, batch.report.readings, batch.report.received_at) == (
        2, 0, int(NOW * 1000))
    restarted = CounterReport(
        node_id="n1", epoch=EPOCH + 5, seq=1, observed_at=AT + timedelta(minutes=2),
        counters=(Counter(user_id=user, up=7, down=7),))
    [batch] = totals_of(biller.handle(restarted.encode(), 1, 2))
    assert batch.report is not None and batch.report.epoch == EPOCH + 5


def test_dead_letters_late_and_stale_reports_are_counted() -> None:
    later = AT + timedelta(days=10)
    biller = RawHandler(SETTINGS, {}, now=lambda: later.timestamp() + 60)
    user = users_of(0, 1)[0]
    biller.handle(b"{not json", 0, 0)
    biller.handle(report(500, [(user, 100, 100)]).encode(), 0, 1)
    biller.handle(report(5, [(user, 150, 100)]).encode(), 0, 2)  # the seq went back
    biller.handle(report(501, [(user, 200, 100)], at=later).encode(), 0, 3)
    biller.handle(report(502, [(user, 300, 100)]).encode(), 0, 4)  # 10 days late
    stats = biller.stats
    assert stats.dead_letters == {"invalid": 1, "stale-seq": 1, "late": 1}
    assert (stats.dead, stats.late, stats.stale) == (3, 1, 1)

"""The node book and the pipeline figures, against reference models."""

from __future__ import annotations

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from quotaflow.core.contracts import ReportSeen, TotalsBatch
from quotaflow.core.health import (
    COUNTER_FIELDS,
    EpochCount,
    NodeBook,
    NodeStatus,
    PipelineSnapshot,
    Samples,
    percentile,
)
from quotaflow.core.ledger import NodeLedger

PARTITIONS = 4


def _report(seq: int, epoch: int, readings: dict[int, int]) -> list[tuple[int, ReportSeen]]:
    """A node's report as the sink gets it: one `ReportSeen` per partition's fragment."""
    observed = 1_763_000_000_000 + seq * 60_000
    return [(partition, ReportSeen(epoch=epoch, seq=seq, observed_at=observed,
                                   received_at=observed + 150, readings=count))
            for partition, count in readings.items()]


_REPORTS = st.lists(
    st.tuples(st.integers(0, 3),  # restarts so far (the epoch follows them)
              st.dictionaries(st.integers(0, PARTITIONS - 1), st.integers(0, 50),
                              min_size=1)),
    min_size=1, max_size=8,
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(_REPORTS, st.data())
def test_property_the_book_holds_the_last_report_whatever_the_interleaving(
    reports: list[tuple[int, dict[int, int]]], data: st.DataObject,
) -> None:
    """Each partition's fragments come in order, partitions interleave in any way, and any
    fragment may come twice (a redelivery): the book ends with the last report's readings,
    the restarts (its distinct epochs, less the first) and the interval between the last
    two reports."""
    restarts = 0
    epochs = set()
    queues: dict[int, list[ReportSeen]] = {}
    for seq, (more, readings) in enumerate(reports, start=1):
        restarts = max(restarts, more)
        epochs.add(100 + restarts)
        for partition, seen in _report(seq, 100 + restarts, readings):
            queues.setdefault(partition, []).append(seen)
            if data.draw(st.booleans()):
                queues[partition].append(seen)
    book = NodeBook(default_interval_s=60.0, forget_after_s=10**9)
    while queues:
        partition = data.draw(st.sampled_from(sorted(queues)))
        book.update("n1", queues[partition].pop(0), partition)
        if not queues[partition]:
            del queues[partition]
    [(node, fields)] = book.rows(1_763_000_000_000)
    last_seq, (_, last_readings) = len(reports), reports[-1]
    assert node == "n1"
    assert fields["readings"] == sum(last_readings.values())
    assert fields["observed_at"] == 1_763_000_000_000 + last_seq * 60_000
    assert fields["restarts"] == len(epochs) - 1 and fields["epoch"] == 100 + restarts
    # the interval is between the last report and an earlier one the book saw before it
    # (none when the last report came first)
    if "interval_s" in fields:
        assert fields["interval_s"] in {60.0 * k for k in range(1, len(reports))}


def test_a_node_is_alive_for_three_intervals_or_three_default_intervals() -> None:
    book = NodeBook(default_interval_s=60.0, forget_after_s=86_400.0)
    [(_, one)] = _report(1, 1, {0: 5})
    book.update("n1", one, 0)
    received = one.received_at
    assert [book.rows(received + ms)[0][1]["alive"] for ms in (179_999, 180_000)] == [True, False]
    [(_, two)] = _report(2, 1, {0: 5})  # a minute later: the interval is known now
    book.update("n1", two, 0)
    assert [book.rows(two.received_at + ms)[0][1]["alive"] for ms in (179_999, 180_000)] == [
        True, False]


def test_a_seeded_node_gives_way_to_a_report_of_its_own() -> None:
    """After a sink restart the book is seeded from InfluxDB (seq unknown: -1); the same
    report delivered again replaces it, an older one does not."""
    book = NodeBook(default_interval_s=60.0, forget_after_s=86_400.0)
    [(_, seen)] = _report(2, 7, {1: 9})
    book.seed("n1", NodeStatus(seen.observed_at, seen.received_at, 7, -1, {-1: 9}, 60_000,
                               EpochCount.seeded(restarts=2, epoch=7)))
    book.seed("n1", NodeStatus(0, 0, 0, 0))  # only the first seed counts
    [(_, older)] = _report(1, 7, {1: 3})
    book.update("n1", older, 1)
    assert book.rows(0)[0][1]["readings"] == 9
    book.update("n1", seen, 1)
    fields = book.rows(0)[0][1]
    assert (fields["readings"], fields["restarts"], fields["interval_s"]) == (9, 2, 60.0)


def test_old_totals_records_have_no_report() -> None:
    old = b'{"node_id":"n","day":0,"month":0,"totals":[["u",1,2,3,4]]}'
    assert TotalsBatch.decode(old).report is None
    status_only = TotalsBatch.decode(TotalsBatch.encode("n", 0, 0, [], (1, 2, 3, 4, 0)))
    assert status_only.totals == () and status_only.report is not None


def test_a_ledger_record_that_counted_restarts_reads_back() -> None:
    """Ledger records once held the node's latest epoch and restarts; they read as if not."""
    ledger = NodeLedger("n")
    ledger.users = {"a": (5, 1, 0, 0, 0), "b": (9, 1, 0, 0, 0)}
    record = ledger.to_bytes()
    old = record.replace(b',"dropped":', b',"epoch":9,"restarts":1,"dropped":')
    assert b"restarts" in old
    assert NodeLedger.from_bytes(old).to_bytes() == record


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=200))
def test_property_percentiles_are_values_in_order(values: list[float]) -> None:
    samples = Samples()
    samples.extend(values)
    figures = samples.take("x")
    assert figures["x_p50"] in values and figures["x_p99"] in values
    assert min(values) <= figures["x_p50"] <= figures["x_p99"] <= max(values)
    assert figures["x_p50"] == percentile(values, 50)


def test_a_snapshot_keeps_integers_apart_from_floats() -> None:
    snapshot = PipelineSnapshot(process="sink", host="h", at=1, fields={"a": 1, "b": 1.0})
    again = PipelineSnapshot.decode(snapshot.encode())
    assert type(again.fields["a"]) is int and type(again.fields["b"]) is float
    for bad in (b'{"process": "other", "host": "h", "at": 1, "fields": {}}',
                b'{"process": "sink", "host": "h", "at": 1, "fields": {"A b": 1}}',
                b'{"process": "sink", "host": "h", "at": 1, "fields": {"a": "1"}}'):
        try:
            PipelineSnapshot.decode(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    assert "points_written" in COUNTER_FIELDS and "lag" not in COUNTER_FIELDS

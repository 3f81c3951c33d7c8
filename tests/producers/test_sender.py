"""The agent's sender against an in-memory publisher: what is acked goes, the rest is resent.

The double implements our own `Publisher` interface, not Kafka's; the agent's
integration tests in test_agent.py run the sender on a real Kafka.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from quotaflow.core.contracts import Counter, CounterReport
from quotaflow.core.settings import Settings
from quotaflow.producers.agent import Sender
from quotaflow.producers.outbox import Outbox
from quotaflow.producers.publisher import Publisher

START = datetime(2026, 11, 21, 12, tzinfo=UTC)


class Delivery:
    """A send future: acknowledged, or failing with `error`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def get(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error


class Broker:
    """What reached "Kafka", and the fate of the next sends.

    `plan` holds one entry per coming publish call: "ack", "nack" (the second
    fragment is not acknowledged) or "raise" (publish itself fails). When the
    plan is empty every send is acknowledged.
    """

    def __init__(self, plan: list[str] | None = None) -> None:
        self.plan = list(plan or [])
        self.delivered: list[CounterReport] = []
        self.connects = 0
        self.closed: list[float | None] = []
        self.unreachable = False

    def factory(self) -> Publisher:
        if self.unreachable:
            raise ConnectionError("no broker")
        self.connects += 1
        return MemoryPublisher(self)


class MemoryPublisher:
    """A `Publisher` that sends each report as two fragments into a `Broker`."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.open = True

    def publish(self, report: CounterReport) -> list[Delivery]:
        assert self.open, "publish after close"
        fate = self.broker.plan.pop(0) if self.broker.plan else "ack"
        if fate == "raise":
            raise BufferError("queue full")
        if fate == "nack":
            return [Delivery(), Delivery(TimeoutError("no ack"))]
        self.broker.delivered.append(report)
        return [Delivery(), Delivery()]

    def close(self, timeout: float | None = None) -> None:
        self.open = False
        self.broker.closed.append(timeout)


def _fill(outbox: Outbox, nodes: list[str], per_node: int) -> None:
    for i in range(per_node):
        for node in nodes:
            outbox.record(
                node_id=node, epoch=1, observed_at=START + timedelta(minutes=i),
                counters=[Counter(user_id="alice", up=i, down=i)],
            )


def _sender(outbox: Outbox, broker: Broker, batch: int = 500) -> Sender:
    factory: Callable[[], Publisher] = broker.factory
    return Sender(outbox, Settings(), batch, publisher_factory=factory)


def _seqs(reports: list[CounterReport], node: str) -> list[int]:
    return [r.seq for r in reports if r.node_id == node]


def test_each_round_sends_every_nodes_oldest_report_and_acks_it(tmp_path: Path) -> None:
    broker = Broker()
    with Outbox(tmp_path / "o.db") as outbox:
        _fill(outbox, ["a", "b"], 3)
        sender = _sender(outbox, broker)
        assert sender.step() == (2, True)
        assert [(r.node_id, r.seq) for r in broker.delivered] == [("a", 0), ("b", 0)]
        assert sender.step() == (2, True)
        assert sender.step() == (2, True)
        assert sender.step() == (0, True)  # nothing left
        assert len(outbox) == 0 and sender.acked == 6
        assert _seqs(broker.delivered, "a") == _seqs(broker.delivered, "b") == [0, 1, 2]
        assert broker.connects == 1  # one publisher for all rounds
        sender.close()
        assert broker.closed == [5.0]


def test_a_report_kafka_did_not_acknowledge_stays_and_is_resent(tmp_path: Path) -> None:
    broker = Broker(plan=["ack", "nack"])
    with Outbox(tmp_path / "o.db") as outbox:
        _fill(outbox, ["a", "b"], 2)
        sender = _sender(outbox, broker)
        assert sender.step() == (1, False)  # a's head acked, b's not
        assert [(r.node_id, r.seq) for _, r in outbox.pending()] == [("b", 0), ("a", 1), ("b", 1)]
        assert broker.closed == [1.0]  # the failed connection is dropped quickly
        assert sender.step() == (2, True)  # a new connection; b's seq 0 again, in order
        assert broker.connects == 2
        assert [(r.node_id, r.seq) for r in broker.delivered] == [("a", 0), ("b", 0), ("a", 1)]
        assert sender.step() == (1, True)
        assert _seqs(broker.delivered, "b") == [0, 1]
        assert len(outbox) == 0


def test_a_failing_publish_keeps_what_was_not_sent(tmp_path: Path) -> None:
    broker = Broker(plan=["ack", "raise"])
    with Outbox(tmp_path / "o.db") as outbox:
        _fill(outbox, ["a", "b", "c"], 1)
        sender = _sender(outbox, broker)
        assert sender.step() == (1, False)  # a was sent and acknowledged before the failure
        assert [r.node_id for _, r in outbox.pending()] == ["b", "c"]
        assert sender.step() == (2, True)
        assert [r.node_id for r in broker.delivered] == ["a", "b", "c"]


def test_nothing_is_lost_while_the_publisher_cannot_connect(tmp_path: Path) -> None:
    broker = Broker()
    broker.unreachable = True
    with Outbox(tmp_path / "o.db") as outbox:
        _fill(outbox, ["a"], 2)
        sender = _sender(outbox, broker)
        assert sender.step() == (0, False)
        assert sender.step() == (0, False)
        assert len(outbox) == 2 and broker.delivered == []
        broker.unreachable = False
        assert sender.step() == (1, True)
        assert sender.step() == (1, True)
        assert _seqs(broker.delivered, "a") == [0, 1]


def test_the_batch_bounds_a_round(tmp_path: Path) -> None:
    broker = Broker()
    with Outbox(tmp_path / "o.db") as outbox:
        _fill(outbox, ["a", "b", "c"], 1)
        sender = _sender(outbox, broker, batch=2)
        assert sender.step() == (2, True)
        assert sender.step() == (1, True)
        assert [r.node_id for r in broker.delivered] == ["a", "b", "c"]

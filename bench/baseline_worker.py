"""The textbook design the benchmark compares against: one reading per message.

A Faust agent that takes one single-reading report per Kafka message, keeps one
ledger per (node, user) in a table (one changelog record per reading) and sends
one totals record per reading. It uses the same contract, billing rules and
sink as the real worker, so the ratio measures the batched design alone.
"""

from __future__ import annotations

import logging
import time

import faust

from quotaflow.core.contracts import CounterReport, TotalsBatch
from quotaflow.core.ledger import NodeLedger
from quotaflow.core.settings import Settings
from quotaflow.streams.app import faust_app

log = logging.getLogger("quotaflow.bench.baseline")


def create_baseline_app(settings: Settings) -> faust.App:
    """A per-reading Faust app reading `<prefix>.readings`."""
    app = faust_app(settings, f"{settings.topic_prefix}-baseline")
    readings = app.topic(f"{settings.topic_prefix}.readings", partitions=settings.partitions)
    totals = app.topic(settings.topics.totals, partitions=settings.partitions)
    table = app.Table("per-reading-ledgers", default=None, partitions=settings.partitions,
                      key_type=bytes, value_type=bytes)
    policy = settings.billing_policy

    @app.agent(readings)
    async def bill(stream: faust.Stream) -> None:
        first = True
        async for event in stream.events():
            if first:
                first = False
                log.info("first message at %.3f", time.time())  # read by throughput.py
            report = CounterReport.decode(event.value)
            key = f"{report.node_id}|{report.counters[0].user_id}".encode()
            stored = table.get(key)
            ledger = NodeLedger.from_bytes(stored) if stored else NodeLedger(report.node_id)
            billing = ledger.update(report, policy)
            table[key] = ledger.to_bytes()
            await totals.send(
                key=key,
                value=TotalsBatch.encode(
                    report.node_id, billing.day, billing.month, billing.totals
                ),
                partition=event.message.partition,
            )

    return app


if __name__ == "__main__":
    settings = Settings()
    worker = faust.Worker(create_baseline_app(settings), loglevel="INFO", quiet=True)
    worker.execute_from_commandline()

"""quotaflow: exact per-user traffic accounting for fleets of proxy and VPN nodes.

The package is layered; each layer imports only those above it in this list:

* `quotaflow.core`: the pure core (contracts and their wire forms, topic names,
  the billing rules of `NodeLedger`, calendar periods, partitioning, settings).
  No I/O, no edge imports.
* the edges, in the order data flows: `quotaflow.producers` (node agent, proxy
  sources, push receiver, Kafka publisher), `quotaflow.streams` (the Faust
  worker), `quotaflow.sinks` (InfluxDB); plus `quotaflow.admin` (topic creation)
  and `quotaflow.metrics` (the worker's and the sink's Prometheus endpoint).
* `quotaflow.dev`: development tooling (local Kafka and InfluxDB, the fleet
  simulator, the check against ground truth).
* `quotaflow.cli`: the `quotaflow` command, a leaf on top.

The names below are the core's public API.
"""

from quotaflow.core.contracts import (
    Counter,
    CounterReport,
    DeadLetter,
    TotalsBatch,
)
from quotaflow.core.ledger import Billing, BillingPolicy, NodeLedger
from quotaflow.core.partitioning import partition_of, split_report
from quotaflow.core.periods import Calendar
from quotaflow.core.settings import Settings
from quotaflow.core.topics import Topics

__all__ = [
    "Billing",
    "BillingPolicy",
    "Calendar",
    "Counter",
    "CounterReport",
    "DeadLetter",
    "NodeLedger",
    "Settings",
    "Topics",
    "TotalsBatch",
    "partition_of",
    "split_report",
]

"""quotaflow: exact traffic accounting and quota enforcement for proxy and VPN fleets."""

from quotaflow.contracts import (
    Counter,
    CounterReport,
    DeadLetter,
    TotalsBatch,
)
from quotaflow.ledger import Billing, BillingPolicy, NodeLedger
from quotaflow.partitioning import partition_of, split_report
from quotaflow.periods import Calendar

__all__ = [
    "Billing",
    "BillingPolicy",
    "Calendar",
    "Counter",
    "CounterReport",
    "DeadLetter",
    "NodeLedger",
    "TotalsBatch",
    "partition_of",
    "split_report",
]

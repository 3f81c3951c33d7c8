"""quotaflow: exact traffic accounting and quota enforcement for proxy and VPN fleets."""

from quotaflow.core.contracts import (
    Counter,
    CounterReport,
    DeadLetter,
    TotalsBatch,
)
from quotaflow.core.ledger import Billing, BillingPolicy, NodeLedger
from quotaflow.core.partitioning import partition_of, split_report
from quotaflow.core.periods import Calendar

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

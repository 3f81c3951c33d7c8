"""The worker's pure hot path on one core, without Kafka: validate, bill, encode.

    python bench/hot_path.py [--nodes 10 --users 3000 --days 1 --interval 600]

Prints readings per second for the whole path per message (validation of the
raw fragment, `NodeLedger.update`, the ledger's changelog record and the totals
record), the ceiling any worker process built on these pieces can reach.
"""

from __future__ import annotations

import time

from workload import workload, workload_parser

from quotaflow.core.contracts import CounterReport, TotalsBatch
from quotaflow.core.ledger import NodeLedger
from quotaflow.core.partitioning import split_report
from quotaflow.core.settings import Settings


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    sim = workload(args)
    messages = [
        (p, fragment.encode())
        for line in sim.lines
        for p, fragment in split_report(CounterReport.decode(line),
                                        args.partitions).items()
    ]
    policy = Settings().billing_policy
    print(f"{sim.readings} readings in {len(messages)} messages "
          f"({sim.readings / len(messages):.0f} per message)")
    for label in ("first pass", "second pass"):
        ledgers: dict[tuple[str, int], NodeLedger] = {}
        out = 0
        start = time.perf_counter()
        for partition, value in messages:
            report = CounterReport.decode(value)
            key = (report.node_id, partition)
            ledger = ledgers.get(key)
            if ledger is None:
                ledger = ledgers[key] = NodeLedger(report.node_id)
            billing = ledger.update(report, policy)
            out += len(ledger.to_bytes())
            out += len(TotalsBatch.encode(report.node_id, billing.day, billing.month,
                                          billing.totals))
        seconds = time.perf_counter() - start
        print(f"{label:20s} {sim.readings / seconds:12,.0f} readings/s "
              f"({seconds:.2f} s, {out / sim.readings:.0f} bytes produced per reading)")


if __name__ == "__main__":
    main()

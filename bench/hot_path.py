"""The worker's pure hot path on one core, without Kafka: validate, bill, encode.

    python bench/hot_path.py [--nodes 10 --users 3000 --days 1 --interval 600]

Prints readings per second for the whole path per message, the worker's own
`RawHandler` with a dict as its table (validation of the raw fragment, the
clock and routing checks, `NodeLedger.update`, the ledger's changelog record and
the totals record): the ceiling any worker process built on it can reach.
"""

from __future__ import annotations

import time

from workload import workload, workload_parser

from quotaflow.core.contracts import CounterReport
from quotaflow.core.partitioning import split_report
from quotaflow.core.settings import Settings
from quotaflow.streams.billing import RawHandler


class ChangelogTable(dict[bytes, bytes]):
    """The worker's ledger table as a dict that counts the changelog bytes written."""

    written = 0

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.written += len(value)
        super().__setitem__(key, value)


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    sim = workload(args)
    reports = [CounterReport.decode(line) for line in sim.lines]
    messages = [
        (p, fragment.encode())
        for report in reports
        for p, fragment in split_report(report, args.partitions).items()
    ]
    settings = Settings(partitions=args.partitions)
    # the simulated fleet may lie ahead of the wall clock: judge it from its last report
    last = max(r.observed_at.timestamp() for r in reports)
    print(f"{sim.readings} readings in {len(messages)} messages "
          f"({sim.readings / len(messages):.0f} per message)")
    for label in ("first pass", "second pass"):
        table = ChangelogTable()
        handler = RawHandler(settings, table, now=lambda: last)
        out = 0
        start = time.perf_counter()
        for offset, (partition, value) in enumerate(messages):
            outcome = handler.handle(value, partition, offset)
            for record in outcome.totals:
                out += len(record.value)
        seconds = time.perf_counter() - start
        out += table.written
        assert handler.stats.dead == 0 and handler.stats.rerouted == 0, handler.stats.line()
        print(f"{label:20s} {sim.readings / seconds:12,.0f} readings/s "
              f"({seconds:.2f} s, {out / sim.readings:.0f} bytes produced per reading)")


if __name__ == "__main__":
    main()

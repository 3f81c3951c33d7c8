"""The worker's pure hot path on one core, without Kafka: validate, bill, encode.

    python bench/hot_path.py [--nodes 10 --users 3000 --days 1 --interval 600] [--plans]

Prints readings per second and CPU µs per reading for the whole path per
message, the worker's own `RawHandler` with a dict as its table (validation of
the raw fragment, the clock and routing checks, `NodeLedger.update`, the
ledgers' changelog records, written at a checkpoint every 1,000 messages, and the
totals record): the ceiling any worker
process built on it can reach. With `--plans`, the quota step runs too
(`QuotaKeeper` on the same dict, with the plan for every user that
`bench/throughput.py` publishes, its journal record per message, and a flush
every 10 s of the fleet's time as the worker's timer does).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from workload import workload, workload_parser

from quotaflow.core.contracts import CounterReport
from quotaflow.core.partitioning import partition_of, split_report
from quotaflow.core.settings import Settings
from quotaflow.streams.billing import RawHandler
from quotaflow.streams.quotas import QuotaKeeper

REPORT_EVERY = 100_000
FLUSH_EVERY = 1_000_000
CHECKPOINT_EVERY = 1_000  # messages: fewer than the worker handles in its 1 s interval


class ChangelogTable(dict[bytes, bytes]):
    """The worker's ledger table as a dict that counts the changelog bytes written."""

    written = 0

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.written += len(value)
        super().__setitem__(key, value)

    # a `QuotaStore` too, as the worker's table is
    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.pop(key, None)
        else:
            self[key] = value

    def keys_of(self, partition: int) -> list[bytes]:
        prefix = f"{partition}\x1f".encode()
        return [k for k in self if k.startswith(prefix)]


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--plans", action="store_true",
                        help="with the quota step and a plan for every user")
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
    plans = []
    if args.plans:
        from throughput import bench_plans  # the plans the end-to-end benchmark uses

        plans, _ = bench_plans(sim, args.users, args.days, settings)
    print(f"{sim.readings} readings in {len(messages)} messages "
          f"({sim.readings / len(messages):.0f} per message)"
          + (f"; quota step on, {len(plans)} plans" if plans else ""))
    now = datetime.fromtimestamp(last, UTC)
    for label in ("first pass", "second pass"):
        table = ChangelogTable()
        keeper = None
        if args.plans:
            keeper = QuotaKeeper(settings, table)
            for p in range(args.partitions):
                keeper.load(p, {}, now)
                keeper.set_plans(p, [(plan.user_id, plan) for plan in plans
                                     if partition_of(plan.user_id, args.partitions) == p], now)
        handler = RawHandler(settings, table, now=lambda: last, quotas=keeper)
        out = commands = 0
        reported = flushed = 0
        start, cpu = time.perf_counter(), time.process_time()
        for offset, (partition, value) in enumerate(messages):
            outcome = handler.handle(value, partition, offset)
            if offset % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1 or offset == len(messages) - 1:
                handler.checkpoint()
            for record in outcome.totals:
                out += len(record.value)
            if keeper is not None:
                if outcome.quota is not None:
                    commands += len(outcome.quota.commands)
                    for command in outcome.quota.commands:
                        out += len(command.encode())
                        keeper.sent(partition, command)
                if keeper.must_flush(partition):
                    keeper.flush(partition)
                readings = handler.stats.readings
                if readings - reported >= REPORT_EVERY:
                    reported = readings
                    for p in range(args.partitions):
                        out += len(keeper.report(p) or b"")
                if readings - flushed >= FLUSH_EVERY:
                    flushed = readings
                    for p in range(args.partitions):
                        keeper.flush(p)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        out += table.written
        assert handler.stats.dead == 0 and handler.stats.rerouted == 0, handler.stats.line()
        print(f"{label:12s} {sim.readings / seconds:10,.0f} readings/s, "
              f"{cpu / sim.readings * 1e6:.2f} µs CPU per reading ({seconds:.2f} s, "
              f"{out / sim.readings:.0f} bytes produced per reading"
              + (f", {commands} commands" if keeper is not None else "") + ")")


if __name__ == "__main__":
    main()

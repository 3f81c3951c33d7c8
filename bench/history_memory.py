"""The quota book's memory after a month of traffic: the hourly usage history per user.

    python bench/history_memory.py [--users 2000 --days 36]

The memory figure of `bench/steady.py` is taken after one round of readings, when
every user has a single hourly bucket. A user with traffic every hour holds a
bucket per hour for `LONGEST_PERIOD_DAYS` plus the lateness window (35 days, 840
buckets, by default), so that a plan arriving mid-period sees the period's earlier
usage. This runs `--users` users without plans through `--days` days of one
reading an hour each, in one `QuotaBook` (no Kafka), each hour followed by a
flush of the history records it changed (one per user and UTC day) into a dict
keyed as the worker's table keys them, and prints what the book and that table
hold per user (tracemalloc; the book holds the complete days as the table's
record objects). It times, in CPU per user, the last day's hour turns (each
reading of the last day starts a new hour, and with the history full drops its
oldest bucket), and building the history records each of those hours changed,
with the bytes they hold: what the worker writes to the changelog for them every
hour.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from quotaflow.core.quota import QuotaBook
from quotaflow.streams.quotas import day_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--days", type=int, default=36)
    args = parser.parse_args()
    ids = [f"u{i:07d}" for i in range(args.users)]
    start = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    book = QuotaBook(ZoneInfo("UTC"))
    table: dict[bytes, bytes] = {}  # the worker's table: the history records by key
    hours = args.days * 24
    last_day = max(0, hours - 24)

    def run(first: int, last: int) -> tuple[float, float, int]:
        """Hours `first` to `last` (excluded), each followed by a flush of the history
        records it changed into `table`: the CPU seconds the updates took, the CPU
        seconds building those records took, and their bytes."""
        cpu = building = 0.0
        written = 0
        for hour in range(first, last):
            observed = start + hour * 3600 + 60
            readings = [(u, 1_000_000 + hour) for u in ids]
            began = time.process_time()
            book.update(((observed, readings),), datetime.fromtimestamp(observed, UTC))
            cpu += time.process_time() - began
            began = time.process_time()
            records = [(day_key(0, u, day), book.history_bytes(u, day))
                       for u, day in book.take_history_changed()]
            building += time.process_time() - began
            for key, record in records:
                if record is None:
                    table.pop(key, None)
                else:
                    table[key] = record
                    written += len(record)
        return cpu, building, written

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    run(0, last_day)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # the last day without tracemalloc, which would slow it down
    turns, building, written = run(last_day, hours)
    buckets = len(book.users[ids[0]].buckets())
    records = book.history_records(ids[0])
    turned = args.users * (hours - last_day)
    print(f"{args.users:,} users, {args.days} days of a reading an hour each: "
          f"{buckets} hourly buckets per user; the book and the table hold "
          f"{held / args.users:,.0f} bytes per user after {last_day // 24} days "
          f"(tracemalloc); the history records are {sum(map(len, records)):,} bytes in "
          f"{len(records)} records")
    print(f"the last day's hour turns: {turns / turned * 1e6:.1f} µs CPU per user and hour; "
          f"the history records they changed: {written / turned:,.0f} bytes per user and "
          f"hour, built in {building / turned * 1e6:.1f} µs")


if __name__ == "__main__":
    main()

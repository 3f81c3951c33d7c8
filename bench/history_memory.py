"""The quota book's memory after a month of traffic: the hourly usage history per user.

    python bench/history_memory.py [--users 2000 --days 36]

The memory figure of `bench/steady.py` is taken after one round of readings, when
every user has a single hourly bucket. A user with traffic every hour holds a
bucket per hour for `LONGEST_PERIOD_DAYS` plus the lateness window (35 days, 840
buckets, by default), so that a plan arriving mid-period sees the period's earlier
usage. This runs `--users` users without plans through `--days` days of one
reading an hour each, in one `QuotaBook` (no Kafka), and prints what the book
holds per user (tracemalloc) and the size of each user's history records (one per
UTC day), which the worker's table keeps in memory too. It times, in CPU per user,
the last day's hour turns (each reading of the last day starts a new hour, and
with the history full drops its oldest bucket), and for each of those hours the
history records the turn changed, built as the next flush builds them, with the
bytes they hold: what the worker writes to the changelog for them every hour.
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
    hours = args.days * 24
    last_day = max(0, hours - 24)

    def run(first: int, last: int) -> tuple[float, float, int]:
        """Hours `first` to `last` (excluded): the CPU seconds their updates took, the
        CPU seconds building the history records they changed took, and those records'
        bytes."""
        cpu = building = 0.0
        written = 0
        for hour in range(first, last):
            observed = start + hour * 3600 + 60
            readings = [(u, 1_000_000 + hour) for u in ids]
            began = time.process_time()
            book.update(((observed, readings),), datetime.fromtimestamp(observed, UTC))
            cpu += time.process_time() - began
            began = time.process_time()
            records = [book.history_bytes(u, day) for u, day in book.take_history_changed()]
            building += time.process_time() - began
            written += sum(len(r or b"") for r in records)
        return cpu, building, written

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    run(0, last_day)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # the last day without tracemalloc, which would slow it down
    turns, building, written = run(last_day, hours)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table = {day_key(0, u, day): book.history_bytes(u, day)
             for u in ids for day in book.users[u].days()}
    in_table = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del table
    buckets = len(book.users[ids[0]].buckets())
    records = book.history_records(ids[0])
    turned = args.users * (hours - last_day)
    print(f"{args.users:,} users, {args.days} days of a reading an hour each: "
          f"{buckets} hourly buckets per user; the book holds {held / args.users:,.0f} "
          f"bytes per user after {last_day // 24} days; the history records hold "
          f"{sum(map(len, records)):,} bytes in {len(records)} records, "
          f"{in_table / args.users:,.0f} with their keys in a table (a dict, tracemalloc)")
    print(f"the last day's hour turns: {turns / turned * 1e6:.1f} µs CPU per user and hour; "
          f"the history records they changed: {written / turned:,.0f} bytes per user and "
          f"hour, built in {building / turned * 1e6:.1f} µs")


if __name__ == "__main__":
    main()

"""The quota book's memory after a month of traffic: the hourly usage history per user.

    python bench/history_memory.py [--users 2000 --days 36]

The memory figure of `bench/steady.py` is taken after one round of readings, when
every user has a single hourly bucket. A user with traffic every hour holds a
bucket per hour for `LONGEST_PERIOD_DAYS` plus the lateness window (35 days, 840
buckets, by default), so that a plan arriving mid-period sees the period's earlier
usage. This runs `--users` users without plans through `--days` days of one
reading an hour each, in one `QuotaBook` (no Kafka), and prints what the book
holds per user (tracemalloc) and the size of each user's history record, which
the worker's table keeps in memory too and rewrites about once an hour.
"""

from __future__ import annotations

import argparse
import tracemalloc
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from quotaflow.core.quota import QuotaBook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--days", type=int, default=36)
    args = parser.parse_args()
    ids = [f"u{i:07d}" for i in range(args.users)]
    start = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    book = QuotaBook(ZoneInfo("UTC"))
    for hour in range(args.days * 24):
        observed = start + hour * 3600 + 60
        book.update(((observed, [(u, 1_000_000 + hour) for u in ids]),),
                    datetime.fromtimestamp(observed, UTC))
        book.take_history_changed()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    records = sum(len(book.history_bytes(u) or b"") for u in ids)
    buckets = len(book.users[ids[0]].buckets())
    print(f"{args.users:,} users, {args.days} days of a reading an hour each: "
          f"{buckets} hourly buckets per user; the book holds {held / args.users:,.0f} "
          f"bytes per user; the history record is {records / args.users:,.0f} bytes")


if __name__ == "__main__":
    main()

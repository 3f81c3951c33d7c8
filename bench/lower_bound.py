"""The least per-reading work any worker in this stack can do, on one core, without Kafka.

    python bench/lower_bound.py [--keys 3000 100000] [--per-message 100] [--rounds 10] [--passes 3]

A worker that bills cumulative counters exactly must at least, for every reading:
validate it (the contract, `CounterReport.decode`: pydantic-core, the fastest
checked path in `bench/decode_compare.py`), turn its cumulative counters into a
delta against the last ones of its (node, user) key, add the delta to the key's
day and month totals, and add it to the user's quota usage. This benchmark does
exactly that and nothing else: no routing, seq, epoch, rate or lateness checks,
no quota decisions, no records written, no totals sent, plain dicts of tuples.
It is a bound from below for `RawHandler` on the same messages, not a design.
The messages are `bench/steady.py`'s fleet's (each user on two nodes, a node's
readings cut by partition: about 83 per message at 100,000 keys).

It prints CPU µs per reading for validating alone, for the state alone (the
reports decoded beforehand) and for both, at each number of keys, the median
of `--passes` passes, with the garbage collector set as the worker sets it. Add
the framework's floor (`bench/steady.py --floor`: Faust and aiokafka consuming
and producing, nothing decoded) to read what a worker built on Faust and
pydantic costs at the least.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable

from steady import Fleet

from quotaflow.core.contracts import CounterReport
from quotaflow.streams.app import _quiet_gc


def bill(reports: Iterable[CounterReport]) -> int:
    """The least state work: per reading a delta against the last counters, the day and
    month totals, the user's usage. Returns the readings handled."""
    lasts: dict[str, dict[str, tuple[int, int]]] = {}
    days: dict[str, dict[str, tuple[int, int]]] = {}
    months: dict[str, dict[str, tuple[int, int]]] = {}
    used: dict[str, int] = {}
    readings = 0
    for report in reports:
        node = report.node_id
        last = lasts.get(node)
        if last is None:
            last = lasts[node] = {}
            days[node] = {}
            months[node] = {}
        day, month = days[node], months[node]
        for counter in report.counters:
            user, up, down = counter.user_id, counter.up, counter.down
            before = last.get(user)
            if before is None:
                d_up, d_down = up, down
            else:
                d_up, d_down = up - before[0], down - before[1]
            last[user] = (up, down)
            total = day.get(user)
            day[user] = (d_up, d_down) if total is None else (total[0] + d_up,
                                                             total[1] + d_down)
            total = month.get(user)
            month[user] = (d_up, d_down) if total is None else (total[0] + d_up,
                                                               total[1] + d_down)
            used[user] = used.get(user, 0) + d_up + d_down
        readings += len(report.counters)
    return readings


def cpu(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def measure(values: list[bytes], passes: int) -> tuple[int, dict[str, float]]:
    """The readings in `values`, and the median CPU µs per reading of each part."""
    decoded = [CounterReport.decode(v) for v in values]
    readings = sum(len(r.counters) for r in decoded)
    figures: dict[str, list[float]] = {"validate": [], "state": [], "both": []}
    for _ in range(passes):
        figures["validate"].append(cpu(lambda: all(map(CounterReport.decode, values))))
        figures["state"].append(cpu(lambda: bill(decoded)))
        figures["both"].append(cpu(lambda: bill(CounterReport.decode(v) for v in values)))
    return readings, {k: statistics.median(v) / readings * 1e6 for k, v in figures.items()}


def main() -> None:
    _quiet_gc()  # the collector set as the worker sets it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[3_000, 100_000])
    parser.add_argument("--per-message", type=int, default=100,
                        help="readings a node reports at once, before the partitions cut it")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    print("| keys | readings | validate µs | state µs | both µs (per reading, one core) |")
    print("|---:|---:|---:|---:|---:|")
    for keys in args.keys:
        values = [value for _, value in Fleet.sized(keys, args.per_message).reports(args.rounds)]
        readings, us = measure(values, args.passes)
        print(f"| {keys:,} | {readings:,} | {us['validate']:.2f} | {us['state']:.2f} | "
              f"{us['both']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""The billing step alone: `NodeLedger.update` on decoded reports, one core, no Kafka.

    python bench/ledger_step.py [--keys 3000 100000] [--rounds 10] [--before REF --pairs 3]

On `bench/steady.py`'s fleet (each user on two nodes, 100 readings a node and
message before the partitions cut it), decoded beforehand, every report goes
through its node's ledger; CPU µs per reading, the least and the median of three
passes, each pass with fresh ledgers. With `--before REF`, the same measurement
runs alternately with git revision REF's package (from `git archive`) and this
tree's, `--pairs` times, so that both see the machine alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from zoneinfo import ZoneInfo

HERE = Path(__file__).resolve().parent


def measure(keys: int, rounds: int) -> tuple[int, float, float]:
    """(readings, least, median CPU µs per reading) over three passes."""
    from steady import Fleet

    from quotaflow.core.contracts import CounterReport
    from quotaflow.core.ledger import BillingPolicy, NodeLedger
    from quotaflow.streams.app import _quiet_gc

    reports = [(p, CounterReport.decode(v)) for p, v in Fleet.sized(keys).reports(rounds)]
    readings = sum(len(r.counters) for _, r in reports)
    policy = BillingPolicy(timezone=ZoneInfo("UTC"))
    _quiet_gc()  # the collector set as the worker sets it
    passes = []
    for _ in range(3):
        ledgers: dict[tuple[str, int], NodeLedger] = {}
        begin = time.process_time()
        for partition, report in reports:
            ledger = ledgers.get((report.node_id, partition))
            if ledger is None:
                ledger = ledgers[report.node_id, partition] = NodeLedger(report.node_id)
            ledger.update(report, policy)
        passes.append((time.process_time() - begin) / readings * 1e6)
    return readings, min(passes), statistics.median(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[3_000, 100_000])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--before", metavar="REF")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.one:
        readings, least, median = measure(args.keys[0], args.rounds)
        print(f"{readings} {least:.3f} {median:.3f}")
        return
    trees: list[tuple[str, str | None]] = [("this tree", None)]
    workdir = None
    if args.before:
        from throughput import extract_tree

        workdir = tempfile.TemporaryDirectory()
        trees.insert(0, (args.before, str(extract_tree(args.before, Path(workdir.name)))))
    print("| revision | keys | readings | least µs per reading | median |")
    print("|---|---:|---:|---:|---:|")
    for keys in args.keys:
        for _ in range(args.pairs if args.before else 1):
            for label, tree in trees:
                env = dict(os.environ)
                if tree is not None:
                    env["PYTHONPATH"] = tree
                out = subprocess.run(
                    [sys.executable, str(HERE / "ledger_step.py"), "--one", "--keys", str(keys),
                     "--rounds", str(args.rounds)],
                    env=env, check=True, capture_output=True, text=True).stdout.split()
                print(f"| {label} | {keys:,} | {int(out[0]):,} | {out[1]} | {out[2]} |",
                      flush=True)
    if workdir is not None:
        workdir.cleanup()


if __name__ == "__main__":
    main()

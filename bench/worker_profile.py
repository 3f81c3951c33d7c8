"""Where a worker's CPU goes: a py-spy profile of the running worker, summarised.

    python bench/worker_profile.py PROFILE.txt [--top 25]

`bench/throughput.py --profile DIR` records the worker with `py-spy record --pid`
(raw collapsed stacks, idle threads left out, so samples are time on the CPU or
waiting for the GIL) and prints this summary. Each line of the file is a stack,
outermost frame first, and how many samples had it. A function's self time is
the samples in which it is the innermost frame, its total time those in which
it appears anywhere.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# Inclusive shares worth naming in a summary: a label, then text that a frame of
# the stage contains; a stack counts toward every stage one of its frames names.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("validate the report (CounterReport.decode)", ("CounterReport.decode (",)),
    ("bill (NodeLedger.update)", ("NodeLedger.update (",)),
    ("ledger changelog record (NodeLedger.to_bytes)", ("NodeLedger.to_bytes (",)),
    ("quota step (QuotaKeeper.update)", ("QuotaKeeper.update (",)),
    ("quota flush (QuotaKeeper.flush)", ("QuotaKeeper.flush (",)),
    ("quota states report (QuotaKeeper.report)", ("QuotaKeeper.report (",)),
    ("commands (QuotaKeeper._store_commands, .sent)", ("QuotaKeeper._store_commands (",
                                                       "QuotaKeeper.sent (")),
    ("totals record (TotalsBatch.encode)", ("TotalsBatch.encode (",)),
    ("the raw handler as a whole (RawHandler.handle)", ("RawHandler.handle (",)),
    ("the agent as a whole (bill in streams/app.py)", ("create_app.<locals>.bill (",)),
    ("socket writes (asyncio transport write)", ("_SelectorSocketTransport.write (",)),
    ("aiokafka producer (sender, batches, request encoding)", (
        "Sender.", "MessageAccumulator.", "BatchBuilder.", "AIOKafkaProducer.")),
    ("aiokafka consumer (fetcher)", ("Fetcher.", "AIOKafkaConsumer.")),
    ("Faust's producer buffer and topics", ("ProducerBuffer.", "Topic.", "Producer.")),
    ("event loop polling (select)", ("EpollSelector.select (",)),
    ("imports (start-up)", ("_find_and_load (",)),
)


def read(path: Path) -> Counter[tuple[str, ...]]:
    """The stacks of a py-spy raw file and their sample counts."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def summary(stacks: Counter[tuple[str, ...]], top: int = 25) -> list[str]:
    """Lines of text: the top self-time functions, then the stages' inclusive shares."""
    total = sum(stacks.values()) or 1
    own: Counter[str] = Counter()
    within: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    for stack, count in stacks.items():
        own[stack[-1]] += count
        for frame in set(stack):
            within[frame] += count
        for label, prefixes in STAGES:
            if any(p in frame for frame in stack for p in prefixes):
                stages[label] += count
    lines = [f"{total} samples; self time (the function itself), then total time (with what "
             "it calls)", "| self % | total % | function (file:first line) |", "|---:|---:|---|"]
    for frame, count in own.most_common(top):
        lines.append(f"| {100 * count / total:.1f} | {100 * within[frame] / total:.1f} | "
                     f"`{frame}` |")
    lines += ["", "| stage | total % |", "|---|---:|"]
    for label, _ in STAGES:
        lines.append(f"| {label} | {100 * stages[label] / total:.1f} |")
    return lines


def record(pid: int, out: Path, rate: int = 100) -> subprocess.Popen[bytes]:
    """Start py-spy on a running process (stopped by SIGINT, or when the process exits)."""
    beside = Path(sys.executable).with_name("py-spy")  # installed in the same venv
    spy = str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--format", "raw", "--function",
         "--nonblocking", "--rate", str(rate), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print("\n".join(summary(read(args.profile), args.top)))


if __name__ == "__main__":
    main()

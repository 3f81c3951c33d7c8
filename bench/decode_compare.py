"""Validating raw reports: the contract's pydantic-core path against two others, on one core.

    python bench/decode_compare.py [--nodes 10 --users 3000 --days 1 --interval 600]

Times, per reading, on the worker's own messages (one partition's fragment of a
report each):

- `CounterReport.decode`: what the worker runs (pydantic-core's JSON validation
  into the frozen model, then the duplicate-key check);
- `orjson.loads` alone: the floor for any JSON path that builds Python objects;
- orjson plus the same rules checked by hand in Python (types, bounds, the
  identifier rules, unique users, and the quote count for duplicate keys);
- msgspec decoding into a typed Struct with the same bounds (only when msgspec
  is installed: it is no dependency of quotaflow). msgspec lets a key given twice
  win silently and has no Unicode-aware identifier check, so those would come on
  top.

Each path must accept every message; the figures say whether replacing the
contract's validation could pay.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from workload import workload, workload_parser

from quotaflow.core.contracts import (
    MAX_COUNTER,
    MAX_IDENTIFIER_LENGTH,
    MAX_SEQ,
    OBSERVED_AT_FLOOR,
    CounterReport,
)
from quotaflow.core.partitioning import split_report

_IDENTIFIER = re.compile(r"(?: |\\*[^\\ \x00-\x1f\x7f-\x9f\u2028\u2029])*\Z")


def _identifier(value: object) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_IDENTIFIER_LENGTH:
        raise ValueError("identifier")
    if not _IDENTIFIER.match(value):
        raise ValueError("identifier")
    return value


def by_hand(data: bytes) -> tuple[str, int, int, datetime, list[tuple[str, int, int]]]:
    """orjson, then the contract's rules in Python (error messages left out)."""
    raw = orjson.loads(data)
    if type(raw) is not dict or not raw.keys() <= {"node_id", "epoch", "seq", "observed_at",
                                                   "kind", "baseline", "counters"}:
        raise ValueError("fields")
    node = _identifier(raw["node_id"])
    epoch, seq = raw["epoch"], raw["seq"]
    if type(epoch) is not int or type(seq) is not int or not (0 <= epoch < MAX_SEQ
                                                              and 0 <= seq < MAX_SEQ):
        raise ValueError("seq")
    observed = datetime.fromisoformat(raw["observed_at"])
    if observed.tzinfo is None or observed < OBSERVED_AT_FLOOR:
        raise ValueError("observed_at")
    counters = []
    seen = set()
    for c in raw.get("counters", ()):
        if type(c) is not dict or len(c) != 3:
            raise ValueError("counter")
        user, up, down = _identifier(c["user_id"]), c["up"], c["down"]
        if type(up) is not int or type(down) is not int or not (
                0 <= up <= MAX_COUNTER and 0 <= down <= MAX_COUNTER):
            raise ValueError("bytes")
        seen.add(user)
        counters.append((user, up, down))
    if len(seen) != len(counters):
        raise ValueError("a user appears twice")
    quotes = 2 * (len(raw) + 4 * len(counters) + 2 + ("kind" in raw))
    if b"\\" in data or data.count(b'"') != quotes:
        raise ValueError("would look closely")
    return node, epoch, seq, observed, counters


def msgspec_decoder() -> Callable[[bytes], Any] | None:
    """A msgspec decoder into Structs with the contract's bounds, if msgspec is installed."""
    try:
        import msgspec
    except ImportError:
        return None
    from typing import Annotated, Literal

    ident = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_IDENTIFIER_LENGTH,
                                        pattern=r"^(?: |\\*[^\\ \x00-\x1f\x7f-\x9f])*$")]
    count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNTER)]
    seq = Annotated[int, msgspec.Meta(ge=0, lt=MAX_SEQ)]
    # built with defstruct: the annotations of a class body here would be strings
    counter = msgspec.defstruct("Counter", [("user_id", ident), ("up", count),
                                            ("down", count)],
                                forbid_unknown_fields=True, frozen=True)
    report_type = msgspec.defstruct("Report", [
        ("node_id", ident), ("epoch", seq), ("seq", seq),
        ("observed_at", Annotated[datetime, msgspec.Meta(tz=True)]),
        ("kind", Literal["cumulative", "delta"], "cumulative"),
        ("baseline", bool, False),
        ("counters", tuple[counter, ...], ()),  # type: ignore[valid-type]
    ], forbid_unknown_fields=True, frozen=True)
    decoder = msgspec.json.Decoder(report_type, strict=True)

    def decode(data: bytes) -> Any:
        report = decoder.decode(data)
        if len({c.user_id for c in report.counters}) != len(report.counters):
            raise ValueError("a user appears twice")
        return report

    return decode


def main() -> None:
    parser = workload_parser(__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sim = workload(args)
    messages = [
        fragment.encode()
        for line in sim.lines
        for fragment in split_report(CounterReport.decode(line), args.partitions).values()
    ]
    readings = sim.readings
    paths: list[tuple[str, Callable[[bytes], Any]]] = [
        ("CounterReport.decode (pydantic-core, the contract)", CounterReport.decode),
        ("orjson.loads only (no checks)", orjson.loads),
        ("orjson + the rules by hand in Python", by_hand),
    ]
    spec = msgspec_decoder()
    if spec is not None:
        paths.append(("msgspec Struct with the bounds (+ unique users)", spec))
    print(f"{readings:,} readings in {len(messages):,} messages "
          f"({readings / len(messages):.0f} per message); best of {args.repeat}")
    print("| path | µs per reading | readings/s on one core |\n|---|---:|---:|")
    for label, decode in paths:
        best = float("inf")
        for _ in range(args.repeat):
            start = time.process_time()
            for message in messages:
                decode(message)
            best = min(best, time.process_time() - start)
        print(f"| {label} | {best / readings * 1e6:.3f} | {readings / best:,.0f} |")


if __name__ == "__main__":
    main()

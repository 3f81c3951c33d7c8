"""iptables (or ip6tables) accounting rules: per-port byte counters, read with `-nvxL`.

The source named `iptables`; users are ports (rename them with `user_map`). The
counters start at zero on boot, so the epoch is the boot time by default.
"""

from __future__ import annotations

import re
import subprocess
from typing import Literal

from quotaflow.core.contracts import Counter
from quotaflow.producers.sources._parsing import (
    DIGITS,
    ParseError,
    add_traffic,
    counters_of,
    decimal_uint,
)
from quotaflow.producers.sources._runtime import (
    ReadParseCollector,
    Runner,
    Source,
    SourceConfigBase,
    run_command,
)

_IPTABLES_COMMENT = re.compile(r"/\*.*?\*/")
_IPTABLES_DPT = re.compile(r"(?<!\w)dpt:([0-9]+)(?![\w:])")
_IPTABLES_SPT = re.compile(r"(?<!\w)spt:([0-9]+)(?![\w:])")


def parse_iptables(text: str) -> list[Counter]:
    """Per-port counters from `iptables -nvxL CHAIN` (or ip6tables) accounting rules.

    A rule matching `dpt:PORT` counts traffic to the server port, which is the
    user's upload; `spt:PORT` counts the download. Rules of the same port are
    summed (tcp and udp, and any repeats), so list only the accounting chain.
    Rules without a single port match (jumps, multiport, ranges) are skipped; a
    rule with both dpt and spt is refused as ambiguous. `-x` is required: without
    it iptables rounds big counts (`12K`), which are refused. The port is the user id.
    Rules are read by the columns of the header line above them (`pkts bytes ...`,
    or `num pkts bytes ...` with `--line-numbers`), so rule lines without their
    header (say, filtered through grep) are refused rather than misread.
    """
    totals: dict[str, tuple[int, int]] = {}
    skip: int | None = None  # columns before `pkts`, known once the header is seen
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("Zeroing chain"):
            raise ParseError("iptables: counters were zeroed on read (-Z); list them without -Z")
        if re.fullmatch(r"Chain \S+ \(.*\)", line):
            skip = None
            continue
        fields = line.split()
        if fields[:2] == ["pkts", "bytes"]:
            skip = 0
            continue
        if fields[:3] == ["num", "pkts", "bytes"]:
            skip = 1
            continue
        if skip is None:
            raise ParseError(f"iptables line {number}: rule or text before the column header")
        if len(fields) < skip + 8:
            raise ParseError(f"iptables line {number}: not a rule: {line[:80]!r}")
        if not all(DIGITS.fullmatch(f) for f in fields[: skip + 2]):
            raise ParseError(
                f"iptables line {number}: packet/byte counts must be exact integers "
                f"(list with -x): {line[:80]!r}"
            )
        size = decimal_uint(fields[skip + 1], f"iptables line {number}: bytes")
        matches = _IPTABLES_COMMENT.sub(" ", " ".join(fields[skip + 2 :]))
        dpts = _IPTABLES_DPT.findall(matches)
        spts = _IPTABLES_SPT.findall(matches)
        if len(dpts) + len(spts) > 1:
            raise ParseError(
                f"iptables line {number}: rule matches more than one port: {line[:80]!r}"
            )
        if not dpts and not spts:
            continue
        port_text = (dpts or spts)[0]
        port = int(port_text)
        if not 0 < port <= 65535 or str(port) != port_text:
            raise ParseError(f"iptables line {number}: bad port {port_text!r}")
        if dpts:
            add_traffic(totals, port_text, size, 0)
        else:
            add_traffic(totals, port_text, 0, size)
    return counters_of(totals)


def read_iptables(
    chain: str,
    runner: Runner = subprocess.run,
    *,
    table: str = "filter",
    binary: str = "iptables",
    timeout: float = 10.0,
) -> str:
    """`iptables -w -t TABLE -nvxL CHAIN`: exact counters, never zeroed; or `binary="ip6tables"`."""
    return run_command([binary, "-w", "-t", table, "-nvxL", chain], timeout, runner)


class IptablesConfig(SourceConfigBase):
    """An accounting chain read with `iptables -nvxL`; users are ports."""

    type: Literal["iptables"]
    chain: str
    table: str = "filter"
    binary: Literal["iptables", "ip6tables"] = "iptables"
    epoch: Literal["constant", "boot"] = "boot"


def _collector(config: IptablesConfig) -> ReadParseCollector:
    chain, table, binary = config.chain, config.table, config.binary
    return ReadParseCollector(
        lambda: read_iptables(chain, table=table, binary=binary),
        parse_iptables, config.user_map, config.epoch,
    )


SOURCE = Source(name="iptables", config=IptablesConfig, collector=_collector, parse=parse_iptables)

"""The truth check: do InfluxDB's daily totals equal a ground truth, to the byte?"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson

from quotaflow.core.periods import Calendar
from quotaflow.core.settings import Settings
from quotaflow.sinks.influxql import InfluxQL

DayKey = tuple[str, str, str]  # user, node, day label


@dataclass
class CheckResult:
    """How InfluxDB's daily totals compare with the truth."""

    expected: int
    found: int
    mismatched: list[tuple[DayKey, tuple[int, int] | None, tuple[int, int] | None]] = field(
        default_factory=list
    )
    expected_bytes: int = 0
    found_bytes: int = 0

    @property
    def exact(self) -> bool:
        """True when every total matches and nothing extra is there."""
        return not self.mismatched

    def summary(self) -> str:
        """A readable verdict with the first few differences."""
        head = (
            f"truth check: {self.expected} expected (user, node, day) totals, "
            f"{self.found} in InfluxDB, {len(self.mismatched)} differ; "
            f"bytes expected {self.expected_bytes:,}, found {self.found_bytes:,}: "
            + ("EXACT" if self.exact else "MISMATCH")
        )
        lines = [head]
        for key, want, got in self.mismatched[:10]:
            lines.append(f"  {key}: truth {want}, InfluxDB {got}")
        return "\n".join(lines)


def read_truth(path: Path) -> dict[DayKey, tuple[int, int]]:
    """Ground truth rows as written by `quotaflow simulate --truth`."""
    truth: dict[DayKey, tuple[int, int]] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            row = orjson.loads(line)
            truth[(row["user_id"], row["node_id"], row["day"])] = (row["up"], row["down"])
    return truth


def read_daily_totals(settings: Settings) -> dict[DayKey, tuple[int, int]]:
    """Every daily total in InfluxDB, keyed like the truth."""
    calendar = Calendar(ZoneInfo(settings.timezone))
    series = InfluxQL.from_settings(settings).query(
        "SELECT up_bytes, down_bytes FROM traffic_daily GROUP BY user_id, node_id"
    )
    return {
        (s.tags["user_id"], s.tags["node_id"], calendar.label(int(r["time"]), "day")): (
            r["up_bytes"], r["down_bytes"],
        )
        for s in series for r in s.rows
    }


def compare(
    truth: dict[DayKey, tuple[int, int]], found: dict[DayKey, tuple[int, int]]
) -> CheckResult:
    """Compare two sets of daily totals; zero totals count as absent."""
    truth = {k: v for k, v in truth.items() if v != (0, 0)}
    found = {k: v for k, v in found.items() if v != (0, 0)}
    result = CheckResult(
        expected=len(truth), found=len(found),
        expected_bytes=sum(u + d for u, d in truth.values()),
        found_bytes=sum(u + d for u, d in found.values()),
    )
    for key in sorted(truth.keys() | found.keys()):
        if truth.get(key) != found.get(key):
            result.mismatched.append((key, truth.get(key), found.get(key)))
    return result


def compare_with_truth(settings: Settings, truth_file: Path) -> CheckResult:
    """The truth check of InfluxDB against a truth file."""
    return compare(read_truth(truth_file), read_daily_totals(settings))

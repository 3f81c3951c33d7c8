"""A simulated fleet: counter reports as real nodes send them, and the ground truth.

The fleet has heavy-tailed users spread over several nodes, nodes that restart
(losing the bytes their counters held since the last report, as real ones do),
agents that first see busy counters (`baseline`), push-style nodes that send
deltas, duplicated and reordered reports and a few malformed lines. The ground
truth is computed from the traffic the simulator generated, not by the ledger,
so comparing the two checks the billing rules end to end.

>>> sim = simulate(FleetSpec(nodes=3, users=20, days=1, seed=1))
>>> sim.readings > 0 and sim.malformed > 0
True
>>> sum(up + down for up, down in sim.truth.values()) > 0
True
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson

from quotaflow.core.periods import Calendar

TruthKey = tuple[str, str, int]  # user, node, day start


@dataclass(frozen=True)
class FleetSpec:
    """The shape of a simulated fleet."""

    nodes: int = 20
    users: int = 500
    days: float = 3.0
    start: datetime = datetime(2026, 11, 1, tzinfo=UTC)
    interval_s: int = 3600
    timezone: str = "UTC"
    seed: int = 7
    nodes_per_user: tuple[int, int] = (1, 3)
    duplicate_rate: float = 0.06
    reorder_rate: float = 0.03
    restart_rate: float = 0.02
    delta_node_share: float = 0.2
    baseline_node_share: float = 0.15
    malformed: int = 12
    name_prefix: str = ""  # put before every node and user name, to keep fleets apart


@dataclass
class Simulation:
    """The lines to publish, in order, and what the rules must bill for them."""

    lines: list[bytes] = field(default_factory=list)
    truth: dict[TruthKey, list[int]] = field(default_factory=dict)
    readings: int = 0
    reports: int = 0
    duplicates: int = 0
    reordered: int = 0
    restarts: int = 0
    malformed: int = 0

    def month_truth(self, tz: ZoneInfo) -> dict[TruthKey, list[int]]:
        """The truth per (user, node, month start)."""
        calendar = Calendar(tz)
        out: dict[TruthKey, list[int]] = {}
        for (user, node, day), (up, down) in self.truth.items():
            total = out.setdefault((user, node, calendar.month_start(day)), [0, 0])
            total[0] += up
            total[1] += down
        return out


_MALFORMED = (
    b"this is not json",
    b'{"node_id": "node-x", "epoch": 1, "seq": 1}',
    b'{"node_id": "node-x", "epoch": 1, "seq": 2, "observed_at": "2026-11-01T00:00:00Z",'
    b' "counters": [{"user_id": "u", "up": -5, "down": 1}]}',
    b'{"node_id": "node-x", "epoch": 1, "seq": 3, "observed_at": "yesterday",'
    b' "counters": []}',
    b'{"node_id": "node-x", "epoch": 1, "seq": 4, "observed_at": "2026-11-01T00:00:00",'
    b' "counters": []}',
    b'{"node_id": "node-x", "epoch": 1, "seq": 5, "observed_at": "2026-11-01T00:00:00Z",'
    b' "counters": [{"user_id": "u", "up": "12", "down": 1}]}',
    b'{"node_id": "node-x", "epoch": 1, "seq": 6, "observed_at": "2026-11-01T00:00:00Z",'
    b' "counters": [{"user_id": "u", "up": 1, "down": 1}, {"user_id": "u", "up": 2, "down": 2}]}',
    b'[1, 2, 3]',
    b'{"node_id": "", "epoch": 1, "seq": 7, "observed_at": "2026-11-01T00:00:00Z"}',
)


@dataclass
class _Report:
    node: str
    epoch: int
    seq: int
    at: datetime
    kind: str
    baseline: bool
    counters: list[tuple[str, int, int]]
    day: int

    def encode(self) -> bytes:
        body: dict[str, object] = {
            "node_id": self.node,
            "epoch": self.epoch,
            "seq": self.seq,
            "observed_at": self.at.isoformat(),
            "counters": [{"user_id": u, "up": up, "down": down} for u, up, down in self.counters],
        }
        if self.kind != "cumulative":
            body["kind"] = self.kind
        if self.baseline:
            body["baseline"] = True
        return orjson.dumps(body)


def _node_reports(
    spec: FleetSpec, rng: random.Random, node: str, users: list[str], rates: dict[str, float],
    calendar: Calendar, sim: Simulation,
) -> list[_Report]:
    """One node's reports in the order it sends them, crediting the truth as it goes."""
    delta = rng.random() < spec.delta_node_share
    baseline = not delta and rng.random() < spec.baseline_node_share
    offset = rng.uniform(0, spec.interval_s)
    epoch = int((spec.start.timestamp() - rng.uniform(3600, 86400 * 30)) * 1000)
    seq = 0
    counters = {u: [0, 0] for u in users}
    if baseline:  # the node was busy before the agent came
        counters = {u: [rng.randrange(10**9), rng.randrange(10**10)] for u in users}
    reports: list[_Report] = []
    steps = int(spec.days * 86400 // spec.interval_s)
    first = True
    for step in range(steps):
        at = spec.start + timedelta(seconds=offset + step * spec.interval_s)
        if not first and rng.random() < spec.restart_rate:
            sim.restarts += 1  # counters die some time into this interval
            epoch = int((at.timestamp() - rng.uniform(1, spec.interval_s)) * 1000)
            seq = 0
            counters = {u: [0, 0] for u in users}
            keep = rng.random()  # the share of this interval's traffic after the restart
        else:
            keep = 1.0
        day = calendar.day_start(int(at.timestamp()))
        seq += 1
        moved: list[tuple[str, int, int]] = []
        if not first:  # traffic of the interval that just ended
            for user in users:
                if rng.random() < 0.4:
                    continue
                scale = rates[user] * spec.interval_s * rng.random() * keep
                up, down = int(scale * rng.uniform(0.05, 0.3)), int(scale)
                if up or down:
                    moved.append((user, up, down))
        for user, up, down in moved:
            counters[user][0] += up
            counters[user][1] += down
            total = sim.truth.setdefault((user, node, day), [0, 0])
            total[0] += up
            total[1] += down
        shown = moved if delta else [(u, c[0], c[1]) for u, c in counters.items()]
        reports.append(
            _Report(node, epoch, seq, at, "delta" if delta else "cumulative",
                    baseline and first, shown, day)
        )
        first = False
    return reports


def _disorder(spec: FleetSpec, rng: random.Random, reports: list[_Report],
              sim: Simulation) -> list[_Report]:
    """Swap neighbours and repeat reports the way flaky links and retries do.

    A swap never crosses a restart or a day boundary of a cumulative node: the
    rules then bill the overtaken report's bytes with the next one, at its day.
    """
    out = list(reports)
    for i in range(len(out) - 1):
        a, b = out[i], out[i + 1]
        swappable = a.kind == "delta" or (
            a.epoch == b.epoch and a.day == b.day and not a.baseline
        )
        if swappable and rng.random() < spec.reorder_rate:
            out[i], out[i + 1] = b, a
            sim.reordered += 1
    # a retried report arrives again right away or a few reports later, never earlier
    with_dups: list[_Report] = []
    later: list[tuple[int, _Report]] = []
    for position, report in enumerate(out):
        with_dups.append(report)
        with_dups.extend(r for due, r in later if due == position)
        later = [(due, r) for due, r in later if due != position]
        if rng.random() < spec.duplicate_rate:
            later.append((position + rng.randrange(1, 4), report))
            sim.duplicates += 1
    with_dups.extend(r for _, r in later)
    return with_dups


def simulate(spec: FleetSpec) -> Simulation:
    """Generate the fleet's reports and their ground truth."""
    rng = random.Random(spec.seed)
    calendar = Calendar(ZoneInfo(spec.timezone))
    sim = Simulation()
    users = [f"{spec.name_prefix}user-{i:05d}" for i in range(spec.users)]
    # heavy-tailed mean rates, bytes per second, capped at about 20 Mbit/s
    rates = {u: min(rng.paretovariate(1.2) * 2_000, 2_500_000) for u in users}
    per_node: dict[str, list[str]] = {
        f"{spec.name_prefix}node-{n:03d}": [] for n in range(spec.nodes)
    }
    nodes = list(per_node)
    for user in users:
        low, high = spec.nodes_per_user
        for node in rng.sample(nodes, min(len(nodes), rng.randint(low, high))):
            per_node[node].append(user)
    timeline: list[tuple[datetime, int, _Report]] = []
    for index, (node, node_users) in enumerate(per_node.items()):
        reports = _node_reports(spec, rng, node, node_users, rates, calendar, sim)
        for position, report in enumerate(_disorder(spec, rng, reports, sim)):
            # each node sends in its own order; nodes interleave by the send slot
            slot = reports[min(position, len(reports) - 1)].at
            timeline.append((slot, index, report))
    timeline.sort(key=lambda item: (item[0], item[1]))
    for _, _, report in timeline:
        sim.lines.append(report.encode())
        sim.reports += 1
        sim.readings += len(report.counters)
    for i in range(spec.malformed):
        sim.lines.insert(rng.randrange(len(sim.lines) + 1), _MALFORMED[i % len(_MALFORMED)])
        sim.malformed += 1
    return sim


def iter_truth_rows(sim: Simulation, calendar: Calendar) -> Iterator[dict[str, object]]:
    """The truth as printable rows, one per (user, node, day)."""
    for (user, node, day), (up, down) in sorted(sim.truth.items()):
        yield {
            "user_id": user, "node_id": node, "day": calendar.label(day, "day"),
            "up": up, "down": down,
        }

"""`quotaflow report`: the key views as PNG charts, and a static HTML page, without Grafana.

Each chart runs a dashboard panel's own query (taken from `quotaflow.dashboards.boards`
and resolved by `quotaflow.dashboards.grafana` as Grafana would), so the pictures and
the dashboards cannot disagree:

* fleet traffic by day, stacked by node (Fleet, the last 30 days);
* the top users this month, billed and raw (Fleet);
* a node's last 30 days and last 12 months (Node);
* a user's quota burn through the month against the allowance (User).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from quotaflow.dashboards.boards import build_all
from quotaflow.dashboards.grafana import Selection, panel_range, resolve
from quotaflow.sinks.influxql import InfluxQL, Series


@dataclass
class Chart:
    """One picture and the numbers it shows."""

    file: str
    title: str
    rows: list[tuple[str, int]] = field(default_factory=list)  # label, bytes


def human(n: float) -> str:
    """Bytes in decimal units, as the dashboards show them (`decbytes`).

    >>> human(1_234_567_890), human(999)
    ('1.23 GB', '999 B')
    """
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


class Report:
    """Runs dashboard panels' queries on InfluxDB and draws them."""

    def __init__(self, client: InfluxQL, zone: str, now: datetime) -> None:
        self.client = client
        self.zone = ZoneInfo(zone)
        self.boards = build_all(zone)
        self.now = now

    def query(self, uid: str, title: str, selections: dict[str, Selection],
              ref: str = "A") -> list[Series]:
        """The results of one panel query, times in Unix ms."""
        model = self.boards[uid]
        panel = next(p for p in model["panels"] if p["title"] == title)
        target = next(t for t in panel["targets"] if t["refId"] == ref)
        statement = resolve(model, panel, target["query"], selections, self.now)
        return self.client.query(statement, epoch="ms")

    def values(self, variable: str) -> tuple[str, ...]:
        """Every value of the `$node` or `$user` variable, from its own query."""
        query = next(v["query"] for model in self.boards.values()
                     for v in model["templating"]["list"] if v["name"] == variable)
        return tuple(sorted(str(row["value"]) for s in self.client.query(query)
                            for row in s.rows))

    def periods(self, uid: str, title: str, fmt: str) -> list[str]:
        """Labels of every day (`fmt` with %d) or month of a panel's time range."""
        model = self.boards[uid]
        panel = next(p for p in model["panels"] if p["title"] == title)
        time_range = panel_range(model, panel, self.now)
        day = self._time(time_range.start_ms).date()
        last = self._time(time_range.end_ms).date()
        labels: list[str] = []
        while day <= last:
            label = day.strftime(fmt)
            if label not in labels:
                labels.append(label)
            day += timedelta(days=1)
        return labels

    def _time(self, ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, self.zone)


def _save(figure: Any, out: Path, name: str) -> str:
    figure.tight_layout()
    figure.savefig(out / name, dpi=110)
    plt.close(figure)
    return name


def _bytes_axis(axis: Any) -> None:
    axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: human(v)))


def fleet_by_day(report: Report, out: Path, nodes: tuple[str, ...]) -> Chart | None:
    series = report.query("quotaflow-fleet", "Traffic by day, stacked by node",
                          {"node": Selection(nodes, all=True)})
    if not any(r["total"] for s in series for r in s.rows):
        return None
    figure, axis = plt.subplots(figsize=(11, 4.5))
    days = sorted({r["time"] for s in series for r in s.rows})
    colors = [plt.get_cmap("tab20")(i) for i in range(20)]  # 20 colours, not the default 10
    labels = [report._time(t).strftime("%m-%d") for t in days]
    bottom = [0] * len(days)
    totals: dict[str, int] = {}
    for index, s in enumerate(sorted(series, key=lambda s: s.tags.get("node_id", ""))):
        by_time = {r["time"]: int(r["total"] or 0) for r in s.rows}
        values = [by_time.get(t, 0) for t in days]
        axis.bar(labels, values, bottom=bottom, label=s.tags.get("node_id", ""),
                 color=colors[index % len(colors)])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        totals[s.tags.get("node_id", "")] = sum(values)
    axis.set_title("Fleet traffic by day, stacked by node (last 30 days)")
    axis.tick_params(axis="x", labelrotation=60, labelsize=7)
    _bytes_axis(axis)
    if len(series) <= 20:  # beside the bars, not over them
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    name = _save(figure, out, "fleet-traffic-by-day.png")
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    return Chart(name, "Fleet traffic by day, stacked by node (last 30 days, per node)", rows)


def top_users(report: Report, out: Path, nodes: tuple[str, ...]) -> Chart | None:
    (series,) = report.query("quotaflow-fleet", "Top users this month, raw and billed",
                             {"node": Selection(nodes, all=True)}) or (None,)
    if series is None or not series.rows:
        return None
    rows = sorted(((r["user_id"], int(r["billed"]), int(r["raw"])) for r in series.rows),
                  key=lambda r: -r[1])
    figure, axis = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    labels = [r[0] for r in rows][::-1]
    axis.barh(labels, [r[1] for r in rows][::-1], label="billed")
    axis.barh(labels, [r[2] for r in rows][::-1], height=0.4, label="raw")
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: human(v)))
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    axis.set_title("Top users this month (billed, raw)")
    axis.legend()
    return Chart(_save(figure, out, "top-users.png"), "Top users this month (billed bytes)",
                 [(u, b) for u, b, _ in rows])


def node_history(report: Report, out: Path, node: str) -> list[Chart]:
    charts = []
    selection = {"node": Selection((node,))}
    for title, name, fmt in (("Last 30 days, by day", "30-days", "%Y-%m-%d"),
                             ("Last 12 months, by month", "12-months", "%Y-%m")):
        series = report.query("quotaflow-node", title, selection)
        found = {report._time(r["time"]).strftime(fmt): int(r["total"] or 0)
                 for s in series for r in s.rows}
        # every day or month of the panel's range, 0 where InfluxDB has no point
        labels = report.periods("quotaflow-node", title, fmt)
        rows = [(label, found.get(label, 0)) for label in labels]
        figure, axis = plt.subplots(figsize=(10, 3.8))
        axis.bar([label[5:] if name == "30-days" else label for label, _ in rows],
                 [v for _, v in rows])
        axis.set_title(f"{node}: {title.lower()}")
        axis.tick_params(axis="x", labelrotation=60, labelsize=7)
        _bytes_axis(axis)
        file = _save(figure, out, f"node-{_safe(node)}-{name}.png")
        charts.append(Chart(file, f"{node}: {title.lower()}", rows))
    return charts


BURN = "Quota burn through the month, cumulative billed, against the allowance"


def quota_burn(report: Report, out: Path, user: str) -> Chart | None:
    """The user's billed bytes of the month, cumulative day by day, against the allowance
    of the latest quota state (the User dashboard's burn panel, both its queries)."""
    selection = {"user": Selection((user,))}
    used = {report._time(r["time"]).strftime("%Y-%m-%d"): int(r["used_bytes"] or 0)
            for s in report.query("quotaflow-user", BURN, selection) for r in s.rows}
    states = [r for s in report.query("quotaflow-user", BURN, selection, ref="B")
              for r in s.rows]
    if not used:
        return None
    labels = report.periods("quotaflow-user", BURN, "%Y-%m-%d")
    rows = [(label, used.get(label, 0)) for label in labels]
    allowance = states[-1]["allowance_bytes"] if states else None
    figure, axis = plt.subplots(figsize=(11, 4.2))
    days = [label[5:] for label, _ in rows]
    values = [v for _, v in rows]
    axis.bar(days, values, color="tab:blue", label="billed so far this month")
    if allowance is not None:
        axis.axhline(allowance, color="tab:red", linestyle="--",
                     label=f"allowance {human(allowance)}")
        # the warnings the worker issued this period, at their thresholds
        events = report.query("quotaflow-user", "Quota commands", selection)
        month_start = report.periods("quotaflow-user", BURN, "%Y-%m-%d")[0]
        thresholds = sorted({r["threshold"] for s in events for r in s.rows
                             if r["action"] == "warn" and r["threshold"] is not None
                             and report._time(r["time"]).strftime("%Y-%m-%d") >= month_start})
        for threshold, style in zip(thresholds, (":", "-.", (0, (5, 5))), strict=False):
            axis.axhline(allowance * threshold, color="tab:orange", linestyle=style,
                         linewidth=1.2, label=f"warned at {threshold:.0%}")
        axis.set_ylim(0, max(allowance, max(values)) * 1.12)
    axis.set_title(f"{user}: quota burn through the month (cumulative billed bytes)")
    axis.set_xlabel("billing day")
    axis.tick_params(axis="x", labelrotation=60, labelsize=7)
    _bytes_axis(axis)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # off the lines
    numbers = [("used", rows[-1][1])]
    if allowance is not None:
        numbers.append(("allowance", int(allowance)))
    return Chart(_save(figure, out, f"user-{_safe(user)}-quota.png"),
                 f"{user}: quota burn through the month against the allowance", numbers)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def heaviest_node(report: Report, nodes: tuple[str, ...]) -> str | None:
    """The node with the most bytes in the last 30 days."""
    series = report.query("quotaflow-fleet", "Traffic by day, stacked by node",
                          {"node": Selection(nodes, all=True)})
    totals = {s.tags.get("node_id", ""): sum(int(r["total"] or 0) for r in s.rows)
              for s in series}
    return max(totals, key=lambda n: totals[n]) if totals else None


def fullest_user(report: Report, users: tuple[str, ...]) -> str | None:
    """The user with a quota whose usage is the largest share of the allowance."""
    series = report.query("quotaflow-user", "Usage of the billing period against the allowance",
                          {"user": Selection(users, all=True)})
    ratios = {s.tags["user_id"]: (r["used_bytes"] or 0) / r["allowance_bytes"]
              for s in series for r in s.rows[-1:] if r["allowance_bytes"]}
    return max(ratios, key=lambda u: ratios[u]) if ratios else None


def write_report(
    client: InfluxQL, out: Path, zone: str, now: datetime, user: str | None = None,
    node: str | None = None, with_html: bool = False,
) -> list[Chart]:
    """Write the PNGs (and `index.html`) to `out`; return what was drawn."""
    out.mkdir(parents=True, exist_ok=True)
    report = Report(client, zone, now)
    nodes, users = report.values("node"), report.values("user")
    charts = [c for c in (fleet_by_day(report, out, nodes), top_users(report, out, nodes)) if c]
    node = node or heaviest_node(report, nodes)
    if node:
        charts += node_history(report, out, node)
    user = user or fullest_user(report, users)
    if user:
        burn = quota_burn(report, out, user)
        if burn:
            charts.append(burn)
    if with_html:
        (out / "index.html").write_text(page(charts, now, zone))
    return charts


def page(charts: list[Chart], now: datetime, zone: str) -> str:
    """One static page with every chart and its numbers."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>quotaflow report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td{padding:2px 10px;border-bottom:1px solid #ddd}"
        "td.n{text-align:right;font-variant-numeric:tabular-nums}</style></head><body>",
        f"<h1>quotaflow report</h1><p>{html.escape(now.isoformat(timespec='seconds'))}, "
        f"billing zone {html.escape(zone)}. Each chart runs a Grafana dashboard panel's "
        "query on InfluxDB.</p>",
    ]
    for chart in charts:
        parts.append(f"<h2>{html.escape(chart.title)}</h2>"
                     f"<img src='{html.escape(chart.file)}' alt='{html.escape(chart.title)}'>")
        parts.append("<table>")
        for label, value in chart.rows:
            parts.append(f"<tr><td>{html.escape(label)}</td><td class='n'>{value:,} bytes</td>"
                         f"<td class='n'>{human(value)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)

"""The five dashboards, built with grafana-foundation-sdk: Fleet, Node, User, Quotas, Pipeline.

Conventions: stable uids (`quotaflow-<name>`), raw InfluxQL targets
(`quotaflow.dashboards.queries`), the data source as the `$datasource` variable,
multi-value `$node` and `$user` variables with All, a 10 s refresh, and the dashboard's
time zone set to the billing zone (`QUOTAFLOW_TIMEZONE`), so that Grafana rounds
`now/d`, `now/M` and `now/y` to the starts of billing days, months and years.

`python -m quotaflow.dashboards.boards` (or `quotaflow dashboards build`) writes
`dashboards/build/<uid>.json`; tests/dashboards/test_build.py fails when those are stale.

>>> sorted(build_all("UTC"))
['quotaflow-fleet', 'quotaflow-node', 'quotaflow-pipeline', 'quotaflow-quotas', 'quotaflow-user']
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, gauge, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    CustomVariable,
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard

from quotaflow.dashboards import queries as q
from quotaflow.dashboards.targets import DATASOURCE, InfluxQL, InfluxQLAnnotation

BUILD_DIR = Path(__file__).resolve().parent / "build"
BYTES = "decbytes"
TAGS = ["quotaflow"]

Panel = (
    stat.Panel | timeseries.Panel | table.Panel | gauge.Panel | bargauge.Panel
)


def _targets(panel: Panel, *queries: str, table_format: bool = False) -> Panel:
    for index, text in enumerate(queries):
        target = InfluxQL(text).ref_id(chr(ord("A") + index))
        if table_format:
            target = target.table()
        panel.with_target(target)
    return panel


def _stat(title: str, query: str, time_from: str = "", unit: str = BYTES) -> stat.Panel:
    panel = (
        stat.Panel().title(title).datasource(DATASOURCE).unit(unit).height(4).span(6)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .graph_mode(common.BigValueGraphMode.NONE)
    )
    if time_from:
        panel.time_from(time_from)
    _targets(panel, query)
    return panel


def _bars(title: str, time_from: str, *queries: str, stacked: bool = False,
          unit: str = BYTES, span: int = 12) -> timeseries.Panel:
    panel = (
        timeseries.Panel().title(title).datasource(DATASOURCE).unit(unit).height(8).span(span)
        .draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
    )
    if stacked:
        panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    if time_from:
        panel.time_from(time_from)
    _targets(panel, *queries)
    return panel


def _lines(title: str, *queries: str, unit: str = "short", span: int = 12,
           time_from: str = "") -> timeseries.Panel:
    panel = (
        timeseries.Panel().title(title).datasource(DATASOURCE).unit(unit).height(8).span(span)
    )
    if time_from:
        panel.time_from(time_from)
    _targets(panel, *queries)
    return panel


def _table(title: str, *queries: str, time_from: str = "", sort: str = "",
           span: int = 12, merge: bool = False, units: dict[str, str] | None = None,
           ) -> table.Panel:
    """A table; its byte columns (`decbytes`) and others named in `units` get their unit."""
    panel = table.Panel().title(title).datasource(DATASOURCE).height(8).span(span).unit(BYTES)
    for column, unit in (units or {}).items():
        panel.override_by_name(column, [dashboard.DynamicConfigValue(id_val="unit", value=unit)])
    if time_from:
        panel.time_from(time_from)
    if sort:
        panel.sort_by([common_builders.TableSortByFieldState().display_name(sort).desc(True)])
    if merge:  # one row per tag value, one column per query
        panel.with_transformation(dashboard.DataTransformerConfig(id_val="merge", options={}))
    _targets(panel, *queries, table_format=True)
    return panel


def _datasource() -> DatasourceVariable:
    return DatasourceVariable("datasource").label("InfluxDB").type("influxdb")


def _values(name: str, label: str, query: str, all_value: str = "") -> QueryVariable:
    variable = (
        QueryVariable(name).label(label).query(query).datasource(DATASOURCE)
        .multi(True).include_all(True).refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard.VariableSort.ALPHABETICAL_ASC)
        .current(dashboard.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )
    if all_value:
        variable.all_value(all_value)
    return variable


def _node_variable() -> QueryVariable:
    # All expands to every node, regex-escaped: (node-a|node-b)
    return _values("node", "node", q.NODE_VALUES)


def _user_variable() -> QueryVariable:
    # All is `.*`: a fleet has thousands of users, too many to list in every query
    return _values("user", "user", q.USER_VALUES, all_value=".*")


class Board:
    """A dashboard builder that numbers its panels 1, 2, ... in the order they are added."""

    def __init__(self, uid: str, title: str, zone: str, time_from: str) -> None:
        self.dashboard = (
            Dashboard(title).uid(uid).tags(TAGS).refresh("10s").time(time_from, "now")
            .timezone(zone).editable().with_variable(_datasource())
        )
        self._ids = 0

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def panel(self, panel: Panel) -> None:
        self.dashboard.with_panel(panel.id(self._next_id()))

    def row(self, title: str) -> None:
        self.dashboard.with_row(Row(title).id(self._next_id()))

    def with_variable(self, variable: QueryVariable | CustomVariable) -> None:
        self.dashboard.with_variable(variable)

    def annotation(self, annotation: AnnotationQuery) -> None:
        self.dashboard.annotation(annotation)

    def build(self) -> dashboard.Dashboard:
        return self.dashboard.build()


def _dashboard(uid: str, title: str, zone: str, time_from: str) -> Board:
    return Board(uid, title, zone, time_from)


def fleet(zone: str) -> Board:
    """Traffic of the whole fleet, who uses what, and the nodes."""
    board = _dashboard("quotaflow-fleet", "quotaflow / Fleet", zone, "now-29d/d")
    board.with_variable(_node_variable())
    board.row("Traffic")
    board.panel(_stat("Traffic today", q.period_total("traffic_daily", q.NODE), "now/d"))
    board.panel(
        _stat("Traffic this month", q.period_total("traffic_monthly", q.NODE), "now/M")
    )
    board.panel(
        _stat("Traffic this year", q.period_total("traffic_monthly", q.NODE), "now/y")
    )
    board.panel(
        _stat("Active users today", q.active_users(q.NODE), "now/d", unit="short")
    )
    board.panel(_bars(
        "Traffic by day, stacked by node", "", q.daily_series(q.NODE, zone, by="node_id"),
        stacked=True,
    ))
    board.row("Users and nodes")
    board.panel(_table(
        "Top users this month, raw and billed", q.top_users(q.NODE), time_from="now/M",
        sort="billed",
    ))
    board.panel(_table(
        "Nodes", q.nodes_today(zone), q.nodes_month(zone), q.nodes_year(), q.node_status(),
        time_from="now/y", merge=True, sort="year",
        units={"last_report": "dateTimeAsIso", "age_s": "s", "alive": "bool_yes_no"},
    ))
    return board


def node(zone: str) -> Board:
    """One node (or several): its totals, its last 30 days and 12 months, its users, its health."""
    board = _dashboard("quotaflow-node", "quotaflow / Node", zone, "now-24h")
    board.with_variable(_node_variable())
    board.panel(_stat("Today", q.period_total("traffic_daily", q.NODE), "now/d"))
    board.panel(_stat("This month", q.period_total("traffic_monthly", q.NODE), "now/M"))
    board.panel(_stat("This year", q.period_total("traffic_monthly", q.NODE), "now/y"))
    board.panel(
        _stat("Last report", q.node_status(), "", unit="dateTimeFromNow")
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"])
                        .fields("/^last_report$/"))
    )
    board.panel(_bars("Last 30 days, by day", "now-29d/d", q.daily_series(q.NODE, zone)))
    board.panel(
        _bars("Last 12 months, by month", "now-11M/M", q.monthly_series(q.NODE, zone))
    )
    board.panel(_table(
        "Top users on the node this month", q.top_users(q.NODE), time_from="now/M",
        sort="billed", span=12,
    ))
    board.panel(_lines("Counter restarts seen (epoch changes)", q.node_restarts()))
    return board


def user(zone: str) -> Board:
    """One user (or several): quota, per-node use, raw against billed, 30 days and 12 months."""
    board = _dashboard("quotaflow-user", "quotaflow / User", zone, "now-29d/d")
    board.with_variable(_user_variable())
    board.annotation(
        AnnotationQuery().name("quota commands").datasource(DATASOURCE).enable(True)
        .icon_color("red").target(InfluxQLAnnotation(
            q.quota_command_events(q.USER), text_column="command_id", tags_column="action,reason",
        ))
    )
    board.panel(
        gauge.Panel().title("Usage of the billing period against the allowance")
        .datasource(DATASOURCE).unit("percentunit").min(0).max(1).height(6).span(6)
        .with_transformation(dashboard.DataTransformerConfig(id_val="calculateField", options={
            "mode": "binary", "alias": "used",
            "binary": {"left": "used_bytes", "operator": "/", "right": "allowance_bytes"},
            "replaceFields": True,
        }))
        .with_target(InfluxQL(q.quota_latest(q.USER)).table())
    )
    board.panel(_stat("This month", q.period_total("traffic_monthly", q.USER), "now/M"))
    board.panel(_stat("Today", q.period_total("traffic_daily", q.USER), "now/d"))
    board.panel(
        bargauge.Panel().title("This month per node, raw and billed").datasource(DATASOURCE)
        .unit(BYTES).height(6).span(6).time_from("now/M")
        .with_target(InfluxQL(q.per_node(q.USER)).alias("$tag_node_id $col"))
    )
    board.panel(_bars("Raw and billed bytes by day", "", q.raw_and_billed_daily(q.USER, zone)))
    board.panel(
        _bars("Last 30 days, by day", "now-29d/d", q.daily_series(q.USER, zone), span=12)
    )
    board.panel(
        _bars("Last 12 months, by month", "now-11M/M", q.monthly_series(q.USER, zone), span=12)
    )
    board.panel(_lines("Quota burn against the allowance", q.quota_burn(q.USER), unit=BYTES))
    board.panel(_lines(
        "Quota burn through the month, cumulative billed, against the allowance",
        q.quota_burn_by_day(q.USER, zone), q.quota_allowance_by_day(q.USER, zone),
        unit=BYTES, time_from="now/M",
    ))
    board.panel(_table("Quota commands", q.quota_command_events(q.USER),
                       units={"command_id": "string", "threshold": "percentunit"}))
    return board


def quotas(zone: str) -> Board:
    """Who is near or over quota, who is disabled and why, the commands, time to exhaustion."""
    board = _dashboard("quotaflow-quotas", "quotaflow / Quotas", zone, "now-31d")
    board.with_variable(_user_variable())
    board.with_variable(
        CustomVariable("threshold").label("warn at").values("0.5,0.8,0.9,1")
        .current(dashboard.VariableOption(selected=True, text="0.8", value="0.8"))
    )
    board.panel(_table(
        "Users at or above the threshold, by ratio", q.quota_above_threshold(q.USER),
        sort="ratio", units={"ratio": "percentunit", "state": "string"},
    ))
    board.panel(_table(
        "Disabled users and why", q.quota_disabled(q.USER), q.quota_disable_reasons(q.USER),
        merge=True, units={"state": "string", "command_id": "string"},
    ))
    board.panel(_bars("Commands issued, by action", "", q.quota_commands(q.USER),
                           stacked=True, unit="short"))
    board.panel(_table(
        "Estimated time to exhaustion at the last 24 h's rate", q.quota_exhaustion(q.USER),
        units={"seconds_left": "s"},
    ))
    return board


def pipeline(zone: str) -> Board:
    """The pipeline's own health: throughput, lag, dead letters, writes, freshness."""
    board = _dashboard("quotaflow-pipeline", "quotaflow / Pipeline", zone, "now-3h")
    board.panel(_lines("Readings/s and reports/s", q.pipeline_rates(), span=12))
    board.panel(_lines("Consumer lag per partition: worker", q.pipeline_lag("worker"),
                            span=12))
    board.panel(_lines("Consumer lag per partition: sink", q.pipeline_lag("sink"),
                            span=12))
    board.panel(_lines("Dead letters by reason", q.pipeline_dead_letters(), span=12))
    board.panel(_lines("Late and stale reports", q.pipeline_late_stale(), span=12))
    board.panel(_lines("InfluxDB writes: latency and retries", q.pipeline_write(),
                            span=12))
    board.panel(_lines("End-to-end freshness (Kafka to InfluxDB)",
                            q.pipeline_freshness(), unit="ms", span=12))
    board.panel(_lines("Quota commands issued", q.pipeline_commands(), span=12))
    return board


BOARDS: tuple[Callable[[str], Board], ...] = (fleet, node, user, quotas, pipeline)


def build_all(zone: str) -> dict[str, dict[str, Any]]:
    """Every dashboard as Grafana's JSON model, by uid, for the billing zone `zone`."""
    out: dict[str, dict[str, Any]] = {}
    for make in BOARDS:
        model = json.loads(json.dumps(make(zone).build(), cls=JSONEncoder))
        out[model["uid"]] = model
    return out


def render(model: dict[str, Any]) -> str:
    """A dashboard's JSON as committed: sorted keys, two-space indents, a final newline."""
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_build(zone: str, out: Path = BUILD_DIR) -> list[Path]:
    """Write every dashboard to `out/<uid>.json`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for uid, model in build_all(zone).items():
        path = out / f"{uid}.json"
        path.write_text(render(model))
        written.append(path)
    return written


def iter_queries(model: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(panel title, panel, query) for every target of every panel, and the annotations
    (as panel title `annotation: <name>`)."""
    for panel in model.get("panels", []):
        for target in panel.get("targets", []):
            yield panel["title"], panel, target["query"]
    for annotation in model.get("annotations", {}).get("list", []):
        query = (annotation.get("target") or {}).get("query")
        if query:
            yield f"annotation: {annotation['name']}", {}, query


if __name__ == "__main__":
    for written in write_build("UTC"):
        print(written)

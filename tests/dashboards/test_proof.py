"""The dashboards, proven without Grafana: every query of dashboards/build/ on real data.

Each query is resolved the way Grafana resolves it (`quotaflow.dashboards.grafana`: the
panel's time range in the dashboard's zone, `$timeFilter`, `$__interval`, `$node` and
`$user` as one value, several values and All) and run on the real InfluxDB that the real
pipeline wrote the simulated fleet to (tests/dashboards/conftest.py). The numbers of the
stat and table panels must be the simulator's ground truth.

Panels on `node_status` and `pipeline` need the pipeline to write those measurements
(docs/influx-schema.md); `test_status_and_pipeline_panels_return_data` and the node
status checks fail until it does.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from quotaflow.dashboards.boards import BUILD_DIR, build_all, iter_queries
from quotaflow.dashboards.grafana import Selection, resolve
from quotaflow.sinks.influxql import InfluxQL, Series
from tests.dashboards.conftest import ZONE, ProofFleet

pytestmark = pytest.mark.integration

STATUS_MEASUREMENTS = ("FROM node_status", "FROM pipeline")


def _boards() -> dict[str, dict[str, Any]]:
    """The committed dashboards (built for UTC), moved to the fleet's billing zone: the
    dashboard's time zone and every `tz()`, which is all that `--timezone` changes
    (`test_the_zone_is_all_a_build_for_another_zone_changes`)."""
    out = {}
    for path in sorted(BUILD_DIR.glob("*.json")):
        model = json.loads(path.read_text().replace("tz('UTC')", f"tz('{ZONE}')"))
        assert model["timezone"] == "UTC", path
        model["timezone"] = ZONE
        out[model["uid"]] = model
    return out


def test_the_zone_is_all_a_build_for_another_zone_changes() -> None:
    assert _boards() == build_all(ZONE)


def _run(fleet: ProofFleet, uid: str, title: str, selections: dict[str, Selection],
         ref: str = "A") -> list[Series]:
    model = _boards()[uid]
    panel = next(p for p in model["panels"] if p["title"] == title)
    target = next(t for t in panel["targets"] if t["refId"] == ref)
    statement = resolve(model, panel, target["query"], selections,
                        fleet.truth.now)
    return InfluxQL.from_settings(fleet.settings).query(statement, epoch="ms")


def _value(series: list[Series], column: str) -> int:
    (only,) = series
    return int(only.rows[-1][column])


def _has_data(series: list[Series]) -> bool:
    return any(
        value is not None
        for s in series for row in s.rows for key, value in row.items() if key != "time"
    )


def _selections(fleet: ProofFleet) -> list[dict[str, Selection]]:
    """`$node` and `$user` as one value, as two values and as All, with the threshold."""
    truth = fleet.truth
    nodes = truth.nodes()
    # the planned users, heaviest (disabled, with every kind of quota data) first
    planned = sorted(truth.plans, key=lambda u: -truth.total("month", user=u))
    one = {"node": Selection((nodes[0],)), "user": Selection((planned[0],))}
    two = {"node": Selection(tuple(nodes[:2])), "user": Selection(tuple(planned[:2]))}
    everything = {"node": Selection(tuple(nodes), all=True),
                  "user": Selection(tuple(truth.users()), all=True)}
    threshold = {"threshold": Selection(("0.8",))}
    return [{**s, **threshold} for s in (one, two, everything)]


def _all_queries() -> list[tuple[str, str, str]]:
    return [(uid, title, query) for uid, model in _boards().items()
            for title, _, query in iter_queries(model)]


def _check_every_query(fleet: ProofFleet, status: bool) -> None:
    client = InfluxQL.from_settings(fleet.settings)
    problems: list[str] = []
    ran = 0
    for uid, model in _boards().items():
        for title, panel, query in iter_queries(model):
            if any(m in query for m in STATUS_MEASUREMENTS) != status:
                continue
            for selections in _selections(fleet):
                statement = resolve(model, panel, query, selections,
                                    fleet.truth.now)
                ran += 1
                try:
                    series = client.query(statement, epoch="ms")
                except Exception as exc:  # the test reports every failing query at once
                    problems.append(f"{uid} / {title}: {exc}\n  {statement}")
                    continue
                if not _has_data(series):
                    problems.append(f"{uid} / {title}: no data\n  {statement}")
    assert ran > 0
    assert not problems, f"{len(problems)} of {ran} queries failed:\n" + "\n".join(problems)


def test_every_traffic_and_quota_query_runs_and_returns_data(proof_fleet: ProofFleet) -> None:
    _check_every_query(proof_fleet, status=False)


def test_status_and_pipeline_panels_return_data(proof_fleet: ProofFleet) -> None:
    """Needs the pipeline's node_status and pipeline measurements (every 10 s)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            _check_every_query(proof_fleet, status=True)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_every_panel_has_queries() -> None:
    for uid, model in _boards().items():
        for panel in model["panels"]:
            if panel["type"] != "row":
                assert panel.get("targets"), f"{uid} / {panel['title']} has no query"
                for target in panel["targets"]:
                    assert target["rawQuery"] is True
                    assert target["datasource"] == {"type": "influxdb", "uid": "${datasource}"}
    assert len(_all_queries()) >= 40


def test_variables_list_every_node_and_user(proof_fleet: ProofFleet) -> None:
    client = InfluxQL.from_settings(proof_fleet.settings)
    for name, want in (("node", proof_fleet.truth.nodes()), ("user", proof_fleet.truth.users())):
        for uid, model in _boards().items():
            variable = next((v for v in model["templating"]["list"] if v["name"] == name), None)
            if variable is not None:
                got = sorted(r["value"] for s in client.query(variable["query"]) for r in s.rows)
                assert got == want, (uid, name)


def test_fleet_stats_show_ground_truth(proof_fleet: ProofFleet) -> None:
    truth = proof_fleet.truth
    every = {"node": Selection(tuple(truth.nodes()), all=True)}
    for title, period in (("Traffic today", "day"), ("Traffic this month", "month"),
                          ("Traffic this year", "year")):
        got = _value(_run(proof_fleet, "quotaflow-fleet", title, every), "total")
        assert got == truth.total(period), title
    active = _value(_run(proof_fleet, "quotaflow-fleet", "Active users today", every), "users")
    assert active == len({u for (u, _, day) in truth.by_day if day.date() == truth.now.date()})


def test_node_stats_show_ground_truth_for_one_several_and_all(proof_fleet: ProofFleet) -> None:
    truth = proof_fleet.truth
    nodes = truth.nodes()
    for chosen, all_ in (((nodes[0],), False), (tuple(nodes[1:3]), False), (tuple(nodes), True)):
        selection = {"node": Selection(chosen, all=all_)}
        for title, period in (("Today", "day"), ("This month", "month"),
                              ("This year", "year")):
            got = _value(_run(proof_fleet, "quotaflow-node", title, selection), "total")
            assert got == truth.total(period, nodes=set(chosen)), (chosen, title)


def test_nodes_table_shows_each_nodes_today_month_and_year(proof_fleet: ProofFleet) -> None:
    truth = proof_fleet.truth
    every = {"node": Selection(tuple(truth.nodes()), all=True)}
    for ref, column, period in (("A", "today", "day"), ("B", "month", "month"),
                                ("C", "year", "year")):
        series = _run(proof_fleet, "quotaflow-fleet", "Nodes", every, ref=ref)
        got = {s.tags["node_id"]: int(s.rows[-1][column]) for s in series}
        want = {n: truth.total(period, node=n) for n in truth.nodes()}
        assert all(want.values()), want  # every node of the fleet has traffic today
        assert got == want, column


def test_user_month_and_per_node_show_ground_truth(proof_fleet: ProofFleet) -> None:
    truth = proof_fleet.truth
    for user in sorted(truth.plans):
        selection = {"user": Selection((user,))}
        got = _value(_run(proof_fleet, "quotaflow-user", "This month", selection), "total")
        assert got == truth.total("month", user=user)
        per_node = _run(proof_fleet, "quotaflow-user", "This month per node, raw and billed",
                        selection)
        assert {s.tags["node_id"]: (s.rows[0]["raw"], s.rows[0]["billed"]) for s in per_node} \
            == {n: (truth.total("month", user=user, node=n),) * 2 for n in truth.nodes()
                if truth.total("month", user=user, node=n)}


def test_top_users_are_the_months_heaviest(proof_fleet: ProofFleet) -> None:
    truth = proof_fleet.truth
    every = {"node": Selection(tuple(truth.nodes()), all=True)}
    (series,) = _run(proof_fleet, "quotaflow-fleet", "Top users this month, raw and billed",
                     every)
    got = {row["user_id"]: (row["billed"], row["raw"]) for row in series.rows}
    month = {u: truth.total("month", user=u) for u in truth.users()}
    heaviest = sorted((v for v in month.values() if v), reverse=True)[:20]
    assert sorted((b for b, _ in got.values()), reverse=True) == heaviest
    assert all(month[u] == billed == raw for u, (billed, raw) in got.items())


def _series_by_local_time(series: list[Series], column: str) -> dict[datetime, int]:
    zone = ZoneInfo(ZONE)
    return {datetime.fromtimestamp(row["time"] / 1000, zone): int(row[column])
            for s in series for row in s.rows if row[column] is not None}


@pytest.mark.parametrize("variable", ["node", "user"])
def test_30_days_and_12_months_sum_to_month_and_year(proof_fleet: ProofFleet,
                                                     variable: str) -> None:
    truth = proof_fleet.truth
    today = truth.now.date()
    uid = f"quotaflow-{variable}"
    key = truth.nodes()[0] if variable == "node" else sorted(truth.plans)[0]
    selection = {variable: Selection((key,))}
    filter_ = {variable: key}

    days = _series_by_local_time(
        _run(proof_fleet, uid, "Last 30 days, by day", selection), "total")
    assert len(days) == 30 and max(days).date() == today
    per_day = truth.per_day(**filter_)
    assert days == {d: per_day.get(d, 0) for d in days}
    this_month = sum(v for d, v in days.items() if (d.year, d.month) == (today.year, today.month))
    assert this_month == truth.total("month", **filter_) > 0

    months = _series_by_local_time(
        _run(proof_fleet, uid, "Last 12 months, by month", selection), "total")
    assert len(months) == 12 and all(m.day == 1 and m.hour == 0 for m in months)
    this_year = sum(v for m, v in months.items() if m.year == today.year)
    assert this_year == truth.total("year", **filter_) > 0


def test_quota_panels_show_the_plans(proof_fleet: ProofFleet) -> None:
    truth = proof_fleet.truth
    over, near, low = sorted(truth.plans, key=lambda u: -truth.total("month", user=u))
    users = {"user": Selection(tuple(truth.users()), all=True),
             "threshold": Selection(("0.8",))}
    gauge = _run(proof_fleet, "quotaflow-user", "Usage of the billing period against the allowance",
                 users)
    latest = {s.tags["user_id"]: s.rows[-1] for s in gauge}
    assert set(latest) == set(truth.plans)
    for user, plan in truth.plans.items():
        assert latest[user]["used_bytes"] == truth.total("month", user=user)
        assert latest[user]["allowance_bytes"] == plan.quota_bytes

    above = _run(proof_fleet, "quotaflow-quotas", "Users at or above the threshold, by ratio",
                 users)
    ratios = {s.tags["user_id"]: s.rows[-1]["ratio"] for s in above}
    assert set(ratios) == {over, near} and ratios[over] >= 2 and 0.8 <= ratios[near] < 1

    disabled = _run(proof_fleet, "quotaflow-quotas", "Disabled users and why", users, ref="A")
    assert {s.tags["user_id"] for s in disabled} == {over}
    reasons = _run(proof_fleet, "quotaflow-quotas", "Disabled users and why", users, ref="B")
    assert {(s.tags["user_id"], s.tags["reason"]) for s in reasons} == {(over, "quota")}

    events = _run(proof_fleet, "quotaflow-user", "Quota commands", users)
    actions = sorted((r["user_id"], r["action"]) for s in events for r in s.rows)
    assert actions == sorted([(over, "warn"), (over, "disable"), (near, "warn")])
    assert {r["threshold"] for s in events for r in s.rows if r["action"] == "warn"} == {0.8}

    left = _run(proof_fleet, "quotaflow-quotas",
                "Estimated time to exhaustion at the last 24 h's rate", users)
    seconds = {s.tags["user_id"]: s.rows[-1]["seconds_left"] for s in left}
    assert over in seconds and seconds[over] < 0  # used up already
    assert all(seconds[u] > 0 for u in (near, low) if u in seconds)


BURN = "Quota burn through the month, cumulative billed, against the allowance"


def test_quota_burn_is_the_months_billed_bytes_cumulative_by_day(proof_fleet: ProofFleet) -> None:
    """Each planned user's billed bytes (raw: the fleet has no node rates) summed day by
    day from the month's first day to today, one series per user also for All; and the
    allowance beside it is the plan's, with the latest usage."""
    truth = proof_fleet.truth
    today = truth.now.date()
    every = {"user": Selection(tuple(truth.users()), all=True)}
    burn_all = {s.tags["user_id"]: s for s in _run(proof_fleet, "quotaflow-user", BURN, every)}
    for user, plan in truth.plans.items():
        one = {"user": Selection((user,))}
        burn = _run(proof_fleet, "quotaflow-user", BURN, one)
        assert [s.tags["user_id"] for s in burn] == [user]
        days = _series_by_local_time(burn, "used_bytes")
        assert _series_by_local_time([burn_all[user]], "used_bytes") == days
        assert [d.date() for d in sorted(days)] == [
            today.replace(day=n) for n in range(1, today.day + 1)]
        per_day = truth.per_day(user=user)
        running = 0
        for day in sorted(days):
            running += per_day.get(day, 0)
            assert days[day] == running, (user, day)
        assert running == truth.total("month", user=user) > 0
        (states,) = _run(proof_fleet, "quotaflow-user", BURN, one, ref="B")
        assert states.tags["user_id"] == user
        assert states.rows[-1]["allowance_bytes"] == plan.quota_bytes
        assert states.rows[-1]["used_bytes"] == running


def test_node_status_panels_show_every_node_alive(proof_fleet: ProofFleet) -> None:
    """Needs the pipeline's node_status measurement: every node reported during the run,
    so each is alive, its last report arrived after the first publish, and the restarts
    seen are the restarts the simulator made."""
    truth = proof_fleet.truth
    every = {"node": Selection(tuple(truth.nodes()), all=True)}
    status = _run(proof_fleet, "quotaflow-fleet", "Nodes", every, ref="D")
    assert {s.tags["node_id"] for s in status} == set(truth.nodes())
    for s in status:
        assert s.rows[-1]["last_report"] >= proof_fleet.published_ms, s
        assert s.rows[-1]["alive"] is True, s
    restarts = _run(proof_fleet, "quotaflow-node", "Counter restarts seen (epoch changes)",
                    every)
    seen = {s.tags["node_id"]: max(r["restarts"] for r in s.rows) for s in restarts}
    assert sum(seen.values()) == proof_fleet.sim.restarts > 0

"""Every query of every panel, in one place: the dashboards and the report use these.

The queries are raw InfluxQL with Grafana's macros and variables left in
(`$timeFilter`, `$__interval`, `$node`, `$user`, `$threshold`); `quotaflow.dashboards.grafana`
substitutes them as Grafana does. Daily and monthly points are running totals stamped
at the period's start in the billing zone (docs/influx-schema.md), so:

* a period's total is the sum of its points in a panel time range that starts at the
  period start (`now/d`, `now/M`, `now/y`, rounded in the dashboard's zone, which is
  the billing zone);
* series by day group by `time(1d)` with `tz()` in the billing zone, so that a bucket
  is a billing day and holds exactly that day's points;
* a year is the sum of its months (`traffic_monthly`).

>>> print(period_total("traffic_daily", NODE))
SELECT sum(total_bytes) AS "total" FROM traffic_daily WHERE $timeFilter AND node_id =~ /^$node$/
"""

from __future__ import annotations

NODE = "node_id =~ /^$node$/"
USER = "user_id =~ /^$user$/"


def _tz(zone: str) -> str:
    return "tz('" + zone.replace("\\", "\\\\").replace("'", "\\'") + "')"


# -- traffic ------------------------------------------------------------------------------


def period_total(measurement: str, where: str) -> str:
    """The total bytes of the panel's period (today, this month, this year)."""
    return f'SELECT sum(total_bytes) AS "total" FROM {measurement} WHERE $timeFilter AND {where}'


def daily_series(where: str, zone: str, by: str = "") -> str:
    """Bytes per billing day over the panel's range, a 0 for a day without traffic."""
    group = f"time(1d), {by}" if by else "time(1d)"
    return (
        f'SELECT sum(total_bytes) AS "total" FROM traffic_daily WHERE $timeFilter AND {where} '
        f"GROUP BY {group} fill(0) {_tz(zone)}"
    )


def monthly_series(where: str, zone: str) -> str:
    """Bytes per billing month over the panel's range: one bar per month start."""
    return (
        f'SELECT sum(total_bytes) AS "total" FROM traffic_monthly WHERE $timeFilter AND {where} '
        f"GROUP BY time(1d) fill(none) {_tz(zone)}"
    )


def raw_and_billed_daily(where: str, zone: str) -> str:
    """Raw and billed bytes per billing day."""
    return (
        'SELECT sum(total_bytes) AS "raw", sum(billed_total_bytes) AS "billed" FROM '
        f"traffic_daily WHERE $timeFilter AND {where} GROUP BY time(1d) fill(0) {_tz(zone)}"
    )


def top_users(where: str, limit: int = 20) -> str:
    """The users with the most billed bytes in the panel's range (a month), raw beside."""
    return (
        f'SELECT top("billed", "user_id", {limit}) AS "billed", "raw" FROM ('
        'SELECT sum(billed_total_bytes) AS "billed", sum(total_bytes) AS "raw" '
        f"FROM traffic_monthly WHERE $timeFilter AND {where} GROUP BY user_id)"
    )


def per_node(where: str) -> str:
    """Raw and billed bytes per node in the panel's range (a month)."""
    return (
        'SELECT sum(total_bytes) AS "raw", sum(billed_total_bytes) AS "billed" FROM '
        f"traffic_monthly WHERE $timeFilter AND {where} GROUP BY node_id"
    )


def active_users(where: str) -> str:
    """How many users moved bytes in the panel's range (today)."""
    return (
        'SELECT count("total") AS "users" FROM (SELECT sum(total_bytes) AS "total" FROM '
        f'traffic_daily WHERE $timeFilter AND {where} GROUP BY user_id) WHERE "total" > 0'
    )


# The nodes table: its range is the year so far; each query gives one column per node.


def nodes_today(zone: str) -> str:
    """Per node, today's bytes: the last billing-day bucket of the year so far."""
    return (
        'SELECT last("total") AS "today" FROM (SELECT sum(total_bytes) AS "total" FROM '
        f"traffic_daily WHERE $timeFilter AND {NODE} GROUP BY time(1d), node_id fill(0) "
        f"{_tz(zone)}) GROUP BY node_id"
    )


def nodes_month(zone: str) -> str:
    """Per node, the bytes of the node's latest month of the year (this month, once it
    has traffic)."""
    return (
        'SELECT last("total") AS "month" FROM (SELECT sum(total_bytes) AS "total" FROM '
        f"traffic_monthly WHERE $timeFilter AND {NODE} GROUP BY time(1d), node_id fill(none) "
        f"{_tz(zone)}) GROUP BY node_id"
    )


def nodes_year() -> str:
    """Per node, the bytes of the year so far (its months)."""
    return (
        'SELECT sum(total_bytes) AS "year" FROM traffic_monthly WHERE $timeFilter AND '
        f"{NODE} GROUP BY node_id"
    )


# -- node_status ---------------------------------------------------------------------------


def node_status() -> str:
    """Per node: the last report's arrival (Unix ms), its age and whether the node is alive."""
    return (
        'SELECT last(received_at) AS "last_report", last(age_s) AS "age_s", '
        f'last(alive) AS "alive" FROM node_status WHERE $timeFilter AND {NODE} GROUP BY node_id'
    )


def node_restarts() -> str:
    """Per node, the counter restarts (epoch changes) the worker has seen."""
    return (
        'SELECT last(restarts) AS "restarts" FROM node_status WHERE $timeFilter AND '
        f"{NODE} GROUP BY time($__interval), node_id fill(none)"
    )


# -- quotas --------------------------------------------------------------------------------


def _latest_quota(where: str) -> str:
    # last(used_bytes) is the only selector, so the other fields come from the same point
    return (
        'SELECT last(used_bytes) AS "used_bytes", allowance_bytes, state, period_start '
        f"FROM quota_usage WHERE $timeFilter AND {where} GROUP BY user_id"
    )


def quota_latest(where: str) -> str:
    """Per user, the latest usage, allowance, state and period start."""
    return _latest_quota(where)


def quota_burn(where: str) -> str:
    """A user's usage over time against the allowance."""
    return (
        'SELECT max(used_bytes) AS "used_bytes", max(allowance_bytes) AS "allowance_bytes" '
        f"FROM quota_usage WHERE $timeFilter AND {where} GROUP BY time($__interval), user_id "
        "fill(none)"
    )


def quota_burn_by_day(where: str, zone: str) -> str:
    """A user's billed bytes from the panel's start (the billing month), cumulative by
    billing day: what a calendar-month plan counts, day by day."""
    return (
        'SELECT cumulative_sum(sum(billed_total_bytes)) AS "used_bytes" FROM traffic_daily '
        f"WHERE $timeFilter AND {where} GROUP BY time(1d), user_id fill(0) {_tz(zone)}"
    )


def quota_allowance_by_day(where: str, zone: str) -> str:
    """A user's allowance per billing day: that of the day's latest quota state (absent
    while unlimited)."""
    return (
        'SELECT last(used_bytes) AS "used_bytes", allowance_bytes FROM quota_usage WHERE '
        f"$timeFilter AND {where} GROUP BY time(1d), user_id fill(none) {_tz(zone)}"
    )


def quota_above_threshold(where: str) -> str:
    """Users whose usage is at or above `$threshold` of their allowance, with the ratio."""
    return (
        'SELECT "ratio", "used_bytes", "allowance_bytes", "state" FROM ('
        'SELECT "used_bytes" * 1.0 / "allowance_bytes" AS "ratio", "used_bytes", '
        '"allowance_bytes", '
        f'"state" FROM ({_latest_quota(where)}) GROUP BY user_id) WHERE "ratio" >= $threshold '
        "GROUP BY user_id"
    )


def quota_disabled(where: str) -> str:
    """Users the worker holds disabled now, with their usage."""
    return (
        'SELECT "used_bytes", "allowance_bytes", "state" FROM '
        f"({_latest_quota(where)}) WHERE \"state\" = 'disabled' GROUP BY user_id"
    )


def quota_disable_reasons(where: str) -> str:
    """Per user, the reason of the latest disable command."""
    return (
        'SELECT last(command_id) AS "command_id", used_bytes FROM quota_events WHERE '
        f"$timeFilter AND action = 'disable' AND {where} GROUP BY user_id, reason"
    )


def quota_commands(where: str) -> str:
    """The commands issued, per action, over time."""
    return (
        'SELECT count(command_id) AS "commands" FROM quota_events WHERE $timeFilter AND '
        f"{where} GROUP BY time($__interval), action fill(none)"
    )


def quota_command_events(where: str) -> str:
    """Each command as an event (annotations and the commands table)."""
    return (
        'SELECT command_id, used_bytes, allowance_bytes, threshold, "action"::tag, '
        f'"reason"::tag, "user_id"::tag FROM quota_events WHERE $timeFilter AND {where}'
    )


def quota_exhaustion(where: str) -> str:
    """Per user, seconds until the allowance is used up at the user's rate of the last 24 h
    (negative: used up that long ago, at that rate)."""
    return (
        'SELECT ("allowance" - "used") / ("burned" / 86400.0) AS "seconds_left", "used", '
        '"allowance", "burned" FROM (SELECT spread(used_bytes) AS "burned", '
        'last(used_bytes) AS "used", last(allowance_bytes) AS "allowance" FROM quota_usage '
        f'WHERE time > now() - 24h AND {where} GROUP BY user_id) '
        'WHERE "burned" > 0 GROUP BY user_id'
    )


# -- pipeline ------------------------------------------------------------------------------


def _pipeline(select: str, process: str) -> str:
    return (
        f"SELECT {select} FROM pipeline WHERE $timeFilter AND process = '{process}' "
        "GROUP BY time($__interval), host fill(none)"
    )


def pipeline_rates() -> str:
    """The worker's readings and reports per second."""
    return _pipeline(
        'mean(readings_per_s) AS "readings/s", mean(reports_per_s) AS "reports/s"', "worker"
    )


def pipeline_lag(process: str) -> str:
    """Consumer lag per partition of one process (`worker` or `sink`)."""
    return _pipeline("last(/^lag_/)", process)


def pipeline_dead_letters() -> str:
    """Dead letters by reason, cumulative since each process started."""
    return (
        "SELECT last(/^dead_letters_/) FROM pipeline WHERE $timeFilter "
        "GROUP BY time($__interval), process, host fill(none)"
    )


def pipeline_late_stale() -> str:
    """Late and stale reports the worker refused, cumulative."""
    return _pipeline('last(late_reports) AS "late", last(stale_reports) AS "stale"', "worker")


def pipeline_write() -> str:
    """The sink's InfluxDB write latency (p50, p99) and its retries."""
    return _pipeline(
        'max(write_latency_ms_p50) AS "p50 ms", max(write_latency_ms_p99) AS "p99 ms", '
        'last(write_retries) AS "retries"',
        "sink",
    )


def pipeline_freshness() -> str:
    """End-to-end freshness: a report on Kafka to its totals in InfluxDB."""
    return _pipeline(
        'max(freshness_ms_p50) AS "p50 ms", max(freshness_ms_p99) AS "p99 ms"', "sink"
    )


def pipeline_commands() -> str:
    """Quota commands the worker issued, cumulative."""
    return _pipeline('last(commands_issued) AS "commands"', "worker")


# -- template variables ----------------------------------------------------------------------

NODE_VALUES = 'SHOW TAG VALUES FROM traffic_monthly WITH KEY = "node_id"'
USER_VALUES = 'SHOW TAG VALUES FROM traffic_monthly WITH KEY = "user_id"'

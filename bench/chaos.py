"""The fault matrix: quotaflow's pipeline under crashes, outages and hostile input.

    python bench/chaos.py [--rows NAME,...] [--quick] [--soak-minutes N] [--json OUT]
    make chaos

Starts its own Kafka (KRaft) and InfluxDB 1.8 with `quotaflow.dev.local` in a
temporary state directory, runs each row against them with real `quotaflow`
subprocesses (worker, InfluxDB sink, node agent, push receiver), and stops
everything at the end, also on errors and Ctrl-C. Each row gets a fresh topic
prefix and database, publishes a workload whose ground truth it knows, injects
its fault, and then waits (bounded) until the lag is zero and InfluxDB holds the
expected totals. The "recovery" column is the time from the end of the fault to
that moment, polled every 0.5-1 s. The end of the fault: the last worker restart
(worker-kill), the restart command of the server, which includes its own start
(broker-kill, influx-down, agent-outage), the kill of the first worker
(second-worker), the last message published or pushed (poison, push, soak), the
`--reset-outbox` start (corrupt-outbox).

"dead letters" counts distinct refused messages in `<prefix>.dead` (a redelivery
after a crash may repeat one; the notes say so) against the number expected.

Rows (`--rows` names):

* worker-kill    worker SIGKILLed 5 times, each 1-3 s after it began billing; 10 repetitions
* broker-kill    the Kafka broker SIGKILLed for 40 s while the pipeline bills, then restarted
* influx-down    influxd SIGKILLed for 60 s while the pipeline bills, then restarted
* second-worker  a second worker joins the group, then the first is SIGKILLed
* poison         hostile and extreme input among valid reports
* agent-outage   a real `quotaflow agent` SIGKILLed during a Kafka outage, restarted after it
* corrupt-outbox zero-length, truncated and garbage outboxes: refused, then `--reset-outbox`
* push           200 concurrent pushes and 10 concurrent 3.5 MB pushes to `quotaflow push-receiver`
* soak           N minutes of steady load, sampling RSS and lag

`--quick` runs every row small and once, to try the harness. The table is printed
as each row finishes and at the end; the results go to bench/chaos-results.json
(or --json). The exit status is 1 if any row is not OK. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from chaos_kit import (
    QUOTAFLOW,
    ROOT,
    UTC_CALENDAR,
    Child,
    LagReader,
    Pipeline,
    RowResult,
    Servers,
    Truth,
    dead_summary,
    free_port,
    kill_all_children,
    new_settings,
    read_dead,
    say,
    settings_env,
    table_header,
    table_line,
    total_bytes,
    wait_recovered,
)

from quotaflow.admin import ensure_topics
from quotaflow.core.contracts import CounterReport
from quotaflow.core.settings import Settings
from quotaflow.dev.simulation import FleetSpec, Simulation, simulate
from quotaflow.producers.publisher import ReportPublisher

HERE = Path(__file__).resolve().parent
MAX_COUNTER = 2**63 - 1


@dataclass
class Ctx:
    """What every row gets."""

    servers: Servers
    workdir: Path
    quick: bool
    soak_minutes: float
    reps: int
    rng: random.Random

    def settings(self, tag: str) -> Settings:
        return new_settings(self.servers, self.workdir, tag)

    def logs(self, settings: Settings) -> Path:
        path = self.workdir / "logs" / settings.topic_prefix
        path.mkdir(parents=True, exist_ok=True)
        return path


# --------------------------------------------------------------------------- helpers


def day_start_utc(days_ago: int) -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days_ago)


def fleet(quick: bool, seed: int, malformed: int = 12, users: int = 3000) -> Simulation:
    """The simulated fleet the pipeline rows bill: restarts, baselines, deltas, duplicates.

    20 nodes, 1 day, a report every 10 minutes: 3000 users make about 840,000 readings.
    """
    users = 1000 if quick else users
    return simulate(FleetSpec(nodes=20, users=users, days=1, interval_s=600, seed=seed,
                              start=day_start_utc(2), malformed=malformed))


def sim_truth(sim: Simulation) -> Truth:
    return {(u, n, UTC_CALENDAR.label(d, "day")): (up, down)
            for (u, n, d), (up, down) in sim.truth.items()}


def publish(settings: Settings, lines: list[bytes]) -> None:
    if not lines:
        return
    publisher = ReportPublisher(settings)
    try:
        publisher.publish_lines(lines)
        publisher.flush(timeout=120)
    finally:
        publisher.close(timeout=30)


def chunks(lines: list[bytes], parts: int) -> list[list[bytes]]:
    size = len(lines) // parts + 1
    return [lines[i * size:(i + 1) * size] for i in range(parts)]


def finish(result: RowResult, settings: Settings, expected: Truth, rec: Any,
           expected_dead: int | None, started: float, pipeline: Pipeline | None) -> RowResult:
    """Fill in the common columns from a recovery and the dead topic."""
    result.expected_bytes = total_bytes(expected)
    result.billed_bytes = total_bytes(rec.found)
    result.exact = rec.exact
    result.recovery_s = None if rec.seconds is None else round(rec.seconds, 1)
    if rec.seconds is None:
        result.notes.append(f"did not recover: lag {rec.lag} when the wait ended")
    if not rec.exact:
        n = 0 if rec.check is None else len(rec.check.mismatched)
        result.notes.append(f"{n} (user, node, day) totals differ; first: "
                            + "; ".join(rec.mismatch_notes()))
    try:
        letters = read_dead(settings)
        summary = dead_summary(letters)
    except Exception as exc:
        letters, summary = [], {"error": repr(exc)}
        result.notes.append(f"could not read the dead topic: {exc!r}")
    result.dead_letters = summary.get("distinct", 0)
    result.expected_dead = expected_dead
    result.details["dead"] = summary
    result.details["letters"] = [
        {"reason": d.reason, "detail": d.detail[:160], "source": d.source, "size": d.size}
        for d in letters[:50]
    ]
    if summary.get("duplicates"):
        result.notes.append(f"{summary['duplicates']} dead letters repeated after redelivery "
                            "(at-least-once; counted once)")
    if expected_dead is not None and summary.get("distinct") != expected_dead:
        result.notes.append(f"dead letters: {summary.get('distinct')} distinct, "
                            f"expected {expected_dead} ({summary.get('by_reason')})")
    if pipeline is not None:
        result.notes.extend(pipeline.exit_notes())
        result.details["process_starts"] = dict(pipeline.starts)
        if not rec.exact or rec.seconds is None:
            result.details["logs"] = pipeline.logs_tail()
    result.ok = (rec.exact and rec.seconds is not None
                 and (expected_dead is None or summary.get("distinct") == expected_dead))
    result.seconds = round(time.monotonic() - started, 1)
    return result


def sleep_supervised(pipeline: Pipeline | None, seconds: float) -> None:
    """Sleep, restarting pipeline processes that exit meanwhile (a supervisor's job)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pipeline is not None:
            pipeline.restart_exited()
        time.sleep(min(1.0, max(end - time.monotonic(), 0.0)))


# --------------------------------------------------------------------------- worker kill


def _worker_kill_once(ctx: Ctx, sim: Simulation, expected: Truth, rep: int,
                      kills: int) -> RowResult:
    started = time.monotonic()
    settings = ctx.settings(f"wk{rep}")
    ensure_topics(settings)
    result = RowResult(f"worker-kill#{rep + 1}", f"worker SIGKILL x{kills} (rep {rep + 1})",
                       readings=sim.readings)
    # 60% before the first start, the rest in equal parts while the worker is down
    head = len(sim.lines) * 3 // 5
    parts = [sim.lines[:head], *chunks(sim.lines[head:], kills)]
    pipeline = Pipeline(settings, ctx.logs(settings))
    reader = LagReader(settings)
    kill_log: list[dict[str, Any]] = []
    try:
        publish(settings, parts[0])
        pipeline.start("sink")
        pipeline.start("worker")
        for k in range(1, kills + 1):
            seen = pipeline.wait_billing("worker", timeout=90)
            pause = ctx.rng.uniform(1.0, 3.0)
            time.sleep(pause)
            lag = reader.lag()
            pipeline.kill("worker")
            kill_log.append({"kill": k, "billing_seen": seen, "after_billing_s": round(pause, 2),
                             "raw_lag_at_kill": None if lag is None else lag[0]})
            publish(settings, parts[k])  # more work arrives while the worker is down
            pipeline.start("worker")
        fault_end = time.monotonic()
        rec = wait_recovered(pipeline, settings, expected, fault_end,
                             timeout=300 if ctx.quick else 600)
    finally:
        reader.close()
        pipeline.stop()
    with_work = sum(1 for k in kill_log if (k["raw_lag_at_kill"] or 0) > 0)
    unseen = sum(1 for k in kill_log if not k["billing_seen"])
    result.details["kills"] = kill_log
    result.notes.append(f"{with_work}/{kills} kills left raw messages unhandled")
    if unseen:
        result.notes.append(f"{unseen} kills came without a 'first message' line within 90 s")
    return finish(result, settings, expected, rec, sim.malformed, started, pipeline)


def row_worker_kill(ctx: Ctx) -> RowResult:
    reps = 1 if ctx.quick else ctx.reps
    # The worker bills 115,000-180,000 readings/s on the 2-core development machine; five
    # kills 1-3 s into billing use up to ~1.8M readings. 10,000 users (2.9M readings, 60%
    # of them published first) leave work for every kill.
    sim = fleet(ctx.quick, seed=11, users=10_000)
    expected = sim_truth(sim)
    say(f"worker-kill: {reps} repetition(s) of {sim.readings:,} readings, "
        f"{sim.reports:,} reports")
    runs = []
    for rep in range(reps):
        one = _worker_kill_once(ctx, sim, expected, rep, kills=5)
        say("  " + table_line(one))
        for note in one.notes:
            say(f"    {note}")
        runs.append(one)
    worst = max(runs, key=lambda r: (not r.ok, abs(r.difference), r.recovery_s or 1e9))
    recoveries = [r.recovery_s for r in runs if r.recovery_s is not None]
    agg = RowResult(
        "worker-kill", f"worker SIGKILL x5, {reps} reps (worst)",
        readings=sim.readings, expected_bytes=worst.expected_bytes,
        billed_bytes=worst.billed_bytes, dead_letters=worst.dead_letters,
        expected_dead=worst.expected_dead,
        recovery_s=None if len(recoveries) < len(runs) else max(recoveries),
        exact=all(r.exact for r in runs), ok=all(r.ok for r in runs),
        seconds=round(sum(r.seconds for r in runs), 1),
    )
    agg.notes.append(f"{sum(r.ok for r in runs)}/{reps} repetitions exact; worst difference "
                     f"{max(abs(r.difference) for r in runs):,} bytes; recovery "
                     + (f"{min(recoveries):.1f}-{max(recoveries):.1f} s" if recoveries else "-"))
    kills_with_work = sum(
        1 for r in runs for k in r.details.get("kills", []) if (k["raw_lag_at_kill"] or 0) > 0)
    agg.notes.append(f"{kills_with_work}/{5 * reps} kills left raw messages unhandled")
    agg.notes.extend(n for r in runs if not r.ok for n in [f"rep {r.row}: {m}" for m in r.notes])
    agg.details["repetitions"] = [r.to_json() for r in runs]
    return agg


# --------------------------------------------------------------------------- broker, influx


def row_broker_kill(ctx: Ctx) -> RowResult:
    started = time.monotonic()
    outage = 15.0 if ctx.quick else 40.0
    settings = ctx.settings("broker")
    ensure_topics(settings)
    sim = fleet(ctx.quick, seed=12)
    expected = sim_truth(sim)
    result = RowResult("broker-kill", f"Kafka SIGKILL, {outage:.0f}s down, restart",
                       readings=sim.readings)
    pipeline = Pipeline(settings, ctx.logs(settings))
    try:
        publish(settings, sim.lines)
        pipeline.start("sink")
        pipeline.start("worker")
        seen = pipeline.wait_billing(timeout=90)
        time.sleep(ctx.rng.uniform(1.0, 3.0))
        lag = LagReader(settings)
        at_kill = lag.lag()
        lag.close()
        say(f"  SIGKILL Kafka (lag {at_kill}, billing seen: {seen})")
        killed = time.monotonic()
        ctx.servers.kill_kafka()
        sleep_supervised(pipeline, outage - (time.monotonic() - killed))
        say("  starting Kafka again")
        fault_end = time.monotonic()  # recovery includes the broker's own start
        if note := ctx.servers.start_kafka():
            result.notes.append(note)
        started_s = time.monotonic() - fault_end
        result.details.update(kafka_start_s=round(started_s, 1), lag_at_kill=at_kill)
        result.notes.append(f"the broker took {started_s:.1f}s to start and answer "
                            f"(included in the recovery); lag at the kill {at_kill}")
        rec = wait_recovered(pipeline, settings, expected, fault_end,
                             timeout=300 if ctx.quick else 600)
    finally:
        pipeline.stop()
    return finish(result, settings, expected, rec, sim.malformed, started, pipeline)


def row_influx_down(ctx: Ctx) -> RowResult:
    started = time.monotonic()
    outage = 20.0 if ctx.quick else 60.0
    settings = ctx.settings("influx")
    ensure_topics(settings)
    sim = fleet(ctx.quick, seed=13)
    expected = sim_truth(sim)
    first, rest = chunks(sim.lines, 2)
    result = RowResult("influx-down", f"InfluxDB SIGKILL, {outage:.0f}s down, restart",
                       readings=sim.readings)
    pipeline = Pipeline(settings, ctx.logs(settings))
    try:
        publish(settings, first)
        pipeline.start("sink")
        pipeline.start("worker")
        pipeline.wait_billing(timeout=90)
        time.sleep(ctx.rng.uniform(1.0, 3.0))
        say("  SIGKILL influxd")
        killed = time.monotonic()
        ctx.servers.kill_influx()
        publish(settings, rest)  # the backlog grows while InfluxDB is away
        sleep_supervised(pipeline, outage - (time.monotonic() - killed))
        say("  starting influxd again")
        fault_end = time.monotonic()  # recovery includes influxd's own start
        if note := ctx.servers.start_influx():
            result.notes.append(note)
        result.notes.append(f"influxd took {time.monotonic() - fault_end:.1f}s to start "
                            "(included in the recovery)")
        rec = wait_recovered(pipeline, settings, expected, fault_end,
                             timeout=300 if ctx.quick else 600)
    finally:
        pipeline.stop()
    return finish(result, settings, expected, rec, sim.malformed, started, pipeline)


def row_second_worker(ctx: Ctx) -> RowResult:
    started = time.monotonic()
    settings = ctx.settings("second")
    ensure_topics(settings)
    sim = fleet(ctx.quick, seed=14)
    expected = sim_truth(sim)
    first, rest = chunks(sim.lines, 2)
    result = RowResult("second-worker", "2nd worker joins, then 1st SIGKILL",
                       readings=sim.readings)
    pipeline = Pipeline(settings, ctx.logs(settings))
    try:
        publish(settings, first)
        pipeline.start("sink")
        pipeline.start("worker")
        pipeline.wait_billing("worker", timeout=90)
        pipeline.start("worker2", QUOTAFLOW_STATE_DIR=str(settings.state_dir) + "-2")
        publish(settings, rest)
        joined = pipeline.wait_billing("worker2", timeout=120)
        result.details["second_worker_billed_before_kill"] = joined
        if not joined:
            result.notes.append("the second worker billed nothing within 120 s of joining")
        time.sleep(ctx.rng.uniform(1.0, 3.0))
        say(f"  SIGKILL the first worker (second one billing: {joined})")
        pipeline.kill("worker")
        fault_end = time.monotonic()
        rec = wait_recovered(pipeline, settings, expected, fault_end,
                             timeout=300 if ctx.quick else 600)
    finally:
        pipeline.stop()
    return finish(result, settings, expected, rec, sim.malformed, started, pipeline)


# --------------------------------------------------------------------------- poison


def _report(node: str, epoch: int, seq: int, at: datetime,
            counters: list[tuple[str, int, int]], **extra: Any) -> bytes:
    return orjson.dumps({
        "node_id": node, "epoch": epoch, "seq": seq, "observed_at": at.isoformat(),
        "counters": [{"user_id": u, "up": a, "down": b} for u, a, b in counters], **extra,
    })


def _poison_messages(now: datetime, rng: random.Random) -> list[tuple[str, bytes]]:
    """Messages the contract refuses (docs/contracts.md), each must become one dead letter."""
    at = now.isoformat()
    ok = '{"user_id": "victim", "up": 1000, "down": 2000}'

    def rep(body: str, node: str = "poison-bad") -> bytes:
        return (f'{{"node_id": "{node}", "epoch": 1760000000000, "seq": 7, '
                f'"observed_at": "{at}", {body}}}').encode()

    def bad_user(user_json: str) -> bytes:
        return rep(f'"counters": [{ok}, {{"user_id": {user_json}, "up": 5, "down": 6}}]')

    huge_user = "x" * (13 * 2**20)
    return [
        ("garbage bytes (4 KiB random)", rng.randbytes(4096)),
        ("garbage: NUL and 0xff bytes", b"\xff\xfe\x00\x00not json\x00\xff"),
        ("JSON array", b"[1, 2, 3]"),
        ("JSON null", b"null"),
        ("wrong type: node_id a number",
         f'{{"node_id": 42, "epoch": 1, "seq": 1, "observed_at": "{at}", '
         f'"counters": [{ok}]}}'.encode()),
        ("wrong type: up a string", rep('"counters": [{"user_id": "victim", "up": "1000", '
                                        '"down": 2000}]')),
        ("wrong type: up a float", rep('"counters": [{"user_id": "victim", "up": 1000.0, '
                                       '"down": 2000}]')),
        ("wrong type: seq a bool",
         f'{{"node_id": "poison-bad", "epoch": 1760000000000, "seq": true, '
         f'"observed_at": "{at}", "counters": [{ok}]}}'.encode()),
        ("wrong type: counters an object", rep(f'"counters": {ok}')),
        ("wrong type: observed_at a number",
         f'{{"node_id": "poison-bad", "epoch": 1760000000000, "seq": 8, '
         f'"observed_at": 1764000000, "counters": [{ok}]}}'.encode()),
        ("user_id ending in a backslash", bad_user(json.dumps("alice\\"))),
        ("user_id with a backslash before a space", bad_user(json.dumps("a\\ b"))),
        ("user_id with a newline", bad_user(json.dumps("a\nb"))),
        ("user_id with a tab", bad_user(json.dumps("a\tb"))),
        ("user_id with NUL", bad_user(json.dumps("a\u0000b"))),
        ("user_id with DEL", bad_user(json.dumps("a\u007fb"))),
        ("user_id with C1 U+0085", bad_user(json.dumps("a\u0085b"))),
        ("user_id with U+2028", bad_user(json.dumps("a\u2028b"))),
        ("user_id with a lone surrogate", bad_user('"a\\ud800b"')),
        ("node_id with a newline", rep(f'"counters": [{ok}]', node="poi\\nson")),
        ("up = 2**63 (overflow)", rep(f'"counters": [{{"user_id": "victim", "up": {2**63}, '
                                      f'"down": 1}}]')),
        ("down = 10**30 (overflow)", rep('"counters": [{"user_id": "victim", "up": 1, '
                                         f'"down": {10**30}}}]')),
        ("seq = 2**62",
         f'{{"node_id": "poison-bad", "epoch": 1760000000000, "seq": {2**62}, '
         f'"observed_at": "{at}", "counters": [{ok}]}}'.encode()),
        ("epoch in microseconds",
         f'{{"node_id": "poison-bad", "epoch": {int(now.timestamp() * 1e6)}, "seq": 1, '
         f'"observed_at": "{at}", "counters": [{ok}]}}'.encode()),
        ("observed_at in 1970",
         f'{{"node_id": "poison-bad", "epoch": 1000, "seq": 2, '
         f'"observed_at": "1970-01-01T00:00:05Z", "counters": [{ok}]}}'.encode()),
        ("observed_at in 2099 (clock ahead)",
         f'{{"node_id": "poison-bad", "epoch": 1760000000000, "seq": 9, '
         f'"observed_at": "2099-01-01T00:00:00Z", "counters": [{ok}]}}'.encode()),
        ("duplicate key node_id",
         f'{{"node_id": "poison-bad", "node_id": "poison-other", "epoch": 1760000000000, '
         f'"seq": 10, "observed_at": "{at}", "counters": [{ok}]}}'.encode()),
        ("duplicate key up in a counter",
         rep('"counters": [{"user_id": "victim", "up": 1, "up": 999999, "down": 2}]')),
        ("duplicate user in one report", rep(f'"counters": [{ok}, {ok}]')),
        ("unknown field", rep(f'"counters": [{ok}], "bonus": 1')),
        ("13 MiB invalid message (13 MiB user_id)", bad_user(json.dumps(huge_user))),
    ]


def row_poison(ctx: Ctx) -> RowResult:
    started = time.monotonic()
    rng = random.Random(99)
    settings = ctx.settings("poison")
    ensure_topics(settings)
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=2)
    if now.hour == 23 and now.minute >= 55:  # every valid report of "now" on one day
        now = now.replace(minute=50)
    elif now.hour == 0 and now.minute < 5:
        now -= timedelta(minutes=10)
    day = UTC_CALENDAR.label(int(now.timestamp()), "day")
    expected: dict[tuple[str, str, str], list[int]] = {}
    valid: list[tuple[str, bytes]] = []

    def credit(user: str, node: str, up: int, down: int, on: str = day) -> None:
        total = expected.setdefault((user, node, on), [0, 0])
        total[0] += up
        total[1] += down

    # background: a small simulated fleet (restarts, deltas, duplicates, reordering)
    sim = simulate(FleetSpec(nodes=5, users=300, days=1, interval_s=1800, seed=5,
                             start=day_start_utc(2), malformed=0))
    valid += [("fleet", line) for line in sim.lines]
    for key, value in sim_truth(sim).items():
        credit(*key[:2], *value, on=key[2])
    # identifiers the contract allows that InfluxDB line protocol makes awkward
    epoch = int((now.timestamp() - 3600) * 1000)
    odd = ["DOMAIN\\alice", "a b", "c,d=e", 'quo"te', "x\\\\y", "ünï cødé 😀", "trail ",
           "back\\slash\\mid", "=", ","]
    counters = [(u, 1000 + i, 5000 + i) for i, u in enumerate(odd)]
    valid.append(("odd ids", _report("poison-odd node,x=y", epoch, 1, now, counters)))
    for u, a, b in counters:
        credit(u, "poison-odd node,x=y", a, b)
    # five new-epoch reports of 10**18 up and down for one user; epochs from 2000, so the
    # plausibility bound (1.25 GB/s since the epoch began) allows them
    up_total = down_total = 0
    overflow_refused = 0
    for k in range(5):
        valid.append(("overflow", _report("poison-overflow", 946_684_800_000 + k * 1000, 1,
                                          now + timedelta(seconds=k),
                                          [("overflow-user", 10**18, 10**18)])))
        # docs/contracts.md "Bounds": a reading that would take up + down past 2**63-1 is
        # refused as an anomaly, the totals stay
        if up_total + down_total + 2 * 10**18 <= MAX_COUNTER:
            up_total += 10**18
            down_total += 10**18
        else:
            overflow_refused += 1
    credit("overflow-user", "poison-overflow", up_total, down_total)
    # more than 100,000 distinct user ids: 11 nodes of 10,000 users
    for n in range(11):
        node = f"poison-many-{n:02d}"
        counters = [(f"many-{n:02d}-{j:05d}", rng.randrange(1, 10**9), rng.randrange(1, 10**9))
                    for j in range(10_000)]
        valid.append(("many users", _report(node, epoch, 1, now, counters)))
        for u, a, b in counters:
            credit(u, node, a, b)
    # huge valid reports: 200,000 counters, twice (the second bills the difference)
    users = [f"huge-{j:06d}" for j in range(200_000)]
    first = [(u, rng.randrange(1, 10**8), rng.randrange(1, 10**8)) for u in users]
    second = [(u, a + rng.randrange(0, 10**8), b + rng.randrange(0, 10**8)) for u, a, b in first]
    valid.append(("huge 200k", _report("poison-huge", epoch, 1, now, first)))
    valid.append(("huge 200k", _report("poison-huge", epoch, 2, now + timedelta(seconds=30),
                                       second)))
    for u, a, b in second:
        credit(u, "poison-huge", a, b)

    poison = _poison_messages(now, rng)
    order: list[tuple[str, str, bytes]] = [("valid", label, line) for label, line in valid]
    for label, line in poison:
        order.insert(rng.randrange(len(order) + 1), ("poison", label, line))
    truth: Truth = {k: (v[0], v[1]) for k, v in expected.items()}
    readings = sum(len(orjson.loads(line)["counters"]) for _, line in valid)
    result = RowResult("poison", f"poison set: {len(poison)} invalid among valid",
                       readings=readings)
    pipeline = Pipeline(settings, ctx.logs(settings))
    placed: dict[str, tuple[int, int] | str] = {}
    try:
        pipeline.start("sink")
        pipeline.start("worker")
        pipeline.wait_billing(timeout=90)
        say(f"  publishing {len(valid)} valid reports ({readings:,} readings) and "
            f"{len(poison)} invalid messages")
        futures = []
        publisher = ReportPublisher(settings)
        try:
            for kind, label, line in order:
                if kind == "poison":
                    futures.append((label, publisher.publish_raw(line)))
                    continue
                try:
                    publisher.publish(CounterReport.decode(line))
                except ValueError as exc:  # the product's own decoder refused valid input
                    result.notes.append(f"producer refused a valid report ({label}): {exc}"[:300])
                    publisher.publish_raw(line)
            publisher.flush(timeout=180)
            for label, future in futures:
                try:
                    meta = future.get(timeout=60)
                    placed[label] = (meta.partition, meta.offset)
                except Exception as exc:
                    placed[label] = f"not published: {exc!r}"[:200]
        finally:
            publisher.close(timeout=30)
        fault_end = time.monotonic()
        rec = wait_recovered(pipeline, settings, truth, fault_end,
                             timeout=300 if ctx.quick else 600, settle_s=60)
        alive = {name: child.alive() for name, child in pipeline.procs.items()}
    finally:
        pipeline.stop()
    finish(result, settings, truth, rec, len(poison) + overflow_refused, started, pipeline)
    # every invalid message: one dead letter naming it, with a reason
    letters = read_dead(settings)
    raw_topic = settings.topics.raw
    by_source: dict[tuple[int, int], list[Any]] = {}
    for letter in letters:
        if letter.source and letter.source[0] == raw_topic:
            by_source.setdefault((letter.source[1], letter.source[2]), []).append(letter)
    missing, unreasoned, unfaithful = [], [], []
    reasons: dict[str, str] = {}
    originals = dict(poison)
    for label, where in placed.items():
        if isinstance(where, str):
            missing.append(f"{label}: {where}")
            continue
        found = [d for d in by_source.get(where, []) if d.reason == "invalid"]
        if not found:
            missing.append(label)
        elif not all(d.detail for d in found):
            unreasoned.append(label)
        if found:
            letter, original = found[0], originals[label]
            digest = hashlib.sha256(original).hexdigest()
            # docs/contracts.md: the payload is the message, or its first 2 MiB with
            # `truncated`, and `size` and `sha256` of the whole message
            faithful = letter.payload_sha256 == digest if letter.payload_len == len(original) \
                else (letter.meta.get("truncated") is True and letter.meta.get("sha256") == digest
                      and letter.meta.get("size") == len(original))
            if not faithful:
                unfaithful.append(label)
            reasons[label] = (f"{letter.detail[:140]} (letter {letter.size:,} bytes, payload "
                              f"kept {letter.payload_len:,} of {len(original):,} bytes, "
                              f"{letter.meta})")
    big = next((v for k, v in reasons.items() if k.startswith("13 MiB")), None)
    if big:
        result.notes.append(f"13 MiB message: {big}")
    anomalies = [d for d in letters if d.reason == "anomaly" and any(
        r.get("user_id") == "overflow-user" for r in d.readings)]
    poison_sources = {w for w in placed.values() if not isinstance(w, str)}
    other = [d for d in letters if not (d.source and (d.source[1], d.source[2]) in poison_sources)
             and d not in anomalies]
    result.details["poison"] = {"placed": {k: str(v) for k, v in placed.items()},
                                "reasons": reasons, "unfaithful_payloads": unfaithful,
                                "missing_dead_letters": missing, "no_reason": unreasoned,
                                "overflow_anomalies": len(anomalies),
                                "processes_alive_at_end": alive}
    if missing:
        result.notes.append(f"no 'invalid' dead letter for: {', '.join(missing)}")
    if unreasoned:
        result.notes.append(f"dead letter without a reason for: {', '.join(unreasoned)}")
    if unfaithful:
        result.notes.append("dead letter payload is neither the message nor its documented "
                            f"truncation (size, sha256) for: {', '.join(unfaithful)}")
    if len(anomalies) != overflow_refused:
        result.notes.append(f"overflow: {len(anomalies)} anomaly letters for overflow-user, "
                            f"expected {overflow_refused}")
    if other:
        result.notes.append("unexpected dead letters: " + "; ".join(
            f"{d.reason}: {d.detail[:100]}" for d in other[:5]))
    if not all(alive.values()) or pipeline.exits:
        result.notes.append(f"pipeline processes did not keep running: alive {alive}")
    result.ok = result.ok and not missing and not unreasoned and not unfaithful and not other and (
        len(anomalies) == overflow_refused) and all(alive.values()) and not pipeline.exits
    result.notes.append(f"expected: {up_total + down_total:,} bytes of overflow-user billed "
                        f"and {overflow_refused} report(s) refused as anomaly (2**63-1 bound)")
    return result


# --------------------------------------------------------------------------- the agent

FAKE_SOURCE = textwrap.dedent('''
    """A counter source for the agent's command collector: n grows by one per call."""
    import json, os, sys
    folder = sys.argv[1]
    users = int(sys.argv[2])
    path = os.path.join(folder, "n")
    n = int(open(path).read()) if os.path.exists(path) else 0
    if not os.path.exists(os.path.join(folder, "frozen")):
        n += 1
        with open(path + ".tmp", "w") as f:
            f.write(str(n))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    print(json.dumps({f"user-{k}": [n * (k + 1) * 1000, n * (k + 1) * 7919]
                      for k in range(users)}))
''')


class AgentNode:
    """A real `quotaflow agent` with a command collector whose counters grow by known steps."""

    def __init__(self, workdir: Path, settings: Settings, node: str, users: int,
                 interval_s: float) -> None:
        self.dir = workdir / node
        self.dir.mkdir(parents=True)
        self.settings, self.node, self.users = settings, node, users
        self.source = self.dir / "source"
        self.source.mkdir()
        script = self.dir / "fake_source.py"
        script.write_text(FAKE_SOURCE)
        self.outbox = self.dir / "outbox" / "outbox.db"
        self.config = self.dir / "agent.toml"
        self.config.write_text(textwrap.dedent(f'''
            node_id = "{node}"
            outbox = "{self.outbox}"
            baseline_on_first_start = false
            drain_timeout_s = 5
            log_level = "INFO"
            [[collectors]]
            type = "command"
            command = ["{sys.executable}", "{script}", "{self.source}", "{users}"]
            parser = "json"
            interval_s = {interval_s}
        '''))
        self.runs = 0
        self.child: Child | None = None

    def start(self, *args: str) -> Child:
        self.runs += 1
        self.child = Child(f"agent-{self.node}",
                           [*QUOTAFLOW, "agent", "--config", str(self.config), *args],
                           settings_env(self.settings), self.dir / f"agent-{self.runs}.log")
        return self.child

    def calls(self) -> int:
        path = self.source / "n"
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return 0

    def wait_calls(self, at_least: int, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.calls() < at_least:
            if time.monotonic() > deadline or (self.child and not self.child.alive()):
                return False
            time.sleep(0.1)
        return True

    def pending(self) -> int:
        """Reports in the outbox (-1 if it cannot be read)."""
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True,
                                                    timeout=5)) as db:
                return int(db.execute("SELECT COUNT(*) FROM reports").fetchone()[0])
        except sqlite3.Error:
            return -1

    def freeze(self) -> int:
        (self.source / "frozen").write_text("")
        time.sleep(1.0)  # a call that began before the freeze has finished
        return self.calls()

    def truth(self, n: int) -> dict[str, tuple[int, int]]:
        return {f"user-{k}": (n * (k + 1) * 1000, n * (k + 1) * 7919) for k in range(self.users)}


def _add(expected: dict[tuple[str, str, str], list[int]], node: str,
         truth: dict[str, tuple[int, int]], sign: int = 1) -> None:
    for user, (up, down) in truth.items():
        total = expected.setdefault((user, node, "*"), [0, 0])
        total[0] += sign * up
        total[1] += sign * down


def row_agent_outage(ctx: Ctx) -> RowResult:
    started = time.monotonic()
    outage = 20.0 if ctx.quick else 40.0
    settings = ctx.settings("agent")
    ensure_topics(settings)
    pipeline = Pipeline(settings, ctx.logs(settings))
    node = AgentNode(ctx.workdir / settings.topic_prefix, settings, "agent-outage", users=50,
                     interval_s=0.5)
    result = RowResult("agent-outage", f"agent SIGKILL in a {outage:.0f}s Kafka outage")
    try:
        pipeline.start("sink")
        pipeline.start("worker")
        node.start()
        if not node.wait_calls(5) and node.child is not None:
            result.notes.append("the agent did not collect at start: " + node.child.tail(800))
        say("  stopping Kafka")
        down_at = time.monotonic()
        ctx.servers.stop_kafka()
        sleep_supervised(None, outage / 2 - (time.monotonic() - down_at))
        before_kill = node.pending()
        calls_before = node.calls()
        say(f"  SIGKILL the agent ({before_kill} reports in its outbox)")
        assert node.child is not None
        node.child.kill()
        n = node.freeze()
        sleep_supervised(None, outage - (time.monotonic() - down_at))
        after_kill = node.pending()
        say("  starting Kafka again, then the agent")
        fault_end = time.monotonic()  # recovery includes the broker's own start
        if note := ctx.servers.start_kafka():
            result.notes.append(note)
        result.notes.append(f"the broker took {time.monotonic() - fault_end:.1f}s to start")
        node.start()
        emptied: list[float] = []

        def outbox_watch() -> None:
            if not emptied and node.pending() == 0:
                emptied.append(time.monotonic() - fault_end)

        expected: dict[tuple[str, str, str], list[int]] = {}
        _add(expected, node.node, node.truth(n))
        truth: Truth = {k: (v[0], v[1]) for k, v in expected.items()}
        result.readings = n * node.users
        result.details.update(outbox_before_kill=before_kill, outbox_after_kill=after_kill,
                              collections=n, collections_before_kill=calls_before)
        result.notes.append(f"outbox held {before_kill} reports at the SIGKILL, "
                            f"{after_kill} after it; {n} collections in all")
        if after_kill < before_kill or before_kill <= 0:
            result.notes.append("the outbox did not keep the outage's reports across SIGKILL")
        rec = wait_recovered(pipeline, settings, truth, fault_end,
                             timeout=240 if ctx.quick else 400, by_day=False, settle_s=90,
                             on_poll=outbox_watch)
        result.notes.append("the restarted agent's outbox was empty "
                            + (f"{emptied[0]:.1f}s after the restart command"
                               if emptied else "never, while waiting"))
        status = node.child.stop(timeout=30) if node.child else None
        result.details["agent_exit"] = status
        if status != 0:
            result.notes.append(f"the restarted agent exited with status {status}: "
                                + (node.child.tail(600) if node.child else ""))
    finally:
        if node.child is not None:
            node.child.stop(timeout=10)
        pipeline.stop()
    finish(result, settings, truth, rec, 0, started, pipeline)
    result.ok = result.ok and status == 0 and before_kill > 0 and after_kill >= before_kill
    return result


def _corrupt(path: Path, how: str, rng: random.Random) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    size = path.stat().st_size
    if how == "zero-length":
        path.write_bytes(b"")
    elif how == "truncated":
        with path.open("r+b") as f:
            f.truncate(max(size // 2, 1))
    else:
        path.write_bytes(rng.randbytes(max(size, 8192)))


def row_corrupt_outbox(ctx: Ctx) -> RowResult:
    started = time.monotonic()
    settings = ctx.settings("outbox")
    ensure_topics(settings)
    pipeline = Pipeline(settings, ctx.logs(settings))
    rng = random.Random(7)
    result = RowResult("corrupt-outbox", "outbox zero/truncated/garbage: refuse, reset")
    expected: dict[tuple[str, str, str], list[int]] = {}
    variants: dict[str, dict[str, Any]] = {}
    recoveries: list[float | None] = []
    rec: Any = None
    try:
        pipeline.start("sink")
        pipeline.start("worker")
        for how in ("zero-length", "truncated", "garbage"):
            info: dict[str, Any] = {}
            variants[how] = info
            node = AgentNode(ctx.workdir / settings.topic_prefix, settings, f"outbox-{how}",
                             users=20, interval_s=0.3)
            node.start()
            node.wait_calls(6)
            assert node.child is not None
            info["first_run_exit"] = node.child.stop(timeout=30)
            info["pending_after_first_run"] = node.pending()
            n_stop = node.calls()
            _corrupt(node.outbox, how, rng)
            damaged = node.outbox.read_bytes()
            # without the flag: must refuse, quickly, saying why and what to do
            t = time.monotonic()
            refused = node.start()
            while refused.alive() and time.monotonic() - t < 30:
                time.sleep(0.2)
            still_running = refused.alive()
            status = refused.stop(timeout=10)
            info["left_untouched"] = (node.outbox.exists()
                                      and node.outbox.read_bytes() == damaged)
            text = refused.text()
            lines = [ln for ln in text.splitlines()
                     if "--reset-outbox" in ln or str(node.outbox) in ln]
            info.update(refused_status=None if still_running else status,
                        ran_on_corrupt_outbox=still_running,
                        refusal_s=round(time.monotonic() - t, 1),
                        message=(lines[-1][:400] if lines else text[-400:]))
            clear = bool(lines) and str(node.outbox) in " ".join(lines) and (
                "--reset-outbox" in " ".join(lines))
            info["refused_clearly"] = ((not still_running) and status not in (0, None) and clear
                                       and info["left_untouched"])
            # with --reset-outbox: a new outbox, the first report a baseline
            n_before = node.calls()
            reset_start = time.monotonic()
            node.start("--reset-outbox")
            collected = node.wait_calls(n_before + 5, timeout=30)
            assert node.child is not None
            info["reset_runs"] = node.child.alive() and collected
            info["reset_log"] = [ln[:300] for ln in node.child.text().splitlines()
                                 if "reset" in ln.lower()][:3]
            info["moved_aside"] = sorted(p.name for p in node.outbox.parent.iterdir()
                                         if ".broken-" in p.name)
            n_final = node.freeze()
            deadline = time.monotonic() + 60
            while node.pending() not in (0, -1) and time.monotonic() < deadline:
                time.sleep(0.3)
            info["reset_run_exit"] = node.child.stop(timeout=30)
            info["collections"] = {"before_corruption": n_stop, "before_reset": n_before,
                                   "final": n_final}
            # docs/agent.md, --reset-outbox: the traffic since the last acknowledged report
            # is not billed (here: the first reading of the reset run is a baseline)
            if info["reset_runs"]:
                _add(expected, node.node, node.truth(n_stop))
                _add(expected, node.node, node.truth(n_final))
                _add(expected, node.node, node.truth(n_before + 1), sign=-1)
            else:
                _add(expected, node.node, node.truth(n_stop))
            result.readings += n_final * node.users
            truth: Truth = {k: (v[0], v[1]) for k, v in expected.items()}
            rec = wait_recovered(pipeline, settings, truth, reset_start, timeout=180,
                                 by_day=False, settle_s=60)
            recoveries.append(rec.seconds)
            say(f"  {how}: refused clearly {info['refused_clearly']} (status "
                f"{info['refused_status']}), --reset-outbox runs {info['reset_runs']}, "
                f"billed exact {rec.exact}")
    finally:
        pipeline.stop()
    result.details["variants"] = variants
    finish(result, settings, truth, rec, 0, started, pipeline)
    result.recovery_s = (None if not recoveries or None in recoveries
                         else round(max(r for r in recoveries if r is not None), 1))
    for how, info in variants.items():
        if not info.get("refused_clearly"):
            result.notes.append(
                f"{how}: not refused clearly (status {info.get('refused_status')}, kept "
                f"running: {info.get('ran_on_corrupt_outbox')}, damaged file left as it was: "
                f"{info.get('left_untouched')}); log: {info.get('message')}")
        if not info.get("reset_runs"):
            result.notes.append(f"{how}: --reset-outbox did not start a collecting agent: "
                                f"{info.get('reset_log')}")
    if variants:
        example = next(iter(variants.values())).get("message", "")
        result.notes.append(f"refusal message, e.g.: {example[:300]}")
    result.notes.append("expected bytes: per the documented --reset-outbox cost, the first "
                        "reading after the reset is a baseline (not billed)")
    result.ok = result.ok and all(
        i.get("refused_clearly") and i.get("reset_runs") for i in variants.values())
    return result


# --------------------------------------------------------------------------- push receiver


def _push_bodies(rng: random.Random, small: int, large: int
                 ) -> list[tuple[str, str, dict[str, list[int]]]]:
    """(node_type, node_id, body) of every push, each body distinct."""
    out: list[tuple[str, str, dict[str, list[int]]]] = []
    for i in range(small):
        node = str(i % 20 + 1)
        body = {f"px-{i % 20}-{j}": [rng.randrange(1, 10**9), rng.randrange(1, 10**10)]
                for j in range(rng.randrange(1, 30))}
        body[f"push-no-{i}"] = [i + 1, 2 * i + 1]  # makes each body unique
        out.append(("vless", node, body))
    for i in range(large):
        body: dict[str, list[int]] = {}
        size = 0
        j = 0
        while size < 3_500_000:  # the exact length of the compact JSON
            user = f"big-{i}-user-{j:06d}"
            value = [rng.randrange(10**8, 10**9), rng.randrange(10**9, 10**10)]
            body[user] = value
            size += len(user) + len(str(value[0])) + len(str(value[1])) + 7
            j += 1
        out.append(("vmess", f"big{i}", body))
    return out


async def _push_all(port: int, token: str, pushes: list[tuple[str, str, bytes]]
                    ) -> list[tuple[int, str, float, str]]:
    """POST all pushes at once; (status, answer, seconds, Retry-After) of each."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/api/v1/server/UniProxy/push"
    timeout = aiohttp.ClientTimeout(total=180)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(node_type: str, node_id: str, body: bytes
                      ) -> tuple[int, str, float, str]:
            t = time.monotonic()
            try:
                async with session.post(url, data=body, params={
                    "node_type": node_type, "node_id": node_id, "token": token,
                }, headers={"Content-Type": "application/json"}) as response:
                    text = await response.text()
                    return (response.status, text[:200], time.monotonic() - t,
                            response.headers.get("Retry-After", ""))
            except Exception as exc:
                return -1, repr(exc)[:200], time.monotonic() - t, ""

        return list(await asyncio.gather(*(one(*p) for p in pushes)))


def row_push(ctx: Ctx) -> RowResult:
    started = time.monotonic()
    small, large = (50, 2) if ctx.quick else (200, 10)
    settings = ctx.settings("push")
    ensure_topics(settings)
    pipeline = Pipeline(settings, ctx.logs(settings))
    folder = ctx.workdir / settings.topic_prefix
    folder.mkdir(parents=True)
    port, token = free_port(), "chaos-token"
    config = folder / "push.toml"
    config.write_text(textwrap.dedent(f'''
        node_id = "push-host"
        outbox = "{folder / 'outbox.db'}"
        drain_timeout_s = 10
        log_level = "INFO"
        [push]
        host = "127.0.0.1"
        port = {port}
        token = "{token}"
    '''))
    result = RowResult("push", f"push: {small} concurrent + {large} x 3.5 MB concurrent")
    pushes = _push_bodies(random.Random(3), small, large)
    wire = [(t, n, orjson.dumps(b)) for t, n, b in pushes]
    result.details["large_body_bytes"] = [len(w[2]) for w in wire[small:]]
    receiver = Child("push-receiver", [*QUOTAFLOW, "push-receiver", "--config", str(config)],
                     settings_env(settings), folder / "push-receiver.log")
    peak: float | None = None
    rss_samples: list[float] = []
    try:
        pipeline.start("sink")
        pipeline.start("worker")
        import socket

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and receiver.alive():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.2)
        say(f"  pushing {len(wire)} bodies at once ({sum(len(w[2]) for w in wire):,} bytes)")
        loop_done = False

        def sample() -> None:
            while not loop_done:
                value = receiver.rss()
                if value is not None:
                    rss_samples.append(value)
                time.sleep(0.1)

        import threading

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        burst = time.monotonic()
        answers = asyncio.run(_push_all(port, token, wire))
        burst_s = time.monotonic() - burst
        first = list(answers)
        # A 503 is the receiver's documented backpressure (docs/agent.md, nothing stored);
        # a backend pushes that traffic again later, and so does this row, a few times.
        retries = 0
        for _ in range(10):
            busy = [i for i, a in enumerate(answers) if a[0] == 503]
            if not busy:
                break
            wait = max((float(answers[i][3]) if answers[i][3].isdigit() else 1.0
                        for i in busy), default=1.0)  # Retry-After, in seconds
            time.sleep(min(max(wait, 0.5), 5.0))
            again = asyncio.run(_push_all(port, token, [wire[i] for i in busy]))
            for i, answer in zip(busy, again, strict=True):
                answers[i] = answer
            retries += len(busy)
        fault_end = time.monotonic()
        result.details["burst_s"] = round(burst_s, 2)
        loop_done = True
        sampler.join(timeout=5)
        accepted = [i for i, (status, text, _, _) in enumerate(answers)
                    if status == 200 and '"data": true' in text.replace('":true', '": true')]
        accepted_set = set(accepted)
        refused = [(i, a[0], a[1]) for i, a in enumerate(answers) if i not in accepted_set]
        first_busy = sum(1 for a in first if a[0] == 503)
        large_busy = sum(1 for a in first[small:] if a[0] == 503)
        expected: dict[tuple[str, str, str], list[int]] = {}
        for i in accepted:
            node_type, node_id, body = pushes[i]
            _add(expected, f"{node_type}-{node_id}", {u: (v[0], v[1]) for u, v in body.items()})
        truth: Truth = {k: (v[0], v[1]) for k, v in expected.items()}
        result.readings = sum(len(pushes[i][2]) for i in accepted)
        latencies = sorted(a[2] for a in first)  # the burst
        result.details.update(
            accepted=len(accepted), refused=[r for r in refused[:20]],
            latency_s={"median": round(latencies[len(latencies) // 2], 2),
                       "max": round(latencies[-1], 2)},
        )
        result.details.update(busy_503_first_round=first_busy, busy_503_large=large_busy,
                              retried=retries)
        result.notes.append(f"first round: {len(wire) - first_busy}/{len(wire)} accepted in "
                            f"{burst_s:.1f}s, {first_busy} answered 503 busy ({large_busy} of "
                            f"them large) and pushed again ({retries} retries); in the end "
                            f"{len(accepted)}/{len(wire)} accepted; answer time median "
                            f"{latencies[len(latencies) // 2]:.2f}s, max {latencies[-1]:.2f}s")
        if refused:
            result.notes.append(f"{len(refused)} pushes not accepted, e.g. {refused[:3]}")
        rec = wait_recovered(pipeline, settings, truth, fault_end,
                             timeout=300 if ctx.quick else 600, by_day=False, settle_s=90)
        peak = receiver.peak_rss()
        alive = receiver.alive()
        status = receiver.stop(timeout=30)
    finally:
        receiver.stop(timeout=10)
        pipeline.stop()
    finish(result, settings, truth, rec, 0, started, pipeline)
    result.details.update(receiver_peak_rss_mb=peak,
                          receiver_rss_max_sampled_mb=max(rss_samples, default=None),
                          receiver_exit=status)
    result.notes.append(f"receiver peak RSS {peak or float('nan'):.0f} MB (VmHWM)"
                        + ("" if alive else "; the receiver died"))
    result.ok = result.ok and alive and len(accepted) == len(wire)
    return result


# --------------------------------------------------------------------------- soak


def row_soak(ctx: Ctx) -> RowResult:
    started = time.monotonic()
    minutes = ctx.soak_minutes
    nodes, users, tick = 10, 1000, 1.0
    settings = ctx.settings("soak")
    ensure_topics(settings)
    pipeline = Pipeline(settings, ctx.logs(settings))
    rng = random.Random(21)
    result = RowResult("soak", f"soak {minutes:g} min, {nodes * users:,} readings/s")
    counters = {f"soak-{n:02d}": {f"su-{u:04d}": [0, 0] for u in range(users)}
                for n in range(nodes)}
    seqs = dict.fromkeys(counters, 0)
    epoch = int(time.time() * 1000) - 1000
    expected: dict[tuple[str, str, str], list[int]] = {}
    samples: list[dict[str, Any]] = []
    reader = LagReader(settings)
    try:
        worker = pipeline.start("worker")
        sink = pipeline.start("sink")
        time.sleep(5)  # let them come up
        publisher = ReportPublisher(settings)
        begin = time.monotonic()
        end = begin + minutes * 60
        next_sample = begin
        ticks = 0
        max_ticks = int(minutes * 60 / tick) + 1
        say(f"  steady load for {minutes:g} min")
        try:
            while time.monotonic() < end and ticks < max_ticks:
                at = datetime.now(UTC)
                label = UTC_CALENDAR.label(int(at.timestamp()), "day")
                for node, state in counters.items():
                    seqs[node] += 1
                    for user, c in state.items():
                        if rng.random() < 0.5:
                            continue
                        up, down = rng.randrange(0, 200_000), rng.randrange(0, 2_000_000)
                        c[0] += up
                        c[1] += down
                        total = expected.setdefault((user, node, label), [0, 0])
                        total[0] += up
                        total[1] += down
                    publisher.publish(CounterReport.decode(_report(
                        node, epoch, seqs[node], at, [(u, c[0], c[1]) for u, c in state.items()])))
                    result.readings += users
                ticks += 1
                now = time.monotonic()
                if now >= next_sample:
                    pipeline.restart_exited()
                    lag = reader.lag()
                    samples.append({"t": round(now - begin, 1),
                                    "worker_rss_mb": pipeline.procs["worker"].rss(),
                                    "sink_rss_mb": pipeline.procs["sink"].rss(),
                                    "lag_raw": None if lag is None else lag[0],
                                    "lag_totals": None if lag is None else lag[1]})
                    next_sample = now + 5.0
                delay = begin + ticks * tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            publisher.flush(timeout=120)
        finally:
            publisher.close(timeout=30)
        fault_end = time.monotonic()
        truth: Truth = {k: (v[0], v[1]) for k, v in expected.items()}
        worker_peak = pipeline.procs["worker"].peak_rss()
        sink_peak = pipeline.procs["sink"].peak_rss()
        behind = sum(1 for s in samples[1:] if (s["lag_raw"] or 0) > nodes * 4 * 30)
        rec = wait_recovered(pipeline, settings, truth, fault_end, timeout=300)
        result.details.update(samples=samples, ticks=ticks,
                              achieved_readings_per_s=round(result.readings /
                                                            max(fault_end - begin, 1e-9)))
    finally:
        reader.close()
        pipeline.stop()
    finish(result, settings, truth, rec, 0, started, pipeline)

    def stat(key: str) -> str:
        values = [s[key] for s in samples if s[key] is not None]
        if not values:
            return "-"
        return f"{values[0]:.0f}/{values[-1]:.0f}/{max(values):.0f}"

    lags_raw = [s["lag_raw"] for s in samples if s["lag_raw"] is not None]
    lags_totals = [s["lag_totals"] for s in samples if s["lag_totals"] is not None]
    result.details.update(worker_peak_rss_mb=worker_peak, sink_peak_rss_mb=sink_peak,
                          max_lag_raw=max(lags_raw, default=None),
                          max_lag_totals=max(lags_totals, default=None))
    result.notes.append(
        f"RSS MB start/end/peak-sampled: worker {stat('worker_rss_mb')} (VmHWM "
        f"{worker_peak or float('nan'):.0f}), sink {stat('sink_rss_mb')} (VmHWM "
        f"{sink_peak or float('nan'):.0f}); max lag raw {max(lags_raw, default=None)}, totals "
        f"{max(lags_totals, default=None)} messages; {len(samples)} samples every 5 s; "
        f"{result.details['achieved_readings_per_s']:,} readings/s published")
    if behind:
        result.notes.append(f"the worker fell behind (raw lag > 30 s of load) in {behind} samples")
    result.details["worker_start_pid"] = worker.pid
    result.details["sink_start_pid"] = sink.pid
    return result


# --------------------------------------------------------------------------- main

ROWS: dict[str, Callable[[Ctx], RowResult]] = {
    "worker-kill": row_worker_kill,
    "broker-kill": row_broker_kill,
    "influx-down": row_influx_down,
    "second-worker": row_second_worker,
    "poison": row_poison,
    "agent-outage": row_agent_outage,
    "corrupt-outbox": row_corrupt_outbox,
    "push": row_push,
    "soak": row_soak,
}


def _print_table(results: list[RowResult]) -> None:
    print(table_header())
    for r in results:
        print(table_line(r))
    print()
    for r in results:
        for note in r.notes:
            print(f"  {r.row}: {note}")
    sys.stdout.flush()


def _save(path: Path, args: argparse.Namespace, results: list[RowResult],
          servers: dict[str, Any], begun: str) -> None:
    payload = {"started": begun, "command": " ".join(sys.argv), "quick": args.quick,
               "soak_minutes": args.soak_minutes, "servers": servers,
               "rows": [r.to_json() for r in results]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows to run (default all: {','.join(ROWS)})")
    parser.add_argument("--quick", action="store_true", help="each row small and once")
    parser.add_argument("--soak-minutes", type=float, default=None,
                        help="length of the soak row (default 20, 1 with --quick)")
    parser.add_argument("--reps", type=int, default=10,
                        help="repetitions of the worker-kill row (default 10, 1 with --quick)")
    parser.add_argument("--json", type=Path, default=HERE / "chaos-results.json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.soak_minutes is None:
        args.soak_minutes = 1.0 if args.quick else 20.0
    if not 0 < args.soak_minutes <= 24 * 60 or not 1 <= args.reps <= 100:
        parser.error("--soak-minutes must be in (0, 1440] and --reps in [1, 100]")
    signal.signal(signal.SIGTERM, _terminate)
    begun = datetime.now(UTC).isoformat(timespec="seconds")
    workdir = Path(tempfile.mkdtemp(prefix="quotaflow-chaos-"))
    results: list[RowResult] = []
    servers: Servers | None = None
    info: dict[str, Any] = {}
    failed_hard = False
    try:
        say(f"work directory {workdir}; starting local Kafka and InfluxDB")
        servers = Servers(workdir / "local")
        info = {"kafka": servers.kafka_bootstrap, "influx": servers.influx_url,
                "kafka_version": servers.services.kafka_version}
        ctx = Ctx(servers, workdir, args.quick, args.soak_minutes, args.reps,
                  random.Random(20261124))
        for name in names:
            say(f"row {name}")
            begin = time.monotonic()
            try:
                result = ROWS[name](ctx)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                result = RowResult(name, f"{name} (harness error)")
                first_line = (str(exc).splitlines() or [""])[0][:300]
                result.notes.append(f"the row raised {type(exc).__name__}: {first_line}")
                result.details["traceback"] = traceback.format_exc()
                result.seconds = round(time.monotonic() - begin, 1)
                say(traceback.format_exc())
                kill_all_children()
            results.append(result)
            say(f"row {name} done in {result.seconds:.0f}s")
            print(table_header())
            print(table_line(result))
            for note in result.notes:
                print(f"  {note}")
            sys.stdout.flush()
            _save(args.json, args, results, info, begun)
    except KeyboardInterrupt as exc:
        failed_hard = True
        say(f"interrupted ({exc}); stopping everything")
    finally:
        kill_all_children()
        if servers is not None:
            with contextlib.suppress(Exception):
                servers.down()
        _save(args.json, args, results, info, begun)
        if args.keep or failed_hard or not all(r.ok for r in results):
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"quotaflow chaos matrix, {begun}{' (--quick)' if args.quick else ''}")
    _print_table(results)
    print(f"results in {args.json}")
    return 0 if results and not failed_hard and all(r.ok for r in results) else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    raise SystemExit(main())

"""`quotaflow plans` on real Kafka and InfluxDB: import, export, set, show, list, delete."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from quotaflow.core.partitioning import partition_of
from quotaflow.core.plan_edits import plans_file, read_plans_file
from quotaflow.core.plans import Plan
from quotaflow.core.settings import Settings
from quotaflow.sinks.influxql import InfluxQL
from tests.cli.conftest import Cli, read_topic

pytestmark = pytest.mark.integration

PLANS: list[dict[str, Any]] = [
    {"user_id": "alice", "quota_bytes": 50_000_000_000, "period": {"kind": "calendar_month"},
     "timezone": "Europe/Berlin", "starts_at": "2026-11-01T00:00:00+01:00",
     "expires_at": "2026-12-31T23:59:59Z",
     "packs": [{"pack_id": "nov-extra", "bytes": 10_000_000_000,
                "added_at": "2026-11-20T10:00:00Z", "expires_at": None}],
     "warn_at": [0.5, 0.8], "enabled": True},
    {"user_id": "bob", "quota_bytes": None, "period": {"kind": "monthly", "reset_day": 31},
     "enabled": False},
    {"user_id": "carol", "quota_bytes": 1_073_741_824,
     "period": {"kind": "every_days", "days": 30, "anchor": "2026-11-01T00:00:00+05:30"},
     "enabled": True},
    {"user_id": "dave, the \"second\"", "quota_bytes": 5, "period": {"kind": "none"},
     "starts_at": "2026-01-01T00:00:00Z", "warn_at": [], "enabled": True},
]


def _write_lines(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def _exported(cli: Cli) -> list[Plan]:
    plans, errors = read_plans_file(cli.ok("plans", "export").stdout)
    assert errors == []
    return plans


def test_import_then_export_round_trips(cli: Cli, settings: Settings, tmp_path: Path) -> None:
    result = cli.ok("plans", "import", str(_write_lines(tmp_path / "plans.jsonl", PLANS)))
    assert f"imported 4 plans into {settings.topics.plans}" in result.stderr
    expected = sorted((Plan.model_validate_json(json.dumps(p)) for p in PLANS),
                      key=lambda p: p.user_id)
    exported = cli.ok("plans", "export").stdout
    assert exported == plans_file(expected)
    # what export writes, import reads: importing it again changes nothing
    (tmp_path / "again.jsonl").write_text(exported)
    cli.ok("plans", "import", str(tmp_path / "again.jsonl"))
    assert cli.ok("plans", "export").stdout == exported
    # each plan is on its user's partition, keyed by the user id
    records = read_topic(settings, settings.topics.plans)
    assert len(records) == 8
    for record in records:
        assert record.key is not None and record.value is not None
        user = record.key.decode()
        assert Plan.decode(record.value).user_id == user
        assert record.partition == partition_of(user, settings.partitions)


def test_import_reads_one_json_array_too(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "plans.json").write_text(json.dumps(PLANS, indent=2))
    cli.ok("plans", "import", str(tmp_path / "plans.json"))
    assert [p.user_id for p in _exported(cli)] == sorted(str(p["user_id"]) for p in PLANS)


def test_a_bad_file_names_every_bad_line_and_writes_nothing(
    cli: Cli, settings: Settings, tmp_path: Path
) -> None:
    cli.ok("plans", "import", str(_write_lines(tmp_path / "good.jsonl", PLANS[:2])))
    before = read_topic(settings, settings.topics.plans)
    lines = [
        json.dumps(PLANS[2]),                                             # 1 good
        json.dumps({**PLANS[2], "user_id": "zero", "quota_bytes": 0}),    # 2 quota 0
        "",                                                               # 3 blank
        json.dumps({**PLANS[2], "user_id": "tz", "timezone": "Mars/Base"}),  # 4 bad zone
        json.dumps(PLANS[2]),                                             # 5 carol again
        "{not json",                                                      # 6
        json.dumps(PLANS[3]),                                             # 7 good
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = cli("plans", "import", str(bad))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith(str(bad))]
    assert errors == [
        f"{bad}:2: quota_bytes: must be positive; use null for unlimited",
        f"{bad}:4: timezone: unknown IANA timezone 'Mars/Base'",
        f"{bad}:5: user 'carol' is given again (first on line 1)",
        f"{bad}:6: not JSON: key must be a string at line 1 column 2",
    ]
    assert "4 bad lines" in result.stderr and "nothing was written" in result.stderr
    # nothing was written: the topic holds exactly what it held
    assert read_topic(settings, settings.topics.plans) == before
    assert [p.user_id for p in _exported(cli)] == ["alice", "bob"]


def test_a_bad_file_on_a_fresh_deployment_creates_nothing(
    cli: Cli, settings: Settings, tmp_path: Path
) -> None:
    bad = _write_lines(tmp_path / "bad.jsonl", [{**PLANS[1], "period": {"kind": "weekly"}}])
    result = cli("plans", "import", str(bad))
    assert result.exit_code == 1
    assert f"{bad}:1: period.kind: 'weekly' is not one of calendar_month, monthly" in result.stderr
    assert read_topic(settings, settings.topics.plans) == []


def test_an_empty_file_is_refused(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    result = cli("plans", "import", str(tmp_path / "empty.jsonl"))
    assert result.exit_code == 1 and "holds no plan" in result.stderr


def test_set_changes_one_field_and_keeps_the_rest(cli: Cli, tmp_path: Path) -> None:
    cli.ok("plans", "import", str(_write_lines(tmp_path / "plans.jsonl", PLANS[:2])))
    alice = _exported(cli)[0]
    result = cli.ok("plans", "set", "alice", "--quota", "60GB")
    assert "quota_bytes: 50000000000 -> 60000000000" in result.stderr
    after = _exported(cli)
    assert after[0] == alice.model_copy(update={"quota_bytes": 60_000_000_000})
    assert after[1].user_id == "bob" and after[1].enabled is False  # others untouched

    cli.ok("plans", "set", "alice", "--disable", "--expires", "never", "--warn-at", "90%")
    assert _exported(cli)[0] == alice.model_copy(update={
        "quota_bytes": 60_000_000_000, "enabled": False, "expires_at": None, "warn_at": (0.9,),
    })
    cli.ok("plans", "set", "alice", "--period", "monthly:15", "--timezone", "default")
    changed = _exported(cli)[0]
    assert (changed.period.kind, changed.timezone, changed.packs) == ("monthly", None, alice.packs)

    unchanged = cli.ok("plans", "set", "alice", "--period", "monthly:15")
    assert "unchanged; nothing was written" in unchanged.stderr


def test_set_refuses_bad_options_and_writes_nothing(
    cli: Cli, settings: Settings, tmp_path: Path
) -> None:
    cli.ok("plans", "import", str(_write_lines(tmp_path / "plans.jsonl", PLANS[:1])))
    before = read_topic(settings, settings.topics.plans)
    result = cli("plans", "set", "alice", "--quota", "0", "--period", "weekly",
                 "--timezone", "Mars/Base")
    assert result.exit_code == 2
    assert "--quota: quota '0' is not positive: use 'unlimited'" in result.stderr
    assert "--period: period 'weekly' is not one of" in result.stderr
    result = cli("plans", "set", "alice", "--timezone", "Mars/Base")
    assert result.exit_code == 2
    assert "--timezone: unknown IANA timezone 'Mars/Base'" in result.stderr
    result = cli("plans", "set", "alice")
    assert result.exit_code == 2 and "nothing to set" in result.stderr
    assert read_topic(settings, settings.topics.plans) == before


def test_set_creates_a_plan_for_a_new_user_given_a_quota(cli: Cli) -> None:
    result = cli("plans", "set", "erin", "--warn-at", "0.5")
    assert result.exit_code == 2
    assert "erin has no plan yet: give --quota" in result.stderr
    cli.ok("plans", "set", "erin", "--quota", "10GiB", "--period", "every_days:30@now")
    (erin,) = _exported(cli)
    assert erin.quota_bytes == 10 * 2**30 and erin.enabled and erin.warn_at == (0.8,)
    assert erin.period.kind == "every_days"
    assert abs(erin.period.anchor - datetime.now(UTC)) < timedelta(minutes=1)


def test_add_pack(cli: Cli, tmp_path: Path) -> None:
    cli.ok("plans", "import", str(_write_lines(tmp_path / "plans.jsonl", PLANS[:1])))
    alice = _exported(cli)[0]
    started = datetime.now(UTC).replace(microsecond=0)
    result = cli.ok("plans", "set", "alice", "--add-pack", "10GiB:2026-12-31T00:00:00+01:00",
                    "--add-pack", "1.5GB")
    after = _exported(cli)[0]
    assert after.model_copy(update={"packs": after.packs[:1]}) == alice
    new = after.packs[1:]
    assert [(p.bytes, p.expires_at) for p in new] == [
        (10 * 2**30, datetime(2026, 12, 30, 23, tzinfo=UTC)), (1_500_000_000, None),
    ]
    for pack in new:
        assert started <= pack.added_at <= datetime.now(UTC)
        assert pack.pack_id.startswith(f"pack-{pack.added_at:%Y%m%dT%H%M%SZ}")
    assert new[0].pack_id != new[1].pack_id
    assert result.stderr.count("packs: + pack-") == 2
    # and a pack goes again by its id
    cli.ok("plans", "set", "alice", "--remove-pack", "nov-extra")
    assert [p.pack_id for p in _exported(cli)[0].packs] == [p.pack_id for p in new]


def test_delete_makes_the_plan_disappear(cli: Cli, settings: Settings, tmp_path: Path) -> None:
    cli.ok("plans", "import", str(_write_lines(tmp_path / "plans.jsonl", PLANS)))
    cli.ok("plans", "delete", "bob")
    listed = [json.loads(line)["user_id"] for line in
              cli.ok("plans", "list", "--json").stdout.splitlines()]
    assert listed == ["alice", "carol", 'dave, the "second"']
    assert "bob" not in cli.ok("plans", "list").stdout
    tombstones = [r for r in read_topic(settings, settings.topics.plans) if r.value is None]
    assert [(r.key, r.partition) for r in tombstones] == [
        (b"bob", partition_of("bob", settings.partitions))
    ]
    result = cli("plans", "delete", "bob")
    assert result.exit_code == 1 and "'bob' has no plan" in result.stderr
    assert cli("plans", "show", "bob").exit_code == 1


def test_a_record_that_is_no_plan_is_reported_not_fatal(
    cli: Cli, settings: Settings, tmp_path: Path
) -> None:
    cli.ok("plans", "import", str(_write_lines(tmp_path / "plans.jsonl", PLANS[:2])))
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    producer.send(settings.topics.plans, key=b"mallory", value=b'{"user_id": "mallory"}',
                  partition=partition_of("mallory", settings.partitions))
    producer.send(settings.topics.plans, key=b"alice", value=b"garbage",
                  partition=partition_of("alice", settings.partitions))
    producer.flush()
    producer.close()
    result = cli.ok("plans", "list", "--json")
    assert [json.loads(line)["user_id"] for line in result.stdout.splitlines()] == [
        "alice", "bob",
    ]
    assert "(key 'mallory'): quota_bytes: Field required" in result.stderr
    assert "(key 'alice'): not JSON" in result.stderr
    # a plan left out can still be deleted; a later record of a key ends its report
    cli.ok("plans", "delete", "mallory")
    cli.ok("plans", "set", "alice", "--quota", "1GB")
    result = cli.ok("plans", "list", "--json")
    assert [json.loads(line)["user_id"] for line in result.stdout.splitlines()] == [
        "alice", "bob",
    ]
    assert "left out" not in result.stderr


def test_list_shows_a_table(cli: Cli, tmp_path: Path) -> None:
    cli.ok("plans", "import", str(_write_lines(tmp_path / "plans.jsonl", PLANS[:2])))
    table = cli.ok("plans", "list").stdout
    assert "2 plans" in table and "alice" in table and "unlimited" in table


# ---------------------------------------------------------------------------- show, usage


def _write_points(settings: Settings, lines: list[str]) -> None:
    """Line protocol into the test's database, as the sink will write quota points."""
    from influxdb_client import InfluxDBClient
    from influxdb_client.client.write_api import SYNCHRONOUS
    from influxdb_client.domain.write_precision import WritePrecision

    InfluxQL.from_settings(settings).create_database()
    with InfluxDBClient(url=settings.influx_url, token=settings.influx_token.get_secret_value(),
                        org=settings.influx_org) as client:
        client.write_api(write_options=SYNCHRONOUS).write(
            bucket=settings.influx_bucket, record="\n".join(lines),
            write_precision=WritePrecision.S,
        )


def test_show_says_plainly_when_influxdb_has_nothing(cli: Cli, tmp_path: Path) -> None:
    cli.ok("plans", "import", str(_write_lines(tmp_path / "plans.jsonl", PLANS[:1])))
    out = cli.ok("plans", "show", "alice").stdout  # the database does not even exist
    assert "plan of alice" in out
    assert "quota         50 GB (50000000000 bytes) per period" in out
    assert "period        calendar_month, in Europe/Berlin" in out
    assert "packs         nov-extra: 10 GB, added 2026-11-20T10:00:00Z" in out
    assert "usage         nothing in InfluxDB yet" in out
    assert "commands      none in InfluxDB yet" in out
    shown = json.loads(cli.ok("plans", "show", "alice", "--json").stdout)
    assert (shown["usage"], shown["commands"]) == (None, [])


def test_show_prints_the_quota_state_and_the_last_commands(
    cli: Cli, settings: Settings
) -> None:
    cli.ok("plans", "set", "alice", "--quota", "50GB", "--timezone", "Europe/Berlin")
    now = datetime.now(UTC)
    berlin_start = cli.ok("plans", "show", "alice", "--json")
    period_start = json.loads(berlin_start.stdout)["period"]["start"]
    t = int(now.timestamp())
    _write_points(settings, [
        # an older point of a limited plan, then the latest one
        f'quota_usage,user_id=alice used_bytes=1i,allowance_bytes=9i,state="enabled",'
        f'period_start="{period_start}" {t - 600}',
        f'quota_usage,user_id=alice used_bytes=41000000000i,allowance_bytes=50000000000i,'
        f'state="enabled",period_start="{period_start}" {t - 60}',
        # bob's plan became unlimited: his latest point has no allowance_bytes
        f'quota_usage,user_id=bob used_bytes=3i,allowance_bytes=9i,state="enabled",'
        f'period_start="{period_start}" {t - 600}',
        f'quota_usage,user_id=bob used_bytes=7i,state="disabled",period_start="{period_start}" '
        f"{t - 30}",
        f'quota_events,user_id=alice,action=warn,reason=threshold command_id="c-50",'
        f"used_bytes=25000000000i,allowance_bytes=50000000000i,threshold=0.5 {t - 3600}",
        f'quota_events,user_id=alice,action=warn,reason=threshold command_id="c-80",'
        f"used_bytes=40000000000i,allowance_bytes=50000000000i,threshold=0.8 {t - 120}",
        f'quota_events,user_id=bob,action=disable,reason=operator command_id="c-bob",'
        f"used_bytes=7i,allowance_bytes=9i {t - 100}",
    ])
    out = cli.ok("plans", "show", "alice").stdout
    assert (f"usage         41 GB used of 50 GB (82.00%) in the period from {period_start}\n"
            "state         enabled\n") in out
    commands = out[out.index("last commands"):].splitlines()[1:]
    assert [line.split()[1:4] for line in commands] == [
        ["warn", "(threshold", "at"], ["warn", "(threshold", "at"],
    ]
    assert "0.8), used 40 GB of 50 GB, id c-80" in commands[0]
    assert "0.5), used 25 GB of 50 GB, id c-50" in commands[1]
    shown = json.loads(cli.ok("plans", "show", "alice", "--json", "--commands", "1").stdout)
    assert shown["usage"] == {
        "time": datetime.fromtimestamp(t - 60, UTC).isoformat().replace("+00:00", "Z"),
        "used_bytes": 41_000_000_000, "allowance_bytes": 50_000_000_000,
        "state": "enabled", "period_start": period_start,
    }
    assert [c["command_id"] for c in shown["commands"]] == ["c-80"]

    # usage --user shows the state too; an unlimited plan has no allowance_bytes
    assert ("quota: 41 GB used of 50 GB (82.00%) in the period from "
            f"{period_start}, enabled") in cli.ok("usage", "--user", "alice").stdout
    assert "quota: 7 B used (unlimited) in the period from" in cli.ok(
        "usage", "--user", "bob"
    ).stdout
    assert "quota:" not in cli.ok("usage", "--user", "carol").stdout


def test_show_marks_a_state_from_an_earlier_period(cli: Cli, settings: Settings) -> None:
    cli.ok("plans", "set", "alice", "--quota", "1GB")
    _write_points(settings, [
        'quota_usage,user_id=alice used_bytes=5i,allowance_bytes=1000000000i,'
        'state="disabled",period_start="2020-01-01T00:00:00Z" 1580000000',
    ])
    out = cli.ok("plans", "show", "alice").stdout
    assert "period from 2020-01-01T00:00:00Z (not the current period" in out
    assert "state         disabled" in out

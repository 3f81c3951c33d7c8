"""`quotaflow nodes` on real Kafka: node rates set from an instant on, and listed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from quotaflow.core.partitioning import partition_of
from quotaflow.core.plans import NodeRates
from quotaflow.core.settings import Settings
from tests.cli.conftest import Cli, read_topic

pytestmark = pytest.mark.integration


def _listed(cli: Cli) -> list[NodeRates]:
    return [NodeRates.decode(line) for line in cli.ok("nodes", "list", "--json").stdout.split()]


def test_set_adds_and_replaces_rates_and_list_shows_them(cli: Cli, settings: Settings) -> None:
    result = cli.ok("nodes", "set", "node-a", "--rate", "1.5", "--from", "2026-11-01T00:00:00Z")
    assert "node-a: rate 1.5 from 2026-11-01T00:00:00Z" in result.stderr
    assert "readings billed before now keep their rate" in result.stderr  # --from is past
    before = datetime.now(UTC).replace(microsecond=0)
    cli.ok("nodes", "set", "node-a", "--rate", "2")  # from now
    cli.ok("nodes", "set", "node-b", "--rate", "0.5", "--from", "2026-11-01T01:00:00+01:00")
    node_a, node_b = _listed(cli)
    assert [r.rate for r in node_a.rates] == ["1.5", "2"]
    assert before <= node_a.rates[1].from_ <= datetime.now(UTC)
    assert node_b.model_dump(mode="json", by_alias=True) == {  # the time as it was given
        "node_id": "node-b", "rates": [{"from": "2026-11-01T01:00:00+01:00", "rate": "0.5"}],
    }
    # a rate from the same instant (in any offset) replaces the one there; the others stay
    cli.ok("nodes", "set", "node-b", "--rate", "0.25", "--from", "2026-11-01T00:00:00Z")
    assert [r.rate for r in _listed(cli)[1].rates] == ["0.25"]
    assert [r.rate for r in _listed(cli)[0].rates] == ["1.5", "2"]

    table = cli.ok("nodes", "list").stdout
    assert "2 nodes with rates" in table
    assert "node-a" in table and "│ 2 " in table  # the rate in effect now

    for record in read_topic(settings, settings.topics.nodes):
        assert record.key is not None and record.value is not None
        assert json.loads(record.value)["node_id"] == record.key.decode()
        assert record.partition == partition_of(record.key.decode(), settings.partitions)


def test_bad_rates_and_times_are_refused_and_write_nothing(
    cli: Cli, settings: Settings
) -> None:
    cli.ok("nodes", "set", "node-a", "--rate", "3")
    before = read_topic(settings, settings.topics.nodes)
    for args, message in [
        (["--rate", "1.23456"], "rate '1.23456' is not a decimal with at most 4 places"),
        (["--rate", "x2"], "rate 'x2' is not a decimal"),
        (["--rate", "2", "--from", "tomorrow"], "time 'tomorrow' is not an RFC 3339 time"),
        (["--rate", "2", "--from", "2026-11-01T00:00:00"], "has no offset"),
    ]:
        result = cli("nodes", "set", "node-a", *args)
        assert result.exit_code == 2, result.stderr
        assert message in result.stderr
    assert read_topic(settings, settings.topics.nodes) == before


def test_a_future_rate_is_listed_but_not_yet_in_effect(cli: Cli) -> None:
    later = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    cli.ok("nodes", "set", "node-c", "--rate", "4", "--from", later.isoformat())
    (node_c,) = _listed(cli)
    assert node_c.rates[0].from_ == later
    assert "│ 1 " in cli.ok("nodes", "list").stdout

"""`quotaflow report` on the real pipeline's InfluxDB (the proof fleet of conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quotaflow.cli import app
from tests.dashboards.conftest import ProofFleet

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_draws_the_key_views_with_their_numbers(proof_fleet: ProofFleet,
                                                       tmp_path: Path) -> None:
    truth = proof_fleet.truth
    node = truth.nodes()[1]
    over = max(truth.plans, key=lambda u: truth.total("month", user=u))
    env = {**os.environ, **proof_fleet.settings.to_env()}
    result = CliRunner().invoke(
        app, ["report", "--out", str(tmp_path), "--node", node, "--html"], env=env
    )
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted([
        "fleet-traffic-by-day.png", "top-users.png", f"node-{node}-30-days.png",
        f"node-{node}-12-months.png", f"user-{over}-quota.png", "index.html",
    ])
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 5000, png
    page = (tmp_path / "index.html").read_text()
    for name in files:
        if name.endswith(".png"):
            assert f"src='{name}'" in page
    # the page's numbers are the ground truth: the node's months of the year, this month's
    # heaviest user, and the over-quota user's usage
    today = truth.now
    months = f"{truth.total('month', node=node):,} bytes"
    assert f"<td>{today:%Y-%m}</td><td class='n'>{months}</td>" in page
    heaviest = max(truth.users(), key=lambda u: truth.total("month", user=u))
    assert f"<td>{heaviest}</td><td class='n'>{truth.total('month', user=heaviest):,} bytes" \
        in page
    assert f"<td>used</td><td class='n'>{truth.total('month', user=over):,} bytes" in page


def test_report_defaults_pick_the_busiest_node_and_fullest_quota(proof_fleet: ProofFleet,
                                                                tmp_path: Path) -> None:
    truth = proof_fleet.truth
    env = {**os.environ, **proof_fleet.settings.to_env()}
    result = CliRunner().invoke(app, ["report", "--out", str(tmp_path)], env=env)
    assert result.exit_code == 0, result.output
    busiest = max(truth.nodes(), key=lambda n: sum(
        v for d, v in truth.per_day(node=n).items() if (truth.now - d).days < 30))
    over = max(truth.plans, key=lambda u: truth.total("month", user=u))
    assert (tmp_path / f"node-{busiest}-30-days.png").exists()
    assert (tmp_path / f"user-{over}-quota.png").exists()
    assert not (tmp_path / "index.html").exists()

"""dashboards/build/ is what the Python builders make: a test fails when it is stale."""

from __future__ import annotations

from pathlib import Path

from quotaflow.dashboards.boards import BUILD_DIR, build_all, render, write_build


def test_committed_build_is_up_to_date() -> None:
    built = {f"{uid}.json": render(model) for uid, model in build_all("UTC").items()}
    committed = {p.name: p.read_text() for p in BUILD_DIR.glob("*.json")}
    stale = sorted(n for n in built.keys() | committed.keys() if built.get(n) != committed.get(n))
    assert not stale, (
        f"dashboards/build/ is out of date for {stale}: run "
        "`quotaflow dashboards build --timezone UTC`"
    )


def test_build_for_another_zone_changes_only_the_zone(tmp_path: Path) -> None:
    written = write_build("America/New_York", tmp_path)
    assert len(written) == 5
    for path in written:
        text = path.read_text()
        assert "UTC" not in text
        assert text.replace("America/New_York", "UTC") == (BUILD_DIR / path.name).read_text()


def test_uids_titles_and_conventions() -> None:
    boards = build_all("UTC")
    assert {uid: m["title"] for uid, m in boards.items()} == {
        "quotaflow-fleet": "quotaflow / Fleet", "quotaflow-node": "quotaflow / Node",
        "quotaflow-user": "quotaflow / User", "quotaflow-quotas": "quotaflow / Quotas",
        "quotaflow-pipeline": "quotaflow / Pipeline",
    }
    for uid, model in boards.items():
        assert model["refresh"] == "10s"
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "influxdb"
        for name in ("node", "user"):
            if name in variables:
                assert variables[name]["multi"] and variables[name]["includeAll"], (uid, name)
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids)), uid

"""deploy/grafana/provisioning/ is valid provisioning YAML that fits the dashboards."""

from __future__ import annotations

from pathlib import Path

import yaml

from quotaflow.dashboards.boards import build_all

PROVISIONING = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "provisioning"


def test_datasource_is_influxql_and_the_dashboards_accept_it() -> None:
    config = yaml.safe_load((PROVISIONING / "datasources" / "quotaflow-influxdb.yaml").read_text())
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["type"] == "influxdb" and source["jsonData"]["version"] == "InfluxQL"
    assert source["jsonData"]["httpMode"] == "GET" and source["jsonData"]["dbName"]
    for model in build_all("UTC").values():
        variable = next(v for v in model["templating"]["list"] if v["name"] == "datasource")
        assert variable["query"] == source["type"]  # the variable lists this data source
    text = (PROVISIONING / "datasources" / "quotaflow-influxdb.yaml").read_text()
    assert "#     version: Flux" in text  # the commented 2.x variant


def test_dashboard_provider_loads_files() -> None:
    config = yaml.safe_load((PROVISIONING / "dashboards" / "quotaflow.yaml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    assert provider["folder"] == "quotaflow"

"""`quotaflow dashboards push` against a small HTTP server that answers like Grafana.

No Grafana runs here. The server checks each request the way Grafana's HTTP API documents
it (docs/sources/developers/http_api: folder, dashboard, data_source): the path and method,
the `Authorization: Bearer <token>` header, the JSON body's shape, and answers with
Grafana's documented status codes and bodies (401 for a bad token, 404 for an unknown
data source name, 409 for a folder uid that exists, 412 for a dashboard that exists
without `overwrite`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from quotaflow.cli import app
from quotaflow.dashboards.boards import build_all
from quotaflow.dashboards.push import InfluxSource, PushError, push

TOKEN = "glsa_test_token"


class FakeGrafana:
    """Grafana's state as the API shows it, and every request it got."""

    def __init__(self) -> None:
        self.folders: dict[str, dict[str, Any]] = {}
        self.datasources: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.problems: list[str] = []

    def handle(self, method: str, path: str, headers: Any, body: Any) -> tuple[int, Any]:
        self.requests.append((method, path))
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, {"message": "invalid API key"}
        if not path.startswith("/api/"):
            return 404, {"message": "Not found"}
        if (method, path) == ("GET", "/api/folders"):
            return 200, [{"id": f["id"], "uid": f["uid"], "title": f["title"]}
                         for f in self.folders.values()]
        if (method, path) == ("POST", "/api/folders"):
            self._expect(body, {"title": str}, optional={"uid": str, "parentUid": str})
            uid = body.get("uid") or f"f{len(self.folders)}"
            if uid in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            self.folders[uid] = {"id": len(self.folders) + 1, "uid": uid, "title": body["title"]}
            return 200, {**self.folders[uid], "url": f"/dashboards/f/{uid}/", "version": 1}
        if method == "GET" and path.startswith("/api/datasources/name/"):
            name = path.removeprefix("/api/datasources/name/")
            if name not in self.datasources:
                return 404, {"message": "Data source not found"}
            return 200, self.datasources[name]
        if (method, path) == ("POST", "/api/datasources"):
            self._expect(body, {"name": str, "type": str, "access": str, "url": str},
                         optional={"database": str, "jsonData": dict, "secureJsonData": dict})
            if body["name"] in self.datasources:
                return 409, {"message": "data source with the same name already exists"}
            made = {**body, "id": len(self.datasources) + 1, "uid": f"ds{len(self.datasources)}"}
            self.datasources[body["name"]] = made
            return 200, {"datasource": made, "id": made["id"], "message": "Datasource added",
                         "name": body["name"]}
        if (method, path) == ("POST", "/api/dashboards/db"):
            self._expect(body, {"dashboard": dict},
                         optional={"folderUid": str, "folderId": int, "overwrite": bool,
                                   "message": str})
            dashboard = body["dashboard"]
            self._expect(dashboard, {"uid": str, "title": str, "panels": list},
                         optional=None)
            if body.get("folderUid") and body["folderUid"] not in self.folders:
                return 400, {"message": "folder not found"}
            uid = dashboard["uid"]
            if uid in self.dashboards and not body.get("overwrite"):
                return 412, {"message": "A dashboard with the same uid already exists",
                             "status": "name-exists"}
            version = self.dashboards.get(uid, {}).get("version", 0) + 1
            self.dashboards[uid] = {"dashboard": dashboard, "folderUid": body.get("folderUid"),
                                    "version": version}
            return 200, {"id": len(self.dashboards), "uid": uid, "status": "success",
                         "url": f"/d/{uid}/{uid}", "version": version, "slug": uid}
        return 404, {"message": "Not found"}

    def _expect(self, body: Any, required: dict[str, type],
                optional: dict[str, type] | None) -> None:
        if not isinstance(body, dict):
            self.problems.append(f"body is not a JSON object: {body!r}")
            return
        for key, kind in required.items():
            if not isinstance(body.get(key), kind):
                self.problems.append(f"{key!r} missing or not {kind.__name__}: {body!r:.200}")
        if optional is not None:
            for key in body.keys() - required.keys() - optional.keys():
                self.problems.append(f"unexpected field {key!r}")


@pytest.fixture
def grafana() -> Iterator[tuple[str, FakeGrafana]]:
    state = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if raw and self.headers.get("Content-Type", "").split(";")[0] != "application/json":
                state.problems.append(f"{self.path}: Content-Type {self.headers['Content-Type']}")
            body = json.loads(raw) if raw else None
            status, answer = state.handle(self.command, self.path, self.headers, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def test_push_creates_folder_and_datasource_and_is_idempotent(
    grafana: tuple[str, FakeGrafana],
) -> None:
    url, state = grafana
    boards = build_all("UTC")
    source = InfluxSource("quotaflow-influx", "http://influx:8086", "quotaflow")
    first = push(url, TOKEN, boards, folder="quotaflow", datasource="quotaflow-influx",
                 create_datasource=source)
    assert first.folder_created and first.datasource_created
    assert sorted(state.dashboards) == sorted(boards)
    assert state.folders["quotaflow"]["title"] == "quotaflow"
    assert state.datasources["quotaflow-influx"]["type"] == "influxdb"
    assert state.datasources["quotaflow-influx"]["jsonData"]["httpMode"] == "GET"
    for uid, saved in state.dashboards.items():
        assert saved["folderUid"] == "quotaflow" and saved["version"] == 1
        variable = next(v for v in saved["dashboard"]["templating"]["list"]
                        if v["name"] == "datasource")
        assert variable["current"]["value"] == first.datasource_uid
        assert saved["dashboard"]["panels"] == boards[uid]["panels"]

    second = push(url, TOKEN, boards, folder="quotaflow", datasource="quotaflow-influx",
                  create_datasource=source)
    assert not second.folder_created and not second.datasource_created
    assert len(state.folders) == 1 and len(state.datasources) == 1
    assert {saved["version"] for saved in state.dashboards.values()} == {2}
    assert state.problems == []
    assert ("POST", "/api/dashboards/db") in state.requests


def test_bad_token_is_named(grafana: tuple[str, FakeGrafana]) -> None:
    url, state = grafana
    with pytest.raises(PushError, match="refused the token"):
        push(url, "wrong", build_all("UTC"))
    assert state.dashboards == {} and state.folders == {}


def test_wrong_url_is_named(grafana: tuple[str, FakeGrafana]) -> None:
    url, _ = grafana
    with pytest.raises(PushError, match="not Grafana's HTTP API"):
        push(f"{url}/nothing-here", TOKEN, build_all("UTC"))
    with pytest.raises(PushError, match="cannot reach Grafana"):
        push("http://127.0.0.1:9", TOKEN, build_all("UTC"), timeout=2)


def test_missing_datasource_is_named_and_nothing_is_saved(
    grafana: tuple[str, FakeGrafana],
) -> None:
    url, state = grafana
    with pytest.raises(PushError, match="no data source named 'influx'"):
        push(url, TOKEN, build_all("UTC"), datasource="influx")
    assert state.dashboards == {} and state.folders == {}


def test_cli_build_and_push(grafana: tuple[str, FakeGrafana], tmp_path: Path) -> None:
    url, state = grafana
    runner = CliRunner()
    built = runner.invoke(app, ["dashboards", "build", "--out", str(tmp_path),
                                "--timezone", "Europe/Berlin"])
    assert built.exit_code == 0, built.output
    assert len(list(tmp_path.glob("*.json"))) == 5
    pushed = runner.invoke(app, ["dashboards", "push", "--url", url, "--token", TOKEN,
                                 "--folder", "Traffic", "--timezone", "Europe/Berlin"])
    assert pushed.exit_code == 0, pushed.output
    assert state.folders["traffic"]["title"] == "Traffic" and len(state.dashboards) == 5
    assert {s["dashboard"]["timezone"] for s in state.dashboards.values()} == {"Europe/Berlin"}
    refused = runner.invoke(app, ["dashboards", "push", "--url", url, "--token", "nope"])
    assert refused.exit_code == 1
    assert "refused the token" in " ".join(refused.output.split())

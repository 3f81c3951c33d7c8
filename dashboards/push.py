"""Upload the dashboards to a Grafana through its HTTP API, with grafana-client.

Idempotent: every dashboard keeps its uid and is written with `overwrite: true`, so a
second push replaces the first (Grafana keeps the old one as a version). The folder is
created when missing (found by title), and so is the InfluxQL data source when asked.
Every failure is a `PushError` with a sentence for the operator: Grafana not reachable,
a URL that is not Grafana's API, a token Grafana refuses, a data source that is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from grafana_client.api import GrafanaApi
from grafana_client.client import (
    GrafanaClientError,
    GrafanaException,
    GrafanaServerError,
    GrafanaUnauthorizedError,
)


class PushError(RuntimeError):
    """The push failed; the message says why and what to do."""


@dataclass(frozen=True)
class InfluxSource:
    """The InfluxQL data source to create when asked (`--create-datasource`)."""

    name: str
    url: str
    database: str
    token: str = ""

    def payload(self) -> dict[str, Any]:
        """`POST /api/datasources` body: InfluxQL over HTTP GET, 10 s minimum interval."""
        body: dict[str, Any] = {
            "name": self.name, "type": "influxdb", "access": "proxy", "url": self.url,
            "database": self.database,
            "jsonData": {"version": "InfluxQL", "dbName": self.database, "httpMode": "GET",
                         "timeInterval": "10s"},
        }
        if self.token:  # InfluxDB 2.x through its v1 API: the token as a header
            body["jsonData"]["httpHeaderName1"] = "Authorization"
            body["secureJsonData"] = {"httpHeaderValue1": f"Token {self.token}"}
        return body


@dataclass
class PushResult:
    """What the push did."""

    folder_uid: str
    folder_created: bool
    datasource_uid: str | None = None
    datasource_created: bool = False
    dashboards: list[str] = field(default_factory=list)  # their URLs in Grafana


def folder_uid(title: str) -> str:
    """A stable folder uid from its title (letters, digits, `-`, `_`; 40 at most).

    >>> folder_uid("quotaflow / Traffic")
    'quotaflow-traffic'
    """
    return re.sub(r"[^a-z0-9_]+", "-", title.lower()).strip("-")[:40] or "quotaflow"


def _explain(exc: GrafanaException | OSError, url: str, what: str) -> PushError:
    if isinstance(exc, OSError):  # refused, DNS, TLS: the HTTP library's errors
        return PushError(f"cannot reach Grafana at {url} while {what}: {exc}")
    if isinstance(exc, GrafanaUnauthorizedError) or exc.status_code == 403:
        return PushError(
            f"Grafana at {url} refused the token ({exc.status_code}) while {what}: "
            "use a service account token with the Editor role (Admin to create a data source)"
        )
    if exc.status_code == 0:
        return PushError(f"cannot reach Grafana at {url} while {what}: {exc.message}")
    if exc.status_code == 404:
        return PushError(
            f"{url} answered 404 while {what}: not Grafana's HTTP API; give Grafana's root URL "
            "(with its sub-path, if it is served under one)"
        )
    if isinstance(exc, GrafanaServerError):
        return PushError(f"Grafana at {url} failed ({exc.status_code}) while {what}: {exc}")
    return PushError(f"Grafana at {url} refused {what} ({exc.status_code}): {exc}")


def _datasource(api: GrafanaApi, url: str, name: str,
                create: InfluxSource | None) -> tuple[str, bool]:
    try:
        found = api.datasource.get_datasource_by_name(name)
        return str(found["uid"]), False
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise _explain(exc, url, f"looking up the data source {name!r}") from None
    except (GrafanaException, OSError) as exc:
        raise _explain(exc, url, f"looking up the data source {name!r}") from None
    if create is None:
        raise PushError(
            f"Grafana at {url} has no data source named {name!r}: add it (see "
            "deploy/grafana/provisioning/), or pass --create-datasource"
        )
    try:
        made = api.datasource.create_datasource(create.payload())
    except (GrafanaException, OSError) as exc:
        raise _explain(exc, url, f"creating the data source {name!r}") from None
    return str(made["datasource"]["uid"]), True


def _find_folder(api: GrafanaApi, url: str, title: str) -> str | None:
    try:
        folders = api.folder.get_all_folders()
    except (GrafanaException, OSError) as exc:
        raise _explain(exc, url, "listing folders") from None
    if not isinstance(folders, list):
        raise PushError(f"{url}/api/folders did not answer a list of folders: not Grafana?")
    return next((str(f["uid"]) for f in folders if f.get("title") == title), None)


def _create_folder(api: GrafanaApi, url: str, title: str) -> str:
    try:
        made = api.folder.create_folder(title, uid=folder_uid(title))
    except (GrafanaException, OSError) as exc:
        raise _explain(exc, url, f"creating the folder {title!r}") from None
    return str(made["uid"])


def bind_datasource(model: dict[str, Any], name: str, uid: str) -> dict[str, Any]:
    """The dashboard with its `$datasource` variable preset to this data source."""
    bound = dict(model)
    templating = [dict(v) for v in model.get("templating", {}).get("list", [])]
    for variable in templating:
        if variable.get("name") == "datasource":
            variable["current"] = {"selected": True, "text": name, "value": uid}
    bound["templating"] = {"list": templating}
    return bound


def push(
    url: str, token: str, boards: dict[str, dict[str, Any]], folder: str = "quotaflow",
    datasource: str | None = None, create_datasource: InfluxSource | None = None,
    timeout: float = 10.0,
) -> PushResult:
    """Upload `boards` (uid → dashboard JSON) to the Grafana at `url` with a token."""
    api = GrafanaApi.from_url(url.rstrip("/"), credential=token, timeout=timeout)
    found = _find_folder(api, url, folder)  # first: checks the URL and the token
    result = PushResult(found or "", found is None)
    if datasource:  # before anything is written: a missing data source stops the push
        result.datasource_uid, result.datasource_created = _datasource(
            api, url, datasource, create_datasource
        )
    folder_id = result.folder_uid = found or _create_folder(api, url, folder)
    for uid, model in boards.items():
        body = dict(model)
        if datasource and result.datasource_uid:
            body = bind_datasource(body, datasource, result.datasource_uid)
        body["id"] = None  # found by uid: Grafana's own id is not ours to set
        try:
            answer = api.dashboard.update_dashboard({
                "dashboard": body, "folderUid": folder_id, "overwrite": True,
                "message": "quotaflow dashboards push",
            })
        except (GrafanaException, OSError) as exc:
            raise _explain(exc, url, f"saving the dashboard {uid}") from None
        result.dashboards.append(str(answer.get("url", uid)))
    return result

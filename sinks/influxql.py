"""A small InfluxQL client over InfluxDB's `/query` endpoint, for reading totals back.

influxdb-client speaks Flux only; analysts, the `usage` command and the dashboard
checks speak InfluxQL, which InfluxDB 1.x serves and 2.x serves through its v1
compatibility API. Standard library HTTP keeps this usable from any tool.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from quotaflow.core.settings import Settings


class InfluxQLError(RuntimeError):
    """InfluxDB refused a query or could not be reached."""


class InfluxUnreachable(InfluxQLError):
    """InfluxDB did not answer at all."""


@dataclass(frozen=True)
class Series:
    """One result series: its name, tags and rows as dicts."""

    name: str
    tags: dict[str, str]
    rows: list[dict[str, Any]]


class InfluxQL:
    """Runs InfluxQL statements against one database."""

    def __init__(self, url: str, database: str, token: str = "", timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.database = database
        self._token = token
        self.timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> InfluxQL:
        """A client for the configured InfluxDB and bucket."""
        return cls(
            settings.influx_url, settings.influx_bucket, settings.influx_token.get_secret_value()
        )

    def _request(
        self, statement: str, method: str, database: str | None, epoch: str = "s"
    ) -> dict[str, Any]:
        params = {"q": statement, "epoch": epoch}
        if database:
            params["db"] = database
        data = urllib.parse.urlencode(params).encode()
        url = f"{self.url}/query"
        request = (
            urllib.request.Request(url, data=data, method="POST")
            if method == "POST"
            else urllib.request.Request(f"{url}?{data.decode()}")
        )
        if self._token:
            request.add_header("Authorization", f"Token {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:
            raise InfluxQLError(f"InfluxDB answered {exc.code}: {exc.read()[:300]!r}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise InfluxUnreachable(f"cannot reach InfluxDB at {self.url}: {exc}") from None
        for result in body.get("results", []):
            if "error" in result:
                raise InfluxQLError(f"InfluxQL error: {result['error']}")
        return body

    def query(self, statement: str, epoch: str = "s") -> list[Series]:
        """Run a read statement and return its series, times as integers in `epoch` units.

        `epoch` is `s` (Unix seconds, the default), `ms`, `u` or `ns`; quota events keep
        their milliseconds and more (see `quotaflow.sinks.influx.quota_event_line`).
        """
        body = self._request(statement, "GET", self.database, epoch)
        out: list[Series] = []
        for result in body.get("results", []):
            for series in result.get("series", []):
                columns = series["columns"]
                out.append(
                    Series(
                        name=series.get("name", ""),
                        tags=series.get("tags", {}),
                        rows=[dict(zip(columns, row, strict=True)) for row in series["values"]],
                    )
                )
        return out

    def execute(self, statement: str) -> None:
        """Run a statement that changes something, such as CREATE DATABASE."""
        self._request(statement, "POST", None)

    def create_database(self) -> None:
        """Create the database if it is missing (a no-op when it exists)."""
        self.execute(f'CREATE DATABASE "{self.database}"')


def _quoted(value: str, quote: str) -> str:
    # influxql's ScanString knows the escapes \\ \' \" and \n, ends the literal at a raw
    # newline, and its reader turns CR and CRLF into a newline first: so a newline is
    # written as \n, and a carriage return cannot be written at all.
    if "\r" in value:
        raise ValueError(f"InfluxQL cannot quote a carriage return: {value[:60]!r}")
    escaped = value.replace("\\", "\\\\").replace(quote, "\\" + quote).replace("\n", "\\n")
    return quote + escaped + quote


def quote_ident(name: str) -> str:
    r"""An InfluxQL identifier in double quotes; ValueError if it holds a carriage return.

    >>> print(quote_ident('my "db"'))
    "my \"db\""
    """
    return _quoted(name, '"')


def quote_string(value: str) -> str:
    r"""An InfluxQL string literal in single quotes; ValueError if it holds a carriage return.

    User and node ids cannot hold one (the contracts refuse control characters).

    >>> print(quote_string("it's C:\\temp\nnext"))
    'it\'s C:\\temp\nnext'
    """
    return _quoted(value, "'")

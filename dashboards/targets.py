"""An InfluxQL query target and an InfluxQL annotation for grafana-foundation-sdk's panels.

The SDK ships builders for many data sources but not for InfluxDB; its panels accept
any `Dataquery`. Targets here are raw InfluxQL (`rawQuery: true`), so each one can be
read and run as it is, and the data source is the dashboard's `$datasource` variable.
"""

from __future__ import annotations

from typing import Literal, Self

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard

ResultFormat = Literal["time_series", "table", "logs"]

DATASOURCE = dashboard.DataSourceRef(type_val="influxdb", uid="${datasource}")


class InfluxQLQuery(cogvariants.Dataquery):
    """One raw InfluxQL query of a panel, as Grafana's InfluxDB data source stores it."""

    def __init__(self, query: str, ref_id: str, result_format: ResultFormat, alias: str) -> None:
        self.query = query
        self.ref_id = ref_id
        self.result_format = result_format
        self.alias = alias

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "datasource": DATASOURCE.to_json(),
            "query": self.query,
            "rawQuery": True,
            "refId": self.ref_id,
            "resultFormat": self.result_format,
        }
        if self.alias:
            payload["alias"] = self.alias
        return payload


class InfluxQL(cogbuilder.Builder[InfluxQLQuery]):
    """Builds an `InfluxQLQuery`: `InfluxQL("SELECT ...").ref_id("A").table()`."""

    def __init__(self, query: str) -> None:
        self._internal = InfluxQLQuery(query, "A", "time_series", "")

    def build(self) -> InfluxQLQuery:
        return self._internal

    def ref_id(self, ref_id: str) -> Self:
        self._internal.ref_id = ref_id
        return self

    def table(self) -> Self:
        """Rows and columns (tags as columns) instead of time series."""
        self._internal.result_format = "table"
        return self

    def alias(self, alias: str) -> Self:
        """The series name pattern, such as `$tag_node_id`."""
        self._internal.alias = alias
        return self


class InfluxQLAnnotationTarget(dashboard.AnnotationTarget):
    """An annotation's InfluxQL query: each row is an event at its time."""

    def __init__(self, query: str, text_column: str, tags_column: str) -> None:
        super().__init__()
        self.query = query
        self.text_column = text_column
        self.tags_column = tags_column

    def to_json(self) -> dict[str, object]:
        return {
            "query": self.query,
            "rawQuery": True,
            "refId": "Anno",
            "resultFormat": "table",
            "textColumn": self.text_column,
            "tagsColumn": self.tags_column,
        }


class InfluxQLAnnotation(cogbuilder.Builder[dashboard.AnnotationTarget]):
    """Builds an `InfluxQLAnnotationTarget` for `AnnotationQuery().target(...)`."""

    def __init__(self, query: str, text_column: str, tags_column: str) -> None:
        self._internal = InfluxQLAnnotationTarget(query, text_column, tags_column)

    def build(self) -> dashboard.AnnotationTarget:
        return self._internal

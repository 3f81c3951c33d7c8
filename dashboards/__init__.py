"""Grafana dashboards as code, their proof helpers, the push to Grafana and the static report.

* `targets`: the InfluxQL query target and annotation (grafana-foundation-sdk has no
  InfluxDB builder, so these two small typed builders plug into its panels);
* `queries`: every query text of every panel, one definition for the dashboards and
  the report;
* `boards`: the five dashboards (Fleet, Node, User, Quotas, Pipeline), built with
  grafana-foundation-sdk, and `write_build()` for `dashboards/build/`;
* `grafana`: what Grafana does to a query before InfluxDB sees it (macros, variables,
  relative time ranges), for the proof and the report;
* `push`: uploading the dashboards through grafana-client;
* `report`: PNG charts and an HTML page from the same queries, with matplotlib.
"""

"""A process's `pipeline` figures on a Prometheus `/metrics` endpoint.

The worker and the InfluxDB sink build a `PipelineSnapshot` every status interval
(`QUOTAFLOW_STATUS_INTERVAL_S`); the same snapshot goes to InfluxDB (`pipeline`)
and is what `/metrics` serves until the next one. Each field is a metric named
`quotaflow_<field>`, labelled with the process:

- cumulative counters (`quotaflow.core.health.COUNTER_FIELDS`) are counters, so
  their names end in `_total` (`quotaflow_points_written_total`);
- `dead_letters_<reason>` is one counter, `quotaflow_dead_letters_total{reason=...}`;
- `lag_<topic>_<partition>` is one gauge, `quotaflow_partition_lag{topic, partition}`;
- every other field is a gauge of its own name (`quotaflow_lag`,
  `quotaflow_freshness_ms_p99`).

>>> from quotaflow.core.health import PipelineSnapshot
>>> snapshot = PipelineSnapshot(process="sink", host="h", at=0, fields={
...     "points_written": 7, "dead_letters_stale_seq": 1, "lag": 3, "lag_control_acks_2": 3})
>>> for family in families(snapshot):
...     print(family.type, [(s.name, s.labels, s.value) for s in family.samples])
counter [('quotaflow_points_written_total', {'process': 'sink'}, 7)]
gauge [('quotaflow_lag', {'process': 'sink'}, 3)]
counter [('quotaflow_dead_letters_total', {'process': 'sink', 'reason': 'stale-seq'}, 1)]
gauge [('quotaflow_partition_lag', {'process': 'sink', 'topic': 'control_acks', \
'partition': '2'}, 3)]
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from quotaflow.core.health import COUNTER_FIELDS, DEAD_REASONS, PipelineSnapshot

log = logging.getLogger("quotaflow.metrics")

_REASONS = {reason.replace("-", "_"): reason for reason in DEAD_REASONS}


def families(snapshot: PipelineSnapshot) -> Iterator[Metric]:
    """The snapshot's fields as Prometheus metric families (see the module docstring)."""
    process = snapshot.process
    dead = CounterMetricFamily("quotaflow_dead_letters", "Dead letters sent, by reason",
                               labels=["process", "reason"])
    lags = GaugeMetricFamily("quotaflow_partition_lag",
                             "Records not yet committed by the process, per partition",
                             labels=["process", "topic", "partition"])
    for name, value in snapshot.fields.items():
        if name.startswith("dead_letters_"):
            dead.add_metric([process, _REASONS.get(name[13:], name[13:])], value)
        elif name.startswith("lag_"):
            topic, partition = name[4:].rsplit("_", 1)
            lags.add_metric([process, topic, partition], value)
        elif name in COUNTER_FIELDS:
            counter = CounterMetricFamily(f"quotaflow_{name.removesuffix('_total')}",
                                          f"{name} (pipeline field)", labels=["process"])
            counter.add_metric([process], value)
            yield counter
        else:
            gauge = GaugeMetricFamily(f"quotaflow_{name}", f"{name} (pipeline field)",
                                      labels=["process"])
            gauge.add_metric([process], value)
            yield gauge
    for family in (dead, lags):
        if family.samples:
            yield family


class MetricsEndpoint:
    """Serves the latest snapshot on `http://<address>:<port>/metrics` (a daemon thread).

    Until the first snapshot, `/metrics` has no quotaflow metrics.
    """

    def __init__(self, port: int, address: str = "0.0.0.0") -> None:
        self._snapshot: PipelineSnapshot | None = None
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self._server, _thread = start_http_server(port, addr=address, registry=self.registry)
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", address, self.port)

    def update(self, snapshot: PipelineSnapshot) -> None:
        """Serve `snapshot` from now on."""
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """What a scrape returns (called by prometheus_client)."""
        snapshot = self._snapshot
        if snapshot is not None:
            yield from families(snapshot)

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def serve(port: int, address: str) -> MetricsEndpoint | None:
    """A `MetricsEndpoint` on `port`, or None when the port is 0 (no endpoint)."""
    return MetricsEndpoint(port, address) if port else None

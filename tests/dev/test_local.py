"""quotaflow.dev.local against the real servers: Kafka (KRaft) and InfluxDB 1.8 on loopback."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quotaflow.dev import local

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private state location, so this module never touches a developer's running servers."""
    path = tmp_path_factory.mktemp("local")
    yield path
    local.down(path)


def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    try:
        producer.send(topic, value).get(timeout=30)
    finally:
        producer.close()


def _consume(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """Read `topic` from the start until `count` records came (sorted: 4 partitions)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    try:
        while len(values) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                values.extend(record.value for record in records)
    finally:
        consumer.close()
    return sorted(values)


def _influx(url: str, path: str, params: dict[str, str], body: bytes | None = None) -> Any:
    request = urllib.request.Request(f"{url}{path}?{urllib.parse.urlencode(params)}", data=body)
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def test_up_kafka_outage_and_down(state_dir: Path) -> None:
    started = time.monotonic()
    services = local.up(state_dir)
    assert time.monotonic() - started < 45
    assert services.env()["QUOTAFLOW_KAFKA_BOOTSTRAP"] == services.kafka_bootstrap
    assert services.env()["QUOTAFLOW_INFLUX_URL"] == services.influx_url
    assert local.up(state_dir) == services  # idempotent: reuses the running pair

    report = local.status(state_dir)
    assert report["running"] is True
    assert report["kafka"]["answers"] and report["influx"]["answers"]

    # Kafka: a message goes in and comes back out.
    topic = f"local-test-{uuid.uuid4().hex[:8]}"
    _produce(services.kafka_bootstrap, topic, b"hello")
    assert _consume(services.kafka_bootstrap, topic, 1) == [b"hello"]

    # InfluxDB: up() created the database; a point written through /write is queryable.
    _influx(services.influx_url, "/write", {"db": services.database}, b"probe,node=n1 up=42i 1")
    result = _influx(
        services.influx_url, "/query", {"db": services.database, "q": "SELECT up FROM probe"}
    )
    assert result["results"][0]["series"][0]["values"] == [["1970-01-01T00:00:00.000000001Z", 42]]

    # Kafka outage: the broker stops, comes back on the same port with the same data.
    port = services.kafka_port
    services.stop_kafka()
    assert local.status(state_dir)["kafka"]["alive"] is False
    assert local.status(state_dir)["influx"]["answers"] is True
    local.start_kafka(state_dir)  # the module-level form, as another process would call it
    again = local.up(state_dir)
    assert again.kafka_port == port and again.kafka_bootstrap == services.kafka_bootstrap
    _produce(again.kafka_bootstrap, topic, b"after")
    assert _consume(again.kafka_bootstrap, topic, 2) == [b"after", b"hello"]

    assert local.down(state_dir) is True
    assert local.down(state_dir) is False
    assert local.status(state_dir) == {"state_dir": str(state_dir), "running": False}
    assert not services.run_dir.exists()


def test_influx_v2_client_api(state_dir: Path) -> None:
    """The sink writes with influxdb-client (v2 API): 1.8's compatibility endpoints accept it."""
    from influxdb_client.client.influxdb_client import InfluxDBClient
    from influxdb_client.client.write_api import SYNCHRONOUS

    services = local.up(state_dir)
    env = services.env()
    with InfluxDBClient(
        url=env["QUOTAFLOW_INFLUX_URL"],
        token=env["QUOTAFLOW_INFLUX_TOKEN"],
        org=env["QUOTAFLOW_INFLUX_ORG"],
    ) as client:
        write_api = client.write_api(write_options=SYNCHRONOUS)
        write_api.write(bucket=services.database, record="probe,node=n2 down=7i 2")
        tables = client.query_api().query(
            f'from(bucket: "{services.database}") |> range(start: 0)'
            ' |> filter(fn: (r) => r._measurement == "probe" and r.node == "n2")'
        )
    assert [record.get_value() for table in tables for record in table.records] == [7]

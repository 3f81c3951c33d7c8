"""Sinks: running totals from Kafka into InfluxDB, and the InfluxQL reader."""

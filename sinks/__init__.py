"""Sinks: the InfluxDB writer, the InfluxQL reader, the control topic and enforcement consumers."""

"""The pure core: what a record is, how traffic is billed, and which partition owns a user.

Nothing here does I/O or imports an edge (Kafka, Faust, InfluxDB, the proxies);
`tests/test_layers.py` checks it. Every rule is a plain function or a small state
object with runnable examples in its docstring.
"""

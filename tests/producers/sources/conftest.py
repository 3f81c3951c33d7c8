"""The fixtures of the source tests: root, the node software, processes, an HTTP server."""

from tests.producers.sources.helpers import http_port, node_software, processes, root

__all__ = ["http_port", "node_software", "processes", "root"]

"""Enforcement: consumers of `<prefix>.control` that apply warn/disable/enable on the nodes.

* `backends/`: one module per program the commands act on (Xray/V2Ray, sing-box,
  ss-manager, WireGuard, OpenVPN) or hand them to (webhook, command), each behind
  the one `Backend` seam of `backends/_base.py`;
* `credentials.py`: the accounts that re-adding a user needs;
* `delivery.py`: the pure rules (deduplication, latest state per user, retries);
* `consumer.py`: the Kafka loop that runs them, in the node agent or centrally.
"""

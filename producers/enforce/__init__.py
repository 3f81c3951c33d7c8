"""Enforcement: consumers of `<prefix>.control` that apply warn/disable/enable on the nodes.

It lives with the producers because it runs where they run, on the node, inside
`quotaflow agent`, and acts on the same programs through the same clients
(`quotaflow.producers.sources`); `quotaflow enforce` runs it centrally too.

* `backends/`: one module per program the commands act on (Xray/V2Ray, sing-box,
  ss-manager, WireGuard, OpenVPN) or hand them to (webhook, command), each behind
  the one `Backend` seam of `backends/_base.py`;
* `credentials.py`: the accounts that re-adding a user needs;
* `config.py`: the `[enforce]` section shared by the agent and `quotaflow enforce`;
* `delivery.py`: the pure rules (deduplication, latest state per user, retries);
* `consumer.py`: the Kafka loop that runs them, in the node agent or centrally.
"""

"""Kafka administration: creating quotaflow's topics where they are missing.

Used by the worker at start, by the CLI before publishing, and by a node agent
configured with `ensure_topics = true`.
"""

from __future__ import annotations

import contextlib

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from quotaflow.core.settings import Settings
from quotaflow.core.topics import MAX_MESSAGE_BYTES


def ensure_topics(settings: Settings) -> None:
    """Create quotaflow's topics if they are missing, with the configured partitions.

    All are partitioned alike so that a user's data (reports, plan, totals,
    commands) stays in one partition number end to end; plans and nodes are
    compacted, so the latest record of each key is kept for good.
    """
    admin = KafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, client_id="quotaflow-admin"
    )
    try:
        wanted = [
            NewTopic(
                name,
                settings.partitions,
                settings.replication_factor,
                topic_configs={
                    "max.message.bytes": str(MAX_MESSAGE_BYTES),
                    **({"cleanup.policy": "compact"} if name in settings.topics.compacted else {}),
                },
            )
            for name in settings.topics.created
        ]
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process was quicker
                admin.create_topics(missing)
    finally:
        admin.close()

"""The core's view of a configured source: what :func:`gateway.core.ingest.ingest` needs."""

from __future__ import annotations

from gateway.config import Config, SourceConfig
from gateway.core.ingest import Source

__all__ = ["ingest_source"]


def ingest_source(config: Config, source: SourceConfig) -> Source:
    """``source`` with the server and Kafka settings that decide its bodies."""
    kafka = config.kafka
    return Source(
        name=source.name,
        format=source.format,
        topic_template=kafka.topic,
        dead_letter_topic=kafka.dead_letter_topic,
        max_record_bytes=kafka.max_request_size,
        max_json_depth=config.server.max_json_depth,
        unknown_kinds=kafka.unknown_kinds,
        unknown_channel_topic=kafka.unknown_channel_topic,
        content_mode=kafka.content_mode,
        app_id=source.app_id,
        mapping=source.mapping,
        dead_letter_every_body=source.require_secret,
        unauthenticated_topic=kafka.unauthenticated_topic,
    )

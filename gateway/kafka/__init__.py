"""The Kafka sink: publish a record, wait for its acknowledgement, bounded.

``sink`` holds what every sink shares (admission, the ack deadline, readiness, the stall
watchdog); ``thread`` and ``process`` are the two producers behind it; ``producer`` makes
kafka-python's producer; ``memory`` is a sink without Kafka for in-process ingress tests;
``topics`` creates and checks the gateway's topics.
"""

from __future__ import annotations

from gateway.config import KafkaConfig
from gateway.kafka.sink import PublishResult, SinkBase, Unavailable
from gateway.metrics import IngressMetrics

__all__ = ["PublishResult", "SinkBase", "Unavailable", "create_sink"]


def create_sink(
    cfg: KafkaConfig, metrics: IngressMetrics, warm_topics: tuple[str, ...] = ()
) -> SinkBase:
    """The sink ``kafka.producer`` names: a producer process (default) or this process."""
    if cfg.producer == "thread":
        from gateway.kafka.thread import KafkaSink

        return KafkaSink(cfg, metrics, warm_topics=warm_topics)
    from gateway.kafka.process import ProcessSink

    return ProcessSink(cfg, metrics, warm_topics=warm_topics)

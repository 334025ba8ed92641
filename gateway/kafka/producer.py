"""kafka-python's producer as the gateway makes it: options, partitioner, opening it.

Shared by the in-thread sink and the producer process.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.partitioner.default import DefaultPartitioner, murmur2

from gateway.config import KafkaConfig

__all__ = ["KeyHashCachePartitioner", "ProducerOpener", "close_quietly", "producer_options"]

log = logging.getLogger("gateway.kafka.sink")


@functools.lru_cache(maxsize=65536)
def _key_hash(key: bytes) -> int:
    return int(murmur2(key)) & 0x7FFFFFFF


class KeyHashCachePartitioner(DefaultPartitioner):  # type: ignore[misc]
    """kafka-python's default partitioner (the Java client's murmur2), with the hash cached.

    kafka-python computes murmur2 in pure Python on every send; the key is the user id, and
    one user's events keep arriving, so the hash is remembered. Same partitions as the default.
    """

    def partition(
        self,
        topic: str,
        key: Any,
        serialized_key: bytes | None,
        value: Any,
        serialized_value: bytes | None,
        cluster: Any,
    ) -> int:
        partitions = cluster.partitions_for_topic(topic)
        if serialized_key is None or not partitions:
            return int(
                super().partition(topic, key, serialized_key, value, serialized_value, cluster)
            )
        ordered = sorted(partitions)
        return int(ordered[_key_hash(serialized_key) % len(ordered)])


def producer_options(cfg: KafkaConfig) -> dict[str, Any]:
    opts = cfg.client_options()
    opts.update(
        acks="all",
        enable_idempotence=True,
        max_in_flight_requests_per_connection=5,
        linger_ms=cfg.linger_ms,
        batch_size=cfg.batch_size,
        request_timeout_ms=cfg.request_timeout_ms,
        delivery_timeout_ms=cfg.delivery_timeout_ms,
        max_block_ms=cfg.max_block_ms,
        max_request_size=cfg.max_request_size,
        partitioner=KeyHashCachePartitioner(),
    )
    if cfg.compression_type:
        opts["compression_type"] = cfg.compression_type
    return opts


class ProducerOpener:
    """Create the producer, then fetch metadata for every topic we write to; blocking.

    Both retry with backoff until they succeed or ``stop`` is set: until then the sink says
    not ready and publishes answer 503, and the first send to a topic never waits for its
    metadata. Runs on a thread (an executor's in this process, its own in a producer process).
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        warm_topics: tuple[str, ...],
        *,
        on_producer: Callable[[KafkaProducer], None],
        on_topic: Callable[[str], None],
        on_error: Callable[[str], None],
        stop: threading.Event,
    ) -> None:
        self.cfg = cfg
        self.warm_topics = warm_topics
        self.on_producer = on_producer
        self.on_topic = on_topic
        self.on_error = on_error
        self.stop = stop

    def run(self) -> None:
        producer = self._create()
        if producer is None:
            return
        if self.stop.is_set():  # closed while it was being created: nobody will close it
            producer.close(timeout=0)
            return
        self.on_producer(producer)
        pending = list(self.warm_topics)
        delay = 0.5
        while pending and not self.stop.is_set():
            pending = [t for t in pending if not self._warm(producer, t)]
            if pending:
                self.stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _create(self) -> KafkaProducer | None:
        delay = 0.5
        while not self.stop.is_set():
            try:
                producer = KafkaProducer(**producer_options(self.cfg))
            except Exception as exc:  # NoBrokersAvailable, config errors surface here
                error = f"{type(exc).__name__}: {exc}"
                self.on_error(error)
                log.warning("kafka producer not created yet, retrying", extra={"error": error})
                self.stop.wait(delay)
                delay = min(delay * 2, 10.0)
            else:
                log.info("kafka producer created", extra={"bootstrap": self.cfg.bootstrap_servers})
                return producer
        return None

    def _warm(self, producer: KafkaProducer, topic: str) -> bool:
        try:
            producer.partitions_for(topic)
        except KafkaError as exc:
            self.on_error(f"metadata for {topic}: {type(exc).__name__}")
            log.warning("metadata warm-up failed", extra={"topic": topic, "error": str(exc)})
            return False
        self.on_topic(topic)
        return True


def close_quietly(producer: KafkaProducer) -> None:
    """Close a replaced producer at once: what it held was given up already."""
    try:
        producer.close(timeout=0)
    except Exception as exc:  # its flush times out at once, by design
        log.debug("closing the replaced producer", extra={"error": f"{type(exc).__name__}"})

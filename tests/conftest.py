"""Shared fixtures: a real Kafka-protocol broker (librdkafka's mock cluster) on loopback."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from gateway.embedded_broker import API_VERSION, EmbeddedBroker

KAFKA_API_VERSION = tuple(int(p) for p in API_VERSION.split("."))


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One mock cluster for the whole session; tests use unique topic names."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def fresh_broker() -> Iterator[EmbeddedBroker]:
    """A mock cluster of its own, for tests that pause or kill it."""
    with EmbeddedBroker() as b:
        yield b


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def read_topic(
    bootstrap: str, topic: str, expect: int | None = None, timeout_s: float = 20.0
) -> list[Any]:
    """Every record of ``topic`` from the beginning (assigned partitions, no group).

    Returns as soon as ``expect`` records are read, else when the end offsets are reached
    (or at the timeout).
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        api_version=KAFKA_API_VERSION,
        enable_auto_commit=False,
        consumer_timeout_ms=500,
    )
    try:
        deadline = time.monotonic() + timeout_s
        parts: set[int] | None = None
        while time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if parts:
                break
            consumer.topics()  # refresh metadata
            time.sleep(0.2)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records: list[Any] = []
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=300)
            for recs in batch.values():
                records.extend(recs)
            if expect is not None and len(records) >= expect:
                break
            if expect is None and all(consumer.position(tp) >= end[tp] for tp in tps):
                break
        return records
    finally:
        consumer.close()

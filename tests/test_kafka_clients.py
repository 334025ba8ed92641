"""A Kafka client that fails to start leaves no thread behind (gateway.kafka.clients).

kafka-python 3 starts a client's IO thread before it bootstraps; a constructor that raises for
want of a broker used to leave that thread retrying metadata until the process ended. The
topic watcher makes an admin client at every check, so a Kafka outage grew one thread per check.
Port 9 on loopback (discard) has no listener here: every connection is refused at once.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.errors import KafkaError

from gateway.config import KafkaConfig
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.kafka.clients import start_client
from gateway.kafka.memory import MemorySink
from gateway.kafka.topics import TopicWatcher
from gateway.metrics import IngressMetrics

from .conftest import API_VERSION

NOBODY = "127.0.0.1:9"


def _client_threads() -> set[int]:
    return {t.ident or 0 for t in threading.enumerate() if t.name.startswith("kafka-io-")}


def test_a_topic_watcher_in_an_outage_leaves_no_thread_per_check() -> None:
    kafka = dataclasses.replace(KafkaConfig(), bootstrap_servers=NOBODY)
    sink = MemorySink(kafka, IngressMetrics(process=False))
    watcher = TopicWatcher(kafka, ("onesignal.push",), interval_s=60.0, sink=sink)
    before = _client_threads()
    for _ in range(3):
        assert watcher.check_once() is None  # the listing failed; the last answer stands
    assert _client_threads() - before == set()


@pytest.mark.parametrize("cls", [KafkaAdminClient, KafkaConsumer])
def test_a_client_that_cannot_bootstrap_is_closed_before_the_error_goes_up(cls: type) -> None:
    before = _client_threads()
    with pytest.raises(KafkaError):
        start_client(cls, bootstrap_servers=NOBODY, bootstrap_timeout_ms=1000)
    assert _client_threads() - before == set()


def test_a_started_client_works(broker: EmbeddedBroker) -> None:
    pinned = {"api_version": tuple(int(v) for v in API_VERSION.split("."))} if API_VERSION else {}
    admin = start_client(KafkaAdminClient, bootstrap_servers=broker.bootstrap_servers, **pinned)
    try:
        assert isinstance(admin.list_topics(), list)
    finally:
        admin.close()

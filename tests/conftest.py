"""Shared fixtures: a real Kafka broker on loopback.

The backend is chosen by ``GATEWAY_TEST_KAFKA``:
- ``apache``: real Apache Kafka (KRaft, from Maven Central, see
  gateway/devkit/kafka_cluster.py); the run fails if it cannot be started. CI sets this.
- ``mock``: librdkafka's mock cluster from the confluent-kafka wheel (Python only).
- unset or ``auto``: ``apache`` where this machine has Java 17+ and Maven, else ``mock`` with a
  one-line notice, so the README's test command passes on a Python-only machine.

The Apache Kafka release is ``GATEWAY_TEST_KAFKA_VERSION`` (default: the CI pin,
``kafka_cluster.DEFAULT_VERSION``); ``make compat`` runs the integration files against others.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings
from kafka import KafkaConsumer, TopicPartition

from gateway.devkit import embedded_broker, kafka_cluster
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.devkit.kafka_cluster import KafkaCluster, KafkaUnavailable
from gateway.logs import JsonFormatter

from .contract import TopicAudit

# Hypothesis' per-example deadline (200 ms) is a timing assert, and this machine is shared:
# an example held up by other work failed a property that holds. Speed is the bench's job;
# a hang is still caught by pytest-timeout.
settings.register_profile("gateway", deadline=None)
settings.load_profile("gateway")

Broker = EmbeddedBroker | KafkaCluster


def _wanted_version() -> str:
    try:
        return kafka_cluster.wanted_version()
    except KafkaUnavailable as exc:
        raise pytest.UsageError(str(exc)) from None


KAFKA_VERSION = _wanted_version()


def _choose_backend() -> tuple[str, str]:
    wanted = os.environ.get("GATEWAY_TEST_KAFKA", "auto").strip().lower() or "auto"
    if wanted not in ("apache", "mock", "auto"):
        raise pytest.UsageError(f"GATEWAY_TEST_KAFKA must be apache, mock or auto, not {wanted!r}")
    if wanted == "mock":
        return "mock", "GATEWAY_TEST_KAFKA=mock"
    ok, why = kafka_cluster.available(KAFKA_VERSION)
    if ok:
        try:
            kafka_cluster.provision(KAFKA_VERSION)
            return "apache", f"Apache Kafka {KAFKA_VERSION} ({why})"
        except KafkaUnavailable as exc:
            why = str(exc).splitlines()[0]
    if wanted == "apache":
        raise pytest.UsageError(f"GATEWAY_TEST_KAFKA=apache, but Apache Kafka cannot run: {why}")
    return "mock", f"Apache Kafka unavailable ({why}): using the embedded mock broker"


BACKEND, BACKEND_NOTE = _choose_backend()
APACHE = BACKEND == "apache"
# kafka-python negotiates with Apache Kafka; the mock needs the pin (see embedded_broker.py)
API_VERSION = "" if APACHE else embedded_broker.API_VERSION
KAFKA_API_VERSION: tuple[int, ...] | None = (
    tuple(int(p) for p in API_VERSION.split(".")) if API_VERSION else None
)
requires_apache = pytest.mark.skipif(
    not APACHE, reason="needs real Apache Kafka (GATEWAY_TEST_KAFKA=apache; Java 17+ and Maven)"
)


def pytest_report_header() -> str:
    return f"kafka backend: {BACKEND} - {BACKEND_NOTE}"


# What the contract audit read on each broker the session stopped (tests/contract.py).
_AUDITED: list[int] = []


def _audit(b: Broker) -> None:
    """Check every record on ``b`` against the published schemas; fail the test if one is off.

    A test may leave nodes killed or frozen: they are brought back first, so the records of
    fault tests are read too.
    """
    if isinstance(b, KafkaCluster):
        for node in b.node_ids:
            b.resume(node)
            if not b.alive(node):
                b.restart(node)
        b.wait_ready()
    else:
        b.resume()
    audit = TopicAudit(b.bootstrap_servers, KAFKA_API_VERSION).run()
    _AUDITED.append(audit.checked)
    assert not audit.problems, "records that break the published schema:\n" + "\n".join(
        audit.report()
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _AUDITED:
        terminalreporter.write_line(
            f"contract: {sum(_AUDITED)} records checked against the schemas "
            f"on {len(_AUDITED)} broker(s)"
        )
    # a fallback to the mock is said again at the end, where it is read (also under -q)
    if BACKEND == "mock" and os.environ.get("GATEWAY_TEST_KAFKA", "auto") != "mock":
        terminalreporter.write_line(f"notice: {BACKEND_NOTE}")


def _new_broker() -> Broker:
    if APACHE:
        return KafkaCluster(nodes=1, version=KAFKA_VERSION).start()
    return EmbeddedBroker().start()


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """Undo what a command run in-process did to logging.

    ``gateway.startup.start`` (every CLI command that reads a config) points the root logger at
    a JSON handler on the ``sys.stderr`` of that moment: inside a test, pytest's capture file,
    which is closed when the test ends. Left in place, every later log record from any thread
    of the run fails to write, and logging prints a stack trace for each one. kafka-python's IO
    loops then run slow ("Task ... ran for 0.228s"), beside the group joins of later tests.
    """
    root, kafka = logging.getLogger(), logging.getLogger("kafka")
    before, root_level, kafka_level = list(root.handlers), root.level, kafka.level
    yield
    for handler in list(root.handlers):
        if handler not in before and isinstance(handler.formatter, JsonFormatter):
            root.removeHandler(handler)
    root.setLevel(root_level)
    kafka.setLevel(kafka_level)
    closed = [h for h in root.handlers if getattr(getattr(h, "stream", None), "closed", False)]
    assert not closed, f"the test left log handlers on closed streams: {closed}"


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """One broker for the whole session; tests use unique topic names."""
    b = _new_broker()
    try:
        yield b
        _audit(b)
    finally:
        b.stop()


@pytest.fixture
def fresh_broker() -> Iterator[Broker]:
    """A broker of its own, for tests that pause or kill it."""
    b = _new_broker()
    try:
        yield b
        # a killed mock loses its data with it (it lives in the child's memory)
        if not isinstance(b, EmbeddedBroker) or (
            b.process is not None and b.process.poll() is None
        ):
            _audit(b)
    finally:
        b.stop()


@pytest.fixture
def cluster3() -> Iterator[KafkaCluster]:
    """Three Apache Kafka nodes (RF 3, min.insync.replicas 2, no topic auto-creation)."""
    if not APACHE:
        pytest.skip("needs real Apache Kafka (GATEWAY_TEST_KAFKA=apache; Java 17+ and Maven)")
    with KafkaCluster(nodes=3, version=KAFKA_VERSION, auto_create_topics=False) as c:
        yield c
        _audit(c)


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

"""The sink's ack deadline: a publish Kafka does not acknowledge fails at ``kafka.ack_timeout_s``.

Measured on the event loop's own clock (``loop.time()``, the clock the deadline timer runs on),
from the call to the ``Unavailable``: never before the deadline, and within a fifth of it
after. A deadline 1.25 times too long fails here; scheduler noise on a busy machine adds
milliseconds to the loop's wake-up, not hundreds of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable

import pytest

from gateway.config import KafkaConfig
from gateway.core.records import KafkaRecord
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.kafka import PublishResult, SinkBase, Unavailable, create_sink
from gateway.metrics import IngressMetrics

from .conftest import API_VERSION, unique

UPPER = 1.2  # x ack_timeout_s: a 1.25x deadline is outside, a loop that woke late is not


class Unacknowledged(SinkBase):
    """Takes every record and never settles it, unless the test does (``ack_after_s``)."""

    def __init__(self, cfg: KafkaConfig, ack_after_s: float | None = None) -> None:
        super().__init__(cfg, IngressMetrics(process=False))
        self.ack_after_s = ack_after_s

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self, timeout_s: float = 15.0) -> None:
        pass

    def _producer_state(self) -> tuple[bool, bool]:
        return True, True

    async def _submit(self, record: KafkaRecord, fut: asyncio.Future[PublishResult]) -> None:
        if self.ack_after_s is not None:
            assert self._loop is not None
            self._loop.call_later(
                self.ack_after_s, fut.set_result, PublishResult(record.topic, 0, 7)
            )


def kafka_config(**overrides: object) -> KafkaConfig:
    return dataclasses.replace(KafkaConfig(), **overrides)  # type: ignore[arg-type]


async def timed_failure(sink: SinkBase, record: KafkaRecord) -> tuple[float, Unavailable]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Unavailable) as failed:
        await sink.publish(record)
    return loop.time() - started, failed.value


def assert_within_deadline(took: float, deadline: float) -> None:
    # asyncio may run a timer up to its clock resolution early
    resolution = time.get_clock_info("monotonic").resolution
    assert deadline - resolution <= took < UPPER * deadline, (
        f"503 after {took:.3f}s on the loop's clock; the deadline is {deadline}s"
    )


@pytest.mark.parametrize("ack_timeout_s", [0.5, 1.0])
def test_an_unacknowledged_publish_fails_at_the_deadline(ack_timeout_s: float) -> None:
    async def scenario() -> None:
        sink = Unacknowledged(kafka_config(ack_timeout_s=ack_timeout_s))
        await sink.start()
        took, failed = await timed_failure(sink, KafkaRecord("t", b"k", b"v", []))
        assert failed.reason == "timeout"
        assert_within_deadline(took, ack_timeout_s)
        # the record still holds the producer's memory until the producer gives up on it
        assert sink.in_flight == 1
        # and the replica says it is not ready until an ack or retry_after_s passed
        ready, why = sink.ready()
        assert not ready and why.startswith("last publish failed: no acknowledgement")

    asyncio.run(scenario())


def test_an_ack_just_before_the_deadline_is_a_success() -> None:
    async def scenario() -> None:
        sink = Unacknowledged(kafka_config(ack_timeout_s=1.0), ack_after_s=0.8)
        await sink.start()
        result = await sink.publish(KafkaRecord("t", b"k", b"v", []))
        assert (result.topic, result.offset) == ("t", 7)
        assert sink.last_ack_at is not None and sink.last_error is None

    asyncio.run(scenario())


def test_the_deadline_holds_for_both_producers_with_kafka_frozen(
    fresh_broker: EmbeddedBroker,
) -> None:
    """Real Kafka, frozen (SIGSTOP) after a first acknowledged record: the next publish of the
    in-process producer and of the producer process each fail within [1.0, 1.2) x 2 s."""
    topic = unique("deadline")
    ack_timeout_s = 2.0
    cfg = kafka_config(
        bootstrap_servers=fresh_broker.bootstrap_servers,
        api_version=API_VERSION,
        ack_timeout_s=ack_timeout_s,
        request_timeout_ms=5000,
        delivery_timeout_ms=8000,
    )

    async def until(predicate: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, "sink not ready"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        sinks = [
            create_sink(
                dataclasses.replace(cfg, producer=kind),
                IngressMetrics(process=False),
                warm_topics=(topic,),
            )
            for kind in ("thread", "process")
        ]
        for sink in sinks:
            await sink.start()
        try:
            for sink in sinks:
                await until(lambda s=sink: s.ready()[0], 60)  # type: ignore[misc]
                await sink.publish(KafkaRecord(topic, b"k", b"before", []))
            fresh_broker.pause()
            try:
                for sink in sinks:
                    record = KafkaRecord(topic, b"k", uuid.uuid4().bytes, [])
                    took, failed = await timed_failure(sink, record)
                    assert failed.reason == "timeout", (type(sink).__name__, failed)
                    assert_within_deadline(took, ack_timeout_s)
            finally:
                fresh_broker.resume()
        finally:
            for sink in sinks:
                await sink.close(timeout_s=10.0)

    asyncio.run(scenario())

"""The sink's ack deadline: a publish Kafka does not acknowledge fails at ``kafka.ack_timeout_s``.

Measured on the event loop's own clock (``loop.time()``, the clock the deadline timer runs on),
from the call to the ``Unavailable``: never before the deadline, and within a fifth of it
after. A deadline 1.25 times too long fails here; scheduler noise on a busy machine adds
milliseconds to the loop's wake-up, not hundreds of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable

import pytest
from kafka.errors import KafkaTimeoutError

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


# -- admission, failure accounting, readiness and the stall watchdog (SinkBase, no broker) ----


class Scripted(SinkBase):
    """A producer the test steers: connected or not, with or without metadata; ``submit`` is
    what handing a record over does (settle the future, raise, or nothing)."""

    def __init__(
        self,
        cfg: KafkaConfig,
        submit: Callable[[KafkaRecord, asyncio.Future[PublishResult]], None] | None = None,
    ) -> None:
        super().__init__(cfg, IngressMetrics(process=False))
        self.state = (True, True)
        self.submit = submit
        self.replaced = 0
        self.replace_fails = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self, timeout_s: float = 15.0) -> None:
        self._closed = True
        await self._stop_watchdog()

    def _producer_state(self) -> tuple[bool, bool]:
        return self.state

    async def _submit(self, record: KafkaRecord, fut: asyncio.Future[PublishResult]) -> None:
        if self.submit is not None:
            self.submit(record, fut)

    async def _replace_producer(self) -> None:
        self.replaced += 1
        if self.replace_fails:
            self.replace_fails -= 1
            raise RuntimeError("cannot start a producer")
        self._release(self._in_flight)  # the old producer's records are failed


def sample(sink: SinkBase, name: str, labels: dict[str, str] | None = None) -> float:
    return sink.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def failures(sink: SinkBase, reason: str) -> float:
    return sample(sink, "gateway_publish_failures_total", {"reason": reason})


RECORD = KafkaRecord("t", b"k", b"v", [])


def test_an_acknowledged_publish_is_counted_and_timed() -> None:
    def ack(record: KafkaRecord, fut: asyncio.Future[PublishResult]) -> None:
        fut.set_result(PublishResult(record.topic, 3, 41))

    async def scenario() -> None:
        sink = Scripted(kafka_config(), ack)
        await sink.start()
        result = await sink.publish(RECORD)
        assert (result.topic, result.partition, result.offset) == ("t", 3, 41)
        assert sample(sink, "gateway_published_records_total", {"topic": "t"}) == 1
        assert sample(sink, "gateway_publish_seconds_count") == 1
        assert sink.last_ack_at is not None and sink.last_failure_at is None
        assert sink.ready() == (True, "ok")

    asyncio.run(scenario())


def test_no_producer_or_loop_is_503_not_connected() -> None:
    async def scenario() -> None:
        sink = Scripted(kafka_config())
        with pytest.raises(Unavailable) as failed:  # not started: no loop
            await sink.publish(RECORD)
        assert failed.value.reason == "not_connected"
        await sink.start()
        sink.state = (False, False)
        with pytest.raises(Unavailable) as failed:
            await sink.publish(RECORD)
        assert failed.value.reason == "not_connected"
        assert str(failed.value) == "Kafka producer is not connected yet"
        assert failures(sink, "not_connected") == 2
        assert sink.in_flight == 0
        assert sink.last_error == "Kafka producer is not connected yet"
        assert sink.last_failure_at is not None

    asyncio.run(scenario())


def test_past_max_in_flight_a_publish_is_refused_at_once() -> None:
    async def scenario() -> None:
        sink = Scripted(kafka_config(max_in_flight=2, ack_timeout_s=30.0))
        await sink.start()
        held = [asyncio.ensure_future(sink.publish(RECORD)) for _ in range(2)]
        await asyncio.sleep(0)
        assert sink.in_flight == 2
        assert sink.ready() == (False, "kafka backlog at max_in_flight")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Unavailable) as failed:
            await sink.publish(RECORD)
        assert loop.time() - started < 1.0  # not after the 30 s ack deadline
        assert failed.value.reason == "backpressure"
        assert str(failed.value) == "2 records await Kafka already"
        assert failures(sink, "backpressure") == 1
        assert sink.in_flight == 2  # the refused one was never counted
        for fut in held:
            fut.cancel()
        await asyncio.gather(*held, return_exceptions=True)

    asyncio.run(scenario())


def test_a_record_that_cannot_be_handed_over_is_503_and_released() -> None:
    def refuse(record: KafkaRecord, fut: asyncio.Future[PublishResult]) -> None:
        raise BufferError("producer closed")

    async def scenario() -> None:
        sink = Scripted(kafka_config(max_in_flight=1), refuse)
        await sink.start()
        for _ in range(2):  # the slot is given back: the second is not "backpressure"
            with pytest.raises(Unavailable) as failed:
                await sink.publish(RECORD)
            assert failed.value.reason == "error"
            assert str(failed.value) == "send failed: BufferError: producer closed"
        assert sink.in_flight == 0
        assert failures(sink, "error") == 2 and failures(sink, "backpressure") == 0

    asyncio.run(scenario())


def test_a_record_kafka_refuses_is_503_with_its_error() -> None:
    from kafka.errors import MessageSizeTooLargeError

    def refuse(record: KafkaRecord, fut: asyncio.Future[PublishResult]) -> None:
        fut.set_exception(MessageSizeTooLargeError("too big"))

    async def scenario() -> None:
        sink = Scripted(kafka_config(), refuse)
        await sink.start()
        with pytest.raises(Unavailable) as failed:
            await sink.publish(RECORD)
        assert failed.value.reason == "error"
        assert str(failed.value).startswith("Kafka refused the record: MessageSizeTooLargeError")
        assert failures(sink, "error") == 1 and failures(sink, "timeout") == 0
        ready, why = sink.ready()
        assert not ready and why == f"last publish failed: {failed.value}"

    asyncio.run(scenario())


def test_readiness_reasons_in_order() -> None:
    sink = Scripted(kafka_config())
    sink.state = (False, False)
    assert sink.ready() == (False, "kafka producer not connected (starting)")
    sink.last_error = "NoBrokersAvailable"
    assert sink.ready() == (False, "kafka producer not connected (NoBrokersAvailable)")
    sink.state = (True, False)
    sink.missing_topics = frozenset({"b-topic", "a-topic"})
    assert sink.ready() == (
        False,
        "topics missing in Kafka: a-topic, b-topic (create them: gateway topics create)",
    )
    sink.missing_topics = frozenset()
    assert sink.ready() == (False, "no topic metadata from Kafka yet (NoBrokersAvailable)")
    sink.last_error = None
    assert sink.ready() == (False, "no topic metadata from Kafka yet (starting)")
    sink.state = (True, True)
    assert sink.ready() == (True, "ok")


def test_a_failed_publish_makes_the_replica_unready_until_an_ack_or_retry_after() -> None:
    sink = Scripted(kafka_config(retry_after_s=5))
    sink.last_error = "boom"
    now = time.monotonic()
    sink.last_failure_at = now
    assert sink.ready() == (False, "last publish failed: boom")
    sink.last_ack_at = now - 0.001  # an ack before the failure does not clear it
    assert sink.ready()[0] is False
    sink.last_ack_at = now + 0.001
    assert sink.ready() == (True, "ok")
    sink.last_ack_at = None
    sink.last_failure_at = now - 4.5  # within retry_after_s
    assert sink.ready()[0] is False
    sink.last_failure_at = now - 5.5  # decayed by itself
    assert sink.ready() == (True, "ok")


def test_stalled_means_outstanding_records_and_nothing_settled_for_stall_after_s() -> None:
    sink = Scripted(kafka_config(stall_timeout_s=10.0))
    start = sink._progress_at
    assert not sink.stalled(start + 100)  # nothing outstanding: idle, not stuck
    sink._in_flight = 1
    assert not sink.stalled(start + 10.0)
    assert sink.stalled(start + 10.001)
    sink._release()
    assert sink.in_flight == 0 and sink._progress_at >= start


def test_the_first_publish_after_an_idle_spell_is_not_a_stall() -> None:
    async def scenario() -> None:
        sink = Scripted(kafka_config(stall_timeout_s=10.0, ack_timeout_s=30.0))
        await sink.start()
        sink._progress_at = time.monotonic() - 3600  # an hour without traffic
        first = asyncio.ensure_future(sink.publish(RECORD))
        await asyncio.sleep(0)
        assert sink.in_flight == 1 and not sink.stalled(time.monotonic())
        mark = sink._progress_at
        second = asyncio.ensure_future(sink.publish(RECORD))
        await asyncio.sleep(0)
        assert sink._progress_at == mark  # only the first of a spell resets the clock
        for fut in (first, second):
            fut.cancel()
        await asyncio.gather(first, second, return_exceptions=True)

    asyncio.run(scenario())


def test_the_watchdog_replaces_a_stuck_producer_and_retries_a_failed_replacement(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, "the watchdog did not act"
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        sink = Scripted(kafka_config(stall_timeout_s=0.2, ack_timeout_s=30.0))
        await sink.start()
        sink.replace_fails = 1
        sink._start_watchdog()
        try:
            # Watched, idle: several intervals (0.05 s) pass without a replacement.
            await asyncio.sleep(0.3)
            assert sink.replaced == 0 and sink.stalls == 0
            held = asyncio.ensure_future(sink.publish(RECORD))
            await until(lambda: sink.replaced >= 2)
            assert sink.stalls == 2  # the failed replacement was tried again
            assert sample(sink, "gateway_producer_stalls_total") == 2
            assert sink.last_error == (
                "the Kafka producer settled no record for 0s with 1 outstanding; replaced"
            )
            ready, why = sink.ready()
            assert not ready and why.startswith("last publish failed: the Kafka producer")
            assert sink.in_flight == 0
            await asyncio.sleep(0.3)  # replaced and nothing outstanding: no further stall
            assert sink.stalls == 2
            held.cancel()
            await asyncio.gather(held, return_exceptions=True)
        finally:
            await sink.close()
        assert sink._watchdog is not None and sink._watchdog.done()
        stuck = [
            r for r in caplog.records if r.getMessage() == "kafka producer stuck: replacing it"
        ]
        assert len(stuck) == 2 and stuck[0].__dict__["outstanding"] == 1
        assert stuck[0].__dict__["stall_after_s"] == 0.2
        assert any(
            r.getMessage() == "replacing the stuck kafka producer failed" for r in caplog.records
        )

    with caplog.at_level(logging.WARNING, logger="gateway.kafka.sink"):
        asyncio.run(scenario())


def test_the_close_warning_names_the_unacknowledged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.kafka.sink"):
        SinkBase._warn_unacknowledged(3)
        SinkBase._warn_unacknowledged(None, "closed abruptly")
    first, second = [r for r in caplog.records if r.name == "gateway.kafka.sink"]
    assert first.__dict__["unacknowledged"] == 3 and "error" not in first.__dict__
    assert second.__dict__["unacknowledged"] is None
    assert second.__dict__["error"] == "closed abruptly"
    assert first.getMessage() == (
        "producer closed with records Kafka did not acknowledge; their requests were "
        "answered 503 and will be retried by the sender"
    )


@pytest.mark.parametrize(("stall_timeout_s", "interval"), [(100.0, 1.0), (2.0, 0.5)])
def test_the_watchdog_looks_a_quarter_of_the_stall_bound_at_most_once_a_second(
    stall_timeout_s: float, interval: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = Scripted(kafka_config(stall_timeout_s=stall_timeout_s))
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        sink._closed = True  # one round is enough to see the interval

    monkeypatch.setattr(asyncio, "sleep", sleep)
    asyncio.run(sink._watch())
    assert slept == [interval]


def test_a_producer_without_topic_metadata_yet_still_publishes() -> None:
    """Unready (no metadata), but a publish is still tried: kafka-python fetches metadata on
    send, and the deadline bounds it. Only a missing producer refuses at once."""

    def ack(record: KafkaRecord, fut: asyncio.Future[PublishResult]) -> None:
        fut.set_result(PublishResult(record.topic, 0, 1))

    async def scenario() -> None:
        sink = Scripted(kafka_config(), ack)
        await sink.start()
        sink.state = (True, False)
        assert sink.ready()[0] is False
        result = await sink.publish(RECORD)
        assert result.offset == 1
        # the time from send to ack, not a clock reading
        assert 0 <= sample(sink, "gateway_publish_seconds_sum") < 5

    asyncio.run(scenario())


def test_a_new_sink_has_no_ack_no_failure_no_missing_topics_and_closes_unwatched() -> None:
    sink = Scripted(kafka_config())
    assert sink.last_ack_at is None and sink.last_failure_at is None and sink.last_error is None
    assert sink.missing_topics == frozenset() and sink.in_flight == 0 and sink.stalls == 0
    asyncio.run(sink.close())  # the watchdog was never started: nothing to stop


# -- the outcome a retry of the same event waits on (no spool: the record's own fate) ------


class Held(Scripted):
    """Keeps every record's future for the test to settle, acknowledged or failed, late."""

    def __init__(self, cfg: KafkaConfig) -> None:
        super().__init__(cfg, lambda record, fut: self.held.append(fut))
        self.held: list[asyncio.Future[PublishResult]] = []


def test_the_outcome_is_the_records_fate_in_time_or_after_the_503() -> None:
    async def scenario() -> None:
        sink = Held(kafka_config(ack_timeout_s=0.1))
        await sink.start()
        loop = asyncio.get_running_loop()
        # acknowledged in time: the publish and its outcome both say so
        outcome: asyncio.Future[bool] = loop.create_future()
        publish = asyncio.ensure_future(sink.publish(RECORD, outcome))
        await asyncio.sleep(0)
        sink.held[0].set_result(PublishResult("t", 0, 5))
        assert (await publish).offset == 5
        assert outcome.result() is True
        # past the deadline: 503, but the record is still queued in the producer, so its
        # outcome stays open (a retry waits on it) and an ack after the 503 settles it True
        late: asyncio.Future[bool] = loop.create_future()
        with pytest.raises(Unavailable) as failed:
            await sink.publish(RECORD, late)
        assert failed.value.reason == "timeout" and not late.done()
        sink.held[1].set_result(PublishResult("t", 0, 6))
        assert await asyncio.wait_for(late, 1.0) is True
        # a record Kafka refuses after the 503 settles it False: the retry must send again
        lost: asyncio.Future[bool] = loop.create_future()
        with pytest.raises(Unavailable):
            await sink.publish(RECORD, lost)
        assert not lost.done()
        sink.held[2].set_exception(KafkaTimeoutError("expired in the producer"))
        assert await asyncio.wait_for(lost, 1.0) is False
        # a refusal in time: False as well
        refused: asyncio.Future[bool] = loop.create_future()
        publish = asyncio.ensure_future(sink.publish(RECORD, refused))
        await asyncio.sleep(0)
        sink.held[3].set_exception(KafkaTimeoutError("refused"))
        with pytest.raises(Unavailable) as failed:
            await publish
        assert failed.value.reason == "error" and refused.result() is False

    asyncio.run(scenario())


def test_a_record_never_handed_over_settles_its_outcome_false_at_once() -> None:
    async def scenario() -> None:
        sink = Held(kafka_config(max_in_flight=1, ack_timeout_s=30.0))
        await sink.start()
        loop = asyncio.get_running_loop()
        sink.state = (False, False)
        outcome: asyncio.Future[bool] = loop.create_future()
        with pytest.raises(Unavailable) as failed:
            await sink.publish(RECORD, outcome)
        assert failed.value.reason == "not_connected" and outcome.result() is False
        sink.state = (True, True)
        first = asyncio.ensure_future(sink.publish(RECORD))
        await asyncio.sleep(0)
        refused: asyncio.Future[bool] = loop.create_future()
        with pytest.raises(Unavailable) as failed:
            await sink.publish(RECORD, refused)
        assert failed.value.reason == "backpressure" and refused.result() is False
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)

    asyncio.run(scenario())


def test_a_record_future_its_producer_cancels_is_503_at_once_not_at_the_deadline() -> None:
    async def scenario() -> None:
        sink = Held(kafka_config(ack_timeout_s=2.0))
        await sink.start()
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[bool] = loop.create_future()
        publish = asyncio.ensure_future(sink.publish(RECORD, outcome))
        await asyncio.sleep(0)
        started = loop.time()
        sink.held[0].cancel()
        with pytest.raises(Unavailable) as failed:
            await publish
        assert loop.time() - started < 1.0  # not at the 2 s ack deadline
        assert failed.value.reason == "error"
        # what the 503's log and /readyz (last_error) say
        assert str(failed.value).startswith("Kafka refused the record: KafkaError")
        assert str(failed.value).endswith(": the record's delivery was cancelled")
        assert sink.last_error == str(failed.value)
        assert outcome.result() is False
        assert failures(sink, "error") == 1 and failures(sink, "timeout") == 0

    asyncio.run(scenario())

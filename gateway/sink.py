"""The Kafka sink: publish a record and wait for the broker's acknowledgement, bounded.

Two implementations share the asyncio side (:class:`SinkBase`): :class:`KafkaSink` runs
kafka-python's producer in this process and bridges its sender thread's futures to the loop;
:class:`gateway.producer_process.ProcessSink` runs the producer in a child process of its
own (``kafka.producer = "process"``, the default), so the Kafka client's Python work does not
share the GIL with HTTP. Three guarantees the ingress builds on, whichever runs:

- ``publish`` returns only after Kafka acknowledged the record (``acks=all``, idempotent
  producer); otherwise it raises :class:`Unavailable` and the request is answered 503.
- It never waits longer than ``kafka.ack_timeout_s``.
- Memory is bounded: kafka-python 3 has no ``buffer_memory``, so records sent but not yet
  acknowledged or failed are counted, and past ``kafka.max_in_flight`` new publishes are
  refused at once. A timed-out record still counts until the producer gives up on it
  (``delivery_timeout_ms``), because it still holds memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.partitioner.default import DefaultPartitioner, murmur2

from .config import KafkaConfig
from .metrics import IngressMetrics
from .records import KafkaRecord

__all__ = ["KafkaSink", "PublishResult", "SinkBase", "Unavailable", "create_sink"]

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """Kafka did not take the record in time; ``reason`` is a metric-friendly class."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class PublishResult:
    __slots__ = ("offset", "partition", "topic")

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset


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


def create_sink(
    cfg: KafkaConfig, metrics: IngressMetrics, warm_topics: tuple[str, ...] = ()
) -> SinkBase:
    """The sink ``kafka.producer`` names: a producer process (default) or this process."""
    if cfg.producer == "thread":
        return KafkaSink(cfg, metrics, warm_topics=warm_topics)
    from .producer_process import ProcessSink

    return ProcessSink(cfg, metrics, warm_topics=warm_topics)


def _close_quietly(producer: KafkaProducer) -> None:
    """Close a replaced producer at once: what it held was given up already."""
    try:
        producer.close(timeout=0)
    except Exception as exc:  # its flush times out at once, by design
        log.debug("closing the replaced producer", extra={"error": f"{type(exc).__name__}"})


def _expire(fut: asyncio.Future[PublishResult]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class SinkBase:
    """Admission, the ack deadline, failure accounting and readiness; subclasses move records.

    A subclass implements :meth:`_submit` (hand one record to the producer; its completion
    later settles ``fut`` on the loop thread), :meth:`start`, :meth:`close`, and says through
    :meth:`_producer_state` whether a producer exists and has topic metadata.
    """

    def __init__(self, cfg: KafkaConfig, metrics: IngressMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._closed = False
        self.last_error: str | None = None
        self.last_ack_at: float | None = None
        self.last_failure_at: float | None = None
        # set by the topic watcher: the gateway's topics that Kafka does not have
        self.missing_topics: frozenset[str] = frozenset()
        # when a record last settled, or the first of an idle spell was handed over
        self._progress_at = time.monotonic()
        self.stalls = 0
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self, timeout_s: float = 15.0) -> None:
        raise NotImplementedError

    def _producer_state(self) -> tuple[bool, bool]:
        """(a producer exists, metadata for at least one of our topics was fetched)."""
        raise NotImplementedError

    async def _submit(self, record: KafkaRecord, fut: asyncio.Future[PublishResult]) -> None:
        """Hand the record over; raise (anything) if it cannot be sent at all."""
        raise NotImplementedError

    async def _replace_producer(self) -> None:
        """Throw the producer away and make a new one (its records are failed)."""
        raise NotImplementedError

    # -- the stall watchdog ----------------------------------------------------------------

    def _start_watchdog(self) -> None:
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

    def stalled(self, now: float) -> bool:
        """Records outstanding and none settled for ``kafka.stall_after_s``.

        kafka-python settles every record within ``delivery_timeout_ms`` (acknowledged, or
        failed), so a producer past that bound with nothing settled is stuck. kafka-python
        3.0.12's idempotent producer gets there after a quorum loss: a batch expires, the
        producer id is reset, and the InitProducerId request it sent while the cluster was
        down never completes, so it holds every record for good. A new producer writes at once.
        """
        return self._in_flight > 0 and now - self._progress_at > self.cfg.stall_after_s

    async def _watch(self) -> None:
        interval = min(1.0, self.cfg.stall_after_s / 4)
        while not self._closed:
            await asyncio.sleep(interval)
            if not self.stalled(time.monotonic()) or self._closed:
                continue
            self.stalls += 1
            self.metrics.producer_stalls.inc()
            self.last_error = (
                f"the Kafka producer settled no record for {self.cfg.stall_after_s:.0f}s"
                f" with {self._in_flight} outstanding; replaced"
            )
            self.last_failure_at = time.monotonic()
            log.error(
                "kafka producer stuck: replacing it",
                extra={"outstanding": self._in_flight, "stall_after_s": self.cfg.stall_after_s},
            )
            self._progress_at = time.monotonic()
            try:
                await self._replace_producer()
            except Exception:  # the next round tries again
                log.exception("replacing the stuck kafka producer failed")

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def ready(self) -> tuple[bool, str]:
        """Whether this replica should get traffic, and why not.

        Not ready: no producer yet, no metadata fetched yet, the backlog cap reached, or a
        publish failed in the last ``retry_after_s`` seconds with no acknowledgement since.
        The last condition decays by itself, so a load balancer that only routes to ready
        replicas cannot leave this one unready forever.
        """
        connected, has_metadata = self._producer_state()
        if not connected:
            return False, f"kafka producer not connected ({self.last_error or 'starting'})"
        if self.missing_topics:
            return False, (
                f"topics missing in Kafka: {', '.join(sorted(self.missing_topics))}"
                " (create them: gateway topics create)"
            )
        if not has_metadata:
            return False, f"no topic metadata from Kafka yet ({self.last_error or 'starting'})"
        if self._in_flight >= self.cfg.max_in_flight:
            return False, "kafka backlog at max_in_flight"
        failed_at = self.last_failure_at
        if (
            failed_at
            and (self.last_ack_at or 0) < failed_at
            and time.monotonic() - failed_at < self.cfg.retry_after_s
        ):
            return False, f"last publish failed: {self.last_error}"
        return True, "ok"

    async def publish(self, record: KafkaRecord) -> PublishResult:
        loop = self._loop
        if loop is None or not self._producer_state()[0]:
            self._fail("not_connected", "Kafka producer is not connected yet")
        with self._in_flight_lock:
            if self._in_flight >= self.cfg.max_in_flight:
                full = True
            else:
                full = False
                if self._in_flight == 0:  # an idle producer is not a stuck one
                    self._progress_at = time.monotonic()
                self._in_flight += 1
        if full:
            self._fail("backpressure", f"{self.cfg.max_in_flight} records await Kafka already")
        fut: asyncio.Future[PublishResult] = loop.create_future()
        started = time.perf_counter()
        try:
            await self._submit(record, fut)
        except Exception as exc:  # KafkaTimeoutError on metadata, BufferError, closed producer
            self._release()
            self._fail("error", f"send failed: {type(exc).__name__}: {exc}")
        # one timer on the future itself (cheaper than wait_for + shield): whichever comes
        # first, the acknowledgement or the deadline, settles it; the other finds it done
        timer = loop.call_later(self.cfg.ack_timeout_s, _expire, fut)
        try:
            result = await fut
        except TimeoutError:
            self._fail("timeout", f"no acknowledgement from Kafka within {self.cfg.ack_timeout_s}s")
        except KafkaError as exc:
            self._fail("error", f"Kafka refused the record: {type(exc).__name__}: {exc}")
        finally:
            timer.cancel()
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        self.metrics.published.labels(result.topic).inc()
        self.last_ack_at = time.monotonic()
        return result

    def _fail(self, reason: str, message: str) -> NoReturn:
        self.metrics.publish_failures.labels(reason).inc()
        self.last_error = message
        self.last_failure_at = time.monotonic()
        raise Unavailable(reason, message)

    def _release(self, n: int = 1) -> None:
        with self._in_flight_lock:
            self._in_flight -= n
        self._progress_at = time.monotonic()

    @staticmethod
    def _warn_unacknowledged(count: int | None, error: str | None = None) -> None:
        """Records Kafka never acknowledged at close: every one of their requests was already
        answered 503 (an answer waits for its ack), so this is a bounded, expected end."""
        extra: dict[str, Any] = {"unacknowledged": count}
        if error:
            extra["error"] = error
        log.warning(
            "producer closed with records Kafka did not acknowledge; their requests were "
            "answered 503 and will be retried by the sender",
            extra=extra,
        )


class KafkaSink(SinkBase):
    """kafka-python's producer in this process (``kafka.producer = "thread"``)."""

    def __init__(
        self, cfg: KafkaConfig, metrics: IngressMetrics, warm_topics: tuple[str, ...] = ()
    ):
        super().__init__(cfg, metrics)
        self.warm_topics = warm_topics
        self._producer: KafkaProducer | None = None
        # completions arrive on the producer's sender thread; they are queued here and drained
        # on the event loop with one wake-up per batch rather than one per record
        self._done: collections.deque[tuple[asyncio.Future[PublishResult], Any, bool]] = (
            collections.deque()
        )
        self._wake_pending = False
        self._known_topics: set[str] = set()
        self._stop = threading.Event()
        self._generation = 0  # which producer a callback belongs to (see _replace_producer)
        self._outstanding = 0  # records handed to the current producer, not yet settled

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the producer in the background; until it exists, publishes answer 503."""
        self._loop = asyncio.get_running_loop()
        self._open()
        self._start_watchdog()

    async def _replace_producer(self) -> None:
        loop = self._loop
        assert loop is not None
        old, self._producer = self._producer, None
        self._known_topics = set()
        # the old producer's records are given up: its late callbacks are ignored, and what it
        # held is released now (their requests were answered 503 at their deadline)
        with self._in_flight_lock:
            self._generation += 1
            abandoned, self._outstanding = self._outstanding, 0
        if abandoned:
            self._release(abandoned)
        self._stop.set()
        self._stop = threading.Event()
        self._open()
        if old is not None:
            loop.run_in_executor(None, _close_quietly, old)

    def _open(self) -> None:
        loop = self._loop
        assert loop is not None
        opener = ProducerOpener(
            self.cfg,
            self.warm_topics,
            on_producer=self._set_producer,
            on_topic=self._known_topics.add,
            on_error=self._set_error,
            stop=self._stop,
        )
        loop.run_in_executor(None, opener.run)  # it stops when self._stop is set

    def _set_producer(self, producer: KafkaProducer) -> None:
        self._producer = producer

    def _set_error(self, message: str) -> None:
        self.last_error = message

    async def close(self, timeout_s: float = 15.0) -> None:
        """Flush what was sent and close; bounded so a dead broker cannot hold shutdown."""
        self._closed = True
        await self._stop_watchdog()
        self._stop.set()
        producer, self._producer = self._producer, None
        if producer is None or self._loop is None:
            return
        pending = self._in_flight
        try:
            await self._loop.run_in_executor(None, lambda: producer.close(timeout=timeout_s))
        except KafkaError as exc:
            self._warn_unacknowledged(pending, f"{type(exc).__name__}: {exc}")

    # -- the producer in this process ----------------------------------------------------

    def _producer_state(self) -> tuple[bool, bool]:
        return self._producer is not None, bool(self._known_topics)

    async def _submit(self, record: KafkaRecord, fut: asyncio.Future[PublishResult]) -> None:
        producer = self._producer
        loop = self._loop
        assert producer is not None and loop is not None
        if record.topic in self._known_topics:
            kfut = producer.send(
                record.topic, value=record.value, key=record.key, headers=record.headers
            )
        else:  # the first send to a topic may block on its metadata: not on the loop
            kfut = await loop.run_in_executor(
                None,
                lambda: producer.send(
                    record.topic, value=record.value, key=record.key, headers=record.headers
                ),
            )
            self._known_topics.add(record.topic)
        with self._in_flight_lock:
            generation = self._generation
            self._outstanding += 1
        kfut.add_callback(self._on_done, fut, True, generation)
        kfut.add_errback(self._on_done, fut, False, generation)

    def _on_done(
        self, fut: asyncio.Future[PublishResult], ok: bool, generation: int, value: Any
    ) -> None:
        # runs on the producer's sender thread
        with self._in_flight_lock:
            if generation != self._generation:
                return  # a replaced producer's record: released when it was replaced
            self._outstanding -= 1
        self._release()
        self._done.append((fut, value, ok))
        if not self._wake_pending and self._loop is not None:
            self._wake_pending = True
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._wake_pending = False
        while self._done:
            fut, value, ok = self._done.popleft()
            if fut.done():
                continue
            if ok:
                fut.set_result(PublishResult(value.topic, value.partition, value.offset))
            else:
                fut.set_exception(
                    value if isinstance(value, BaseException) else KafkaError(str(value))
                )
                # mark it retrieved: if the request already timed out, nobody awaits it anymore
                fut.exception()

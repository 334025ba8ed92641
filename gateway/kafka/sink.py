"""What every Kafka sink shares: admission, the ack deadline, readiness, the stall watchdog.

Two producers sit behind it: :class:`gateway.kafka.thread.KafkaSink` runs kafka-python's
producer in this process and bridges its sender thread's futures to the loop;
:class:`gateway.kafka.process.ProcessSink` runs it in a child process of its own
(``kafka.producer = "process"``, the default), so the Kafka client's Python work does not
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
import contextlib
import logging
import threading
import time
from typing import Any, NoReturn

from kafka.errors import KafkaError

from gateway.config import KafkaConfig
from gateway.core.records import KafkaRecord
from gateway.metrics import IngressMetrics

__all__ = ["PublishResult", "SinkBase", "Unavailable"]

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

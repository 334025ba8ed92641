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
from typing import TYPE_CHECKING, Any, NoReturn

from kafka.errors import KafkaError

from gateway.config import KafkaConfig
from gateway.core.records import KafkaRecord
from gateway.metrics import IngressMetrics

if TYPE_CHECKING:
    from gateway.kafka.spool import Spool

__all__ = ["PublishResult", "SinkBase", "Unavailable"]

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """Kafka did not take the record in time; ``reason`` is a metric-friendly class."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class PublishResult:
    """Where Kafka stored a record; ``spooled``: on the spool's disk instead (no place yet)."""

    __slots__ = ("offset", "partition", "spooled", "topic")

    def __init__(self, topic: str, partition: int, offset: int, spooled: bool = False) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.spooled = spooled


def _expire(fut: asyncio.Future[PublishResult]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _relay(source: asyncio.Future[PublishResult], target: asyncio.Future[PublishResult]) -> None:
    if source.cancelled():
        exc: BaseException | None = KafkaError("the record's delivery was cancelled")
    else:
        exc = source.exception()  # retrieved here, whether or not anyone still waits
    if target.done():
        return
    if exc is not None:
        target.set_exception(exc)
        target.exception()  # retrieved: its publish may have been cancelled meanwhile
    else:
        target.set_result(source.result())


def _settle(outcome: asyncio.Future[bool] | None, ok: bool) -> None:
    if outcome is not None and not outcome.done():
        outcome.set_result(ok)


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
        # the durable local spool (spool.enabled), and its drain
        self.spool: Spool | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._spool_opened_at = 0.0
        self._connected_once = False

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

        With the spool on, a replica whose Kafka is away is ready while the spool can take
        records (it is doing its job); it is not ready when topics are missing (a setup error
        the spool would only hide) or when the spool is full or its disk is failing.
        """
        ok, detail = self._kafka_ready()
        spool = self.spool
        if spool is None or self.missing_topics:
            return ok, detail
        if ok and self.kafka_down():
            # Without the spool a failure decays (no traffic, no way to see Kafka is back);
            # with it the drain probes Kafka, and every request is spooled until an ack: a
            # full spool must not pass for "ok" once the last failure is retry_after_s old.
            ok, detail = False, f"kafka away since the last failure: {self.last_error}"
        if ok:
            return ok, detail
        if not self._connected_once and self._producer_state()[0]:
            self._connected_once = True
        if not self._connected_once and time.monotonic() - self._spool_opened_at < (
            self.cfg.ack_timeout_s
        ):
            # at start, give Kafka the ack deadline to connect before taking traffic to spool
            return False, f"{detail} (spooling if Kafka is not there in {self.cfg.ack_timeout_s}s)"
        spool_ok, spool_detail = spool.usable()
        if spool_ok:
            return True, f"spooling: {detail}"
        return False, f"{detail}; {spool_detail}"

    def kafka_down(self) -> bool:
        """No producer, or a publish failed since the last acknowledgement."""
        if self._loop is None or not self._producer_state()[0]:
            return True
        failed_at = self.last_failure_at
        return failed_at is not None and (self.last_ack_at or 0) < failed_at

    def _kafka_ready(self) -> tuple[bool, str]:
        """Whether Kafka can take records now (see :meth:`ready`).

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

    async def publish(
        self, record: KafkaRecord, outcome: asyncio.Future[bool] | None = None
    ) -> PublishResult:
        """Kafka's acknowledgement, or (spool on) the spool's fsync; else :class:`Unavailable`.

        With the spool on, a record whose key has records in the spool is spooled behind them,
        and so is every record while Kafka is known to be away; a record Kafka does not
        acknowledge in time is spooled too (Kafka may still get that first copy: then it is
        there twice, which ``ce_id`` tells apart).

        ``outcome`` (see :meth:`publish_now`) is settled with the record's fate: without the
        spool, Kafka's, even after the deadline; with it, True once Kafka or the spool has
        it, False if neither took it.
        """
        spool = self.spool
        if spool is None:
            return await self.publish_now(record, outcome)
        try:
            if spool.holds(record):
                result = await self._spool(spool, record, "key_waiting")
            elif self.kafka_down():
                result = await self._spool(spool, record, "kafka_down")
            else:
                try:
                    result = await self.publish_now(record)
                except Unavailable:
                    result = await self._spool(spool, record, "not_acknowledged")
        except BaseException:
            _settle(outcome, False)
            raise
        _settle(outcome, True)
        return result

    async def _spool(self, spool: Spool, record: KafkaRecord, reason: str) -> PublishResult:
        from gateway.kafka.spool import SpoolError

        try:
            await spool.store(record, reason)
        except SpoolError as exc:
            self.metrics.publish_failures.labels("spool").inc()
            raise Unavailable("spool", str(exc)) from None
        return PublishResult(record.topic, -1, -1, spooled=True)

    # -- the spool's lifecycle (the ingress's lifespan calls these) --------------------------

    async def open_spool(self, spool: Spool) -> None:
        """Own and replay the spool directory (raises SpoolError: refuse to start), start its
        writer and its drain."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, spool.open)
        spool.start(loop)
        self.spool = spool
        self._spool_opened_at = time.monotonic()
        self._drain_task = loop.create_task(self._run_drain(spool))

    async def _run_drain(self, spool: Spool) -> None:
        from gateway.kafka.spool.drain import Drainer

        while True:
            try:
                await Drainer(spool, self.publish_now, self.kafka_down).run()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: say so, and go on delivering
                log.exception("the spool drain failed; restarting it")
                await asyncio.sleep(spool.cfg.drain_retry_s)

    async def stop_drain(self) -> None:
        task, self._drain_task = self._drain_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close_spool(self) -> None:
        """After the requests: let the writer finish, release the directory."""
        spool = self.spool
        if spool is not None:
            await asyncio.get_running_loop().run_in_executor(None, spool.close)

    async def publish_now(
        self, record: KafkaRecord, outcome: asyncio.Future[bool] | None = None
    ) -> PublishResult:
        """Kafka's acknowledgement of ``record``, or :class:`Unavailable` by the ack deadline.

        ``outcome``, when given, is settled with the record's own fate, which can come after
        this call gave up on it: True once Kafka acknowledged it (even after the deadline: a
        timed-out record stays queued in the producer), False once it failed for good or was
        never handed over. A retry of the same event waits on it instead of sending a copy.
        """
        try:
            loop, fut, started = await self._hand_over(record)
        except BaseException:
            _settle(outcome, False)
            raise
        if outcome is not None:
            fut.add_done_callback(
                lambda f: _settle(outcome, not f.cancelled() and f.exception() is None)
            )
        # the deadline settles a waiter, not the record's future, which stays the record's
        # own fate; whichever comes first, the acknowledgement or the deadline, settles it
        waiter: asyncio.Future[PublishResult] = loop.create_future()
        fut.add_done_callback(lambda f: _relay(f, waiter))
        timer = loop.call_later(self.cfg.ack_timeout_s, _expire, waiter)
        try:
            result = await waiter
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

    async def _hand_over(
        self, record: KafkaRecord
    ) -> tuple[asyncio.AbstractEventLoop, asyncio.Future[PublishResult], float]:
        """Admission and the hand-over to the producer: the record's future, or Unavailable."""
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
        return loop, fut, started

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

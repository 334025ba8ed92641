"""The in-thread sink (``kafka.producer = "thread"``): kafka-python's producer in this process.

Its sender thread's futures are bridged to the loop with one wake-up per batch of results.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from gateway.config import KafkaConfig
from gateway.core.records import KafkaRecord
from gateway.kafka.producer import ProducerOpener, close_quietly
from gateway.kafka.sink import PublishResult, SinkBase
from gateway.metrics import IngressMetrics

__all__ = ["KafkaSink"]


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
            loop.run_in_executor(None, close_quietly, old)

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

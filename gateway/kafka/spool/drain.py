"""The drain: deliver the spool to Kafka, oldest segment first, in order per key.

It reads one sealed segment at a time and sends its records in chunks of
``spool.drain_batch``, each chunk handed to the producer in file order (so in order per key,
which the idempotent producer keeps per partition). A chunk is done when
every record of it is acknowledged; a segment is deleted when every chunk is. While Kafka is
known to be away, it tries one record every ``spool.drain_retry_s`` (a probe, so an outage does
not queue the spool into the producer many times over).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from gateway.core.records import KafkaRecord
from gateway.kafka.sink import PublishResult, Unavailable
from gateway.kafka.spool import format as fmt
from gateway.kafka.spool.store import Segment, Spool

__all__ = ["Drainer"]

log = logging.getLogger(__name__)

Publish = Callable[[KafkaRecord], Awaitable[PublishResult]]


class Drainer:
    def __init__(self, spool: Spool, publish: Publish, kafka_down: Callable[[], bool]) -> None:
        self.spool = spool
        self.publish = publish
        self.kafka_down = kafka_down
        self.batch = spool.cfg.drain_batch
        self.retry_s = spool.cfg.drain_retry_s
        self.delivered = 0

    async def run(self, *, until_empty: bool = False) -> None:
        """Deliver for ever (the ingress), or until the spool is empty (``gateway spool drain``)."""
        loop = asyncio.get_running_loop()
        spool = self.spool
        while True:
            spool.changed.clear()  # before looking: a change after the look wakes the wait
            seg = spool.oldest_sealed()
            if seg is None:
                if spool.active_records():
                    spool.request_rotate()
                elif until_empty and not spool.segments:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(spool.changed.wait(), 1.0)
                continue
            entries = await loop.run_in_executor(None, spool.read, seg)
            counted = seg.records
            await self._deliver_segment(seg, entries)
            await loop.run_in_executor(None, spool.remove, seg)
            spool.forget_segment(seg, max(0, counted - len(entries)))
            log.info(
                "spool segment delivered and deleted",
                extra={"segment": str(seg.path), "records": len(entries)},
            )

    async def _deliver_segment(self, seg: Segment, entries: list[fmt.Entry]) -> None:
        for start in range(0, len(entries), self.batch):
            pending = entries[start : start + self.batch]
            failures = 0
            while pending:
                sent = pending[:1] if self.kafka_down() else pending
                left = await self._deliver(seg, sent)
                progressed = len(left) < len(sent)
                pending = left + pending[len(sent) :]
                if progressed:
                    failures = 0
                elif pending:
                    failures += 1
                    await asyncio.sleep(self.retry_s * min(failures, 5))

    async def _try(self, entry: fmt.Entry) -> bool:
        try:
            await self.publish(entry.record)
        except Unavailable:
            return False
        return True

    async def _deliver(self, seg: Segment, entries: list[fmt.Entry]) -> list[fmt.Entry]:
        """Send ``entries``; the ones not acknowledged, in order.

        Every record is handed to the producer in file order before any answer is awaited: one
        producer, acks=all and idempotent, keeps the records of a partition (so of a key) in
        the order it was given them, also across its retries. A record that fails while a
        later one of its key is acknowledged would land after it when it is sent again: that
        is logged and counted (``gateway_spool_order_breaks_total``), never silent.
        """
        tasks = [asyncio.ensure_future(self._try(e)) for e in entries]  # submitted in order
        results = await asyncio.gather(*tasks)
        failed: set[tuple[str, bytes | None]] = set()
        left = []
        for e, ok in zip(entries, results, strict=True):
            key = fmt.ordering_key(e.record)
            if not ok:
                failed.add(key)
                left.append(e)
                continue
            if key in failed:
                self.spool.order_break(key)
            self.spool.delivered(seg, e)
            self.delivered += 1
        return left

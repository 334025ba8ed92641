"""The consumer side's offsets: which consumed offsets are done, and committing them.

The delivery side reports the sources of what it finished through :attr:`OffsetLedger.done`;
the consumer's thread collects them, and commits per partition only the contiguous done prefix
(:class:`~.coalesce.OffsetTracker`), so whatever is not done is replayed after a crash or
rebalance. The rebalance listener runs on kafka-python's IO loop, hence the lock.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kafka import OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener

import gateway.tagsync.metrics as m
from gateway.tagsync.coalesce import OffsetTracker, SourceRef

__all__ = ["COMMIT_INTERVAL_S", "OffsetLedger", "RebalanceListener", "partition_names"]

log = logging.getLogger("gateway.tagsync.worker")

COMMIT_INTERVAL_S = 0.2

Offsets = dict[TopicPartition, OffsetAndMetadata]


def partition_names(tps: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)


class OffsetLedger:
    """Done-ness of consumed offsets, how far each partition is read, and what is committed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tracker = OffsetTracker()
        self.done: queue.SimpleQueue[Sequence[SourceRef]] = queue.SimpleQueue()
        self._done_upto: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._next_offset: dict[TopicPartition, int] = {}
        self._last_commit = 0.0

    def track(
        self,
        tracked: Sequence[tuple[TopicPartition, int, bool]],
        reached: Callable[[], dict[TopicPartition, int]],
    ) -> dict[TopicPartition, int]:
        """Offsets just polled, each done or not; ``reached``: the next offset per partition
        polled, taken under the same lock. Returns it."""
        with self._lock:
            add = self._tracker.add
            for tp, offset, done in tracked:
                add(tp, offset, done=done)
            positions = reached()
            self._next_offset.update(positions)
        return positions

    def read_positions(self) -> dict[TopicPartition, int]:
        """The next offset to read, per partition read from."""
        with self._lock:
            return dict(self._next_offset)

    def outstanding(self) -> int:
        with self._lock:
            return self._tracker.outstanding()

    def collect_done(self) -> None:
        """Take in what the delivery side finished; advance the committable marks."""
        with self._lock:
            mark = self._tracker.mark_done
            while True:
                try:
                    sources = self.done.get_nowait()
                except queue.Empty:
                    break
                for src in sources:
                    mark(TopicPartition(src.topic, src.partition), src.offset)
            for tp in self._tracker.partitions():
                upto = self._tracker.committable(tp)
                if upto is not None:
                    self._done_upto[tp] = upto
            m.PENDING_EVENTS.set(self._tracker.outstanding())

    def release(self, tps: Iterable[TopicPartition], *, commit: bool) -> Offsets:
        """Revoked or lost: stop tracking them; return what is done, to commit (revoked)."""
        offsets: Offsets = {}
        with self._lock:
            for tp in tps:
                upto = self._done_upto.pop(tp, None)
                if commit and upto is not None and upto > self._committed.get(tp, -1):
                    offsets[tp] = OffsetAndMetadata(upto, "", -1)
                self._committed.pop(tp, None)
                self._next_offset.pop(tp, None)
                self._tracker.drop(tp)
        return offsets

    def maybe_commit(self, consumer: Any, now: float, *, force: bool, dry_run: bool) -> None:
        """Commit what became committable, at most every ``COMMIT_INTERVAL_S`` (unless
        ``force``); a dry run commits nothing. Then the lag gauges."""
        if not force and now - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        with self._lock:
            offsets = {
                tp: OffsetAndMetadata(upto, "", -1)
                for tp, upto in self._done_upto.items()
                if upto > self._committed.get(tp, -1)
            }
        if offsets and not dry_run:
            try:
                consumer.commit(offsets)
            except Exception as exc:  # rebalance in progress etc.: retried next time
                log.warning("offset commit failed", extra={"error": repr(exc)[:300]})
                return
            m.COMMITTED.inc()
            with self._lock:
                for tp, om in offsets.items():
                    self._committed[tp] = om.offset
        self._report_lag(consumer)

    def _report_lag(self, consumer: Any) -> None:
        with self._lock:
            marks = dict(self._done_upto)
        for tp, upto in marks.items():
            high = consumer.highwater(tp)
            if high is not None:
                m.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - upto))


class RebalanceListener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    """Runs on kafka-python's IO loop: commit what is done on revoke, forget on lost.

    ``release(partitions, commit=...)`` stops tracking the partitions and returns what is
    done in them, to commit.
    """

    def __init__(self, release: Callable[..., Offsets], consumer: Any, *, dry_run: bool) -> None:
        self.release = release
        self.consumer = consumer
        self.dry_run = dry_run

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        offsets = self.release(revoked)
        if offsets and not self.dry_run:
            try:
                await self.consumer.commit_async(offsets)
                m.COMMITTED.inc()
            except Exception as exc:
                log.warning("commit on revoke failed", extra={"error": repr(exc)[:300]})
        log.info("partitions revoked", extra={"partitions": partition_names(revoked)})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": partition_names(assigned)})

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.release(lost, commit=False)
        log.warning(
            "partitions lost; their pending work will be replayed",
            extra={"partitions": partition_names(lost)},
        )

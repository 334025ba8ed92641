"""The consumer side's commit policy (gateway.tagsync.offsets), every commit observed.

The ledger is driven the way the worker drives it (track what was polled, collect what the
delivery side reports done, commit); the consumer is a recorder of the calls the ledger makes,
so every commit is seen, not a sample. The worker's own test (test_tagsync_worker.py) holds
the same order against a real broker.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest
from kafka import OffsetAndMetadata, TopicPartition
from prometheus_client import REGISTRY

from gateway.tagsync.coalesce import SourceRef
from gateway.tagsync.offsets import (
    COMMIT_INTERVAL_S,
    OffsetLedger,
    RebalanceListener,
    partition_names,
)

A = TopicPartition("users", 0)
B = TopicPartition("users", 1)


class Consumer:
    """Records every commit; ``fail`` makes the next commits raise, as during a rebalance."""

    def __init__(self, highwater: dict[TopicPartition, int | None] | None = None) -> None:
        self.commits: list[dict[TopicPartition, OffsetAndMetadata]] = []
        self.async_commits: list[dict[TopicPartition, OffsetAndMetadata]] = []
        self.fail = 0
        self._highwater = highwater or {}

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("CommitFailedError: rebalance in progress")
        self.commits.append(dict(offsets))

    async def commit_async(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("CommitFailedError: rebalance in progress")
        self.async_commits.append(dict(offsets))

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._highwater.get(tp)


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def committed_total() -> float:
    return metric("gateway_tagsync_offsets_committed_total")


def polled(ledger: OffsetLedger, tp: TopicPartition, *offsets: int, done: bool = False) -> None:
    ledger.track([(tp, o, done) for o in offsets], lambda: {tp: max(offsets) + 1})


def finish(ledger: OffsetLedger, tp: TopicPartition, *offsets: int) -> None:
    ledger.done.put([SourceRef(tp.topic, tp.partition, o) for o in offsets])


def om(offset: int) -> OffsetAndMetadata:
    return OffsetAndMetadata(offset, "", -1)


def test_track_returns_and_keeps_the_positions_reached() -> None:
    ledger = OffsetLedger()
    got = ledger.track([(A, 3, False), (B, 7, True)], lambda: {A: 4, B: 8})
    assert got == {A: 4, B: 8}
    positions = ledger.read_positions()
    assert positions == {A: 4, B: 8}
    positions[A] = 99  # a copy: the caller cannot move the ledger's positions
    assert ledger.read_positions() == {A: 4, B: 8}
    assert ledger.outstanding() == 2
    ledger.track([(A, 4, False)], lambda: {A: 5})
    assert ledger.read_positions() == {A: 5, B: 8}
    assert ledger.outstanding() == 3


def test_only_the_contiguous_done_prefix_is_committed_each_commit_observed() -> None:
    ledger, consumer = OffsetLedger(), Consumer()
    polled(ledger, A, 10, 11, 12, 13)
    finish(ledger, A, 11, 13)
    ledger.collect_done()
    ledger.maybe_commit(consumer, 100.0, force=True, dry_run=False)
    assert consumer.commits == []  # 10 is not done: nothing past it may be committed
    assert metric("gateway_tagsync_pending_events") == 4
    finish(ledger, A, 10)
    ledger.collect_done()
    ledger.maybe_commit(consumer, 101.0, force=True, dry_run=False)
    assert consumer.commits == [{A: om(12)}]  # 10 and 11 done; 12 is not
    assert metric("gateway_tagsync_pending_events") == 2
    ledger.maybe_commit(consumer, 102.0, force=True, dry_run=False)
    assert consumer.commits == [{A: om(12)}]  # nothing new: no second commit of the same
    finish(ledger, A, 12)
    ledger.collect_done()
    ledger.maybe_commit(consumer, 103.0, force=True, dry_run=False)
    assert consumer.commits == [{A: om(12)}, {A: om(14)}]
    assert ledger.outstanding() == 0


def test_offsets_polled_done_commit_without_a_report() -> None:
    ledger, consumer = OffsetLedger(), Consumer()
    polled(ledger, A, 0, 1, done=True)  # e.g. records no rule applies to
    ledger.collect_done()
    ledger.maybe_commit(consumer, 1.0, force=True, dry_run=False)
    assert consumer.commits == [{A: om(2)}]


def test_each_partition_commits_its_own_prefix_in_one_call() -> None:
    ledger, consumer = OffsetLedger(), Consumer()
    polled(ledger, A, 0, 1)
    polled(ledger, B, 5, 6)
    finish(ledger, A, 0, 1)
    finish(ledger, B, 6)
    ledger.collect_done()
    ledger.maybe_commit(consumer, 1.0, force=True, dry_run=False)
    assert consumer.commits == [{A: om(2)}]
    finish(ledger, B, 5)
    ledger.collect_done()
    ledger.maybe_commit(consumer, 2.0, force=True, dry_run=False)
    assert consumer.commits == [{A: om(2)}, {B: om(7)}]


def test_commits_are_paced_unless_forced() -> None:
    ledger, consumer = OffsetLedger(), Consumer()
    polled(ledger, A, 0, 1, 2)
    finish(ledger, A, 0)
    ledger.collect_done()
    t0 = 1000.0
    ledger.maybe_commit(consumer, t0, force=False, dry_run=False)
    assert consumer.commits == [{A: om(1)}]
    finish(ledger, A, 1)
    ledger.collect_done()
    ledger.maybe_commit(consumer, t0 + COMMIT_INTERVAL_S / 2, force=False, dry_run=False)
    assert len(consumer.commits) == 1  # too soon after the last one
    ledger.maybe_commit(consumer, t0 + COMMIT_INTERVAL_S, force=False, dry_run=False)
    assert consumer.commits[-1] == {A: om(2)}  # one interval later (measured from t0)
    finish(ledger, A, 2)
    ledger.collect_done()
    ledger.maybe_commit(consumer, t0 + COMMIT_INTERVAL_S + 0.01, force=True, dry_run=False)
    assert consumer.commits[-1] == {A: om(3)}  # forced (shutdown, revoke): at once


def test_the_first_commit_is_not_held_back_by_the_interval() -> None:
    ledger, consumer = OffsetLedger(), Consumer()
    polled(ledger, A, 0)
    finish(ledger, A, 0)
    ledger.collect_done()
    ledger.maybe_commit(consumer, COMMIT_INTERVAL_S, force=False, dry_run=False)
    assert consumer.commits == [{A: om(1)}]


def test_a_dry_run_commits_nothing() -> None:
    ledger, consumer = OffsetLedger(), Consumer()
    polled(ledger, A, 0, 1)
    finish(ledger, A, 0, 1)
    ledger.collect_done()
    before = committed_total()
    ledger.maybe_commit(consumer, 1.0, force=True, dry_run=True)
    assert consumer.commits == []
    assert committed_total() == before


def test_a_failed_commit_is_retried_and_counted_only_when_it_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger, consumer = OffsetLedger(), Consumer({A: 10})
    polled(ledger, A, 0, 1)
    finish(ledger, A, 0, 1)
    ledger.collect_done()
    consumer.fail = 1
    before = committed_total()
    with caplog.at_level(logging.WARNING, logger="gateway.tagsync.worker"):
        ledger.maybe_commit(consumer, 1.0, force=True, dry_run=False)
    assert consumer.commits == []
    assert committed_total() == before
    warned = [r for r in caplog.records if r.getMessage() == "offset commit failed"]
    assert len(warned) == 1 and "rebalance in progress" in warned[0].__dict__["error"]
    ledger.maybe_commit(consumer, 2.0, force=True, dry_run=False)
    assert consumer.commits == [{A: om(2)}]  # the same offsets, again
    assert committed_total() == before + 1
    ledger.maybe_commit(consumer, 3.0, force=True, dry_run=False)
    assert len(consumer.commits) == 1  # and now held as committed


def test_lag_is_the_high_watermark_less_the_done_mark() -> None:
    # a topic of its own: the gauge is process-wide, and must not hold this test's answer yet
    topic = f"lag-{uuid.uuid4().hex[:8]}"
    a = TopicPartition(topic, 0)
    b = TopicPartition(topic, 1)
    c = TopicPartition(topic, 2)
    ledger, consumer = OffsetLedger(), Consumer({a: 50, b: 3, c: None})
    polled(ledger, a, 0, 1, 2, 3)
    polled(ledger, b, 0, 1, 2, 3, 4)
    polled(ledger, c, 0)
    finish(ledger, a, 0, 1, 2, 3)
    finish(ledger, b, 0, 1, 2, 3, 4)
    finish(ledger, c, 0)
    ledger.collect_done()
    ledger.maybe_commit(consumer, 1.0, force=True, dry_run=True)  # lag is reported dry too
    assert metric("gateway_tagsync_consumer_lag", {"topic": topic, "partition": "0"}) == 46
    # A stale high watermark below the mark: never a negative lag.
    assert (
        REGISTRY.get_sample_value(
            "gateway_tagsync_consumer_lag", {"topic": topic, "partition": "1"}
        )
        == 0
    )
    unknown = {"topic": topic, "partition": "2"}
    assert REGISTRY.get_sample_value("gateway_tagsync_consumer_lag", unknown) is None


def test_release_returns_what_is_done_and_not_committed_then_forgets() -> None:
    ledger, consumer = OffsetLedger(), Consumer()
    polled(ledger, A, 0, 1, 2)
    polled(ledger, B, 0, 1)
    finish(ledger, A, 0)
    finish(ledger, B, 0)
    ledger.collect_done()
    ledger.maybe_commit(consumer, 1.0, force=True, dry_run=False)
    assert consumer.commits == [{A: om(1), B: om(1)}]
    finish(ledger, A, 1)
    ledger.collect_done()
    assert ledger.release([A, B], commit=True) == {A: om(2)}  # B's 1 is committed already
    assert ledger.read_positions() == {}
    assert ledger.outstanding() == 0
    finish(ledger, A, 2)  # a late completion of a released partition: ignored
    ledger.collect_done()
    ledger.maybe_commit(consumer, 2.0, force=True, dry_run=False)
    assert len(consumer.commits) == 1


def test_release_without_commit_returns_nothing_and_still_forgets() -> None:
    ledger = OffsetLedger()
    polled(ledger, A, 0, 1)
    finish(ledger, A, 0)
    ledger.collect_done()
    assert ledger.release([A], commit=False) == {}
    assert ledger.read_positions() == {} and ledger.outstanding() == 0
    # Reassigned later and read again from the committed offset (0): tracked afresh.
    polled(ledger, A, 0)
    finish(ledger, A, 0)
    ledger.collect_done()
    assert ledger.release([A], commit=True) == {A: om(1)}


def test_a_released_partition_commits_afresh_when_reassigned() -> None:
    ledger, consumer = OffsetLedger(), Consumer()
    polled(ledger, A, 0, 1)
    finish(ledger, A, 0, 1)
    ledger.collect_done()
    ledger.maybe_commit(consumer, 1.0, force=True, dry_run=False)
    ledger.release([A], commit=True)
    # Another member committed further meanwhile; we get it back and read on from there.
    polled(ledger, A, 1)
    finish(ledger, A, 1)
    ledger.collect_done()
    ledger.maybe_commit(consumer, 2.0, force=True, dry_run=False)
    assert consumer.commits == [{A: om(2)}, {A: om(2)}]  # our record of 2 was forgotten


class Release:
    def __init__(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.offsets = offsets
        self.calls: list[tuple[set[TopicPartition], dict[str, Any]]] = []

    def __call__(
        self, tps: set[TopicPartition], **kw: Any
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        self.calls.append((set(tps), kw))
        return self.offsets


def test_revoke_commits_what_release_returns(caplog: pytest.LogCaptureFixture) -> None:
    release, consumer = Release({A: om(5)}), Consumer()
    listener = RebalanceListener(release, consumer, dry_run=False)
    before = committed_total()
    with caplog.at_level(logging.INFO, logger="gateway.tagsync.worker"):
        asyncio.run(listener.on_partitions_revoked({A, B}))
    assert release.calls == [({A, B}, {})]  # the default: commit what is done
    assert consumer.async_commits == [{A: om(5)}]
    assert committed_total() == before + 1
    (rec,) = [r for r in caplog.records if r.getMessage() == "partitions revoked"]
    assert rec.__dict__["partitions"] == ["users[0]", "users[1]"]


def test_revoke_with_nothing_done_or_dry_commits_nothing() -> None:
    consumer = Consumer()
    asyncio.run(RebalanceListener(Release({}), consumer, dry_run=False).on_partitions_revoked({A}))
    dry = RebalanceListener(Release({A: om(5)}), consumer, dry_run=True)
    asyncio.run(dry.on_partitions_revoked({A}))
    assert consumer.async_commits == []


def test_a_failed_commit_on_revoke_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    consumer = Consumer()
    consumer.fail = 1
    before = committed_total()
    listener = RebalanceListener(Release({A: om(5)}), consumer, dry_run=False)
    with caplog.at_level(logging.INFO, logger="gateway.tagsync.worker"):
        asyncio.run(listener.on_partitions_revoked({A}))
    assert committed_total() == before
    (warned,) = [r for r in caplog.records if r.getMessage() == "commit on revoke failed"]
    assert "rebalance in progress" in warned.__dict__["error"]
    assert any(r.getMessage() == "partitions revoked" for r in caplog.records)


def test_lost_partitions_are_released_without_a_commit(caplog: pytest.LogCaptureFixture) -> None:
    release, consumer = Release({A: om(5)}), Consumer()
    listener = RebalanceListener(release, consumer, dry_run=False)
    with caplog.at_level(logging.INFO, logger="gateway.tagsync.worker"):
        asyncio.run(listener.on_partitions_assigned({B}))
        asyncio.run(listener.on_partitions_lost({A}))
    assert release.calls == [({A}, {"commit": False})]
    assert consumer.commits == [] and consumer.async_commits == []
    msgs = {r.getMessage(): r for r in caplog.records}
    assert msgs["partitions assigned"].__dict__["partitions"] == ["users[1]"]
    lost = msgs["partitions lost; their pending work will be replayed"]
    assert lost.levelno == logging.WARNING and lost.__dict__["partitions"] == ["users[0]"]


def test_partition_names_are_sorted_topic_and_index() -> None:
    tps = [TopicPartition("b", 0), TopicPartition("a", 10), TopicPartition("a", 2)]
    assert partition_names(tps) == ["a[10]", "a[2]", "b[0]"]


def test_releasing_partitions_with_nothing_done_or_never_read_is_harmless() -> None:
    ledger = OffsetLedger()
    polled(ledger, A, 0)  # polled, nothing done
    never = TopicPartition("users", 9)  # assigned, never polled
    assert ledger.release([A, never], commit=True) == {}
    assert ledger.read_positions() == {} and ledger.outstanding() == 0


def test_a_failed_commits_error_is_logged_cut_to_300_characters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Verbose(Consumer):
        def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
            raise RuntimeError("x" * 1000)

        async def commit_async(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
            raise RuntimeError("y" * 1000)

    ledger, consumer = OffsetLedger(), Verbose()
    polled(ledger, A, 0, done=True)
    ledger.collect_done()
    with caplog.at_level(logging.WARNING, logger="gateway.tagsync.worker"):
        ledger.maybe_commit(consumer, 1.0, force=True, dry_run=False)
        listener = RebalanceListener(Release({A: om(1)}), consumer, dry_run=False)
        asyncio.run(listener.on_partitions_revoked({A}))
    errors = [r.__dict__["error"] for r in caplog.records if "error" in r.__dict__]
    assert [len(e) for e in errors] == [300, 300]
    assert errors[0].startswith("RuntimeError('xxx") and errors[1].startswith("RuntimeError('yyy")

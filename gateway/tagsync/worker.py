"""The tag-sync worker: Kafka source -> tag rules -> per-user merge -> rate-limited OneSignal.

Two threads, each owning its state:

- the *consumer side* (the caller's thread, this module) polls the kafka-python consumer
  group, decodes records, applies the rules, and hands each event's tags to the delivery side;
  it tracks which offsets are done and commits only the contiguous done prefix per partition
  (:mod:`.offsets`). It never blocks on OneSignal: when too much is pending it pauses its
  partitions and keeps polling, so the group never sees it miss ``max_poll_interval_ms``.
- the *delivery side* (:mod:`.delivery`, an asyncio loop in a thread) merges, rate-limits,
  sends, retries, dead-letters, and reports each event's offset back as done.

An event is done when every request carrying its tags succeeded or was dead-lettered (or when
it needed no request). Whatever is not done is not committed and is replayed after a crash or
rebalance: at least once, never skipped. Updates set absolute values, so a replay is harmless.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any, TextIO

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

import gateway.tagsync.metrics as m
from gateway.config import Config, ConfigError, Secret
from gateway.core.records import UNAUTHENTICATED, KafkaRecord, decode_record
from gateway.kafka.clients import start_client
from gateway.tagsync.auth import ApiKeys
from gateway.tagsync.client import UpdateSender
from gateway.tagsync.coalesce import SourceRef
from gateway.tagsync.deadletters import (
    KafkaDeadLetterWriter,
    LogDeadLetterWriter,
    record_dead_letter,
)
from gateway.tagsync.delivery import Delivery, Update
from gateway.tagsync.fetcher_workaround import restore_parked_records
from gateway.tagsync.hold import CAUGHT_UP_SLACK
from gateway.tagsync.join_workaround import resume_abandoned_join
from gateway.tagsync.offsets import OffsetLedger, Offsets, RebalanceListener, partition_names
from gateway.tagsync.rules import CompiledRule, compile_rules, derive, event_order, resolve_alias
from gateway.tagsync.senders import make_sender
from gateway.tagsync.settings import DeliverySettings
from gateway.tagsync.turns import ReadTurns
from gateway.tracing import Tracing

__all__ = ["TagSyncWorker", "run_tag_sync"]

METADATA_MAX_AGE_MS = 15_000

log = logging.getLogger("gateway.tagsync.worker")

POLL_TIMEOUT_MS = 100

# (partition, offset, done already) for each record polled
Tracked = list[tuple[TopicPartition, int, bool]]


class TagSyncWorker:
    """One consumer-group member: the consumer loop, driving a :class:`~.delivery.Delivery`."""

    def __init__(
        self,
        config: Config,
        *,
        dry_run: bool = False,
        stop: threading.Event | None = None,
        out: TextIO | None = None,
        shutdown_timeout_s: float | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.cfg = config
        self.ts = config.tag_sync
        self.dry_run = dry_run
        self.stop = stop or threading.Event()
        self.shutdown_timeout_s = (
            config.tag_sync.shutdown_timeout_s if shutdown_timeout_s is None else shutdown_timeout_s
        )
        self.rules: tuple[CompiledRule, ...] = compile_rules(self.ts.rules)
        # the keys are re-read every auth_retry_s and on SIGHUP (request_key_reload)
        self.api_keys = ApiKeys(config.onesignal.apps, self.ts.auth_retry_s, time.monotonic())
        self._auth_paused: set[TopicPartition] = set()
        self.topics = self.ts.resolved_topics(
            config.kafka.topic, config.kafka.unauthenticated_topic
        )
        self._out = out
        self.offsets = OffsetLedger()
        # OpenTelemetry: each Update user request continues the trace of its events
        self.tracing = tracing
        if self.tracing is None and config.tracing.enabled:
            self.tracing = Tracing(config.tracing, "tag-sync")
        self._pending_dead_letters: list[tuple[KafkaRecord, str, SourceRef]] = []
        self._paused = False
        # Behind a backlog, a few partitions are read at a time (turns.py), from how far each
        # partition is read (the next offset) and its high watermark.
        self._turns = ReadTurns(
            self.ts.catch_up_partitions,
            behind_by=max(CAUGHT_UP_SLACK, self.ts.max_poll_records),
            slack=CAUGHT_UP_SLACK,
        )
        self.consumer: Any = None
        self.producer: Any = None
        self.delivery: Delivery | None = None
        # Pause above this many consumed-but-not-done events (resume below half). Merging needs
        # read-ahead: a user's events fold into one request only if they are all pending when
        # the user's turn comes, and a backlog waits for the app's rate anyway. About 200 bytes
        # each (offset, source ref, a share of the merged tags): 100k is ~20 MB.
        high = max(self.ts.max_pending_events, 4 * self.ts.max_poll_records)
        self._pause_above = high
        self._resume_below = high // 2

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
        self._announce_apps()
        opts = self.cfg.kafka.client_options()
        if not self.dry_run:
            self.producer = KafkaProducer(
                **opts,
                acks="all",
                linger_ms=5,
                request_timeout_ms=self.cfg.kafka.request_timeout_ms,
                max_block_ms=max(self.cfg.kafka.max_block_ms, 5000),
            )
        self.delivery = Delivery(
            DeliverySettings.from_config(self.ts, self.cfg.onesignal.api_url),
            self._make_sender,
            LogDeadLetterWriter() if self.dry_run else KafkaDeadLetterWriter(self.producer),
            self.offsets.done,
            tracing=self.tracing,
        )
        self.delivery.start()
        self.consumer = start_client(
            KafkaConsumer,
            **opts,
            group_id=self.ts.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.ts.max_poll_records,
            session_timeout_ms=self.ts.session_timeout_ms,
            heartbeat_interval_ms=self.ts.heartbeat_interval_ms,
            # kafka-python's default (300 s) is also how long it waits for a JoinGroup answer
            # (plus 5 s), and how long the coordinator waits for members to rejoin: a join
            # left hanging would stall the worker, silently, for five minutes. This loop polls
            # every 100 ms and blocks at most for a commit's request timeout (30 s).
            max_poll_interval_ms=self.ts.max_poll_interval_ms,
            # a topic created moments before the group formed has no partitions in the
            # assignor's view, and kafka-python only looks again at the next metadata refresh
            # (5 minutes by default): until then nothing of it is read
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
            **(
                {"group_instance_id": self.ts.group_instance_id}
                if self.ts.group_instance_id
                else {}
            ),
        )
        listener = RebalanceListener(self.release_partitions, self.consumer, dry_run=self.dry_run)
        self.consumer.subscribe(list(self.topics), listener=listener)
        log.info(
            "tag sync started",
            extra={"topics": list(self.topics), "group_id": self.ts.group_id, "dry": self.dry_run},
        )
        code = 0
        try:
            self._loop()
        except Exception:
            log.exception("tag sync failed")
            code = 1
        finally:
            self._shutdown()
        return code

    def _announce_apps(self) -> None:
        for app in self.cfg.onesignal.apps:
            if app.api_key is None:
                log.warning(
                    "no API key for app; its events will be dead-lettered",
                    extra={"app_id": app.app_id, "api_key_source": app.api_key_source},
                )
            else:
                m.AUTH_FAILING.labels(app.app_id).set(0)
        if not self.rules:
            log.warning("tag_sync.rules is empty: events are consumed and committed, nothing sent")

    def _make_sender(self) -> UpdateSender:
        return make_sender(self.cfg, self.api_keys.keys, dry_run=self.dry_run, out=self._out)

    def _loop(self) -> None:
        assert self.delivery is not None
        while not self.stop.is_set():
            if not self.delivery.alive:
                raise RuntimeError(f"tag-sync sink stopped: {self.delivery.error!r}")
            self.offsets.collect_done()
            self.offsets.maybe_commit(
                self.consumer, time.monotonic(), force=False, dry_run=self.dry_run
            )
            self.api_keys.maybe_reread(time.monotonic(), self._apply_key)
            self._flow_control()
            polled = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
            if polled:
                self._handle_polled(polled)

    def _shutdown(self) -> None:
        log.info("tag sync stopping")
        if self.delivery is not None:
            self.delivery.close(self.shutdown_timeout_s)
        if self.consumer is not None:
            self.offsets.collect_done()
            self.offsets.maybe_commit(
                self.consumer, time.monotonic(), force=True, dry_run=self.dry_run
            )
            try:
                self.consumer.close()  # the listener commits on revoke as well
            except Exception as exc:
                log.warning("consumer close failed", extra={"error": repr(exc)[:300]})
        if self.producer is not None:
            self.producer.close(timeout=5)
        if self.tracing is not None:
            self.tracing.shutdown()  # exports the spans still batched
        log.info("tag sync stopped")

    # -- API keys -----------------------------------------------------------------------------

    def request_key_reload(self) -> None:
        """Re-read every app's API key now and probe refused apps at once (SIGHUP)."""
        self.api_keys.request_reload()

    def _apply_key(self, app_id: str, key: Secret | None, probe: bool) -> None:
        assert self.delivery is not None
        self.delivery.set_api_key(app_id, key, probe=probe)

    # -- records ------------------------------------------------------------------------------

    def _handle_polled(self, polled: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Track every offset first (under one lock), then hand the updates over at once."""
        assert self.delivery is not None
        updates: list[Update] = []
        tracked: Tracked = []
        for tp, records in polled.items():
            m.EVENTS.labels(tp.topic).inc(len(records))
            for record in records:
                update = self._handle(tp, record, tracked)
                if update is not None:
                    updates.append(update)
        # the consumer's position: past any transaction markers and compacted gaps that
        # follow the last record (known for every partition just polled: no I/O)
        reached = self.offsets.track(
            tracked,
            lambda: {tp: self.consumer.position(tp) for tp, records in polled.items() if records},
        )
        if updates:
            self.delivery.submit_many(updates)
        # after the updates (one FIFO): how far each partition is now read, for the hold policy
        highwater = self.consumer.highwater
        self.delivery.report_progress(
            {(tp.topic, tp.partition): (pos, highwater(tp)) for tp, pos in reached.items()},
            paused=self._paused,
        )
        # dead letters go after the tracking above: their completion must find the offset
        for record, reason, src in self._pending_dead_letters:
            self.delivery.submit_dead_letter(record, reason, src)
        self._pending_dead_letters.clear()

    def _handle(self, tp: TopicPartition, record: Any, tracked: Tracked) -> Update | None:
        """Decode, derive and route one record; its offset goes to ``tracked`` (done or not)."""
        try:
            attrs, event = decode_record(record.headers or [], record.value)
        except ValueError as exc:
            m.SKIPPED.labels("undecodable").inc()
            log.warning(
                "record is not a normalized CloudEvent; skipped",
                extra={
                    "topic": tp.topic,
                    "partition": tp.partition,
                    "offset": record.offset,
                    "error": str(exc)[:200],
                },
            )
            tracked.append((tp, record.offset, True))
            return None
        derivation = derive(
            self.rules, event, authenticated=attrs.get("authtype") != UNAUTHENTICATED
        )
        for skip in derivation.skipped:
            m.TEMPLATE_MISSING.labels(skip.rule_key).inc()
            log.debug("tag skipped", extra={"rule": skip.rule_key, "missing_field": skip.field})
        if not derivation.tags:
            if derivation.matched:
                reason = "no-tags"
            elif derivation.unauthenticated:
                reason = "unauthenticated"  # rules matched, but none accepts such events
            else:
                reason = "no-rule"
            m.SKIPPED.labels(reason).inc()
            tracked.append((tp, record.offset, True))
            return None
        app_id = event.get("app_id")
        trace = None
        if self.tracing is not None and (parent := attrs.get("traceparent")):
            trace = (parent, attrs.get("tracestate", ""))
        src = SourceRef(tp.topic, tp.partition, record.offset, trace)
        if not isinstance(app_id, str) or app_id not in self.api_keys.keys:
            tracked.append((tp, record.offset, False))
            self._dead_letter_record(record, app_id, src)
            return None
        alias = resolve_alias(event, self.ts.alias_label)
        if alias is None:
            m.SKIPPED.labels("no-alias").inc()
            tracked.append((tp, record.offset, True))
            return None
        m.DERIVED.inc(len(derivation.tags))
        tracked.append((tp, record.offset, False))
        return (alias, derivation.tags, (event_order(event), record.offset), src)

    def _dead_letter_record(self, record: Any, app_id: object, src: SourceRef) -> None:
        """An event for an app without a configured API key: dead-lettered after the poll."""
        reason = "unknown-app" if app_id not in self.api_keys.known_apps else "no-api-key"
        dead = record_dead_letter(
            self.ts.dead_letter_topic,
            reason=reason,
            detail=f"no OneSignal app with an API key is configured for app_id {app_id!r}",
            source=src,
            key=record.key,
            value=record.value,
            headers=record.headers or [],
        )
        self._pending_dead_letters.append((dead, reason, src))

    # -- partitions ---------------------------------------------------------------------------

    def release_partitions(self, tps: set[TopicPartition], *, commit: bool = True) -> Offsets:
        """Revoked or lost: stop tracking them; return what is done, to commit (revoked)."""
        self.offsets.collect_done()
        if self.delivery is not None and self.delivery.alive:
            self.delivery.forget_partitions([(tp.topic, tp.partition) for tp in tps])
        return self.offsets.release(tps, commit=commit)

    def _flow_control(self) -> None:
        """Pause and resume partitions: backpressure, refused keys, reading turns."""
        outstanding = self.offsets.outstanding()
        if not self._paused and outstanding > self._pause_above:
            self._set_paused(True, outstanding)
        elif self._paused and outstanding < self._resume_below:
            self._set_paused(False, outstanding)
        # (a rebalance may assign new partitions, unpaused: this pauses them too)
        assignment = self.consumer.assignment()
        auth = self._auth_blocked(assignment)
        # (a partition paused for a key cannot finish a reading turn: no turns for those)
        want = set(assignment) if self._paused else self._waiting_turn(assignment - auth) | auth
        have = self.consumer.paused()
        if want - have:
            self.consumer.pause(*(want - have))
        if have - want:
            self.consumer.resume(*(have - want))
        restore_parked_records(self.consumer)  # before every poll: see fetcher_workaround.py
        if resume_abandoned_join(self.consumer):  # see join_workaround.py
            log.warning("resumed a group join that kafka-python had left unfinished")

    def _set_paused(self, paused: bool, outstanding: int) -> None:
        self._paused = paused
        assert self.delivery is not None
        self.delivery.report_progress({}, paused=paused)  # held users count towards the pause
        m.PAUSED.set(1 if paused else 0)
        if paused:
            log.info("paused: too many pending updates", extra={"pending": outstanding})
        else:
            log.info("resumed", extra={"pending": outstanding})

    def _auth_blocked(self, assignment: set[TopicPartition]) -> set[TopicPartition]:
        """Partitions holding updates of an app whose key OneSignal refuses: reading on would
        only pile up records that cannot be committed past the held one."""
        assert self.delivery is not None
        blocked = self.delivery.auth_blocked
        auth = {tp for tp in assignment if (tp.topic, tp.partition) in blocked}
        if auth != self._auth_paused:
            if auth - self._auth_paused:
                log.warning(
                    "paused partitions holding updates of an app whose API key is refused",
                    extra={"partitions": partition_names(auth - self._auth_paused)},
                )
            if self._auth_paused - auth:
                log.info(
                    "resumed partitions: the API key is accepted again",
                    extra={"partitions": partition_names(self._auth_paused - auth)},
                )
            self._auth_paused = auth
            m.AUTH_PAUSED_PARTITIONS.set(len(auth))
        return auth

    def _waiting_turn(self, assignment: set[TopicPartition]) -> set[TopicPartition]:
        """Behind a backlog, the partitions whose reading turn has not come (see turns.py)."""
        read = self.offsets.read_positions()
        waiting = self._turns.plan(sorted(assignment), read, self.consumer.highwater)
        return {tp for tp in waiting if isinstance(tp, TopicPartition)}


# ---------------------------------------------------------------------------------------------
# entry point


def run_tag_sync(
    config: Config,
    *,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    out: TextIO | None = None,
    shutdown_timeout_s: float | None = None,
    tracing: Tracing | None = None,
) -> int:
    """Run the worker until ``stop`` is set (or SIGTERM/SIGINT in the main thread).

    Returns 0 after a clean shutdown, 1 after a failure, 2 for invalid rules.
    """
    stop = stop or threading.Event()
    if dry_run:
        # a group of its own: a dry run must not take partitions from the real workers (it
        # commits nothing, so it reads from the start of the topics every time)
        dry = dataclasses.replace(
            config.tag_sync,
            group_id=f"{config.tag_sync.group_id}.dry-run",
            group_instance_id="",
            metrics_port=0,
        )
        config = dataclasses.replace(config, tag_sync=dry)
    try:
        worker = TagSyncWorker(
            config,
            dry_run=dry_run,
            stop=stop,
            out=out,
            shutdown_timeout_s=shutdown_timeout_s,
            tracing=tracing,
        )
    except ConfigError as exc:
        log.error("invalid tag_sync configuration: %s", exc, extra={"key": exc.key})
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.tag_sync.metrics_port:
        try:
            m.serve_metrics(config.tag_sync.metrics_port, config.tag_sync.metrics_host)
        except OSError as exc:
            log.warning("metrics server not started", extra={"error": str(exc)})
    restore: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal received; shutting down", extra={"signal": signum})
            stop.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            log.info("SIGHUP: re-reading the API keys", extra={"signal": signum})
            worker.request_key_reload()

        for sig in (signal.SIGTERM, signal.SIGINT):
            restore[sig] = signal.signal(sig, on_signal)
        restore[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    try:
        return worker.run()
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)

"""The tag-sync worker: Kafka source -> tag rules -> per-user merge -> rate-limited OneSignal sink.

Two threads, each owning its state:

- the *source* (the caller's thread) polls the kafka-python consumer group, decodes records,
  applies the rules, and hands each event's tags to the sink; it tracks which offsets are
  done and commits only the contiguous done prefix per partition. It never blocks on
  OneSignal: when too much is pending it pauses its partitions and keeps polling, so the
  group never sees it miss ``max_poll_interval_ms``.
- the *sink* (an asyncio loop in a thread) merges updates per user within the flush
  window, waits for the user's and the app's rate limits, sends (:mod:`.http1`), retries with
  backoff, dead-letters what cannot succeed, and reports each event's offset back as done.

An event is done when every request carrying its tags succeeded or was dead-lettered (or when
it needed no request). Whatever is not done is not committed and is replayed after a crash or
rebalance: at least once, never skipped. Updates set absolute values, so a replay is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import random
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol, TextIO

import orjson
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener

from gateway.config import Config, ConfigError, Secret, TagSyncConfig, read_api_key
from gateway.core.records import KafkaRecord, decode_record
from gateway.logs import register_secrets
from gateway.tagsync import metrics as m
from gateway.tagsync.client import (
    DryRunSender,
    OneSignalClient,
    Response,
    UpdateSender,
    env_proxy_for,
    update_body,
    update_url,
)
from gateway.tagsync.coalesce import Batch, Coalescer, OffsetTracker, SourceRef
from gateway.tagsync.http1 import Http1Client
from gateway.tagsync.ratelimit import (
    AppLimiter,
    Outcome,
    Slot,
    UserLimiter,
    backoff_delay,
    classify,
    parse_retry_after,
)
from gateway.tagsync.rules import (
    Alias,
    CompiledRule,
    TagValue,
    compile_rules,
    derive,
    event_order,
    resolve_alias,
)
from gateway.tagsync.turns import ReadTurns

__all__ = ["DeadLetterWriter", "TagSyncWorker", "run_tag_sync"]

log = logging.getLogger("gateway.tagsync.worker")

# One event's update for the sink: (user, tags, (event time, offset), where it came from).
Update = tuple[Alias, Mapping[str, TagValue], tuple[float, int], SourceRef]

# A user's window may stretch to this many flush windows while the partition its events come
# from is still being read (see Sink._hold).
MAX_HOLD_WINDOWS = 10
# A partition within this many offsets of its high watermark is read as it comes (live
# traffic: Sink._hold does not hold its users), and one within this many of where its
# reading turn ends has had its turn (turns.py). A held user is released only once the
# partition is read to its target exactly: progress is the consumer's position, which moves
# past transaction markers and compacted gaps, so no slack is needed there.
CAUGHT_UP_SLACK = 8
COMMIT_INTERVAL_S = 0.2
POLL_TIMEOUT_MS = 100
MAX_DLT_BODY = 1000


# ---------------------------------------------------------------------------------------------
# dead letters


class DeadLetterWriter(Protocol):
    """Blocking write of one dead-letter record; raises when it was not acknowledged."""

    def write(self, record: KafkaRecord) -> None: ...


class KafkaDeadLetterWriter:
    def __init__(self, producer: KafkaProducer, timeout_s: float = 10.0) -> None:
        self.producer = producer
        self.timeout_s = timeout_s

    def write(self, record: KafkaRecord) -> None:
        future = self.producer.send(
            record.topic, key=record.key, value=record.value, headers=record.headers
        )
        future.get(timeout=self.timeout_s)


class LogDeadLetterWriter:
    """Dry run: say what would be dead-lettered, write nothing."""

    def write(self, record: KafkaRecord) -> None:
        log.warning(
            "dry run: would dead-letter",
            extra={"topic": record.topic, "headers": {k: v.decode() for k, v in record.headers}},
        )


def _source_headers(sources: Sequence[SourceRef]) -> list[tuple[str, bytes]]:
    """dlq_source_topic / _partition / _offsets, once per source partition."""
    by_tp: dict[tuple[str, int], list[int]] = {}
    for s in sources:
        by_tp.setdefault((s.topic, s.partition), []).append(s.offset)
    headers: list[tuple[str, bytes]] = []
    for (topic, partition), offsets in sorted(by_tp.items()):
        headers.append(("dlq_source_topic", topic.encode()))
        headers.append(("dlq_source_partition", str(partition).encode()))
        headers.append(("dlq_source_offsets", ",".join(map(str, sorted(offsets))).encode()))
    return headers


def update_dead_letter(
    topic: str,
    api_url: str,
    alias: Alias,
    tags: Mapping[str, TagValue],
    *,
    reason: str,
    response: Response,
    attempts: int,
    sources: Sequence[SourceRef],
    delete_value: str,
) -> KafkaRecord:
    """A failed update: the request it was (never the key) as the value, the why in headers."""
    value = {
        "reason": reason,
        "method": "PATCH",
        "url": update_url(api_url, alias),
        "app_id": alias.app_id,
        "alias_label": alias.label,
        "alias_id": alias.id,
        "body": update_body(tags, delete_value),
        "status": response.status,
        "response": response.body[:MAX_DLT_BODY],
        "error": response.error,
        "attempts": attempts,
    }
    headers = [
        ("dlq_reason", reason.encode()),
        ("dlq_status", str(response.status or "").encode()),
        ("dlq_response", response.body[:MAX_DLT_BODY].encode()),
        ("dlq_error", response.error.encode()),
        ("dlq_attempts", str(attempts).encode()),
        ("dlq_app_id", alias.app_id.encode()),
        ("dlq_alias_label", alias.label.encode()),
        *_source_headers(sources),
        ("content-type", b"application/json"),
    ]
    return KafkaRecord(
        topic=topic, key=alias.id.encode(), value=orjson.dumps(value), headers=headers
    )


def record_dead_letter(
    topic: str,
    *,
    reason: str,
    detail: str,
    source: SourceRef,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
) -> KafkaRecord:
    """An event we cannot act on: the original record, with the why and where in headers."""
    out = [
        ("dlq_reason", reason.encode()),
        ("dlq_detail", detail[:MAX_DLT_BODY].encode()),
        *_source_headers([source]),
    ]
    out.extend((k, v or b"") for k, v in headers if not k.startswith("dlq_"))
    return KafkaRecord(topic=topic, key=key, value=value or b"", headers=out)


# ---------------------------------------------------------------------------------------------
# the sink: asyncio loop in its own thread


@dataclass(frozen=True, slots=True)
class SinkSettings:
    flush_interval_s: float
    max_keys: int
    per_user_interval_s: float
    app_rate_limit: float
    max_concurrency: int
    max_attempts: int
    backoff_base_s: float
    backoff_cap_s: float
    max_retry_elapsed_s: float
    dead_letter_topic: str
    delete_value: str
    api_url: str
    auth_retry_s: float = 30.0

    @classmethod
    def from_config(cls, ts: TagSyncConfig, api_url: str) -> SinkSettings:
        return cls(
            flush_interval_s=ts.flush_interval_s,
            max_keys=ts.max_keys_per_request,
            per_user_interval_s=ts.per_user_interval_s,
            app_rate_limit=ts.app_rate_limit,
            max_concurrency=ts.max_concurrency,
            max_attempts=ts.max_attempts,
            backoff_base_s=ts.backoff_base_s,
            backoff_cap_s=ts.backoff_cap_s,
            max_retry_elapsed_s=ts.max_retry_elapsed_s,
            dead_letter_topic=ts.dead_letter_topic,
            delete_value=ts.delete_value,
            api_url=api_url,
            auth_retry_s=ts.auth_retry_s,
        )


@dataclass(slots=True)
class _AuthGate:
    """One app whose API key OneSignal refused (401/403): its updates wait, none is
    dead-lettered. One held request at a time probes the key, every ``auth_retry_s`` or as
    soon as a re-read key differs; the app's other users are parked, and the partitions
    their events came from are reported to the source, which pauses them."""

    failing: bool = False
    probing: bool = False
    next_probe: float = 0.0
    generation: int = 0  # bumped when the key changes, so a probe with the old key is stale
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    parked: dict[Alias, None] = field(default_factory=dict)
    partitions: set[tuple[str, int]] = field(default_factory=set)


class Sink:
    """Merges, rate-limits, sends and dead-letters; reports done offsets to ``done``."""

    def __init__(
        self,
        settings: SinkSettings,
        make_sender: Callable[[], UpdateSender],
        dead_letters: DeadLetterWriter,
        done: queue.SimpleQueue[Sequence[SourceRef]],
        rng: random.Random | None = None,
    ) -> None:
        self.s = settings
        self._make_sender = make_sender
        self._dlt = dead_letters
        self._done = done
        self._rng = rng or random.Random()  # jitter, not crypto
        self._coalescer = Coalescer(settings.flush_interval_s, settings.max_keys)
        self._users = UserLimiter(settings.per_user_interval_s)
        self._apps: dict[str, AppLimiter] = {}
        self._max_active = max(16, settings.max_concurrency * 4)
        # Read progress per source partition, (next offset, high watermark), from the source;
        # users held until their partition is read up to a target offset; see _hold.
        self._progress: dict[tuple[str, int], tuple[int, int | None]] = {}
        self._held: dict[tuple[str, int], deque[tuple[int, float, Alias]]] = {}
        self._held_once: set[Alias] = set()
        self._source_paused = False
        self._max_hold_s = MAX_HOLD_WINDOWS * settings.flush_interval_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._deadline = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._sem: asyncio.Semaphore | None = None
        self._sender: UpdateSender | None = None
        self._auth: dict[str, _AuthGate] = {}
        # Partitions holding updates of an app whose key is refused: the source pauses them.
        # Replaced whole (never mutated), so the source thread reads it without a lock.
        self.auth_blocked: frozenset[tuple[str, int]] = frozenset()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tagsync-sink", daemon=True)
        self.error: BaseException | None = None

    # -- called from the source thread ----------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("tag-sync sink did not start")

    def submit(
        self, alias: Alias, tags: Mapping[str, TagValue], order: tuple[float, int], src: SourceRef
    ) -> None:
        self.submit_many([(alias, tags, order, src)])

    def submit_many(self, updates: Sequence[Update]) -> None:
        """Many events' updates in one hand-over (one loop wake-up per poll, not per event)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._accept_many, updates)

    def report_progress(
        self, progress: Mapping[tuple[str, int], tuple[int, int | None]], *, paused: bool
    ) -> None:
        """How far each partition is read, and whether the source paused (from the source)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._accept_progress, dict(progress), paused)

    def forget_partitions(self, partitions: Sequence[tuple[str, int]]) -> None:
        """Revoked or lost: nobody reads them here any more, so hold nobody for them."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._accept_forget, list(partitions))

    def set_api_key(self, app_id: str, key: Secret | None, *, probe: bool = False) -> None:
        """A re-read key for the app (None: unchanged); a new key, or ``probe``, makes a
        refused app try its held update now instead of at the next ``auth_retry_s``."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._accept_key, app_id, key, probe)

    def submit_dead_letter(self, record: KafkaRecord, reason: str, src: SourceRef) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._accept_dead_letter, record, reason, src)

    def close(self, timeout_s: float) -> None:
        """Send what is pending (within the limits) for up to ``timeout_s``, then stop."""
        if self._loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._begin_drain, timeout_s)
        self._thread.join(timeout_s + 10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by the source loop
            self.error = exc
            log.exception("tag-sync sink failed")
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(self.s.max_concurrency)
        self._sender = self._make_sender()
        self._started.set()
        try:
            await self._schedule()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._sender.aclose()

    async def _schedule(self) -> None:
        assert self._wake is not None
        while True:
            now = time.monotonic()
            self._dispatch(now)
            # users parked behind a refused key cannot be sent: shutdown does not wait for them
            parked = sum(len(gate.parked) for gate in self._auth.values()) if self._auth else 0
            if self._draining and (
                (len(self._coalescer) <= parked and not self._tasks) or now >= self._deadline
            ):
                if len(self._coalescer) or self._tasks:
                    log.warning(
                        "shutdown: giving up unfinished updates (they will be replayed)",
                        extra={
                            "pending_users": len(self._coalescer),
                            "tasks": len(self._tasks),
                            "auth_parked_users": parked,
                        },
                    )
                return
            timeout: float | None = None
            # At max_active nothing more can start until a task ends (which wakes us): a
            # timeout from the due users would spin this loop, taking the GIL from the reader.
            due: float | None = None
            expiry: float | None = None
            if len(self._tasks) < self._max_active:
                due = self._coalescer.next_due()
                expiry = self._next_hold_expiry() if self._held else None
            if expiry is not None and (due is None or expiry < due):
                due = expiry
            if due is not None:
                timeout = max(0.0, due - now)
            if self._draining:
                timeout = min(timeout if timeout is not None else 1e9, self._deadline - now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _dispatch(self, now: float) -> None:
        if self._held:
            self._release_held(now)
        due = self._coalescer.pop_due(now)
        while len(self._tasks) < self._max_active:
            alias = next(due, None)
            if alias is None:
                break
            gate = self._auth.get(alias.app_id)
            if gate is not None and gate.failing:
                gate.parked[alias] = None  # back to the due queue once the key works
                self._block(gate, self._coalescer.sources(alias))
                continue
            wait = self._users.wait(alias, now)
            if wait > 0:
                self._coalescer.defer(alias, now + wait)
                continue
            if self._hold(alias, now):
                continue
            self._held_once.discard(alias)
            self._spawn(self._run_batch(self._coalescer.take(alias)))

    def _hold(self, alias: Alias, now: float) -> bool:
        """Keep a due user back while the partition of its events is still being read.

        Behind a backlog (a restart, an outage, a slow consumer), a user's later events are
        often still unread when its window closes; sending now would cost a second request
        from the app's budget (1,000/s) a moment later. So the user waits until its
        partition is read up to where its end was when the window closed (or for
        ``MAX_HOLD_WINDOWS`` windows in all). Once per pending update, so a steady stream
        cannot chase it; never while the source is paused (held events count towards the
        pause) or shutting down. Live traffic, read as it comes, is held for a poll at most.
        """
        if self._source_paused or self._draining or alias in self._held_once:
            return False
        src = self._coalescer.last_source(alias)
        first_at = self._coalescer.first_at(alias)
        if src is None or first_at is None or now - first_at >= self._max_hold_s:
            return False
        key = (src.topic, src.partition)
        read = self._progress.get(key)
        if read is None or read[1] is None or read[1] - read[0] <= CAUGHT_UP_SLACK:
            return False
        self._held_once.add(alias)
        self._held.setdefault(key, deque()).append((read[1], first_at + self._max_hold_s, alias))
        return True

    def _release_held(self, now: float, everyone: bool = False) -> None:
        """Back to the due queue: users whose partition is read far enough, or held long
        enough (held in order, so the oldest are at the front)."""
        defer = self._coalescer.defer
        for key in list(self._held):
            held = self._held[key]
            read = self._progress.get(key)
            while held:
                target, until, alias = held[0]
                if everyone or read is None or read[0] >= target or until <= now:
                    held.popleft()
                    defer(alias, now)
                else:
                    break
            if not held:
                del self._held[key]

    def _next_hold_expiry(self) -> float | None:
        fronts = [held[0][1] for held in self._held.values() if held]
        return min(fronts) if fronts else None

    def _accept_progress(
        self, progress: dict[tuple[str, int], tuple[int, int | None]], paused: bool
    ) -> None:
        self._progress.update(progress)
        self._source_paused = paused
        if self._held:
            self._release_held(time.monotonic(), everyone=paused)
            assert self._wake is not None
            self._wake.set()

    def _accept_forget(self, partitions: list[tuple[str, int]]) -> None:
        for key in partitions:
            self._progress.pop(key, None)
        if self._held:
            self._release_held(time.monotonic())
            assert self._wake is not None
            self._wake.set()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("tag-sync task failed", exc_info=task.exception())
        assert self._wake is not None
        self._wake.set()

    def _accept_many(self, updates: Sequence[Update]) -> None:
        now = time.monotonic()
        add = self._coalescer.add
        superseded = 0
        dropped: list[SourceRef] = []
        for alias, tags, order, src in updates:
            result = add(alias, tags, order, src, now)
            superseded += result.superseded
            if not result.attached:
                dropped.append(src)
            elif self._auth:
                gate = self._auth.get(alias.app_id)
                if gate is not None and gate.failing:
                    self._block(gate, (src,))
        if superseded:
            m.COALESCED.inc(superseded)
        if dropped:
            m.SKIPPED.labels("superseded").inc(len(dropped))
            self._done.put(dropped)
        assert self._wake is not None
        self._wake.set()

    def _accept_dead_letter(self, record: KafkaRecord, reason: str, src: SourceRef) -> None:
        async def write() -> None:
            await self._write_dead_letter(record, reason)
            self._done.put((src,))

        self._spawn(write())

    def _begin_drain(self, timeout_s: float) -> None:
        self._draining = True
        self._deadline = time.monotonic() + timeout_s
        self._coalescer.flush_interval_s = 0.0
        now = time.monotonic()
        self._release_held(now, everyone=True)
        for alias in self._coalescer.drain():
            self._coalescer.defer(alias, now)
        for gate in self._auth.values():
            self._signal(gate)  # requests waiting for a working key give up
        assert self._wake is not None
        self._wake.set()

    # -- refused keys (401/403) ---------------------------------------------------------------

    @staticmethod
    def _signal(gate: _AuthGate) -> None:
        """Wake every request waiting on the gate (they look at it again)."""
        gate.changed.set()
        gate.changed = asyncio.Event()

    def _block(self, gate: _AuthGate, sources: Iterable[SourceRef]) -> None:
        before = len(gate.partitions)
        gate.partitions.update((src.topic, src.partition) for src in sources)
        if len(gate.partitions) != before:
            self._publish_blocked()

    def _publish_blocked(self) -> None:
        self.auth_blocked = frozenset(
            key for gate in self._auth.values() if gate.failing for key in gate.partitions
        )

    def _auth_refused(self, alias: Alias, batch: Batch, resp: Response, probe: int | None) -> None:
        """A 401/403. ``probe``: the gate's generation when this request probed, else None."""
        now = time.monotonic()
        gate = self._auth.get(alias.app_id)
        if gate is None:
            gate = self._auth[alias.app_id] = _AuthGate()
        if not gate.failing:
            gate.failing = True
            gate.next_probe = now + self.s.auth_retry_s
            m.AUTH_FAILING.labels(alias.app_id).set(1)
            log.warning(
                "OneSignal refuses the app's API key; its updates wait for a working key",
                extra={
                    "app_id": alias.app_id,
                    "status": resp.status,
                    "retry_in_s": self.s.auth_retry_s,
                },
            )
            # what the app already has pending: its partitions are paused too
            for user in self._coalescer.users():
                if user.app_id == alias.app_id:
                    gate.partitions.update(
                        (src.topic, src.partition) for src in self._coalescer.sources(user)
                    )
        elif probe is not None:
            gate.probing = False
            # a key that changed while the probe was out is tried at once
            stale = probe != gate.generation
            gate.next_probe = now if stale else now + self.s.auth_retry_s
            m.AUTH_PROBES.labels("refused").inc()
            log.info(
                "API key still refused",
                extra={"app_id": alias.app_id, "status": resp.status, "stale_key": stale},
            )
        self._block(gate, batch.sources)
        self._publish_blocked()
        self._signal(gate)

    def _auth_accepted(self, app_id: str) -> None:
        """A probe got an answer other than 401/403: the key works; release what waited."""
        gate = self._auth.get(app_id)
        if gate is None or not gate.failing:
            return
        gate.failing = False
        gate.probing = False
        m.AUTH_FAILING.labels(app_id).set(0)
        m.AUTH_PROBES.labels("accepted").inc()
        log.info(
            "the app's API key is accepted again; sending its held updates",
            extra={"app_id": app_id, "parked_users": len(gate.parked)},
        )
        now = time.monotonic()
        for alias in gate.parked:
            self._coalescer.defer(alias, now)
        gate.parked.clear()
        gate.partitions.clear()
        self._publish_blocked()
        self._signal(gate)
        assert self._wake is not None
        self._wake.set()

    def _probe_unanswered(self, app_id: str) -> None:
        """A probe without an HTTP answer (transport error): nothing learnt; next probe on
        the timer, so waiting requests do not take turns hammering a dead connection."""
        gate = self._auth.get(app_id)
        if gate is not None and gate.failing:
            gate.probing = False
            gate.next_probe = time.monotonic() + self.s.auth_retry_s
            self._signal(gate)

    def _accept_key(self, app_id: str, key: Secret | None, probe: bool) -> None:
        if key is not None:
            assert self._sender is not None
            self._sender.set_api_key(app_id, key)
        gate = self._auth.get(app_id)
        if gate is None:
            return
        if key is not None:
            gate.generation += 1
        if gate.failing and (probe or key is not None):
            gate.next_probe = time.monotonic()
            self._signal(gate)

    async def _auth_turn(self, batch: Batch) -> bool | int:
        """Before each attempt: True to send (the key is not refused), the gate's generation
        to send as the app's probe, False to give up (shutting down while refused)."""
        gate = self._auth.get(batch.alias.app_id)
        while gate is not None and gate.failing:
            if self._draining:
                return False
            self._block(gate, batch.sources)
            now = time.monotonic()
            if not gate.probing and now >= gate.next_probe:
                gate.probing = True
                return gate.generation
            changed = gate.changed
            timeout = None if gate.probing else gate.next_probe - now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()
        return True

    # -- one user's batch -------------------------------------------------------------------

    async def _run_batch(self, batch: Batch) -> None:
        try:
            for chunk in batch.chunks:
                if not await self._deliver(batch, chunk):
                    return  # given up at shutdown: not done, so replayed
            self._done.put(batch.sources)
        finally:
            self._coalescer.finish(batch.alias, time.monotonic())

    def _app(self, app_id: str) -> AppLimiter:
        limiter = self._apps.get(app_id)
        if limiter is None:
            limiter = self._apps[app_id] = AppLimiter(self.s.app_rate_limit)
        return limiter

    async def _wait_turn(self, alias: Alias, app: AppLimiter) -> Slot:
        while True:
            now = time.monotonic()
            wait = self._users.wait(alias, now)
            if wait <= 0:
                got = app.reserve(now)
                if not isinstance(got, float):
                    return got
                wait = got
            await asyncio.sleep(wait)

    async def _deliver(self, batch: Batch, chunk: Mapping[str, TagValue]) -> bool:
        """Send one chunk until it succeeded or was dead-lettered (True), or until shutdown
        came while the app's key was refused (False)."""
        assert self._sem is not None and self._sender is not None
        alias = batch.alias
        app = self._app(alias.app_id)
        first = time.monotonic()
        attempt = 0
        while True:
            turn = await self._auth_turn(batch)
            if turn is False:
                return False
            probe = None if turn is True else int(turn)
            async with self._sem:
                # The slot is taken before the app's window, so what the window admits is
                # sent at once: the limit holds as the server sees it.
                slot = await self._wait_turn(alias, app)
                gate = self._auth.get(alias.app_id)
                if probe is None and gate is not None and gate.failing:
                    # refused while this waited for its turn: back to the gate, unsent
                    app.release(slot, time.monotonic())
                    continue
                m.IN_FLIGHT.inc()
                try:
                    resp = await self._sender.update_user(alias, chunk)
                finally:
                    m.IN_FLIGHT.dec()
                    answered = time.monotonic()
                    app.release(slot, answered)
                    self._users.mark(alias, answered)
            attempt += 1
            m.REQUEST_SECONDS.observe(resp.elapsed_s)
            outcome = Outcome.RETRY if resp.status is None else classify(resp.status)
            status = str(resp.status) if resp.status is not None else "none"
            m.REQUESTS.labels("error" if resp.status is None else outcome.value, status).inc()
            if outcome is Outcome.AUTH:
                # not the update's fault: it waits for a working key, however long, and the
                # wait counts against neither max_attempts nor max_retry_elapsed_s
                self._auth_refused(alias, batch, resp, probe)
                attempt, first = 0, time.monotonic()
                continue
            if probe is not None:
                if resp.status is None:
                    self._probe_unanswered(alias.app_id)
                else:
                    self._auth_accepted(alias.app_id)
            if outcome is Outcome.OK:
                app.success()
                return True
            fields = {
                "app_id": alias.app_id,
                "alias_label": alias.label,
                "status": resp.status,
                "attempt": attempt,
                "error": resp.error,
            }
            if outcome is Outcome.PERMANENT:
                log.warning("update rejected; dead-lettering", extra=fields)
                await self._dead_letter_update(batch, chunk, f"http-{resp.status}", resp, attempt)
                return True
            now = time.monotonic()
            retry_after = parse_retry_after(resp.retry_after)
            delay = backoff_delay(
                attempt - 1, self.s.backoff_base_s, self.s.backoff_cap_s, self._rng
            )
            if retry_after is not None:
                delay = max(delay, retry_after)
            app.throttle(now, delay)  # the whole app waits, not only this request
            if attempt >= self.s.max_attempts or now - first + delay > self.s.max_retry_elapsed_s:
                log.warning("retries exhausted; dead-lettering", extra=fields)
                await self._dead_letter_update(batch, chunk, "retries-exhausted", resp, attempt)
                return True
            m.RETRIED.labels("timeout" if resp.status is None else status).inc()
            log.info("update will be retried", extra={**fields, "delay_s": round(delay, 3)})
            await asyncio.sleep(delay)

    async def _dead_letter_update(
        self,
        batch: Batch,
        chunk: Mapping[str, TagValue],
        reason: str,
        resp: Response,
        attempts: int,
    ) -> None:
        record = update_dead_letter(
            self.s.dead_letter_topic,
            self.s.api_url,
            batch.alias,
            chunk,
            reason=reason,
            response=resp,
            attempts=attempts,
            sources=batch.sources,
            delete_value=self.s.delete_value,
        )
        await self._write_dead_letter(record, reason)

    async def _write_dead_letter(self, record: KafkaRecord, reason: str) -> None:
        """Until Kafka takes it: the offset is committed only after it did."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                await loop.run_in_executor(None, self._dlt.write, record)
            except Exception as exc:
                delay = backoff_delay(attempt, 0.5, 30.0, self._rng)
                attempt += 1
                log.error(
                    "dead-letter write failed; retrying",
                    extra={"reason": reason, "error": repr(exc)[:300], "delay_s": delay},
                )
                await asyncio.sleep(delay)
                continue
            m.DEAD_LETTERED.labels(reason).inc()
            return


# ---------------------------------------------------------------------------------------------
# the source: kafka-python consumer group in the caller's thread


class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    """Runs on kafka-python's IO loop: commit what is done on revoke, forget on lost."""

    def __init__(self, worker: TagSyncWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        offsets = self.worker.release_partitions(revoked)
        if offsets and not self.worker.dry_run:
            try:
                await self.worker.consumer.commit_async(offsets)
                m.COMMITTED.inc()
            except Exception as exc:
                log.warning("commit on revoke failed", extra={"error": repr(exc)[:300]})
        log.info("partitions revoked", extra={"partitions": _names(revoked)})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": _names(assigned)})

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.worker.release_partitions(lost, commit=False)
        log.warning(
            "partitions lost; their pending work will be replayed",
            extra={"partitions": _names(lost)},
        )


def _names(tps: set[TopicPartition] | Sequence[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)


class TagSyncWorker:
    """One consumer-group member: the source loop, driving a :class:`Sink`."""

    def __init__(
        self,
        config: Config,
        *,
        dry_run: bool = False,
        stop: threading.Event | None = None,
        out: TextIO | None = None,
        shutdown_timeout_s: float | None = None,
    ) -> None:
        self.cfg = config
        self.ts = config.tag_sync
        self.dry_run = dry_run
        self.stop = stop or threading.Event()
        self.shutdown_timeout_s = (
            config.tag_sync.shutdown_timeout_s if shutdown_timeout_s is None else shutdown_timeout_s
        )
        self.rules: tuple[CompiledRule, ...] = compile_rules(self.ts.rules)
        self.keys: dict[str, Secret] = {
            a.app_id: a.api_key for a in config.onesignal.apps if a.api_key is not None
        }
        self.known_apps = {a.app_id for a in config.onesignal.apps}
        # the keys are re-read every auth_retry_s and on SIGHUP (request_key_reload)
        register_secrets(k.reveal() for k in self.keys.values())
        self._reload_keys = threading.Event()
        self._next_key_read = time.monotonic() + self.ts.auth_retry_s
        self._auth_paused: set[TopicPartition] = set()
        self.topics = self.ts.resolved_topics(config.kafka.topic)
        self._out = out
        self._lock = threading.Lock()
        self._tracker = OffsetTracker()
        self._done: queue.SimpleQueue[Sequence[SourceRef]] = queue.SimpleQueue()
        self._done_upto: dict[TopicPartition, int] = {}
        self._pending_dead_letters: list[tuple[KafkaRecord, str, SourceRef]] = []
        self._committed: dict[TopicPartition, int] = {}
        self._last_commit = 0.0
        self._paused = False
        # Behind a backlog, a few partitions are read at a time (turns.py), from how far each
        # partition is read (the next offset) and its high watermark.
        self._next_offset: dict[TopicPartition, int] = {}
        self._turns = ReadTurns(
            self.ts.catch_up_partitions,
            behind_by=max(CAUGHT_UP_SLACK, self.ts.max_poll_records),
            slack=CAUGHT_UP_SLACK,
        )
        self.consumer: Any = None
        self.producer: Any = None
        self.sink: Sink | None = None
        # Pause above this many consumed-but-not-done events (resume below half). Merging needs
        # read-ahead: a user's events fold into one request only if they are all pending when
        # the user's turn comes, and a backlog waits for the app's rate anyway. About 200 bytes
        # each (offset, source ref, a share of the merged tags): 100k is ~20 MB.
        high = max(self.ts.max_pending_events, 4 * self.ts.max_poll_records)
        self._pause_above = high
        self._resume_below = high // 2

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
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
        opts = self.cfg.kafka.client_options()
        if not self.dry_run:
            self.producer = KafkaProducer(
                **opts,
                acks="all",
                linger_ms=5,
                request_timeout_ms=self.cfg.kafka.request_timeout_ms,
                max_block_ms=max(self.cfg.kafka.max_block_ms, 5000),
            )
        settings = SinkSettings.from_config(self.ts, self.cfg.onesignal.api_url)
        self.sink = Sink(
            settings,
            self._make_sender,
            LogDeadLetterWriter() if self.dry_run else KafkaDeadLetterWriter(self.producer),
            self._done,
        )
        self.sink.start()
        self.consumer = KafkaConsumer(
            **opts,
            group_id=self.ts.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.ts.max_poll_records,
            session_timeout_ms=self.ts.session_timeout_ms,
            heartbeat_interval_ms=self.ts.heartbeat_interval_ms,
            **(
                {"group_instance_id": self.ts.group_instance_id}
                if self.ts.group_instance_id
                else {}
            ),
        )
        self.consumer.subscribe(list(self.topics), listener=_Listener(self))
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

    def _make_sender(self) -> UpdateSender:
        if self.dry_run:
            return DryRunSender(
                self.cfg.onesignal.api_url, delete_value=self.ts.delete_value, out=self._out
            )
        api_url = self.cfg.onesignal.api_url
        proxy = env_proxy_for(api_url)
        if self.ts.http_client == "httpx" or proxy is not None:
            # httpx speaks to proxies (CONNECT for https); the lean client does not
            if proxy is not None:
                log.info("an environment proxy applies to onesignal.api_url: using httpx")
            return OneSignalClient(
                api_url,
                self.keys,
                timeout_s=self.cfg.onesignal.timeout_s,
                max_connections=self.ts.max_concurrency,
                delete_value=self.ts.delete_value,
            )
        return Http1Client(
            api_url,
            self.keys,
            timeout_s=self.cfg.onesignal.timeout_s,
            max_connections=self.ts.max_concurrency,
            delete_value=self.ts.delete_value,
        )

    def _loop(self) -> None:
        assert self.sink is not None
        while not self.stop.is_set():
            if not self.sink.alive:
                raise RuntimeError(f"tag-sync sink stopped: {self.sink.error!r}")
            self._collect_done()
            self._maybe_commit()
            self._maybe_reread_keys()
            self._flow_control()
            polled = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
            if polled:
                self._handle_polled(polled)

    def _handle_polled(self, polled: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Track every offset first (under one lock), then hand the updates over at once."""
        assert self.sink is not None
        updates: list[Update] = []
        tracked: list[tuple[TopicPartition, int, bool]] = []
        for tp, records in polled.items():
            m.EVENTS.labels(tp.topic).inc(len(records))
            for record in records:
                update = self._handle(tp, record, tracked)
                if update is not None:
                    updates.append(update)
        with self._lock:
            add = self._tracker.add
            for tp, offset, done in tracked:
                add(tp, offset, done=done)
            # the consumer's position: past any transaction markers and compacted gaps that
            # follow the last record (known for every partition just polled: no I/O)
            reached = {tp: self.consumer.position(tp) for tp, records in polled.items() if records}
            self._next_offset.update(reached)
        if updates:
            self.sink.submit_many(updates)
        # after the updates (one FIFO): how far each partition is now read, for Sink._hold
        highwater = self.consumer.highwater
        self.sink.report_progress(
            {(tp.topic, tp.partition): (pos, highwater(tp)) for tp, pos in reached.items()},
            paused=self._paused,
        )
        # dead letters go after the tracking above: their completion must find the offset
        for record, reason, src in self._pending_dead_letters:
            self.sink.submit_dead_letter(record, reason, src)
        self._pending_dead_letters.clear()

    def _shutdown(self) -> None:
        log.info("tag sync stopping")
        if self.sink is not None:
            self.sink.close(self.shutdown_timeout_s)
        if self.consumer is not None:
            self._collect_done()
            self._maybe_commit(force=True)
            try:
                self.consumer.close()  # the listener commits on revoke as well
            except Exception as exc:
                log.warning("consumer close failed", extra={"error": repr(exc)[:300]})
        if self.producer is not None:
            self.producer.close(timeout=5)
        log.info("tag sync stopped")

    # -- API keys -----------------------------------------------------------------------------

    def request_key_reload(self) -> None:
        """Re-read every app's API key now and probe refused apps at once (SIGHUP)."""
        self._reload_keys.set()

    def _maybe_reread_keys(self) -> None:
        now = time.monotonic()
        asked = self._reload_keys.is_set()
        if not asked and now < self._next_key_read:
            return
        self._reload_keys.clear()
        self._next_key_read = now + self.ts.auth_retry_s
        assert self.sink is not None
        for app in self.cfg.onesignal.apps:
            current = self.keys.get(app.app_id)
            if current is None:
                continue  # no key at start-up: its events are dead-lettered (see _handle)
            try:
                key = read_api_key(app)
            except (OSError, ValueError) as exc:
                log.warning(
                    "cannot re-read the app's API key; keeping the one in use",
                    extra={
                        "app_id": app.app_id,
                        "api_key_source": app.api_key_source,
                        "error": type(exc).__name__,
                    },
                )
                key = None
            changed = key is not None and key != current
            if changed:
                assert key is not None
                register_secrets([key.reveal()])  # before anything could log it
                self.keys[app.app_id] = key
                m.KEY_RELOADS.labels(app.app_id).inc()
                log.info(
                    "the app's API key changed; using the new one",
                    extra={"app_id": app.app_id, "api_key_source": app.api_key_source},
                )
            if changed or asked:
                self.sink.set_api_key(app.app_id, key if changed else None, probe=asked)

    # -- records ------------------------------------------------------------------------------

    def _handle(
        self, tp: TopicPartition, record: Any, tracked: list[tuple[TopicPartition, int, bool]]
    ) -> Update | None:
        """Decode, derive and route one record; its offset goes to ``tracked`` (done or not)."""
        try:
            _, event = decode_record(record.headers or [], record.value)
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
        derivation = derive(self.rules, event)
        for skip in derivation.skipped:
            m.TEMPLATE_MISSING.labels(skip.rule_key).inc()
            log.debug("tag skipped", extra={"rule": skip.rule_key, "missing_field": skip.field})
        if not derivation.tags:
            m.SKIPPED.labels("no-rule" if not derivation.matched else "no-tags").inc()
            tracked.append((tp, record.offset, True))
            return None
        app_id = event.get("app_id")
        src = SourceRef(tp.topic, tp.partition, record.offset)
        if not isinstance(app_id, str) or app_id not in self.keys:
            reason = "unknown-app" if app_id not in self.known_apps else "no-api-key"
            tracked.append((tp, record.offset, False))
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
            return None
        alias = resolve_alias(event, self.ts.alias_label)
        if alias is None:
            m.SKIPPED.labels("no-alias").inc()
            tracked.append((tp, record.offset, True))
            return None
        m.DERIVED.inc(len(derivation.tags))
        tracked.append((tp, record.offset, False))
        return (alias, derivation.tags, (event_order(event), record.offset), src)

    # -- offsets ------------------------------------------------------------------------------

    def _collect_done(self) -> None:
        with self._lock:
            mark = self._tracker.mark_done
            while True:
                try:
                    sources = self._done.get_nowait()
                except queue.Empty:
                    break
                for src in sources:
                    mark(TopicPartition(src.topic, src.partition), src.offset)
            for tp in self._tracker.partitions():
                upto = self._tracker.committable(tp)
                if upto is not None:
                    self._done_upto[tp] = upto
            m.PENDING_EVENTS.set(self._tracker.outstanding())

    def release_partitions(
        self, tps: set[TopicPartition], *, commit: bool = True
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """Revoked or lost: stop tracking them; return what is done, to commit (revoked)."""
        self._collect_done()
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        with self._lock:
            if self.sink is not None and self.sink.alive:
                self.sink.forget_partitions([(tp.topic, tp.partition) for tp in tps])
            for tp in tps:
                upto = self._done_upto.pop(tp, None)
                if commit and upto is not None and upto > self._committed.get(tp, -1):
                    offsets[tp] = OffsetAndMetadata(upto, "", -1)
                self._committed.pop(tp, None)
                self._next_offset.pop(tp, None)
                self._tracker.drop(tp)
        return offsets

    def _maybe_commit(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        with self._lock:
            offsets = {
                tp: OffsetAndMetadata(upto, "", -1)
                for tp, upto in self._done_upto.items()
                if upto > self._committed.get(tp, -1)
            }
        if offsets and not self.dry_run:
            try:
                self.consumer.commit(offsets)
            except Exception as exc:  # rebalance in progress etc.: retried next time
                log.warning("offset commit failed", extra={"error": repr(exc)[:300]})
                return
            m.COMMITTED.inc()
            with self._lock:
                for tp, om in offsets.items():
                    self._committed[tp] = om.offset
        self._report_lag()

    def _report_lag(self) -> None:
        with self._lock:
            marks = dict(self._done_upto)
        for tp, upto in marks.items():
            high = self.consumer.highwater(tp)
            if high is not None:
                m.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - upto))

    def _flow_control(self) -> None:
        with self._lock:
            outstanding = self._tracker.outstanding()
        if not self._paused and outstanding > self._pause_above:
            self._paused = True
            assert self.sink is not None
            self.sink.report_progress({}, paused=True)  # held users count towards the pause
            m.PAUSED.set(1)
            log.info("paused: too many pending updates", extra={"pending": outstanding})
        elif self._paused and outstanding < self._resume_below:
            self._paused = False
            assert self.sink is not None
            self.sink.report_progress({}, paused=False)
            m.PAUSED.set(0)
            log.info("resumed", extra={"pending": outstanding})
        # (a rebalance may assign new partitions, unpaused: this pauses them too)
        assignment = self.consumer.assignment()
        # Partitions holding updates of an app whose key OneSignal refuses: reading on would
        # only pile up records that cannot be committed past the held one.
        assert self.sink is not None
        blocked = self.sink.auth_blocked
        auth = {tp for tp in assignment if (tp.topic, tp.partition) in blocked}
        if auth != self._auth_paused:
            if auth - self._auth_paused:
                log.warning(
                    "paused partitions holding updates of an app whose API key is refused",
                    extra={"partitions": _names(auth - self._auth_paused)},
                )
            if self._auth_paused - auth:
                log.info(
                    "resumed partitions: the API key is accepted again",
                    extra={"partitions": _names(self._auth_paused - auth)},
                )
            self._auth_paused = auth
            m.AUTH_PAUSED_PARTITIONS.set(len(auth))
        # (a partition paused for a key cannot finish a reading turn: no turns for those)
        want = set(assignment) if self._paused else self._waiting_turn(assignment - auth) | auth
        have = self.consumer.paused()
        if want - have:
            self.consumer.pause(*(want - have))
        if have - want:
            self.consumer.resume(*(have - want))
        _restore_parked_records(self.consumer)  # before every poll: see its docstring

    def _waiting_turn(self, assignment: set[TopicPartition]) -> set[TopicPartition]:
        """Behind a backlog, the partitions whose reading turn has not come (see turns.py)."""
        with self._lock:
            read = dict(self._next_offset)
        waiting = self._turns.plan(sorted(assignment), read, self.consumer.highwater)
        return {tp for tp in waiting if isinstance(tp, TopicPartition)}


def _restore_parked_records(consumer: Any) -> None:
    """Work around a kafka-python 3.0.x fetcher bug that strands a resumed partition.

    Records fetched for a partition that was paused meanwhile are parked, and the fetcher puts
    them back once the partition is resumed, but only when its in-line slot
    (``_next_partition_records``) is None. After a partition's records are drained the slot
    holds the drained, empty object instead, so the parked records are never put back, and the
    partition is never fetched again either (the fetcher skips partitions with parked data):
    reading stops for good. An empty slot means the same as None to the fetcher, so it is
    cleared here before every poll while anything is parked. Found by
    tests/test_tagsync_worker.py (reading in turns stalled in 4 runs out of 6); a no-op if the
    attributes are not there (other versions).
    """
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None or not getattr(fetcher, "_paused_partition_records", None):
        return
    in_line = getattr(fetcher, "_next_partition_records", None)
    if in_line is not None and not in_line:
        fetcher._next_partition_records = None


# ---------------------------------------------------------------------------------------------
# entry point


def run_tag_sync(
    config: Config,
    *,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    out: TextIO | None = None,
    shutdown_timeout_s: float | None = None,
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
            config, dry_run=dry_run, stop=stop, out=out, shutdown_timeout_s=shutdown_timeout_s
        )
    except ConfigError as exc:
        log.error("invalid tag_sync configuration: %s", exc, extra={"key": exc.key})
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.tag_sync.metrics_port:
        try:
            m.serve_metrics(config.tag_sync.metrics_port)
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

"""The delivery side of tag sync: an asyncio loop in its own thread, sending to OneSignal.

It merges updates per user within the flush window (:mod:`.coalesce`), holds a due user back
while its partition is still read (:mod:`.hold`), waits for the user's and the app's rate
limits (:mod:`.ratelimit`), sends through an :class:`~.client.UpdateSender`, retries with
backoff, waits out a refused API key (:mod:`.auth`), dead-letters what cannot succeed
(:mod:`.deadletters`), and reports each event's source offset back to the consumer side as
done: every request carrying its tags succeeded or was dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

import gateway.tagsync.metrics as m
from gateway.config import Secret
from gateway.core.records import KafkaRecord
from gateway.tagsync.auth import AuthGates
from gateway.tagsync.client import Response, UpdateSender
from gateway.tagsync.coalesce import Batch, Coalescer, SourceRef
from gateway.tagsync.deadletters import (
    DeadLetterWriter,
    update_dead_letter,
    write_until_acknowledged,
)
from gateway.tagsync.hold import HoldPolicy, PartitionKey, Progress
from gateway.tagsync.ratelimit import (
    AppLimiter,
    Outcome,
    Slot,
    UserLimiter,
    backoff_delay,
    classify,
    parse_retry_after,
)
from gateway.tagsync.rules import Alias, TagValue
from gateway.tagsync.settings import DeliverySettings
from gateway.tracing import Tracing

__all__ = ["Delivery", "Update"]

log = logging.getLogger("gateway.tagsync.worker")

# One event's update: (user, tags, (event time, offset), where it came from).
Update = tuple[Alias, Mapping[str, TagValue], tuple[float, int], SourceRef]


class Delivery:
    """Merges, rate-limits, sends and dead-letters; reports done offsets to ``done``.

    The public methods are called from the consumer's thread and hand over to the loop.
    """

    def __init__(
        self,
        settings: DeliverySettings,
        make_sender: Callable[[], UpdateSender],
        dead_letters: DeadLetterWriter,
        done: queue.SimpleQueue[Sequence[SourceRef]],
        rng: random.Random | None = None,
        *,
        tracing: Tracing | None = None,
    ) -> None:
        self.s = settings
        self._tracing = tracing
        self._make_sender = make_sender
        self._dlt = dead_letters
        self._done = done
        self._rng = rng or random.Random()  # jitter, not crypto
        self._coalescer = Coalescer(settings.flush_interval_s, settings.max_keys)
        self._users = UserLimiter(settings.per_user_interval_s)
        self._apps: dict[str, AppLimiter] = {}
        self._max_active = max(16, settings.max_concurrency * 4)
        self._holds = HoldPolicy(settings.flush_interval_s)
        self._auth = AuthGates(settings.auth_retry_s, time.monotonic)
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._deadline = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._sem: asyncio.Semaphore | None = None
        self._sender: UpdateSender | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tagsync-delivery", daemon=True)
        self.error: BaseException | None = None

    # -- called from the consumer's thread --------------------------------------------------

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
        self._call(self._accept_many, updates)

    def report_progress(self, progress: Mapping[PartitionKey, Progress], *, paused: bool) -> None:
        """How far each partition is read, and whether the source paused."""
        self._call(self._accept_progress, dict(progress), paused)

    def forget_partitions(self, partitions: Sequence[PartitionKey]) -> None:
        """Revoked or lost: nobody reads them here any more, so hold nobody for them."""
        self._call(self._accept_forget, list(partitions))

    def set_api_key(self, app_id: str, key: Secret | None, *, probe: bool = False) -> None:
        """A re-read key for the app (None: unchanged); a new key, or ``probe``, makes a
        refused app try its held update now instead of at the next ``auth_retry_s``."""
        self._call(self._accept_key, app_id, key, probe)

    def submit_dead_letter(self, record: KafkaRecord, reason: str, src: SourceRef) -> None:
        self._call(self._accept_dead_letter, record, reason, src)

    def close(self, timeout_s: float) -> None:
        """Send what is pending (within the limits) for up to ``timeout_s``, then stop."""
        if self._loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._begin_drain, timeout_s)
        self._thread.join(timeout_s + 10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def auth_blocked(self) -> frozenset[PartitionKey]:
        """Partitions holding updates of an app whose key is refused: the source pauses them."""
        return self._auth.blocked

    def holding(self, alias: Alias) -> bool:
        """Whether ``alias`` is held back while its partition is read (see :mod:`.hold`)."""
        return self._holds.holding(alias)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

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
            if self._draining and self._drained(now):
                return
            timeout = self._next_timeout(now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _drained(self, now: float) -> bool:
        """Draining: whether nothing is left that could still be sent, or time is up."""
        # users parked behind a refused key cannot be sent: shutdown does not wait for them
        parked = self._auth.parked()
        if not ((len(self._coalescer) <= parked and not self._tasks) or now >= self._deadline):
            return False
        if len(self._coalescer) or self._tasks:
            log.warning(
                "shutdown: giving up unfinished updates (they will be replayed)",
                extra={
                    "pending_users": len(self._coalescer),
                    "tasks": len(self._tasks),
                    "auth_parked_users": parked,
                },
            )
        return True

    def _next_timeout(self, now: float) -> float | None:
        """How long the loop may sleep when nothing wakes it (None: until woken)."""
        timeout: float | None = None
        # At max_active nothing more can start until a task ends (which wakes us): a
        # timeout from the due users would spin this loop, taking the GIL from the reader.
        due: float | None = None
        expiry: float | None = None
        if len(self._tasks) < self._max_active:
            due = self._coalescer.next_due()
            expiry = self._holds.next_expiry()
        if expiry is not None and (due is None or expiry < due):
            due = expiry
        if due is not None:
            timeout = max(0.0, due - now)
        if self._draining:
            timeout = min(timeout if timeout is not None else 1e9, self._deadline - now)
        return timeout

    def _dispatch(self, now: float) -> None:
        if self._holds:
            self._requeue(self._holds.release(now), now)
        due = self._coalescer.pop_due(now)
        while len(self._tasks) < self._max_active:
            alias = next(due, None)
            if alias is None:
                break
            gate = self._auth.refusing(alias.app_id)
            if gate is not None:
                self._auth.park(gate, alias, self._coalescer.sources(alias))
                continue
            wait = self._users.wait(alias, now)
            if wait > 0:
                self._coalescer.defer(alias, now + wait)
                continue
            last, first_at = self._coalescer.last_source(alias), self._coalescer.first_at(alias)
            if self._holds.hold(alias, last, first_at, now):
                continue
            self._holds.sent(alias)
            self._spawn(self._run_batch(self._coalescer.take(alias)))

    def _requeue(self, aliases: Iterable[Alias], now: float) -> None:
        """Back to the due queue."""
        defer = self._coalescer.defer
        for alias in aliases:
            defer(alias, now)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("tag-sync task failed", exc_info=task.exception())
        assert self._wake is not None
        self._wake.set()

    # -- hand-overs from the consumer's thread, run on the loop -------------------------------

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
            else:
                gate = self._auth.refusing(alias.app_id)
                if gate is not None:
                    self._auth.block(gate, (src,))
        if superseded:
            m.COALESCED.inc(superseded)
        if dropped:
            m.SKIPPED.labels("superseded").inc(len(dropped))
            self._done.put(dropped)
        assert self._wake is not None
        self._wake.set()

    def _accept_progress(self, progress: dict[PartitionKey, Progress], paused: bool) -> None:
        held = bool(self._holds)
        now = time.monotonic()
        self._requeue(self._holds.report(progress, paused=paused, now=now), now)
        if held:
            assert self._wake is not None
            self._wake.set()

    def _accept_forget(self, partitions: list[PartitionKey]) -> None:
        held = bool(self._holds)
        now = time.monotonic()
        self._requeue(self._holds.forget(partitions, now), now)
        if held:
            assert self._wake is not None
            self._wake.set()

    def _accept_key(self, app_id: str, key: Secret | None, probe: bool) -> None:
        if key is not None:
            assert self._sender is not None
            self._sender.set_api_key(app_id, key)
        self._auth.key_reread(app_id, changed=key is not None, probe=probe)

    def _accept_dead_letter(self, record: KafkaRecord, reason: str, src: SourceRef) -> None:
        async def write() -> None:
            await write_until_acknowledged(self._dlt, record, reason, self._rng)
            self._done.put((src,))

        self._spawn(write())

    def _begin_drain(self, timeout_s: float) -> None:
        self._draining = True
        self._deadline = time.monotonic() + timeout_s
        self._coalescer.flush_interval_s = 0.0
        now = time.monotonic()
        self._requeue(self._holds.drain(now), now)
        self._requeue(self._coalescer.drain(), now)
        self._auth.wake_all()  # requests waiting for a working key give up
        assert self._wake is not None
        self._wake.set()

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

    def _pending_sources(self, app_id: str) -> Iterable[SourceRef]:
        """The sources of every update the app has pending."""
        for user in self._coalescer.users():
            if user.app_id == app_id:
                yield from self._coalescer.sources(user)

    async def _send_traced(
        self, batch: Batch, chunk: Mapping[str, TagValue], app: AppLimiter, probe: int | None
    ) -> Response | None:
        """``_send`` as a CLIENT span: the child of the newest event it carries, linked to
        the others, its context sent to OneSignal as ``traceparent``."""
        assert self._tracing is not None
        parents = [
            {"traceparent": src.trace[0], "tracestate": src.trace[1]}
            for src in batch.sources
            if src.trace is not None
        ]
        attributes = {
            "http.request.method": "PATCH",
            "onesignal.app_id": batch.alias.app_id,
            "gateway.tags": len(chunk),
            "gateway.events": len(batch.sources),
        }
        with self._tracing.client_span("PATCH onesignal update user", parents, attributes) as span:
            trace = self._tracing.current()
            resp = await self._send(batch.alias, chunk, app, probe, trace)
            if resp is not None:
                span.set_attribute("http.response.status_code", resp.status or 0)
            return resp

    async def _send(
        self,
        alias: Alias,
        chunk: Mapping[str, TagValue],
        app: AppLimiter,
        probe: int | None,
        trace: Mapping[str, str] | None = None,
    ) -> Response | None:
        """One attempt within the limits; None when the key was refused meanwhile (unsent)."""
        assert self._sem is not None and self._sender is not None
        async with self._sem:
            # The slot is taken before the app's window, so what the window admits is
            # sent at once: the limit holds as the server sees it.
            slot = await self._wait_turn(alias, app)
            if probe is None and self._auth.refusing(alias.app_id) is not None:
                # refused while this waited for its turn: back to the gate, unsent
                app.release(slot, time.monotonic())
                return None
            m.IN_FLIGHT.inc()
            try:
                if trace:
                    return await self._sender.update_user(alias, chunk, trace=trace)
                return await self._sender.update_user(alias, chunk)
            finally:
                m.IN_FLIGHT.dec()
                answered = time.monotonic()
                app.release(slot, answered)
                self._users.mark(alias, answered)

    async def _deliver(self, batch: Batch, chunk: Mapping[str, TagValue]) -> bool:
        """Send one chunk until it succeeded or was dead-lettered (True), or until shutdown
        came while the app's key was refused (False)."""
        alias = batch.alias
        app = self._app(alias.app_id)
        first = time.monotonic()
        attempt = 0
        while True:
            turn = await self._auth.turn(alias.app_id, batch.sources, lambda: self._draining)
            if turn is False:
                return False
            probe = None if turn is True else int(turn)
            if self._tracing is None:
                resp = await self._send(alias, chunk, app, probe)
            else:
                resp = await self._send_traced(batch, chunk, app, probe)
            if resp is None:
                continue
            attempt += 1
            m.REQUEST_SECONDS.observe(resp.elapsed_s)
            outcome = Outcome.RETRY if resp.status is None else classify(resp.status)
            status = str(resp.status) if resp.status is not None else "none"
            m.REQUESTS.labels("error" if resp.status is None else outcome.value, status).inc()
            if outcome is Outcome.AUTH:
                # not the update's fault: it waits for a working key, however long, and the
                # wait counts against neither max_attempts nor max_retry_elapsed_s
                self._auth.refused(alias, batch.sources, resp.status, probe, self._pending_sources)
                attempt, first = 0, time.monotonic()
                continue
            if probe is not None:
                self._probe_answered(alias.app_id, resp)
            if outcome is Outcome.OK:
                app.success()
                return True
            delay = await self._after_failure(batch, chunk, resp, outcome, attempt, first, app)
            if delay is None:
                return True  # dead-lettered
            await asyncio.sleep(delay)

    def _probe_answered(self, app_id: str, resp: Response) -> None:
        if resp.status is None:
            self._auth.unanswered(app_id)
            return
        parked = self._auth.accepted(app_id)
        if parked is not None:
            self._requeue(parked, time.monotonic())
            assert self._wake is not None
            self._wake.set()

    async def _after_failure(
        self,
        batch: Batch,
        chunk: Mapping[str, TagValue],
        resp: Response,
        outcome: Outcome,
        attempt: int,
        first: float,
        app: AppLimiter,
    ) -> float | None:
        """A failed attempt: dead-letter it (None), or the delay before the next one."""
        alias = batch.alias
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
            return None
        now = time.monotonic()
        retry_after = parse_retry_after(resp.retry_after)
        delay = backoff_delay(attempt - 1, self.s.backoff_base_s, self.s.backoff_cap_s, self._rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        app.throttle(now, delay)  # the whole app waits, not only this request
        if attempt >= self.s.max_attempts or now - first + delay > self.s.max_retry_elapsed_s:
            log.warning("retries exhausted; dead-lettering", extra=fields)
            await self._dead_letter_update(batch, chunk, "retries-exhausted", resp, attempt)
            return None
        m.RETRIED.labels("timeout" if resp.status is None else str(resp.status)).inc()
        log.info("update will be retried", extra={**fields, "delay_s": round(delay, 3)})
        return delay

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
        await write_until_acknowledged(self._dlt, record, reason, self._rng)

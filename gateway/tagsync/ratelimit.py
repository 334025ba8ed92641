"""Rate limits, backoff and response classification for calls to OneSignal.

Pure: every function takes ``now`` (monotonic seconds) or a random source, so the limits are
checked by unit and property tests, and the worker merely sleeps for what they return.

OneSignal's Update user limits are 1 request/s per user and 1,000 requests/s per app,
answered with 429 and ``Retry-After``. We keep below both:

- :class:`AppLimiter`: at most ``n`` requests in any window of ``n / rate`` seconds (a sliding
  window log, so it holds over *every* window, not only on average), plus a pause for the
  whole app after a 429/5xx and a multiplicative slow-down that recovers on success;
- :class:`UserLimiter`: at least ``interval`` between two requests for one user.

Both count from when a response came back, not from when the request left: the server
saw the request somewhere in between, so the limits hold at the server whatever the latency.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Hashable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum

__all__ = [
    "AppLimiter",
    "Outcome",
    "Slot",
    "UserLimiter",
    "backoff_delay",
    "classify",
    "parse_retry_after",
]


class Outcome(Enum):
    OK = "ok"
    RETRY = "retry"
    PERMANENT = "permanent"
    AUTH = "auth"


def classify(status: int) -> Outcome:
    """2xx done; 408/429/5xx retry; 401/403 the app's key is refused (the update waits for a
    working key); any other status will not get better by retrying."""
    if 200 <= status < 300:
        return Outcome.OK
    if status in (401, 403):
        return Outcome.AUTH
    if status in (408, 429) or status >= 500:
        return Outcome.RETRY
    return Outcome.PERMANENT


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        seconds = float(value)  # not RFC 9110, but some servers send "1.5"
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (attempt counts from 0)."""
    ceiling = min(cap, base * (2.0 ** min(attempt, 62)))
    return rng.uniform(0.0, ceiling)


# A reservation: its time is +inf while the request is in flight, then the response time.
Slot = list[float]


class AppLimiter:
    """A ceiling of ``rate`` requests/s for one app that holds over any window, server-side.

    A slot is taken when a request starts and its time is moved to when the response came
    (:meth:`release`). A request reaches the server between those two instants, so spacing
    the (n+1)-th start one window after the 1st *completion* keeps the arrivals too within
    the limit, whatever the network latency.
    """

    def __init__(self, rate: float, *, min_factor: float = 0.05) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.n = max(1, math.floor(rate))
        self.window = self.n / rate
        self.min_factor = min_factor
        self.factor = 1.0
        self.blocked_until = 0.0
        self._last_cut = -math.inf
        # When the requests of the last window were answered (sorted), and how many are out.
        # (A list rebuilt and sorted per call was O(n log n) for every wait of every request.)
        self._answered: list[float] = []
        self._in_flight = 0

    @property
    def allowance(self) -> int:
        """Requests allowed per window right now (lower after throttling)."""
        return max(1, math.floor(self.n * self.factor))

    def reserve(self, now: float) -> Slot | float:
        """A :class:`Slot` (send now, then :meth:`release` it), or seconds to wait."""
        if now < self.blocked_until:
            return self.blocked_until - now
        answered = self._answered
        expired = bisect.bisect_right(answered, now - self.window)
        if expired:
            del answered[:expired]
        allowance = self.allowance
        taken = len(answered) + self._in_flight
        if taken < allowance:
            self._in_flight += 1
            slot: Slot = [math.inf]
            return slot
        # The (taken - allowance + 1)-th earliest must leave the window first; in-flight
        # requests count as latest (their answer is still to come).
        k = taken - allowance
        if k < len(answered):
            return max(1e-3, answered[k] + self.window - now)
        return 0.05  # only in-flight requests would free a place: look again soon

    def release(self, slot: Slot, now: float) -> None:
        """The response for ``slot`` came at ``now``."""
        if math.isinf(slot[0]):
            self._in_flight -= 1
            bisect.insort(self._answered, now)
        slot[0] = now

    def throttle(self, now: float, pause_s: float) -> None:
        """OneSignal pushed back (429/5xx/timeout): pause the whole app and slow down."""
        self.blocked_until = max(self.blocked_until, now + pause_s)
        if now - self._last_cut >= self.window:  # one cut per window, not per failed request
            self._last_cut = now
            self.factor = max(self.min_factor, self.factor / 2)

    def success(self) -> None:
        """Recover the rate gradually (additive increase)."""
        if self.factor < 1.0:
            self.factor = min(1.0, self.factor + 1.0 / self.n)


class UserLimiter:
    """At least ``interval`` seconds between two requests for the same user, as the server
    sees them: counted from the previous *response*, which came after that request arrived."""

    def __init__(self, interval_s: float) -> None:
        self.interval = interval_s
        self._last: dict[Hashable, float] = {}
        self._checks = 0

    def ready_at(self, key: Hashable) -> float:
        last = self._last.get(key)
        return 0.0 if last is None else last + self.interval

    def wait(self, key: Hashable, now: float) -> float:
        return max(0.0, self.ready_at(key) - now)

    def mark(self, key: Hashable, now: float) -> None:
        """The response to a request for ``key`` came at ``now`` (one request per user at a
        time is the caller's job)."""
        self._last[key] = now
        self._checks += 1
        if self._checks % 4096 == 0:
            self.prune(now)

    def prune(self, now: float) -> None:
        """Forget users whose interval has passed (bounded memory)."""
        self._last = {k: t for k, t in self._last.items() if t + self.interval > now}

    def __len__(self) -> int:
        return len(self._last)

"""Rate limits, backoff and response classification for calls to OneSignal.

Pure: every function takes ``now`` (monotonic seconds) or a random source, so the limits are
checked by unit and property tests, and the worker merely sleeps for what they return.

OneSignal's Update user limits are 1 request/s per user and 1,000 requests/s per app,
answered with 429 and ``Retry-After``. We keep below both:

- :class:`AppLimiter`: at most ``n`` requests in any window of ``n / rate`` seconds (a sliding
  window log, so it holds over *every* window, not only on average), plus a pause for the
  whole app after a 429/5xx and a multiplicative slow-down that recovers on success;
- :class:`UserLimiter`: at least ``interval`` between two requests for one user.

Both add :data:`CLOCK_GUARD_S` so that network jitter between our clock and the server's
does not make two requests look closer together there than they were here.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Hashable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum

__all__ = [
    "CLOCK_GUARD_S",
    "AppLimiter",
    "Outcome",
    "UserLimiter",
    "backoff_delay",
    "classify",
    "parse_retry_after",
]

CLOCK_GUARD_S = 0.05


class Outcome(Enum):
    OK = "ok"
    RETRY = "retry"
    PERMANENT = "permanent"


def classify(status: int) -> Outcome:
    """2xx done; 408/429/5xx retry; any other status will not get better by retrying."""
    if 200 <= status < 300:
        return Outcome.OK
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


class AppLimiter:
    """A ceiling of ``rate`` requests/s for one app that holds over any window."""

    def __init__(
        self, rate: float, *, guard_s: float = CLOCK_GUARD_S, min_factor: float = 0.05
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.n = max(1, math.floor(rate))
        self.window = self.n / rate + guard_s
        self.min_factor = min_factor
        self.factor = 1.0
        self.blocked_until = 0.0
        self._sent: deque[float] = deque()

    @property
    def allowance(self) -> int:
        """Requests allowed per window right now (lower after throttling)."""
        return max(1, math.floor(self.n * self.factor))

    def reserve(self, now: float) -> float:
        """0.0 and the slot is taken, or the seconds to wait before asking again."""
        if now < self.blocked_until:
            return self.blocked_until - now
        while self._sent and self._sent[0] <= now - self.window:
            self._sent.popleft()
        allowance = self.allowance
        if len(self._sent) < allowance:
            self._sent.append(now)
            return 0.0
        # The (len - allowance + 1)-th oldest must leave the window first.
        oldest = self._sent[len(self._sent) - allowance]
        return max(1e-3, oldest + self.window - now)

    def throttle(self, now: float, pause_s: float) -> None:
        """OneSignal pushed back (429/5xx/timeout): pause the whole app and slow down."""
        self.blocked_until = max(self.blocked_until, now + pause_s)
        self.factor = max(self.min_factor, self.factor / 2)

    def success(self) -> None:
        """Recover the rate gradually (additive increase)."""
        if self.factor < 1.0:
            self.factor = min(1.0, self.factor + 1.0 / self.n)


class UserLimiter:
    """At least ``interval`` seconds between two requests for the same user."""

    def __init__(self, interval_s: float, *, guard_s: float = CLOCK_GUARD_S) -> None:
        self.interval = interval_s + guard_s if interval_s > 0 else 0.0
        self._last: dict[Hashable, float] = {}
        self._checks = 0

    def ready_at(self, key: Hashable) -> float:
        last = self._last.get(key)
        return 0.0 if last is None else last + self.interval

    def wait(self, key: Hashable, now: float) -> float:
        return max(0.0, self.ready_at(key) - now)

    def mark(self, key: Hashable, now: float) -> None:
        """A request for ``key`` starts now."""
        self._last[key] = now
        self._checks += 1
        if self._checks % 4096 == 0:
            self.prune(now)

    def prune(self, now: float) -> None:
        """Forget users whose interval has passed (bounded memory)."""
        self._last = {k: t for k, t in self._last.items() if t + self.interval > now}

    def __len__(self) -> int:
        return len(self._last)

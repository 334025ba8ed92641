"""Which due user to send now, and which to hold back while its partition is still read.

Behind a backlog (a restart, an outage, a slow consumer), a user's later events are often
still unread when its merge window closes; sending then would cost a second request from the
app's budget (1,000/s) a moment later. So a due user waits until its partition is read up to
where the partition ended when the window closed, or for ``MAX_HOLD_WINDOWS`` windows in all.
Once per pending update, so a steady stream cannot chase it; never while the source is paused
(held events count towards the pause) or the delivery is draining. Live traffic, read as it
comes, is held for a poll at most.

A pure state machine: the delivery side passes in ``now``, what the source reported (how far
each partition is read, its high watermark, whether the source paused) and, for a due user,
the last source of its pending events and when the first arrived. Released users go back to
the due queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from gateway.tagsync.coalesce import SourceRef
from gateway.tagsync.rules import Alias

__all__ = ["CAUGHT_UP_SLACK", "MAX_HOLD_WINDOWS", "HoldPolicy", "PartitionKey", "Progress"]

# A user's window may stretch to this many flush windows while the partition its events come
# from is still being read.
MAX_HOLD_WINDOWS = 10
# A partition within this many offsets of its high watermark is read as it comes (live
# traffic: its users are not held), and one within this many of where its reading turn ends
# has had its turn (turns.py). A held user is released only once the partition is read to its
# target exactly: progress is the consumer's position, which moves past transaction markers
# and compacted gaps, so no slack is needed there.
CAUGHT_UP_SLACK = 8

PartitionKey = tuple[str, int]
# How far a partition is read: (next offset, high watermark or None while unknown).
Progress = tuple[int, int | None]


class HoldPolicy:
    """Held users per source partition, in the order they were held."""

    def __init__(self, flush_interval_s: float) -> None:
        self.max_hold_s = MAX_HOLD_WINDOWS * flush_interval_s
        self._progress: dict[PartitionKey, Progress] = {}
        # per partition: (offset to be read up to, hold no later than, user), oldest first
        self._held: dict[PartitionKey, deque[tuple[int, float, Alias]]] = {}
        self._held_once: set[Alias] = set()
        self._source_paused = False
        self._draining = False

    def __bool__(self) -> bool:
        """Whether anyone is held."""
        return bool(self._held)

    def holding(self, alias: Alias) -> bool:
        """Whether ``alias`` is held (safe to ask from another thread: it copies)."""
        return any(a == alias for held in list(self._held.values()) for _, _, a in list(held))

    def hold(
        self, alias: Alias, last: SourceRef | None, first_at: float | None, now: float
    ) -> bool:
        """Hold the due ``alias`` (True), or let it be sent now (False).

        ``last``: the source of its latest pending event; ``first_at``: when its first pending
        event arrived (when its window opened).
        """
        if self._source_paused or self._draining or alias in self._held_once:
            return False
        if last is None or first_at is None or now - first_at >= self.max_hold_s:
            return False
        key = (last.topic, last.partition)
        read = self._progress.get(key)
        if read is None or read[1] is None or read[1] - read[0] <= CAUGHT_UP_SLACK:
            return False
        self._held_once.add(alias)
        self._held.setdefault(key, deque()).append((read[1], first_at + self.max_hold_s, alias))
        return True

    def sent(self, alias: Alias) -> None:
        """``alias``'s update went out: the next one may be held again."""
        self._held_once.discard(alias)

    def report(
        self, progress: Mapping[PartitionKey, Progress], *, paused: bool, now: float
    ) -> list[Alias]:
        """The source read this far (and paused, or not); returns the users it releases."""
        self._progress.update(progress)
        self._source_paused = paused
        return self.release(now, everyone=paused)

    def forget(self, partitions: Iterable[PartitionKey], now: float) -> list[Alias]:
        """Revoked or lost partitions: nobody reads them here any more, so hold nobody for
        them; returns the users that releases."""
        for key in partitions:
            self._progress.pop(key, None)
        return self.release(now)

    def drain(self, now: float) -> list[Alias]:
        """Shutting down: release everyone and hold nobody from now on."""
        self._draining = True
        return self.release(now, everyone=True)

    def release(self, now: float, *, everyone: bool = False) -> list[Alias]:
        """Users whose partition is read far enough, or who were held long enough (held in
        order, so the oldest are at the front); all of them with ``everyone``."""
        released: list[Alias] = []
        for key in list(self._held):
            held = self._held[key]
            read = self._progress.get(key)
            while held:
                target, until, alias = held[0]
                if everyone or read is None or read[0] >= target or until <= now:
                    held.popleft()
                    released.append(alias)
                else:
                    break
            if not held:
                del self._held[key]
        return released

    def next_expiry(self) -> float | None:
        """When the longest-held user must be released at the latest (None: nobody held)."""
        fronts = [held[0][1] for held in self._held.values() if held]
        return min(fronts) if fronts else None

"""Per-user merging of tag updates, and which Kafka offsets are safe to commit.

Both are pure state machines (time is passed in as ``now``), owned by one thread each:

- :class:`Coalescer` folds the tag values of many events for one user into one pending
  update; the newest event (by event time, then Kafka offset) wins per tag key. It remembers
  what it last handed out per user and key, so a late, older event never overwrites a newer
  value that was already sent.
- :class:`OffsetTracker` records, per partition, which offsets are done (sent or
  dead-lettered, or needing nothing) and gives the highest *contiguous* done offset, so a
  commit never skips an event whose update is still pending.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field

from gateway.tagsync.rules import Alias, TagValue

__all__ = ["AddResult", "Batch", "Coalescer", "OffsetTracker", "Order", "SourceRef"]

# (event time in Unix seconds, Kafka offset): newest wins.
Order = tuple[float, int]


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where an event came from: committed once every update it fed is done."""

    topic: str
    partition: int
    offset: int
    # the record's W3C trace context (traceparent, tracestate) when tracing is on
    trace: tuple[str, str] | None = field(default=None, compare=False)


@dataclass(slots=True)
class _Pending:
    first_at: float
    tags: dict[str, tuple[TagValue, Order]] = field(default_factory=dict)
    sources: list[SourceRef] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Batch:
    """One user's merged update, split into requests of at most ``max_keys`` tags."""

    alias: Alias
    chunks: tuple[Mapping[str, TagValue], ...]
    sources: tuple[SourceRef, ...]

    @property
    def tags(self) -> dict[str, TagValue]:
        merged: dict[str, TagValue] = {}
        for chunk in self.chunks:
            merged.update(chunk)
        return merged


@dataclass(frozen=True, slots=True)
class AddResult:
    """``attached``: the event waits for this user's next batch; ``superseded``: values
    that lost to a newer one (counted as coalesced)."""

    attached: bool
    superseded: int


class Coalescer:
    """Pending updates per user, released when their flush window has passed."""

    def __init__(self, flush_interval_s: float, max_keys: int, memory: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.flush_interval_s = flush_interval_s
        self.max_keys = max_keys
        self._memory = memory
        self._pending: dict[Alias, _Pending] = {}
        self._in_flight: set[Alias] = set()
        self._heap: list[tuple[float, int, Alias]] = []
        self._seq = itertools.count()
        # (alias, key) -> order of the newest value handed out, LRU-bounded.
        self._sent: OrderedDict[tuple[Alias, str], Order] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def add(
        self,
        alias: Alias,
        tags: Mapping[str, TagValue],
        order: Order,
        source: SourceRef,
        now: float,
    ) -> AddResult:
        superseded = 0
        pending = self._pending.get(alias)
        fresh: dict[str, TagValue] = {}
        for key, value in tags.items():
            sent = self._sent.get((alias, key))
            if sent is not None and sent > order:
                superseded += 1
                continue
            fresh[key] = value
        if not fresh and pending is None:
            return AddResult(attached=False, superseded=superseded)
        if pending is None:
            pending = _Pending(first_at=now)
            self._pending[alias] = pending
            if alias not in self._in_flight:
                heapq.heappush(self._heap, (now + self.flush_interval_s, next(self._seq), alias))
        for key, value in fresh.items():
            current = pending.tags.get(key)
            if current is not None:
                superseded += 1
                if current[1] > order:
                    continue
            pending.tags[key] = (value, order)
        pending.sources.append(source)
        return AddResult(attached=True, superseded=superseded)

    def first_at(self, alias: Alias) -> float | None:
        """When the user's pending update began (None: nothing pending)."""
        pending = self._pending.get(alias)
        return None if pending is None else pending.first_at

    def last_source(self, alias: Alias) -> SourceRef | None:
        """Where the user's newest pending event came from."""
        pending = self._pending.get(alias)
        return pending.sources[-1] if pending is not None and pending.sources else None

    def users(self) -> list[Alias]:
        """Every user with a pending update."""
        return list(self._pending)

    def sources(self, alias: Alias) -> tuple[SourceRef, ...]:
        """Where the user's pending events came from (empty: nothing pending)."""
        pending = self._pending.get(alias)
        return tuple(pending.sources) if pending is not None else ()

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Iterator[Alias]:
        """Users whose window has passed and that have no request in flight."""
        while self._heap and self._heap[0][0] <= now:
            _, _, alias = heapq.heappop(self._heap)
            if alias in self._pending and alias not in self._in_flight:
                yield alias

    def defer(self, alias: Alias, until: float) -> None:
        """Not yet (the user's rate limit): look again at ``until``."""
        if alias in self._pending:
            heapq.heappush(self._heap, (until, next(self._seq), alias))

    def take(self, alias: Alias) -> Batch:
        """Hand out the user's pending update; the user is in flight until :meth:`finish`."""
        pending = self._pending.pop(alias)
        self._in_flight.add(alias)
        items = sorted(pending.tags.items())
        for key, (_, order) in items:
            self._remember(alias, key, order)
        chunks = tuple(
            {k: v for k, (v, _) in items[i : i + self.max_keys]}
            for i in range(0, len(items), self.max_keys)
        )
        return Batch(alias=alias, chunks=chunks, sources=tuple(pending.sources))

    def finish(self, alias: Alias, now: float) -> None:
        """The user's batch is done; what arrived meanwhile waits out its own window."""
        self._in_flight.discard(alias)
        pending = self._pending.get(alias)
        if pending is not None:
            due = max(now, pending.first_at + self.flush_interval_s)
            heapq.heappush(self._heap, (due, next(self._seq), alias))

    def drain(self) -> list[Alias]:
        """Every user with a pending update and nothing in flight (shutdown: flush now)."""
        return [a for a in self._pending if a not in self._in_flight]

    def _remember(self, alias: Alias, key: str, order: Order) -> None:
        slot = (alias, key)
        old = self._sent.get(slot)
        if old is None or order > old:
            self._sent[slot] = order
        self._sent.move_to_end(slot)
        while len(self._sent) > self._memory:
            self._sent.popitem(last=False)


class OffsetTracker:
    """Done-ness of consumed offsets per partition; commits only a contiguous done prefix."""

    def __init__(self) -> None:
        self._order: dict[Hashable, deque[int]] = {}
        self._done: dict[Hashable, set[int]] = {}
        self._last: dict[Hashable, int] = {}

    def add(self, tp: Hashable, offset: int, *, done: bool = False) -> None:
        order = self._order.setdefault(tp, deque())
        last = self._last.get(tp)
        if last is not None and offset <= last:
            # The consumer went back (reset or re-assignment): what we knew no longer holds.
            order.clear()
            self._done[tp] = set()
        order.append(offset)
        self._last[tp] = offset
        if done:
            self._done.setdefault(tp, set()).add(offset)

    def mark_done(self, tp: Hashable, offset: int) -> None:
        if tp in self._order:
            self._done.setdefault(tp, set()).add(offset)

    def committable(self, tp: Hashable) -> int | None:
        """The offset to commit (next one to read), advancing past the done prefix; or None."""
        order = self._order.get(tp)
        done = self._done.get(tp)
        if not order or not done:
            return None
        last: int | None = None
        while order and order[0] in done:
            last = order.popleft()
            done.discard(last)
        return None if last is None else last + 1

    def outstanding(self, tp: Hashable | None = None) -> int:
        """Offsets consumed and not yet committable (all partitions when ``tp`` is None)."""
        if tp is not None:
            return len(self._order.get(tp, ()))
        return sum(len(o) for o in self._order.values())

    def partitions(self) -> list[Hashable]:
        return list(self._order)

    def drop(self, tp: Hashable) -> None:
        """Forget a partition (revoked or lost): later completions for it are ignored."""
        self._order.pop(tp, None)
        self._done.pop(tp, None)
        self._last.pop(tp, None)

"""A time-windowed set of event ids that were published and acknowledged.

Pure: the caller passes ``now``. An id enters the window only after Kafka acknowledged its
record, so a retry that follows a 503 is published, never swallowed. The window is per
process; dedupe across replicas happens downstream on the CloudEvents ``id``.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["SeenWindow"]


class SeenWindow:
    def __init__(self, window_s: float, max_entries: int) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def seen(self, event_id: str, now: float) -> bool:
        expiry = self._expiry.get(event_id)
        if expiry is None:
            return False
        if expiry <= now:
            del self._expiry[event_id]
            return False
        return True

    def add(self, event_id: str, now: float) -> None:
        if self.window_s <= 0 or self.max_entries <= 0:
            return
        self._expiry[event_id] = now + self.window_s
        self._expiry.move_to_end(event_id)
        self._evict(now)

    def _evict(self, now: float) -> None:
        # Insertion order is expiry order (constant window), so expired ids sit at the front.
        while self._expiry:
            first_id, first_expiry = next(iter(self._expiry.items()))
            if first_expiry > now and len(self._expiry) <= self.max_entries:
                break
            del self._expiry[first_id]

"""A time-windowed set of event ids that were published and acknowledged, in fixed memory.

Pure: the caller passes ``now``. An id enters the window only after Kafka acknowledged its
record, so a retry that follows a 503 is published, never swallowed. The window is per
process, and the ingress keeps one per source; dedupe across replicas happens downstream on
the CloudEvents ``id``.

Each id is held with a hash of its event kind. The same id with another kind is not a retry:
it is a template that hard-codes the id (or reuses one), and :meth:`SeenWindow.check` calls it
a ``conflict`` so that the caller publishes it and counts it instead of dropping a real event.
The window remembers the kind of the latest acknowledged record of each id.

Memory is allocated once, up front, and never grows: ``max_entries`` 64-bit id hashes in a ring
(oldest first, each with its expiry and its kind's 64-bit hash) and an open-addressing table
over them (linear probing, backward-shift deletion, so no tombstones accumulate). About 49
bytes an entry: 1M entries is ~49 MB, where a dict of id strings took ~195 bytes an entry and
grew with traffic. When the ring is full the oldest id leaves first, so under heavy traffic the
effective window is ``max_entries`` events rather than ``window_s`` seconds.

Ids are compared by a 64-bit hash. Two different ids colliding would make a new event look
like a duplicate; with 1M ids held the chance per event is about 5e-14.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Final

__all__ = ["CONFLICT", "DUPLICATE", "NEW", "SeenWindow"]

# What :meth:`SeenWindow.check` says of an id: not held (or expired), held with the same kind,
# held with another kind.
NEW: Final = "new"
DUPLICATE: Final = "duplicate"
CONFLICT: Final = "conflict"

_MASK64 = (1 << 64) - 1


def _hash64(event_id: str) -> int:
    # str hashes are cached on the object and seeded per process (which is all we need: the
    # window lives in one process); 0 marks an empty slot, so it is never a key
    return (hash(event_id) & _MASK64) or 1


def _kind_hash(kind: str) -> int:
    return hash(kind) & _MASK64


class SeenWindow:
    def __init__(
        self,
        window_s: float,
        max_entries: int,
        hash_fn: Callable[[str], int] = _hash64,
    ) -> None:
        self.window_s = window_s
        self.max_entries = max_entries if window_s > 0 else 0
        self._hash = hash_fn
        capacity = max(self.max_entries, 1)
        size = 1
        while size < 2 * capacity:  # load factor <= 0.5 keeps probe runs short
            size <<= 1
        self._mask = size - 1
        self._table = array("Q", bytes(8 * size))  # id hash, 0 = empty
        self._where = array("I", bytes(4 * size))  # ring position of the table's entry
        self._ring = array("Q", bytes(8 * capacity))  # id hash by age, 0 = empty
        self._expiry = array("d", bytes(8 * capacity))
        self._kind = array("Q", bytes(8 * capacity))  # hash of the id's latest kind
        self._next = 0  # ring position the next id takes
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _find(self, h: int) -> int:
        """The table slot holding ``h``, or -1."""
        table = self._table
        mask = self._mask
        slot = h & mask
        while True:
            held = table[slot]
            if held == h:
                return slot
            if held == 0:
                return -1
            slot = (slot + 1) & mask

    def seen(self, event_id: str, now: float) -> bool:
        if self.max_entries <= 0:
            return False
        slot = self._find(self._hash(event_id))
        return slot >= 0 and self._expiry[self._where[slot]] > now

    def check(self, event_id: str, kind: str, now: float) -> str:
        """:data:`NEW`, :data:`DUPLICATE` (same id, same kind) or :data:`CONFLICT`."""
        if self.max_entries <= 0:
            return NEW
        slot = self._find(self._hash(event_id))
        if slot < 0:
            return NEW
        pos = self._where[slot]
        if self._expiry[pos] <= now:
            return NEW
        return DUPLICATE if self._kind[pos] == _kind_hash(kind) else CONFLICT

    def add(self, event_id: str, now: float, kind: str = "") -> None:
        if self.max_entries <= 0:
            return
        h = self._hash(event_id)
        slot = self._find(h)
        if slot >= 0:  # seen before (perhaps expired): the window restarts from now
            pos = self._where[slot]
            self._expiry[pos] = now + self.window_s
            self._kind[pos] = _kind_hash(kind)
            return
        pos = self._next
        old = self._ring[pos]
        if old:
            self._delete(self._find(old))
            self._count -= 1
        self._ring[pos] = h
        self._expiry[pos] = now + self.window_s
        self._kind[pos] = _kind_hash(kind)
        self._insert(h, pos)
        self._count += 1
        self._next = (pos + 1) % self.max_entries

    def _insert(self, h: int, pos: int) -> None:
        table = self._table
        mask = self._mask
        slot = h & mask
        while table[slot]:
            slot = (slot + 1) & mask
        table[slot] = h
        self._where[slot] = pos

    def _delete(self, slot: int) -> None:
        """Empty ``slot`` and shift later members of its probe run back (no tombstones)."""
        table = self._table
        where = self._where
        mask = self._mask
        hole = slot
        probe = slot
        while True:
            probe = (probe + 1) & mask
            held = table[probe]
            if held == 0:
                break
            home = held & mask
            # the entry at `probe` may move into the hole unless its home lies cyclically
            # in (hole, probe]: then the hole is before where its search starts
            if (hole < probe and hole < home <= probe) or (
                hole > probe and (home > hole or home <= probe)
            ):
                continue
            table[hole] = held
            where[hole] = where[probe]
            hole = probe
        table[hole] = 0

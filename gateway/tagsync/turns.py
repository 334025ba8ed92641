"""Which partitions to read now, behind a backlog: a few at a time, in turns.

A user's merged update is final only once its partition is read past the user's last event;
until then the delivery side holds it (:mod:`.hold`), so one request carries all of it. Read
every partition side by side and each of them ends together at the very end of the backlog:
no user is final, and nothing is sent, until all of it is read. Read ``limit`` partitions at a
time and their users are final, and sent within the app's rate, while the next are read.

A pure state machine: the source passes in what it knows (the assignment, how far it read
each partition, their high watermarks) and pauses what :meth:`ReadTurns.plan` returns.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping

__all__ = ["ReadTurns"]


class ReadTurns:
    """At most ``limit`` *behind* partitions are read at a time, each up to where it ended
    when its turn began; the other behind partitions wait, in order, for theirs.

    A partition is behind when more than ``behind_by`` offsets lie between how far it was
    read and its high watermark; one not yet read from, or whose high watermark is not yet
    known, is not (it is read, and then known). A partition that is not behind is never held
    back, so traffic read as it arrives is not affected. A turn ends within ``slack`` offsets
    of its end; a partition still behind then (more arrived meanwhile) queues again at the
    back, so every behind partition gets its turn. ``limit`` 0: no turns, read everything.
    """

    def __init__(self, limit: int, behind_by: int, slack: int) -> None:
        self.limit = limit
        self.behind_by = behind_by
        self.slack = slack
        self._ends: dict[Hashable, int] = {}  # reading now -> where its turn ends
        self._queue: deque[Hashable] = deque()  # behind, waiting for a turn

    @property
    def reading(self) -> set[Hashable]:
        return set(self._ends)

    def plan(
        self,
        assignment: Iterable[Hashable],
        read: Mapping[Hashable, int],
        highwater: Callable[[Hashable], int | None],
    ) -> set[Hashable]:
        """The partitions not to read now (``read``: the next offset per partition)."""
        if self.limit <= 0:
            return set()
        assigned = list(assignment)
        mine = set(assigned)
        for tp, end in list(self._ends.items()):
            if tp not in mine or tp not in read or read[tp] >= end - self.slack:
                del self._ends[tp]  # turn over (or revoked)
        behind: set[Hashable] = set()
        queued = set(self._queue)
        for tp in assigned:
            high = highwater(tp)
            if high is None or tp not in read or high - read[tp] <= self.behind_by:
                continue
            behind.add(tp)
            if tp not in queued and tp not in self._ends:
                self._queue.append(tp)
        self._queue = deque(tp for tp in self._queue if tp in behind)
        while self._queue and len(self._ends) < self.limit:
            tp = self._queue.popleft()
            high = highwater(tp)
            self._ends[tp] = high if high is not None else read[tp]
        return set(self._queue)

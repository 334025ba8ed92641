"""A workaround for a kafka-python 3.0 coordinator bug that abandons a rebalance half-way.

A rebalance that the consumer starts because the metadata changed (a topic's partitions became
known, or their number changed) is driven by ``need_rejoin()``: this consumer's metadata no
longer matches the assignment it made. As group leader it computes the new assignment, and
from that moment ``need_rejoin()`` is False, while its SyncGroup is still on the wire. A poll
gives the join at most its own timeout (100 ms here). When the SyncGroup takes longer, the
poll returns, and the next one asks ``need_rejoin()`` again. Seeing False, it never awaits the
join again. Its assignment is dropped. The member stays "rebalancing" with heartbeats off, the
coordinator expels it after ``session_timeout_ms``, and the worker reads nothing, for good,
without a warning.

Tag sync meets it on a busy machine: a group formed before its consumer's first metadata
answer ("No partition metadata for topic") rebalances as soon as the metadata lands. So before
every poll, a join left in flight while nothing asks for one is asked for again
(``rejoin_needed``): the next poll awaits it, or starts a fresh one.

Only on the series known to have the bug, and only through the attributes checked in
tests/test_tagsync_join_workaround.py. An upgrade out of the series or a kafka-python without
them fails that test rather than silently losing the workaround.
"""

from __future__ import annotations

from typing import Any

from kafka.structs import MemberState

from gateway.tagsync.fetcher_workaround import kafka_python_version

__all__ = ["AFFECTED_SERIES", "APPLIES", "COORDINATOR_ATTRIBUTES", "resume_abandoned_join"]

# The kafka-python (major, minor) series whose coordinator abandons such a join.
AFFECTED_SERIES = ((3, 0),)
# What this module reads and writes on ``KafkaConsumer._coordinator``.
COORDINATOR_ATTRIBUTES = ("state", "_join_task", "rejoin_needed", "need_rejoin")

APPLIES = kafka_python_version()[:2] in AFFECTED_SERIES


def resume_abandoned_join(consumer: Any) -> bool:
    """Before a poll: ask again for a join left in flight that nothing asks for any more.

    Returns whether it did. A no-op outside :data:`AFFECTED_SERIES`.
    """
    if not APPLIES:
        return False
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or getattr(coordinator, "_join_task", None) is None:
        return False
    if coordinator.state is not MemberState.REBALANCING or coordinator.need_rejoin():
        return False
    # (racing the IO thread is harmless: at worst one more join round)
    coordinator.rejoin_needed = True
    return True

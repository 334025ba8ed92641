"""A workaround for a kafka-python 3.0 fetcher bug that strands a resumed partition.

Records fetched for a partition that was paused meanwhile are parked, and the fetcher puts
them back once the partition is resumed, but only when its in-line slot
(``_next_partition_records``) is None. After a partition's records are drained the slot holds
the drained, empty object instead, so the parked records are never put back, and the
partition is never fetched again either (the fetcher skips partitions with parked data):
reading stops for good. An empty slot means the same as None to the fetcher, so it is cleared
before every poll while anything is parked.

Tag sync pauses and resumes partitions all the time (backpressure, reading turns, refused
keys), so it meets the bug; tests/test_tagsync_worker.py's reading in turns exercises it. This
module is the only place that touches the fetcher's private attributes, and only on the
series known to have the bug; tests/test_tagsync_fetcher_workaround.py fails when the
installed kafka-python is outside that series or lacks the attributes, so an upgrade is
checked against the bug rather than silently losing the workaround.
"""

from __future__ import annotations

import re
from typing import Any

import kafka

__all__ = [
    "AFFECTED_SERIES",
    "APPLIES",
    "FETCHER_ATTRIBUTES",
    "kafka_python_version",
    "restore_parked_records",
]

# The kafka-python (major, minor) series whose fetcher strands resumed partitions.
AFFECTED_SERIES = ((3, 0),)
# What this module reads and writes on ``KafkaConsumer._fetcher``.
FETCHER_ATTRIBUTES = ("_paused_partition_records", "_next_partition_records")


def kafka_python_version(version: str | None = None) -> tuple[int, ...]:
    """The installed kafka-python's version as numbers (``3.0.12`` -> ``(3, 0, 12)``)."""
    text = kafka.__version__ if version is None else version
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


APPLIES = kafka_python_version()[:2] in AFFECTED_SERIES


def restore_parked_records(consumer: Any) -> None:
    """Before a poll: let the fetcher put back the records it parked for a resumed partition.

    A no-op outside :data:`AFFECTED_SERIES`, and when nothing is parked.
    """
    if not APPLIES:
        return
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None or not getattr(fetcher, "_paused_partition_records", None):
        return
    in_line = getattr(fetcher, "_next_partition_records", None)
    if in_line is not None and not in_line:
        fetcher._next_partition_records = None

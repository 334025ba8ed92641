"""A durable local spool for Kafka outages (``[spool]``).

What Kafka cannot acknowledge in time (or while it is known to be away) is appended here and
answered 2xx only once the append is fsynced; the drain delivers it to Kafka when Kafka is
back, oldest first and in order per key, with the same producer (acks=all, idempotent).

- :mod:`~gateway.kafka.spool.format`: the segment format (pure; checksums, torn tails).
- :mod:`~gateway.kafka.spool.store`: the directory (lock, replay) and the group-commit writer.
- :mod:`~gateway.kafka.spool.drain`: delivery to Kafka.
"""

from __future__ import annotations

from gateway.kafka.spool.store import (
    FileOps,
    Spool,
    SpoolCorrupt,
    SpoolError,
    SpoolFull,
    SpoolLocked,
    SpoolWriteError,
)

__all__ = [
    "FileOps",
    "Spool",
    "SpoolCorrupt",
    "SpoolError",
    "SpoolFull",
    "SpoolLocked",
    "SpoolWriteError",
]

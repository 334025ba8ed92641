"""The spool directory: the lock, start-up replay, and the writer with group-commit fsync.

Threads: the event loop calls :meth:`Spool.store` and the bookkeeping; one writer thread owns
the active segment's file descriptor, takes every append queued since its last round, writes
them with one ``write`` and one ``fsync`` (a group commit), and only then settles their
futures on the loop. The loop never waits on the disk.

Bookkeeping (loop thread only): per ordering key (topic, key), how many of its records are in
the spool and not yet acknowledged by Kafka (:attr:`Spool.waiting`). A key counted there has
its new records spooled behind the old ones, so one user's events never overtake each other.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import SpoolConfig
from gateway.core.records import KafkaRecord
from gateway.kafka.spool import format as fmt
from gateway.metrics import IngressMetrics

__all__ = [
    "FileOps",
    "Segment",
    "Spool",
    "SpoolCorrupt",
    "SpoolError",
    "SpoolFull",
    "SpoolLocked",
    "SpoolWriteError",
    "replay_dir",
]

log = logging.getLogger(__name__)

Key = tuple[str, bytes | None]
# an append not fsynced within this is answered 503 (a disk that hangs)
COMMIT_TIMEOUT_S = 10.0


class SpoolError(Exception):
    """The spool cannot do what was asked; the message says why."""


class SpoolLocked(SpoolError):
    """Another process owns the spool directory."""


class SpoolCorrupt(SpoolError):
    """A segment is damaged in the middle (not a torn tail)."""

    def __init__(self, path: Path, offset: int, next_good: int) -> None:
        self.path = path
        self.offset = offset
        super().__init__(
            f"spool segment {path} is damaged at offset {offset} (the next good record is at"
            f" {next_good}); run `gateway spool check`, and start with spool.skip_corrupt ="
            " true to give up the damaged bytes"
        )


class SpoolFull(SpoolError):
    """spool.max_bytes reached."""


class SpoolWriteError(SpoolError):
    """A write or fsync failed; the record is not durable."""


class FileOps:
    """The file layer the spool uses: a seam for tests of full disks and failing fsyncs."""

    def open_segment(self, path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[n:]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, path: Path) -> bytes:
        return path.read_bytes()

    def truncate_path(self, path: Path, size: int) -> None:
        with path.open("r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)


@dataclass
class Segment:
    """A segment file, as the loop knows it."""

    seq: int
    path: Path
    size: int  # durable bytes
    records: int = 0  # records in it not yet acknowledged by Kafka
    first_ms: int | None = None  # when its first record was spooled
    sealed: bool = False  # nothing more is appended


@dataclass
class Replay:
    """What start-up found in the directory."""

    segments: list[Segment] = field(default_factory=list)
    waiting: collections.Counter[Key] = field(default_factory=collections.Counter)
    records: int = 0
    truncated_bytes: int = 0
    skipped: list[tuple[Path, int, int]] = field(default_factory=list)  # (segment, from, to)


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for p in directory.iterdir() if directory.is_dir() else ():
        seq = fmt.segment_seq(p.name)
        if seq is not None:
            out.append((seq, p))
    return sorted(out)


def replay_dir(
    directory: Path, *, skip_corrupt: bool, repair: bool, files: FileOps | None = None
) -> Replay:
    """Scan every segment in order. With ``repair``, cut torn tails (the cut bytes are kept
    beside the segment as ``<name>.torn``) and remove segments with nothing left in them.

    Raises :class:`SpoolCorrupt` on damage in the middle of a segment unless ``skip_corrupt``.
    """
    files = files or FileOps()
    out = Replay()
    for seq, path in list_segments(directory):
        data = files.read(path)
        sc = fmt.scan(data, seq)
        if sc.damaged:
            start, nxt = sc.damaged[0]
            if not skip_corrupt:
                raise SpoolCorrupt(path, start, nxt)
            for start, nxt in sc.damaged:
                out.skipped.append((path, start, nxt))
                log.error(
                    "spool segment damaged: skipping the damaged bytes (spool.skip_corrupt)",
                    extra={"segment": str(path), "offset": start, "next_good": nxt},
                )
        size = len(data)
        if sc.torn_at is not None:
            cut = len(data) - sc.torn_at
            out.truncated_bytes += cut
            size = sc.torn_at
            if repair:
                path.with_name(path.name + ".torn").write_bytes(data[sc.torn_at :])
                files.truncate_path(path, sc.torn_at)
            log.warning(
                "spool segment has a torn tail (a write cut by a crash, never acknowledged)",
                extra={"segment": str(path), "offset": sc.torn_at, "bytes": cut},
            )
        if not sc.entries:
            if repair:
                files.remove(path)
            continue
        seg = Segment(seq, path, size, len(sc.entries), sc.entries[0].spooled_at_ms, True)
        out.segments.append(seg)
        out.records += len(sc.entries)
        for e in sc.entries:
            out.waiting[fmt.ordering_key(e.record)] += 1
    return out


class _Item:
    __slots__ = ("fut", "key", "payload", "queued_at", "size")

    def __init__(self, payload: bytes, key: Key, fut: asyncio.Future[None]) -> None:
        self.payload = payload
        self.key = key
        self.fut = fut
        self.size = len(payload) + fmt.FRAME_OVERHEAD
        self.queued_at = time.perf_counter()


class Spool:
    """A spool directory owned by this process; see the module docstring.

    Lifecycle: :meth:`open` (blocking: the lock, then the replay), :meth:`start` (the writer
    thread), then :meth:`store` on the loop; :meth:`close` (blocking) at the end.
    """

    def __init__(
        self,
        cfg: SpoolConfig,
        metrics: IngressMetrics | None = None,
        *,
        files: FileOps | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.metrics = metrics
        self.files = files or FileOps()
        self.clock = clock
        self.segments: dict[int, Segment] = {}
        self.waiting: collections.Counter[Key] = collections.Counter()
        self.bytes = 0
        self.records = 0
        self._reserved = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.replayed = 0
        self._lock_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cond = threading.Condition()
        self._queue: list[_Item] = []
        self._rotate = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._next_seq = 1
        self.changed = asyncio.Event()  # a segment sealed or records appended: the drain looks

    # -- owning the directory ----------------------------------------------------------------

    def open(self) -> Replay:
        """Take the lock, replay the segments (cutting torn tails); raises SpoolError."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = acquire_lock(self.dir)
        try:
            found = replay_dir(
                self.dir, skip_corrupt=self.cfg.skip_corrupt, repair=True, files=self.files
            )
        except BaseException:
            self.release_lock()
            raise
        for seg in found.segments:
            self.segments[seg.seq] = seg
            self.bytes += seg.size
        self.records = found.records
        self.waiting = found.waiting
        self.replayed = found.records
        seqs = [s for s, _ in list_segments(self.dir)]
        self._next_seq = (max(seqs) + 1) if seqs else 1
        if self.metrics is not None:
            self.metrics.spool_replayed.inc(found.records)
            self.metrics.spool_truncated_bytes.inc(found.truncated_bytes)
            self._bind_gauges(self.metrics)
        if found.records:
            log.warning(
                "spool replayed: these records are delivered to Kafka now; any that reached"
                " Kafka before the last stop are delivered twice",
                extra={"records": found.records, "segments": len(found.segments)},
            )
        return found

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _bind_gauges(self, m: IngressMetrics) -> None:
        m.spool_bytes.set_function(lambda: self.bytes)
        m.spool_records.set_function(lambda: self.records)
        m.spool_oldest_age.set_function(self.oldest_age_s)
        m.spool_keys_waiting.set_function(lambda: len(self.waiting))
        m.spool_max_bytes.set(self.cfg.max_bytes)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.changed = asyncio.Event()
        if self.segments:
            self.changed.set()
        self._thread = threading.Thread(target=self._writer, name="spool-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Let the writer finish what is queued, then close; blocking (run it off the loop)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(30)
        self.release_lock()

    # -- state -------------------------------------------------------------------------------

    def holds(self, record: KafkaRecord) -> bool:
        """Records of this record's key are in the spool: it must queue behind them."""
        return bool(self.waiting) and (record.topic, record.key) in self.waiting

    def oldest_age_s(self) -> float:
        for seg in self.segments.values():
            if seg.records and seg.first_ms is not None:
                return max(0.0, self.clock() - seg.first_ms / 1000)
        return 0.0

    def usable(self) -> tuple[bool, str]:
        """Whether an append can succeed now: room left, and no disk error just now."""
        room = min(65536, self.cfg.max_bytes // 10)  # a record or a few
        if self.bytes + self._reserved > self.cfg.max_bytes - room:
            return False, f"spool full ({self.bytes} of {self.cfg.max_bytes} bytes)"
        if self._thread is None or not self._thread.is_alive():
            return False, "the spool's writer is not running"
        at = self.last_error_at
        if at is not None and time.monotonic() - at < 5.0:
            return False, f"spool write failed: {self.last_error}"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        """What /readyz and ``gateway spool status`` show."""
        return {
            "dir": str(self.dir),
            "records": self.records,
            "bytes": self.bytes,
            "max_bytes": self.cfg.max_bytes,
            "segments": len(self.segments),
            "keys_waiting": len(self.waiting),
            "oldest_age_s": round(self.oldest_age_s(), 3),
            "last_error": self.last_error,
        }

    # -- appending (loop thread) -------------------------------------------------------------

    async def store(self, record: KafkaRecord, reason: str = "kafka_down") -> None:
        """Append ``record``; returns once it is fsynced. Raises SpoolFull or SpoolWriteError."""
        payload = fmt.encode_payload(record, int(self.clock() * 1000))
        key = fmt.ordering_key(record)
        loop = self._loop
        assert loop is not None, "Spool.start() was not called"
        item = _Item(payload, key, loop.create_future())
        if len(payload) > fmt.MAX_PAYLOAD:
            raise SpoolWriteError(f"a record over {fmt.MAX_PAYLOAD} bytes cannot be spooled")
        if self._thread is None or not self._thread.is_alive():
            raise SpoolWriteError("the spool's writer is not running")
        if self.bytes + self._reserved + item.size > self.cfg.max_bytes:
            if self.metrics is not None:
                self.metrics.spool_errors.labels("full").inc()
            raise SpoolFull(
                f"the spool is full ({self.bytes} of spool.max_bytes = {self.cfg.max_bytes})"
            )
        # counted now, before the write: a later record of this key queues behind this one
        self.waiting[key] += 1
        self._reserved += item.size
        with self._cond:
            self._queue.append(item)
            self._cond.notify()
        try:
            # bounded: a disk that hangs gets a 503, never a hung request (the append may still
            # land: then the sender's retry makes a duplicate, as with a late Kafka ack)
            await asyncio.wait_for(asyncio.shield(item.fut), COMMIT_TIMEOUT_S)
        except TimeoutError:
            if self.metrics is not None:
                self.metrics.spool_errors.labels("disk").inc()
            raise SpoolWriteError(
                f"the spool's fsync did not complete within {COMMIT_TIMEOUT_S:.0f}s"
            ) from None
        except SpoolWriteError:
            if self.metrics is not None:
                self.metrics.spool_errors.labels("disk").inc()
            raise
        if self.metrics is not None:
            self.metrics.spool_appended.labels(reason).inc()
            self.metrics.spool_fsync_seconds.observe(time.perf_counter() - item.queued_at)

    def request_rotate(self) -> None:
        """Seal the active segment (if it holds records) so the drain can deliver it."""
        with self._cond:
            self._rotate = True
            self._cond.notify()

    # -- the writer thread -------------------------------------------------------------------

    def _writer(self) -> None:
        active: tuple[int, int, int] | None = None  # (seq, fd, durable size)
        while True:
            with self._cond:
                while not self._queue and not self._rotate and not self._stopping:
                    self._cond.wait()
                batch, self._queue = self._queue, []
                rotate, self._rotate = self._rotate, False
                stopping = self._stopping
            if batch:
                if active is not None and active[2] >= self.cfg.segment_bytes:
                    self._seal(active)
                    active = None
                try:
                    active = self._commit(active, batch)
                except Exception as exc:  # a bug: fail the batch, keep the writer alive
                    log.exception("spool writer failed")
                    if active is not None:
                        self._seal(active)
                    active = None
                    self._post(self._failed, batch, OSError(errno.EIO, repr(exc)))
            if (rotate or stopping) and active is not None:
                self._seal(active)
                active = None
            if stopping and not batch:
                with self._cond:
                    if not self._queue:
                        return

    def _commit(
        self, active: tuple[int, int, int] | None, batch: list[_Item]
    ) -> tuple[int, int, int] | None:
        created = active is None
        if active is None:
            seq = self._next_seq
            self._next_seq += 1
            path = self.dir / fmt.segment_name(seq)
            try:
                fd = self.files.open_segment(path)
            except OSError as exc:
                self._post(self._failed, batch, exc)
                return None
            active = (seq, fd, 0)
        seq, fd, durable = active
        parts = [fmt.FILE_MAGIC] if created else []
        offset = len(fmt.FILE_MAGIC) if created else durable
        first_ms = None
        for item in batch:
            framed = fmt.frame(seq, offset, item.payload)
            parts.append(framed)
            offset += len(framed)
        if created:
            first_ms = int.from_bytes(batch[0].payload[:8], "big")
        try:
            self.files.write(fd, b"".join(parts))
            self.files.fsync(fd)
            if created:
                self.files.fsync_dir(self.dir)
        except OSError as exc:
            # give this segment up: cut it back to what was durable, never append to it again
            with contextlib.suppress(OSError):
                self.files.truncate(fd, durable)
                self.files.fsync(fd)
            with contextlib.suppress(OSError):
                self.files.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    self.files.remove(self.dir / fmt.segment_name(seq))
            else:
                self._post(self._sealed, seq)
            self._post(self._failed, batch, exc)
            return None
        self._post(self._written, seq, offset, batch, first_ms)
        return seq, fd, offset

    def _seal(self, active: tuple[int, int, int]) -> None:
        seq, fd, _ = active
        with contextlib.suppress(OSError):
            self.files.close(fd)
        self._post(self._sealed, seq)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            loop.call_soon_threadsafe(fn, *args)

    # -- settled on the loop thread ----------------------------------------------------------

    def _written(self, seq: int, size: int, batch: list[_Item], first_ms: int | None) -> None:
        seg = self.segments.get(seq)
        if seg is None:
            seg = self.segments[seq] = Segment(seq, self.dir / fmt.segment_name(seq), 0)
            seg.first_ms = first_ms
        self.bytes += size - seg.size
        seg.size = size
        seg.records += len(batch)
        self.records += len(batch)
        for item in batch:
            self._reserved -= item.size
            if not item.fut.done():
                item.fut.set_result(None)
        self.changed.set()

    def _failed(self, batch: list[_Item], exc: OSError) -> None:
        message = f"{type(exc).__name__}: {exc}"
        self.last_error = message
        self.last_error_at = time.monotonic()
        log.error(
            "spool write failed: the requests are answered 503",
            extra={"error": message, "records": len(batch)},
        )
        for item in batch:
            self._reserved -= item.size
            self._forget(item.key)
            if not item.fut.done():
                item.fut.set_exception(SpoolWriteError(f"the spool write failed: {message}"))
                item.fut.exception()  # retrieved, even if its request is gone

    def _sealed(self, seq: int) -> None:
        seg = self.segments.get(seq)
        if seg is not None:
            seg.sealed = True
        self.changed.set()

    def _forget(self, key: Key) -> None:
        n = self.waiting.get(key, 0)
        if n <= 1:
            self.waiting.pop(key, None)
        else:
            self.waiting[key] = n - 1

    # -- the drain's side (loop thread) ------------------------------------------------------

    def oldest_sealed(self) -> Segment | None:
        for seg in self.segments.values():
            return seg if seg.sealed else None
        return None

    def active_records(self) -> int:
        return sum(s.records for s in self.segments.values() if not s.sealed)

    def read(self, seg: Segment) -> list[fmt.Entry]:
        """The records of a sealed segment (blocking: run it off the loop)."""
        data = self.files.read(seg.path)[: seg.size]
        sc = fmt.scan(data, seg.seq)
        for start, nxt in sc.damaged:
            log.error(
                "spool segment damaged since it was written: the damaged bytes are skipped",
                extra={"segment": str(seg.path), "offset": start, "next_good": nxt},
            )
        return sc.entries

    def delivered(self, seg: Segment, entry: fmt.Entry) -> None:
        """Kafka acknowledged ``entry``."""
        seg.records = max(0, seg.records - 1)
        self.records = max(0, self.records - 1)
        self._forget(fmt.ordering_key(entry.record))
        if self.metrics is not None:
            self.metrics.spool_drained.inc()

    def order_break(self, key: Key) -> None:
        """A record of ``key`` failed while a later one was acknowledged (see the drain)."""
        log.warning(
            "spool drain: a record was acknowledged after an earlier one of its key failed;"
            " the earlier one is sent again and lands after it",
            extra={"topic": key[0]},
        )
        if self.metrics is not None:
            self.metrics.spool_order_breaks.inc()

    def remove(self, seg: Segment) -> None:
        """Every record of a sealed segment is acknowledged: delete it (blocking)."""
        self.files.remove(seg.path)
        with contextlib.suppress(OSError):
            self.files.remove(seg.path.with_name(seg.path.name + ".torn"))

    def forget_segment(self, seg: Segment, left: int) -> None:
        """After :meth:`remove`, on the loop. ``left``: records the segment was counted with
        that its file no longer held (damaged since written). Only the count is corrected:
        their keys cannot be read from the damage, so those keys stay waiting (their later
        records go through the spool, in order) until the next start replays the directory."""
        self.segments.pop(seg.seq, None)
        self.bytes -= seg.size
        self.records = max(0, self.records - left)


def acquire_lock(directory: Path) -> int:
    """The lock of a spool directory (flock on ``LOCK``); raises SpoolLocked if it is held."""
    path = directory / "LOCK"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise SpoolLocked(
            f"the spool directory {directory} is owned by another process (pid {owner}); one"
            " process owns a spool: give each worker or replica its own directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd

"""The spool directory: fsync before the answer, group commit, full, disk errors, lock, replay.

The disk-error tests use the spool's file-layer seam (:class:`FileOps`) to make a write or an
fsync fail with ENOSPC or EIO; everything else is the real file system.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.config import SpoolConfig
from gateway.core.records import KafkaRecord
from gateway.kafka.spool import (
    FileOps,
    Spool,
    SpoolCorrupt,
    SpoolFull,
    SpoolLocked,
    SpoolWriteError,
)
from gateway.kafka.spool import format as fmt
from gateway.kafka.spool import store as store_module
from gateway.kafka.spool.store import list_segments, replay_dir
from gateway.metrics import IngressMetrics


def rec(i: int, key: bytes | None = b"user-1", topic: str = "t.push") -> KafkaRecord:
    return KafkaRecord(topic, key, b'{"n":%d}' % i, [("ce_id", b"id-%d" % i)])


def cfg(tmp_path: Path, **kw: object) -> SpoolConfig:
    return SpoolConfig(enabled=True, dir=str(tmp_path / "spool"), **kw)  # type: ignore[arg-type]


class CountingFiles(FileOps):
    def __init__(self) -> None:
        self.fsyncs = 0
        self.fail_write: OSError | None = None
        self.fail_fsync: OSError | None = None

    def write(self, fd: int, data: bytes) -> None:
        if self.fail_write is not None:
            super().write(fd, data[: len(data) // 2])  # a partial write, then the error
            raise self.fail_write
        super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self.fsyncs += 1
        if self.fail_fsync is not None:
            raise self.fail_fsync
        super().fsync(fd)


def logged(caplog: pytest.LogCaptureFixture, message: str) -> dict[str, object]:
    """The fields of the one spool log line saying ``message``."""
    [line] = [r for r in caplog.records if r.getMessage() == message]
    return line.__dict__


def stored(directory: Path) -> list[KafkaRecord]:
    found = []
    for seq, path in list_segments(directory):
        found += [e.record for e in fmt.scan(path.read_bytes(), seq).entries]
    return found


async def opened(c: SpoolConfig, files: FileOps | None = None) -> Spool:
    spool = Spool(c, IngressMetrics(process=False), files=files)
    spool.open()
    spool.start(asyncio.get_running_loop())
    return spool


def test_an_append_returns_only_once_it_is_on_disk_and_concurrent_ones_share_fsyncs(
    tmp_path: Path,
) -> None:
    files = CountingFiles()

    async def main() -> None:
        spool = await opened(cfg(tmp_path), files)
        await spool.store(rec(0))
        # the answer came after the fsync: another reader sees it now
        assert stored(spool.dir) == [rec(0)]
        before = files.fsyncs
        n = 2000
        started = time.perf_counter()
        await asyncio.gather(*(spool.store(rec(i, b"u%d" % (i % 50))) for i in range(1, n + 1)))
        elapsed = time.perf_counter() - started
        commits = files.fsyncs - before
        print(
            f"\ngroup commit: {n} concurrent appends, {commits} fsyncs "
            f"({n / commits:.0f} records per fsync), {n / elapsed:.0f} appends/s"
        )
        assert commits < n / 10, commits
        assert len(stored(spool.dir)) == n + 1
        assert spool.records == n + 1 and len(spool.waiting) == 51
        spool.close()

    asyncio.run(main())


def test_records_are_kept_in_order_per_key_across_segments(tmp_path: Path) -> None:
    async def main() -> None:
        spool = await opened(cfg(tmp_path, segment_bytes=4096))
        for i in range(300):
            await spool.store(rec(i, b"k%d" % (i % 3)))
        spool.close()

    asyncio.run(main())
    segs = list_segments(tmp_path / "spool")
    assert len(segs) > 3
    assert stored(tmp_path / "spool") == [rec(i, b"k%d" % (i % 3)) for i in range(300)]


def test_a_full_spool_refuses_and_takes_records_again_once_drained(tmp_path: Path) -> None:
    async def main() -> None:
        spool = await opened(cfg(tmp_path, max_bytes=8192, segment_bytes=4096))
        kept = 0
        with pytest.raises(SpoolFull):
            for i in range(1000):
                await spool.store(rec(i))
                kept += 1
        assert 0 < kept < 1000 and spool.bytes <= 8192
        assert spool.usable()[0] is False  # full: /readyz turns 503 while Kafka is away
        assert len(stored(spool.dir)) == kept  # nothing acknowledged was lost
        # the drain delivers the first segment and deletes it: there is room again
        spool.request_rotate()
        while (seg := spool.oldest_sealed()) is None:
            await asyncio.sleep(0.01)
        for e in spool.read(seg):
            spool.delivered(seg, e)
        spool.remove(seg)
        spool.forget_segment(seg, 0)
        await spool.store(rec(5000))
        assert stored(spool.dir)[-1] == rec(5000)
        spool.close()

    asyncio.run(main())


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_disk_error_is_never_acknowledged_and_the_spool_recovers(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    files = CountingFiles()
    metrics = IngressMetrics(process=False)

    async def main() -> None:
        spool = Spool(cfg(tmp_path), metrics, files=files)
        spool.open()
        spool.start(asyncio.get_running_loop())
        await spool.store(rec(0))
        err = OSError(errno.ENOSPC, "No space left on device")
        if where == "write":
            files.fail_write = err
        else:
            files.fail_fsync = OSError(errno.EIO, "Input/output error")
        with pytest.raises(SpoolWriteError) as info:
            await spool.store(rec(1, b"other"))
        error = "[Errno 28] No space left on device" if where == "write" else "[Errno 5] Input/"
        error += "" if where == "write" else "output error"
        assert str(info.value) == f"the spool write failed: OSError: {error}"
        line = logged(caplog, "spool write failed: the requests are answered 503")
        assert line["error"] == f"OSError: {error}" and line["records"] == 1
        assert spool.usable()[0] is False
        assert not spool.holds(rec(1, b"other"))  # a failed append does not hold its key
        # space returns: the next append works, in a new segment
        files.fail_write = files.fail_fsync = None
        await spool.store(rec(2))
        spool.close()
        # the failed record is not in the spool: what was durable before it still is
        assert stored(spool.dir) == [rec(0), rec(2)]
        assert metrics.spool_errors.labels("disk").value == 1

    asyncio.run(main())


def test_one_process_owns_a_spool_directory(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    first = Spool(c)
    first.open()
    try:
        with pytest.raises(SpoolLocked, match="owned by another process"):
            Spool(c).open()
        # another process too (flock is per open file, and per process)
        code = (
            "import sys\n"
            "from gateway.config import SpoolConfig\n"
            "from gateway.kafka.spool import Spool, SpoolLocked\n"
            "try:\n"
            f"    Spool(SpoolConfig(enabled=True, dir={c.dir!r})).open()\n"
            "except SpoolLocked as exc:\n"
            "    print(exc); sys.exit(3)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 3, out.stderr
    finally:
        first.release_lock()
    Spool(c).open()  # released: a restart takes it


def write_spool(tmp_path: Path, n: int, **kw: object) -> Path:
    async def main() -> None:
        spool = await opened(cfg(tmp_path, **kw))
        for i in range(n):
            await spool.store(rec(i, b"k%d" % (i % 4)))
        spool.close()

    asyncio.run(main())
    return tmp_path / "spool"


def test_replay_cuts_a_torn_tail_and_counts_what_is_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = write_spool(tmp_path, 10)
    ((seq, path),) = list_segments(directory)
    data = path.read_bytes()
    tail = fmt.frame(seq, len(data), fmt.encode_payload(rec(99), 1))[:-3]
    cut = len(tail)
    path.write_bytes(data + tail)
    metrics = IngressMetrics(process=False)
    spool = Spool(cfg(tmp_path), metrics)
    found = spool.open()
    assert found.records == 10 and found.truncated_bytes == cut
    assert path.read_bytes() == data  # cut back to the last whole record
    assert path.with_name(path.name + ".torn").exists()  # the cut bytes are kept aside
    assert spool.waiting == {("t.push", b"k%d" % k): (3 if k < 2 else 2) for k in range(4)}
    assert metrics.spool_replayed.labels().value == 10
    line = logged(
        caplog, "spool segment has a torn tail (a write cut by a crash, never acknowledged)"
    )
    assert (line["segment"], line["offset"], line["bytes"]) == (str(path), len(data), cut)
    line = logged(
        caplog,
        "spool replayed: these records are delivered to Kafka now; any that reached Kafka"
        " before the last stop are delivered twice",
    )
    assert (line["records"], line["segments"]) == (10, 1)
    spool.release_lock()


def test_replay_refuses_damage_in_the_middle_naming_segment_and_offset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = write_spool(tmp_path, 10)
    ((seq, path),) = list_segments(directory)
    data = bytearray(path.read_bytes())
    entries = fmt.scan(bytes(data), seq).entries
    bad = entries[4].offset
    data[bad + 20] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt) as info:
        Spool(cfg(tmp_path)).open()
    assert info.value.offset == bad and info.value.path == path
    assert str(info.value) == (
        f"spool segment {path} is damaged at offset {bad} (the next good record is at"
        f" {entries[5].offset}); run `gateway spool check`, and start with spool.skip_corrupt ="
        " true to give up the damaged bytes"
    )
    # told to skip it: everything but the damaged record
    found = replay_dir(directory, skip_corrupt=True, repair=False)
    assert found.records == 9 and found.skipped == [(path, bad, entries[5].offset)]
    line = logged(caplog, "spool segment damaged: skipping the damaged bytes (spool.skip_corrupt)")
    assert (line["segment"], line["offset"], line["next_good"]) == (
        str(path),
        bad,
        entries[5].offset,
    )
    caplog.clear()
    spool = Spool(cfg(tmp_path, skip_corrupt=True))
    assert spool.open().records == 9
    spool.release_lock()


def drain_by_hand(spool: Spool) -> int:
    """What the drain does with the oldest sealed segment once Kafka acknowledged all of it."""
    seg = spool.oldest_sealed()
    assert seg is not None
    entries = spool.read(seg)
    for e in entries:
        spool.delivered(seg, e)
    spool.remove(seg)
    spool.forget_segment(seg, 0)
    return len(entries)


def on_disk(directory: Path) -> int:
    return sum(path.stat().st_size for _, path in list_segments(directory))


def test_status_and_gauges_count_records_bytes_segments_keys_and_the_oldest_age(
    tmp_path: Path,
) -> None:
    now = [1_000.0]
    metrics = IngressMetrics(process=False)

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    async def main() -> None:
        spool = Spool(cfg(tmp_path, segment_bytes=4096), metrics, clock=lambda: now[0])
        spool.open()
        spool.start(asyncio.get_running_loop())
        assert spool.status() == {
            "dir": str(tmp_path / "spool"),
            "records": 0,
            "bytes": 0,
            "max_bytes": 1073741824,
            "segments": 0,
            "keys_waiting": 0,
            "oldest_age_s": 0.0,
            "last_error": None,
        }
        started = time.perf_counter()
        for i in range(150):
            now[0] += 0.5
            await spool.store(rec(i, b"k%d" % (i % 3)))
            if i == 0:  # spooled this very instant: no age yet, not a second
                assert spool.status()["oldest_age_s"] == 0.0
        took = time.perf_counter() - started
        assert sample("gateway_spool_commit_seconds_count") == 150
        assert 0 < (sample("gateway_spool_commit_seconds_sum") or 0) <= took
        now[0] = 1_100.12345  # the first record was spooled at 1,000.5
        segments = list_segments(spool.dir)
        assert len(segments) == 3
        assert spool.status() == {
            "dir": str(tmp_path / "spool"),
            "records": 150,
            "bytes": on_disk(spool.dir),
            "max_bytes": 1073741824,
            "segments": 3,
            "keys_waiting": 3,
            "oldest_age_s": 99.623,
            "last_error": None,
        }
        assert sample("gateway_spool_records") == 150
        assert sample("gateway_spool_bytes") == on_disk(spool.dir)
        assert sample("gateway_spool_keys_waiting") == 3
        assert sample("gateway_spool_max_bytes") == 1073741824
        assert sample("gateway_spool_oldest_age_seconds") == pytest.approx(99.62345)
        # the first segment delivered: its records, bytes and age go with it
        first = spool.oldest_sealed()
        assert first is not None
        entries = spool.read(first)
        spooled_at = [e.spooled_at_ms for e in entries]
        for e in entries[:-1]:  # one record left in it: the age is still its first record's
            spool.delivered(first, e)
        assert spool.status()["oldest_age_s"] == 99.623
        spool.delivered(first, entries[-1])  # acknowledged, not yet deleted: the next one's
        delivered = len(entries)
        status = spool.status()
        assert status["records"] == 150 - delivered and status["segments"] == 3
        assert status["oldest_age_s"] == round(1_100.12345 - (spooled_at[-1] + 500) / 1000, 3)
        spool.remove(first)
        spool.forget_segment(first, 0)
        status = spool.status()
        assert status["records"] == 150 - delivered and status["segments"] == 2
        assert status["bytes"] == on_disk(spool.dir)
        # the next segment's first record was spooled just after the last one delivered
        assert status["oldest_age_s"] == round(1_100.12345 - (spooled_at[-1] + 500) / 1000, 3)
        assert sample("gateway_spool_records") == 150 - delivered
        spool.close()
        # a restart counts the same from the files
        again = Spool(cfg(tmp_path, segment_bytes=4096), clock=lambda: now[0])
        found = again.open()
        assert found.records == 150 - delivered and len(found.segments) == 2
        assert again.status() == status
        # replayed segments are sealed: the drain delivers them, oldest first
        assert drain_by_hand(again) + drain_by_hand(again) == 150 - delivered
        assert again.status()["records"] == 0 and again.status()["bytes"] == 0
        again.release_lock()

    asyncio.run(main())


def frame_size(record: KafkaRecord) -> int:
    return len(fmt.encode_payload(record, 0)) + fmt.FRAME_OVERHEAD


def test_the_spool_takes_records_up_to_max_bytes_to_the_byte(tmp_path: Path) -> None:
    size = frame_size(rec(10))
    limit = len(fmt.FILE_MAGIC) + 70 * size  # exactly 70 records (rec(10) .. rec(99): one size)

    async def main() -> None:
        spool = await opened(cfg(tmp_path, max_bytes=limit))
        metrics = spool.metrics
        assert metrics is not None
        for i in range(10, 80):
            await spool.store(rec(i))
        assert spool.bytes == limit == on_disk(spool.dir)
        with pytest.raises(SpoolFull, match=f"{limit} of spool.max_bytes = {limit}"):
            await spool.store(rec(80))
        assert metrics.spool_errors.labels("full").value == 1
        assert len(stored(spool.dir)) == 70
        spool.close()

    asyncio.run(main())


def test_concurrent_appends_never_take_more_than_max_bytes(tmp_path: Path) -> None:
    size = frame_size(rec(10))
    limit = len(fmt.FILE_MAGIC) + 70 * size

    async def main() -> None:
        spool = await opened(cfg(tmp_path, max_bytes=limit))
        got = await asyncio.gather(
            *(spool.store(rec(i, b"user%d" % i)) for i in range(10, 85)), return_exceptions=True
        )
        refused = [r for r in got if isinstance(r, SpoolFull)]
        assert len(refused) == 5 and got.count(None) == 70
        assert spool.bytes == limit and len(stored(spool.dir)) == 70
        # the refused ones hold no key; every appended one does
        assert len(spool.waiting) == 70
        spool.close()

    asyncio.run(main())


def test_readiness_turns_unready_with_a_tenth_of_max_bytes_left_at_most_64_kib(
    tmp_path: Path,
) -> None:
    async def fill(c: SpoolConfig, value: bytes, headroom: int) -> None:
        spool = await opened(c)
        seen = set()
        with contextlib.suppress(SpoolFull):
            for i in range(1000):
                await spool.store(KafkaRecord("t", b"k", value + b"%d" % i, []))
                ok, why = spool.usable()
                assert ok == (spool.bytes <= c.max_bytes - headroom), spool.bytes
                assert why == ("ok" if ok else f"spool full ({spool.bytes} of {c.max_bytes} bytes)")
                seen.add(ok)
        assert seen == {True, False}
        spool.close()

    async def main() -> None:
        # 40,960 bytes: unready with less than 4,096 left
        await fill(cfg(tmp_path / "a", max_bytes=40960), b"x" * 250, 4096)
        # 1 MiB: a tenth would be 104,857 bytes; the headroom is 65,536
        await fill(cfg(tmp_path / "b", max_bytes=1048576), b"x" * 30000, 65536)

    asyncio.run(main())


def test_a_write_error_keeps_the_spool_unready_for_five_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = CountingFiles()

    async def main() -> None:
        spool = Spool(cfg(tmp_path), files=files)
        spool.open()
        assert spool.usable() == (False, "the spool's writer is not running")
        spool.start(asyncio.get_running_loop())
        assert spool.usable() == (True, "ok")
        await spool.store(rec(0))
        files.fail_fsync = OSError(errno.EIO, "Input/output error")
        with pytest.raises(SpoolWriteError) as info:
            await spool.store(rec(1))
        assert str(info.value) == "the spool write failed: OSError: [Errno 5] Input/output error"
        files.fail_fsync = None
        # the segment it failed in is given up: sealed, so the drain can deliver rec(0)
        first = spool.oldest_sealed()
        assert first is not None and [e.record for e in spool.read(first)] == [rec(0)]
        at = spool.last_error_at
        assert at is not None
        assert spool.status()["last_error"] == "OSError: [Errno 5] Input/output error"
        with monkeypatch.context() as m:  # no await in here: the loop does not run
            m.setattr(time, "monotonic", lambda: at + 4.9)
            assert spool.usable() == (
                False,
                "spool write failed: OSError: [Errno 5] Input/output error",
            )
            m.setattr(time, "monotonic", lambda: at + 5.1)
            assert spool.usable() == (True, "ok")
        spool.close()
        assert spool.usable() == (False, "the spool's writer is not running")
        with pytest.raises(SpoolWriteError) as info:
            await spool.store(rec(2))
        assert str(info.value) == "the spool's writer is not running"
        assert spool.waiting == {("t.push", b"user-1"): 1}  # rec(0)'s; the failed ones none

    asyncio.run(main())


def test_a_failure_in_a_new_segment_leaves_no_file_and_no_count(tmp_path: Path) -> None:
    files = CountingFiles()
    files.fail_fsync = OSError(errno.EIO, "Input/output error")

    async def main() -> None:
        limit = len(fmt.FILE_MAGIC) + 70 * frame_size(rec(10))
        spool = await opened(cfg(tmp_path, max_bytes=limit), files)
        with pytest.raises(SpoolWriteError):
            await spool.store(rec(10))
        # the frame was written whole, but not durable: no file, so no replay of it
        assert list_segments(spool.dir) == [] and spool.segments == {}
        assert spool.status()["bytes"] == 0 and spool.status()["records"] == 0
        assert not spool.waiting
        files.fail_fsync = None
        for i in range(10, 80):  # all the room is there again: 70 records
            await spool.store(rec(i))
        with pytest.raises(SpoolFull):
            await spool.store(rec(80))
        spool.close()
        assert stored(spool.dir) == [rec(i) for i in range(10, 80)]

    asyncio.run(main())


class BrokenFiles(FileOps):
    """A bug rather than a disk error: the write raises something else, once."""

    def __init__(self) -> None:
        self.broken = False

    def write(self, fd: int, data: bytes) -> None:
        if self.broken:
            self.broken = False
            raise ValueError("a bug")
        super().write(fd, data)


def test_a_writer_bug_fails_its_batch_and_the_writer_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = BrokenFiles()

    async def main() -> None:
        spool = await opened(cfg(tmp_path), files)
        await spool.store(rec(0))
        files.broken = True
        with pytest.raises(SpoolWriteError) as info:
            await spool.store(rec(1))
        assert str(info.value) == "the spool write failed: OSError: [Errno 5] ValueError('a bug')"
        await spool.store(rec(2))  # in a new segment: the old one is sealed
        spool.request_rotate()
        for _ in range(200):
            if all(s.sealed for s in spool.segments.values()):
                break
            await asyncio.sleep(0.01)
        assert [s.records for s in spool.segments.values()] == [1, 1]
        assert drain_by_hand(spool) == 1 and drain_by_hand(spool) == 1
        assert spool.status()["records"] == 0 and not spool.waiting
        spool.close()

    asyncio.run(main())
    assert logged(caplog, "spool writer failed")["exc_info"] is not None


class TruncateFails(CountingFiles):
    def truncate(self, fd: int, size: int) -> None:
        raise OSError(errno.EIO, "Input/output error")


def test_a_record_that_failed_is_never_read_back_even_if_it_could_not_be_cut(
    tmp_path: Path,
) -> None:
    files = TruncateFails()

    async def main() -> None:
        spool = await opened(cfg(tmp_path), files)
        await spool.store(rec(0))
        files.fail_fsync = OSError(errno.EIO, "Input/output error")
        with pytest.raises(SpoolWriteError):
            await spool.store(rec(1))  # written whole, but its fsync failed
        files.fail_fsync = None
        while spool.oldest_sealed() is None:
            await asyncio.sleep(0.01)
        seg = spool.oldest_sealed()
        assert seg is not None
        assert [e.record for e in spool.read(seg)] == [rec(0)]
        spool.close()

    asyncio.run(main())


def test_segment_and_lock_files_are_private_and_a_missing_parent_is_created(
    tmp_path: Path,
) -> None:
    c = SpoolConfig(enabled=True, dir=str(tmp_path / "a" / "b" / "spool"))

    async def main() -> None:
        spool = await opened(c)
        await spool.store(rec(0))
        spool.close()

    asyncio.run(main())
    ((_, path),) = list_segments(Path(c.dir))
    assert path.stat().st_mode & 0o777 == 0o600
    assert (Path(c.dir) / "LOCK").stat().st_mode & 0o777 == 0o600


def test_the_lock_names_its_owner(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    first = Spool(c)
    first.open()
    try:
        with pytest.raises(SpoolLocked) as info:
            Spool(c).open()
        assert str(info.value) == (
            f"the spool directory {tmp_path / 'spool'} is owned by another process (pid"
            f" {os.getpid()}); one process owns a spool: give each worker or replica its own"
            " directory"
        )
    finally:
        first.release_lock()
        first.release_lock()  # twice is harmless
    assert (tmp_path / "spool" / "LOCK").read_text() == f"{os.getpid()}\n"


def test_a_short_write_is_continued_and_one_that_writes_nothing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:1])))
    FileOps().write(fd, b"0123456789")  # one byte per call
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with pytest.raises(OSError) as info:
        FileOps().write(fd, b"more")
    os.close(fd)
    assert info.value.errno == errno.EIO and str(info.value) == "[Errno 5] short write"
    assert path.read_bytes() == b"0123456789"


class HangingFiles(FileOps):
    def __init__(self) -> None:
        self.hang = threading.Event()
        self.release = threading.Event()

    def fsync(self, fd: int) -> None:
        if self.hang.is_set():
            self.release.wait(10)
        super().fsync(fd)


def test_a_disk_that_hangs_is_answered_503_within_the_commit_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "COMMIT_TIMEOUT_S", 0.2)
    files = HangingFiles()

    async def main() -> None:
        spool = await opened(cfg(tmp_path), files)
        metrics = spool.metrics
        assert metrics is not None
        await spool.store(rec(0))
        files.hang.set()
        with pytest.raises(SpoolWriteError) as info:
            await spool.store(rec(1))
        assert str(info.value) == "the spool's fsync did not complete within 0s"
        assert metrics.spool_errors.labels("disk").value == 1
        files.hang.clear()
        files.release.set()
        await spool.store(rec(2))
        spool.close()

    asyncio.run(main())


class OpenFailsOnce(FileOps):
    def __init__(self) -> None:
        self.failures = 1

    def open_segment(self, path: Path) -> int:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().open_segment(path)


def test_a_segment_that_cannot_be_created_is_503_and_the_next_append_works(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        spool = await opened(cfg(tmp_path), OpenFailsOnce())
        with pytest.raises(SpoolWriteError) as info:
            await spool.store(rec(1))
        assert str(info.value) == (
            "the spool write failed: OSError: [Errno 28] No space left on device"
        )
        assert not spool.waiting and spool.segments == {}
        await spool.store(rec(2))
        spool.close()
        assert stored(spool.dir) == [rec(2)]

    asyncio.run(main())


class CloseFails(FileOps):
    def close(self, fd: int) -> None:
        super().close(fd)
        raise OSError(errno.EIO, "Input/output error")


def test_a_close_that_fails_at_a_rotation_does_not_stop_the_writer(tmp_path: Path) -> None:
    async def main() -> None:
        spool = await opened(cfg(tmp_path), CloseFails())
        await spool.store(rec(0))
        spool.request_rotate()
        for _ in range(200):
            if spool.oldest_sealed() is not None:
                break
            await asyncio.sleep(0.01)
        await spool.store(rec(1))
        assert spool.usable() == (True, "ok")
        spool.close()
        assert stored(spool.dir) == [rec(0), rec(1)]

    asyncio.run(main())


class SlowWrites(FileOps):
    def __init__(self) -> None:
        self.slow = False

    def write(self, fd: int, data: bytes) -> None:
        if self.slow:
            time.sleep(0.2)  # the writer thread's disk, not a wait in the test
        super().write(fd, data)


def test_close_lets_the_writer_finish_what_is_queued(tmp_path: Path) -> None:
    files = SlowWrites()

    async def main() -> None:
        spool = await opened(cfg(tmp_path), files)
        files.slow = True
        tasks = [asyncio.ensure_future(spool.store(rec(i, b"u%d" % i))) for i in range(200)]
        await asyncio.sleep(0)  # every append is queued
        spool.close()  # blocking: the loop does not run until the writer is done
        assert len(stored(spool.dir)) == 200
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_record_over_the_size_limit_is_refused_and_leaves_the_spool_usable(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        spool = await opened(cfg(tmp_path))
        await spool.store(rec(0))
        huge = KafkaRecord("t.push", b"big", b"\x00" * fmt.MAX_PAYLOAD, [])
        with pytest.raises(SpoolWriteError) as info:
            await spool.store(huge)
        assert str(info.value) == f"a record over {fmt.MAX_PAYLOAD} bytes cannot be spooled"
        assert spool.usable() == (True, "ok") and not spool.holds(huge)
        await spool.store(rec(1))
        assert len(spool.segments) == 1  # the same segment goes on
        spool.close()

    asyncio.run(main())


def test_a_restart_appends_to_a_new_segment_after_the_replayed_ones(tmp_path: Path) -> None:
    directory = write_spool(tmp_path, 10)

    async def main() -> None:
        spool = await opened(cfg(tmp_path))
        await spool.store(rec(10, b"k2"))
        spool.close()

    asyncio.run(main())
    assert [seq for seq, _ in list_segments(directory)] == [1, 2]
    assert stored(directory) == [rec(i, b"k%d" % (i % 4)) for i in range(10)] + [rec(10, b"k2")]
    found = replay_dir(directory, skip_corrupt=False, repair=False)
    assert found.records == 11 and not found.skipped and found.truncated_bytes == 0


def test_replay_sums_torn_tails_removes_emptied_segments_and_keeps_going(
    tmp_path: Path,
) -> None:
    directory = write_spool(tmp_path, 300, segment_bytes=4096)
    segs = list_segments(directory)
    assert len(segs) >= 4
    tails = []
    for seq, path in segs[1:3]:  # two torn tails
        data = path.read_bytes()
        tail = fmt.frame(seq, len(data), fmt.encode_payload(rec(99), 1))[:-3]
        path.write_bytes(data + tail)
        tails.append((path, tail))
    empty = directory / fmt.segment_name(segs[-1][0] + 1)  # only a torn frame: nothing left
    empty.write_bytes(fmt.FILE_MAGIC + b"\xa5GW")
    later = directory / fmt.segment_name(segs[-1][0] + 2)  # and a whole segment after it
    later.write_bytes(
        fmt.FILE_MAGIC + fmt.frame(segs[-1][0] + 2, 8, fmt.encode_payload(rec(500, b"z"), 1))
    )
    metrics = IngressMetrics(process=False)
    spool = Spool(cfg(tmp_path), metrics)
    found = spool.open()
    cut = sum(len(t) for _, t in tails) + 3
    assert found.truncated_bytes == cut
    assert metrics.spool_truncated_bytes.labels().value == cut
    for path, tail in tails:
        assert path.with_name(path.name + ".torn").read_bytes() == tail
    assert not empty.exists()
    assert found.records == 301 and spool.status()["records"] == 301
    assert spool.holds(rec(0, b"z"))
    # a torn segment delivered: its .torn goes with it
    path = tails[0][0]
    while (seg := spool.oldest_sealed()) is not None and seg.path != path:
        drain_by_hand(spool)
    drain_by_hand(spool)
    assert not path.exists() and not path.with_name(path.name + ".torn").exists()
    spool.release_lock()


def test_a_directory_that_does_not_exist_yet_holds_nothing(tmp_path: Path) -> None:
    found = replay_dir(tmp_path / "none", skip_corrupt=False, repair=False)
    assert found.records == 0 and found.segments == []


def test_a_key_is_held_until_its_last_record_is_acknowledged(tmp_path: Path) -> None:
    async def main() -> None:
        spool = await opened(cfg(tmp_path))
        for i in range(3):
            await spool.store(rec(i, b"a"))
        await spool.store(rec(3, b"b"))
        spool.request_rotate()
        for _ in range(200):
            if spool.oldest_sealed() is not None:
                break
            await asyncio.sleep(0.01)
        seg = spool.oldest_sealed()
        assert seg is not None
        a, b = ("t.push", b"a"), ("t.push", b"b")
        left = []
        for e in spool.read(seg):
            spool.delivered(seg, e)
            left.append(dict(spool.waiting))
        assert left == [{a: 2, b: 1}, {a: 1, b: 1}, {b: 1}, {}]
        assert not spool.holds(rec(9, b"a"))
        spool.close()

    asyncio.run(main())


def test_the_readiness_headroom_is_exact_to_the_byte_and_counts_appends_in_flight(
    tmp_path: Path,
) -> None:
    bare = frame_size(KafkaRecord("t", b"k", b"", []))

    def sized(frame: int) -> KafkaRecord:  # a record whose frame is ``frame`` bytes
        return KafkaRecord("t", b"k", b"x" * (frame - bare), [])

    async def main() -> None:
        # (max_bytes, the headroom): a tenth, at most 64 KiB
        for name, max_bytes, room in (("a", 40965, 4096), ("b", 1048576, 65536)):
            files = HangingFiles()
            spool = await opened(cfg(tmp_path / name, max_bytes=max_bytes), files)
            target = max_bytes - room - len(fmt.FILE_MAGIC)
            while target > 0:
                size = min(target, 30000)
                if 0 < target - size < 100:
                    size -= 100  # the last record must hold a frame
                await spool.store(sized(size))
                target -= size
            assert spool.bytes == max_bytes - room
            assert spool.usable() == (True, "ok"), name
            # appends not yet on disk count as well
            files.hang.set()
            task = asyncio.ensure_future(spool.store(sized(100)))
            await asyncio.sleep(0)  # one turn: the append is queued, its fsync hangs
            assert spool.bytes == max_bytes - room and not task.done()
            assert spool.usable()[0] is False, name
            files.release.set()
            await task
            assert spool.usable() == (False, f"spool full ({spool.bytes} of {max_bytes} bytes)")
            spool.close()

    asyncio.run(main())

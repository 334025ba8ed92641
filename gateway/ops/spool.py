"""``gateway spool status|check|drain``: look at a spool directory, verify it, deliver it.

- ``status`` reads the segments (without the lock, so it works beside a running gateway):
  records, bytes, oldest age, keys waiting, and who owns the directory.
- ``check`` verifies every frame's checksum, like fsck: exit 1 on damage in the middle of a
  segment (the gateway would refuse to start), 0 otherwise; a torn tail is reported (the
  gateway cuts it at start: those records were never acknowledged).
- ``drain`` takes the lock (so the gateway must be stopped), delivers the spool to Kafka with
  the gateway's producer, and exits once it is empty (exit 1 if ``--timeout`` passes first).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, TextIO

from gateway.config import Config
from gateway.kafka.spool import format as fmt
from gateway.kafka.spool.store import SpoolError, list_segments

__all__ = ["spool_check", "spool_drain", "spool_status"]


def _owner(directory: Path) -> str | None:
    """The pid holding the directory's lock, or None if nobody holds it."""
    path = directory / "LOCK"
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _survey(directory: Path) -> dict[str, Any]:
    keys: collections.Counter[tuple[str, bytes | None]] = collections.Counter()
    out: dict[str, Any] = {"dir": str(directory), "segments": []}
    oldest: int | None = None
    records = size = 0
    for seq, path in list_segments(directory):
        data = path.read_bytes()
        sc = fmt.scan(data, seq)
        for e in sc.entries:
            keys[fmt.ordering_key(e.record)] += 1
        if sc.entries and oldest is None:
            oldest = sc.entries[0].spooled_at_ms
        records += len(sc.entries)
        size += len(data)
        out["segments"].append(
            {
                "segment": path.name,
                "bytes": len(data),
                "records": len(sc.entries),
                "torn_at": sc.torn_at,
                "damaged": [{"offset": a, "next_good": b} for a, b in sc.damaged],
            }
        )
    out.update(
        records=records,
        bytes=size,
        keys_waiting=len(keys),
        oldest_age_s=round(time.time() - oldest / 1000, 3) if oldest is not None else 0.0,
        owner_pid=_owner(directory),
    )
    return out


def spool_status(cfg: Config, out: TextIO, *, as_json: bool = False) -> int:
    directory = Path(cfg.spool.dir)
    if not directory.is_dir():
        print(f"spool {directory}: no such directory (nothing spooled yet)", file=out)
        return 0
    s = _survey(directory)
    if as_json:
        s.pop("segments")
        print(json.dumps(s), file=out)
        return 0
    owner = f"owned by pid {s['owner_pid']}" if s["owner_pid"] else "not owned (no gateway)"
    print(f"spool {directory} ({owner}, spool.enabled = {cfg.spool.enabled})", file=out)
    print(f"  records:      {s['records']}  (in segment files; some may be delivered)", file=out)
    print(f"  bytes:        {s['bytes']} of {cfg.spool.max_bytes}", file=out)
    print(f"  segments:     {len(s['segments'])}", file=out)
    print(f"  oldest age:   {s['oldest_age_s']:.1f}s", file=out)
    print(f"  keys waiting: {s['keys_waiting']}", file=out)
    return 0


def spool_check(cfg: Config, out: TextIO) -> int:
    directory = Path(cfg.spool.dir)
    if not directory.is_dir():
        print(f"spool {directory}: no such directory", file=out)
        return 0
    s = _survey(directory)
    damaged = 0
    for seg in s["segments"]:
        line = f"{seg['segment']}: {seg['records']} records, {seg['bytes']} bytes"
        if seg["torn_at"] is not None:
            line += f"; torn tail at offset {seg['torn_at']} (cut at start; never acknowledged)"
        for d in seg["damaged"]:
            damaged += 1
            line += f"; DAMAGED at offset {d['offset']} (next good record at {d['next_good']})"
        print(line, file=out)
    if damaged:
        print(
            f"{damaged} damaged region(s): the gateway refuses to start on this spool; with"
            " spool.skip_corrupt = true it starts and the damaged bytes are lost",
            file=out,
        )
        return 1
    print(f"ok: {s['records']} records in {len(s['segments'])} segments verify", file=out)
    return 0


def spool_drain(cfg: Config, out: TextIO, *, timeout_s: float) -> int:
    return asyncio.run(_drain(cfg, out, timeout_s))


async def _drain(cfg: Config, out: TextIO, timeout_s: float) -> int:
    from gateway.kafka import create_sink
    from gateway.kafka.spool import Spool
    from gateway.kafka.spool.drain import Drainer
    from gateway.kafka.topics import gateway_topics
    from gateway.metrics import IngressMetrics

    metrics = IngressMetrics(process=False)
    spool = Spool(cfg.spool, metrics)
    try:
        found = await asyncio.get_running_loop().run_in_executor(None, spool.open)
    except SpoolError as exc:
        print(f"spool drain: {exc}", file=out)
        return 2
    spool.start(asyncio.get_running_loop())
    print(f"spool {spool.dir}: {found.records} records to deliver", file=out)
    sink = create_sink(cfg.kafka, metrics, warm_topics=tuple(gateway_topics(cfg, tag_sync=False)))
    await sink.start()
    drainer = Drainer(spool, sink.publish_now, sink.kafka_down)
    started = time.monotonic()
    code = 0
    try:
        await asyncio.wait_for(drainer.run(until_empty=True), timeout_s)
    except TimeoutError:
        code = 1
    finally:
        await sink.close()
        await asyncio.get_running_loop().run_in_executor(None, spool.close)
    took = time.monotonic() - started
    rate = drainer.delivered / took if took > 0 else 0.0
    left = spool.records
    print(
        f"delivered {drainer.delivered} records in {took:.1f}s ({rate:.0f}/s); {left} left"
        + (f" (--timeout {timeout_s:.0f}s passed)" if code else ""),
        file=out,
    )
    return code

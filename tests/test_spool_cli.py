"""``gateway spool status|check|drain`` on a real spool directory, drain into real Kafka."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import SpoolConfig
from gateway.core.records import KafkaRecord, header
from gateway.kafka.spool import Spool
from gateway.kafka.spool import format as fmt
from gateway.kafka.spool.store import list_segments

from .conftest import API_VERSION, KAFKA_API_VERSION, Broker, read_topic, unique


def write_config(tmp_path: Path, bootstrap: str = "127.0.0.1:1", **spool: object) -> Path:
    lines = [
        "[allowlist]",
        "refresh_interval_s = 0",
        "[kafka]",
        f'bootstrap_servers = "{bootstrap}"',
        f'api_version = "{API_VERSION}"',
        "ack_timeout_s = 3.0",
        "[spool]",
        "enabled = true",
        f'dir = "{tmp_path / "spool"}"',
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in spool.items()]
    path = tmp_path / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fill(tmp_path: Path, records: list[KafkaRecord], **kw: object) -> None:
    async def go() -> None:
        spool = Spool(SpoolConfig(enabled=True, dir=str(tmp_path / "spool"), **kw))  # type: ignore[arg-type]
        spool.open()
        spool.start(asyncio.get_running_loop())
        for r in records:
            await spool.store(r)
        spool.close()

    asyncio.run(go())


def recs(topic: str, n: int) -> list[KafkaRecord]:
    return [
        KafkaRecord(topic, b"user-%d" % (i % 3), b'{"n":%d}' % i, [("ce_id", b"%d" % i)])
        for i in range(n)
    ]


def test_status_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    fill(tmp_path, recs("t.push", 30), segment_bytes=4096)
    assert main(["spool", "status", "--config", str(cfg), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["records"] == 30 and status["keys_waiting"] == 3
    assert status["owner_pid"] is None and status["oldest_age_s"] >= 0
    assert main(["spool", "check", "--config", str(cfg)]) == 0
    assert "ok: 30 records" in capsys.readouterr().out
    # damage in the middle of the first segment: check fails naming the offset
    (seq, path), *_ = list_segments(tmp_path / "spool")
    data = bytearray(path.read_bytes())
    bad = fmt.scan(bytes(data), seq).entries[1].offset
    data[bad + 13] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["spool", "check", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED at offset {bad}" in out and path.name in out


def test_drain_delivers_in_order_and_empties_the_spool(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = f"{unique('spool-cli')}.push"
    records = recs(topic, 200)
    fill(tmp_path, records, segment_bytes=4096)
    cfg = write_config(tmp_path, broker.bootstrap_servers, drain_batch=64)
    # while another process owns the directory, drain refuses
    owner = Spool(SpoolConfig(enabled=True, dir=str(tmp_path / "spool")))
    owner.open()
    assert main(["spool", "drain", "--config", str(cfg), "--timeout", "30"]) == 2
    assert "owned by another process" in capsys.readouterr().out
    owner.release_lock()
    assert main(["spool", "drain", "--config", str(cfg), "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert "delivered 200 records" in out and "0 left" in out, out
    assert list_segments(tmp_path / "spool") == []
    got = read_topic(broker.bootstrap_servers, topic, expect=200)
    by_key: dict[bytes, list[int]] = {}
    for rec in got:
        by_key.setdefault(rec.key, []).append(int(header(rec.headers, "ce_id") or -1))
    assert sorted(i for ids in by_key.values() for i in ids) == list(range(200))
    for ids in by_key.values():
        assert ids == sorted(ids)


def test_serve_refuses_to_start_on_a_damaged_spool(tmp_path: Path) -> None:
    fill(tmp_path, recs("t.push", 5))
    ((seq, path),) = list_segments(tmp_path / "spool")
    data = bytearray(path.read_bytes())
    bad = fmt.scan(bytes(data), seq).entries[2].offset
    data[bad + 14] ^= 0x01
    path.write_bytes(bytes(data))
    cfg = write_config(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.returncode != 0
    assert f"{path} is damaged at offset {bad}" in proc.stderr, proc.stderr[-2000:]
    assert path.read_bytes() == bytes(data)  # nothing was cut or rewritten


def _delivered(bootstrap: str, topic: str) -> int:
    """Records on ``topic`` now (the sum of its partitions' end offsets), 0 before it exists."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), api_version=KAFKA_API_VERSION)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts]) if parts else {}
        return sum(ends.values())
    finally:
        consumer.close()


def test_a_drain_killed_with_sigkill_loses_nothing_and_the_next_one_finishes(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 in the middle of `gateway spool drain`: a segment is deleted only once every
    record in it is acknowledged, so the next drain delivers the rest. What the killed one had
    delivered from a segment it had not finished comes again: at-least-once, and only those."""
    topic = f"{unique('spool-kill')}.push"
    n = 12_000
    records = [
        KafkaRecord(topic, b"user-%d" % (i % 7), b'{"n":%d}' % i, [("ce_id", b"%d" % i)])
        for i in range(n)
    ]

    async def go() -> None:  # concurrent appends: group commit keeps the fill fast
        spool = Spool(SpoolConfig(enabled=True, dir=str(tmp_path / "spool"), segment_bytes=32768))
        spool.open()
        spool.start(asyncio.get_running_loop())
        for i in range(0, n, 500):
            await asyncio.gather(*(spool.store(r) for r in records[i : i + 500]))
        spool.close()

    asyncio.run(go())
    segments = len(list_segments(tmp_path / "spool"))
    assert segments > 20, segments
    cfg = write_config(tmp_path, broker.bootstrap_servers, drain_batch=32)
    cmd = [sys.executable, "-m", "gateway", "spool", "drain", "--config", str(cfg)]
    drain = subprocess.Popen([*cmd, "--timeout", "120"], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while drain.poll() is None and time.monotonic() < deadline:
            if _delivered(broker.bootstrap_servers, topic) >= n // 6:
                break
            time.sleep(0.02)
        assert drain.poll() is None, "the drain ended before it could be killed"
        drain.send_signal(signal.SIGKILL)
        drain.wait(10)
    finally:
        if drain.poll() is None:
            drain.kill()
    before = _delivered(broker.bootstrap_servers, topic)
    left = len(list_segments(tmp_path / "spool"))
    capsys.readouterr()
    assert main(["spool", "status", "--config", str(cfg), "--json"]) == 0
    spooled = json.loads(capsys.readouterr().out)["records"]
    assert 0 < before < n and 0 < left < segments, (before, left, segments)
    assert n - before <= spooled < n, (before, spooled)  # the undelivered are all still there
    # the next drain takes the directory over (the dead owner's lock went with it)
    assert main(["spool", "drain", "--config", str(cfg), "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    assert "0 left" in out, out
    assert list_segments(tmp_path / "spool") == []
    got = read_topic(broker.bootstrap_servers, topic, timeout_s=60)  # to the end offsets
    ids = [int(header(rec.headers, "ce_id") or -1) for rec in got]
    copies = Counter(ids)
    assert set(copies) == set(range(n)), f"lost: {sorted(set(range(n)) - set(copies))[:5]}"
    duplicates = sum(c - 1 for c in copies.values())
    # only what was still spooled at the kill can come twice, and only what had been sent
    assert duplicates <= min(before, spooled), (duplicates, before, spooled)
    # each user's records in the order they were spooled, by first copy
    first: dict[int, tuple[int, int]] = {}
    for rec, i in zip(got, ids, strict=True):
        first.setdefault(i, (rec.partition, rec.offset))
    for user in range(7):
        places = [first[i] for i in range(user, n, 7)]
        assert places == sorted(places), f"user-{user} out of order"
    print(
        f"\nspool drain kill -9: {before} of {n} delivered before the kill, {left} of "
        f"{segments} segments left, {duplicates} duplicates after the second drain"
    )

"""The ``spool`` rows: what the durable local spool costs, and how fast it drains.

- ``ours`` (spool off) and ``ours + spool`` (spool on, Kafka healthy), each loaded twice,
  alternating (off, on, off, on), so the ratio compares figures taken side by side;
- ``spooling``: spool on and Kafka away (the bootstrap address answers nobody), so every
  request is appended and fsynced before its 2xx: requests/s and p99 of the group commit;
- ``drain``: ``gateway spool drain`` delivering what the spooling run left, to the run's
  broker. The bench body has one user, so that is one key, whose records go one after another
  (the worst case); a second drain has records of ``--spool-keys`` users (the usual case).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import Load, LoadResult, child_env, python
from bench.ingress import load_server
from gateway.config import SpoolConfig
from gateway.core.records import KafkaRecord

__all__ = ["spool_rows"]


def _with_spool(config: Path, spool_dir: Path, out: Path, bootstrap: str | None = None) -> Path:
    text = config.read_text()
    if bootstrap is not None:
        text = re.sub(r'bootstrap_servers = "[^"]*"', f'bootstrap_servers = "{bootstrap}"', text)
    text = text.replace(
        "[[sources]]", f'[spool]\nenabled = true\ndir = "{spool_dir}"\n\n[[sources]]'
    )
    out.write_text(text)
    return out


def _drain(config: Path, workdir: Path) -> dict[str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [python(), "-m", "gateway", "spool", "drain", "--config", str(config), "--timeout", "300"],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=workdir,
        timeout=360,
    )
    m = re.search(r"delivered (\d+) records in ([\d.]+)s \((\d+)/s\); (\d+) left", proc.stdout)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"spool drain failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return {
        "records": float(m.group(1)),
        "seconds": float(m.group(2)),
        "records_per_s": float(m.group(3)),
        "left": float(m.group(4)),
        "wall_s": time.monotonic() - started,
    }


def _fill(spool_dir: Path, records: int, keys: int, body_bytes: int) -> None:
    """``records`` records of ``keys`` users, written through the spool itself."""

    async def go() -> None:
        from gateway.kafka.spool import Spool

        spool = Spool(SpoolConfig(enabled=True, dir=str(spool_dir)))
        spool.open()
        spool.start(asyncio.get_running_loop())
        value = b"x" * body_bytes
        batch = []
        for i in range(records):
            rec = KafkaRecord(
                "bench.ours.push", b"user-%d" % (i % keys), value, [("ce_id", b"b-%d" % i)]
            )
            batch.append(spool.store(rec))
            if len(batch) == 1000:
                await asyncio.gather(*batch)
                batch = []
        await asyncio.gather(*batch)
        spool.close()

    asyncio.run(go())


def spool_rows(config: Path, workdir: Path, load: Load, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    healthy = _with_spool(config, workdir / "spool-healthy", workdir / "spool-healthy.toml")
    runs: dict[str, list[LoadResult]] = {"off": [], "on": []}
    for _ in range(2):
        runs["off"].append(load_server("ours", config, workdir, load, args))
        runs["on"].append(load_server("ours", healthy, workdir, load, args))
        print(
            f"   off {runs['off'][-1].rps:.0f} req/s, on {runs['on'][-1].rps:.0f} req/s",
            flush=True,
        )
    off = sum(r.rps for r in runs["off"]) / 2
    on = sum(r.rps for r in runs["on"]) / 2
    out["healthy"] = {
        "off_rps": off,
        "on_rps": on,
        "ratio": on / off,
        "off_p99_ms": max(r.p99_ms for r in runs["off"]),
        "on_p99_ms": max(r.p99_ms for r in runs["on"]),
    }
    # spooling: Kafka away for the whole run
    spool_dir = workdir / "spool-away"
    away = _with_spool(config, spool_dir, workdir / "spool-away.toml", bootstrap="127.0.0.1:9")
    r = load_server("ours", away, workdir, load, args)
    out["spooling"] = {
        "rps": r.rps,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "non_2xx": r.non_2xx,
        "requests": r.requests,
    }
    print(f"   spooling: {r.rps:.0f} req/s, p99 {r.p99_ms:.2f} ms", flush=True)
    # drain what the spooling run left (one key), then many keys, into the run's broker
    out["drain_one_key"] = _drain(_with_spool(config, spool_dir, workdir / "d1.toml"), workdir)
    many = workdir / "spool-many"
    _fill(many, args.spool_records, args.spool_keys, load.body_bytes)
    out["drain_many_keys"] = _drain(_with_spool(config, many, workdir / "d2.toml"), workdir)
    out["drain_many_keys"]["keys"] = args.spool_keys
    return out


def print_spool(s: dict[str, Any]) -> None:
    h = s["healthy"]
    print(
        f"spool, Kafka healthy: off {h['off_rps']:.0f} req/s (p99 {h['off_p99_ms']:.1f} ms), "
        f"on {h['on_rps']:.0f} req/s (p99 {h['on_p99_ms']:.1f} ms): on / off = {h['ratio']:.2f}"
    )
    sp = s["spooling"]
    print(
        f"spool, Kafka away (every request fsynced to the spool): {sp['rps']:.0f} req/s, "
        f"p50 {sp['p50_ms']:.2f} ms, p99 {sp['p99_ms']:.2f} ms, non-2xx {sp['non_2xx']}"
    )
    for name, label in (("drain_one_key", "one key"), ("drain_many_keys", "many keys")):
        d = s[name]
        keys = f" ({d['keys']:.0f} keys)" if "keys" in d else ""
        print(
            f"spool drain, {label}{keys}: {d['records']:.0f} records in {d['seconds']:.1f}s"
            f" = {d['records_per_s']:.0f} records/s, {d['left']:.0f} left"
        )

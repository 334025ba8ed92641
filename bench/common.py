"""What every measurement shares: the run's constants, child processes, RSS and wrk.

Every server and client runs in a process of its own, started with :func:`child_env` and
stopped with :func:`stop_process` (bounded: a stuck child must not hang the run).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.devkit import samples

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).with_name("post.lua")
PATH = "/v1/onesignal/events"
SECRET = "bench-secret-" + "0123456789abcdef" * 2
SECRET_ENV = "BENCH_EVENT_STREAM_SECRETS"  # noqa: S105 (a variable's name)
XFF = "34.90.12.34"  # in OneSignal's published europe-west4 ranges; the peer 127.0.0.1 is trusted
PLACEHOLDER = "EVENT_ID_PLACEHOLDER"
WRK_THREADS = 2
RESULTS = ROOT / "bench-results"


# ---------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any] | None, timeout_s: float = 15.0) -> None:
    """SIGTERM (graceful: the gateway flushes its producer), then SIGKILL; bounded."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _one_status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (uvicorn's worker processes when ``--workers`` > 1)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, ()))
    return tree


def cpu_by_process(pid: int) -> dict[int, float]:
    """User + system CPU seconds of ``pid`` and of each descendant, by process id."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for p in _process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[p] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants (the producer process)."""
    return sum(cpu_by_process(pid).values())


def cpu_per_request(
    before: dict[int, float], after: dict[int, float], requests: int
) -> dict[str, float]:
    """CPU microseconds per request over a pass, from two :func:`cpu_by_process` readings:
    the whole tree, the first process (the server) and its descendants (the producer process,
    or uvicorn's workers)."""
    main = next(iter(after), None)
    spent = {p: after[p] - before.get(p, 0.0) for p in after}
    n = max(1, requests)
    total = sum(spent.values())
    server = spent.get(main, 0.0) if main is not None else 0.0
    return {
        "total": round(1e6 * total / n, 1),
        "server": round(1e6 * server / n, 1),
        "children": round(1e6 * (total - server) / n, 1),
    }


def read_status_kb(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` figure in kB (VmRSS, VmHWM), summed over the process and its
    worker processes; 0 once the process is gone."""
    return sum(_one_status_kb(p, key) for p in _process_tree(pid))


class RssSampler:
    """Polls a process's VmRSS on a thread: the peak between start and stop, and a series."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            kb = read_status_kb(self.pid, "VmRSS")
            if kb:
                self.samples.append((time.monotonic(), kb))
            self._stop.wait(self.interval_s)

    @property
    def peak_kb(self) -> int:
        return max((kb for _, kb in self.samples), default=0)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_ready(url: str, proc: subprocess.Popen[Any], log: Path, timeout_s: float = 60.0) -> None:
    """Until ``GET /readyz`` answers 200: the gateway also needs its producer and metadata."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {tail(log)}")
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} not ready within {timeout_s}s: {last}; {tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def python() -> str:
    return sys.executable


def child_env(**extra: str) -> dict[str, str]:
    """Every child loads the run's config, which names the secret's variable."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{SECRET_ENV: SECRET}, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


# ---------------------------------------------------------------------------------------------
# wrk


@dataclass
class LoadResult:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    peak_rss_mb: float
    notes: dict[str, Any] = field(default_factory=dict)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, p50/p99 (ms), request count, non-2xx/3xx and socket errors from --latency."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rps:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{out}")
    pct = dict(re.findall(r"^\s+(\d+)%\s+(\S+)$", out, re.M))
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(rps.group(1)),
        "p50_ms": _ms(pct["50"]) if "50" in pct else math.nan,
        "p99_ms": _ms(pct["99"]) if "99" in pct else math.nan,
        "requests": int(total.group(1)) if total else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(g) for g in sock.groups()) if sock else 0,
    }


class Load:
    """wrk runs with the benchmark body; every run gets its own id nonce."""

    def __init__(self, workdir: Path) -> None:
        self.body_file = workdir / "body.json"
        payload = samples.event_stream_payload("message.push.clicked", event_id=PLACEHOLDER)
        body = orjson.dumps(payload)
        assert body.count(PLACEHOLDER.encode()) == 1
        self.body_file.write_bytes(body)
        self.body_bytes = len(body)
        self.nonces: set[str] = set()

    def _nonce(self) -> str:
        while True:
            n = uuid.uuid4().hex[:8]
            if n not in self.nonces:
                self.nonces.add(n)
                return n

    def run(
        self,
        url: str,
        duration_s: float,
        connections: int,
        *,
        delay_ms: int = 0,
        threads: int = WRK_THREADS,
    ) -> dict[str, Any]:
        cmd = [
            "wrk",
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(LUA),
            url + PATH,
            "--",
            self._nonce(),
            str(self.body_file),
            SECRET,
            XFF,
        ]
        env = dict(os.environ)
        env.pop("BENCH_DELAY_MS", None)
        if delay_ms > 0:
            env["BENCH_DELAY_MS"] = str(delay_ms)
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=duration_s + 60, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
        return parse_wrk(out.stdout)


def load_average() -> str:
    """1, 5 and 15 minute load averages: the machine is shared, the figures say how much."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())

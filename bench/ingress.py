"""Rows 1, 3 and 4: the HTTP targets (bare, naive, ours), each a server loaded with wrk.

Every HTTP target reads the same config file (:func:`write_config`), so they differ in their
handler only: the same uvicorn settings, workers, trusted proxy and loopback address.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    PATH,
    SECRET_ENV,
    Load,
    LoadResult,
    RssSampler,
    child_env,
    free_port,
    python,
    read_status_kb,
    stop_process,
    wait_ready,
)
from bench.profiling import profile


def write_config(workdir: Path, bootstrap: str, workers: int = 1, api_version: str = "") -> Path:
    """The gateway's config for the run: real verification, dedupe on, loopback only.

    The bare and naive servers read the same ``[server]`` settings, ``workers`` included, so
    every HTTP target runs with the same number of processes. ``api_version`` is the mock's
    pin, or empty against Apache Kafka (kafka-python negotiates; a pin would be a ceiling).
    """
    path = workdir / "gateway.toml"
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0
workers = {workers}
trusted_proxies = ["127.0.0.1/32"]
proxy_header = "x-forwarded-for"
log_level = "warning"
access_log = false

[allowlist]
scopes = ["europe-west4"]
snapshot = ""
include_onesignal_published = true
refresh_interval_s = 0  # no download in the middle of a measurement

[kafka]
bootstrap_servers = "{bootstrap}"
api_version = "{api_version}"
topic = "bench.ours.{{channel}}"
dead_letter_topic = "bench.ours.dead-letter"

[dedupe]
window_s = 3600.0

[[sources]]
name = "event-stream"
path = "{PATH}"
format = "event-stream"
require_allowlisted_ip = true
require_secret = true
secrets_env = "{SECRET_ENV}"
"""
    )
    return path


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


@contextlib.contextmanager
def server(name: str, config: Path, workdir: Path) -> Iterator[Server]:
    port = free_port()
    if name == "ours":
        cmd = [python(), "-m", "gateway", "serve", "--config", str(config)]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
    else:
        cmd = [python(), "-m", "bench.apps.serve", f"bench.apps.{name}:app"]
        cmd += ["--config", str(config), "--port", str(port)]
    log = workdir / f"{name}-{port}.log"
    env = child_env(BENCH_CONFIG=str(config))
    proc = None
    with open(log, "wb") as log_file:
        try:
            proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc, log)
            yield Server(name, proc, url, log)
        finally:
            stop_process(proc)


def gateway_outcomes(url: str) -> dict[str, float]:
    """``gateway_requests_total`` by outcome: proves the load hit the publish path."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for m in re.finditer(
        r'^gateway_requests_total\{[^}]*outcome="([^"]+)"[^}]*\} ([\d.e+]+)$', text, re.M
    ):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    dedupe = re.search(r"^gateway_dedupe_entries ([\d.e+]+)$", text, re.M)
    if dedupe:
        out["dedupe_entries"] = float(dedupe.group(1))
    return out


def load_server(
    name: str, config: Path, workdir: Path, load: Load, args: argparse.Namespace
) -> LoadResult:
    with server(name, config, workdir) as srv:
        load.run(srv.url, args.warmup, args.connections)
        with RssSampler(srv.proc.pid) as rss:
            w = load.run(srv.url, args.duration, args.connections)
        peak_kb = max(rss.peak_kb, read_status_kb(srv.proc.pid, "VmHWM"))
        notes: dict[str, Any] = {}
        if name == "ours":
            notes["outcomes"] = gateway_outcomes(srv.url)
            if args.profile:
                notes["profile"] = profile(srv.proc.pid, srv.url, load, args)
    return LoadResult(name=name, peak_rss_mb=peak_kb / 1024, notes=notes, **w)

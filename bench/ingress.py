"""Rows 1, 3 and 4: the HTTP targets (bare, naive, ours), each a server loaded with wrk.

Every HTTP target reads the same config file (:func:`write_config`), so they differ in their
handler only: the same uvicorn settings, workers, trusted proxy and loopback address.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import tomllib
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
    cpu_by_process,
    cpu_per_request,
    free_port,
    python,
    read_status_kb,
    stop_process,
    wait_ready,
)
from bench.profiling import profile


def write_config(
    workdir: Path,
    bootstrap: str,
    workers: int = 1,
    api_version: str = "",
    *,
    tracing_endpoint: str = "",
) -> Path:
    """The gateway's config for the run: real verification, dedupe on, loopback only.

    The bare and naive servers read the same ``[server]`` settings, ``workers`` included, so
    every HTTP target runs with the same number of processes. ``api_version`` is the mock's
    pin, or empty against Apache Kafka (kafka-python negotiates; a pin would be a ceiling).
    """
    path = workdir / ("gateway-traced.toml" if tracing_endpoint else "gateway.toml")
    metrics_port = free_port()
    tracing = (
        f'[tracing]\nenabled = true\nexporter = "otlp"\nendpoint = "{tracing_endpoint}"\n'
        if tracing_endpoint
        else ""
    )
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0
metrics_port = {metrics_port}  # /metrics: its own port (gateway_outcomes reads it)
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

{tracing}"""
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
        module = {"aiokafka": "aiokafka_rival"}.get(name, name)
        cmd = [python(), "-m", "bench.apps.serve", f"bench.apps.{module}:app"]
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


def gateway_outcomes(config: Path) -> dict[str, float]:
    """``gateway_requests_total`` by outcome: proves the load hit the publish path.

    Read from the metrics port (``server.metrics_port`` of ``config``), not the webhook port.
    """
    port = tomllib.loads(config.read_text())["server"]["metrics_port"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
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
        cpu_before = cpu_by_process(srv.proc.pid)
        with RssSampler(srv.proc.pid) as rss:
            w = load.run(srv.url, args.duration, args.connections)
        cpu_after = cpu_by_process(srv.proc.pid)
        peak_kb = max(rss.peak_kb, read_status_kb(srv.proc.pid, "VmHWM"))
        notes: dict[str, Any] = {"cpu_us": cpu_per_request(cpu_before, cpu_after, w["requests"])}
        if name == "ours":
            notes["outcomes"] = gateway_outcomes(config)
            if args.profile:
                notes["profile"] = profile(srv.proc.pid, srv.url, load, args)
    return LoadResult(name=name, peak_rss_mb=peak_kb / 1024, notes=notes, **w)


class OtlpSink:
    """A loopback OTLP/HTTP traces endpoint that takes every export and counts it.

    The ``traced`` row's gateway exports its spans here, so the row pays for making, batching,
    encoding and sending spans, as a traced gateway in production does.
    """

    def __init__(self) -> None:
        import http.server
        import threading

        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("content-length") or 0)
                self.rfile.read(size)
                sink.exports += 1
                sink.bytes += size
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.exports = 0
        self.bytes = 0
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def __enter__(self) -> OtlpSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def load_traced(
    bootstrap: str, workdir: Path, load: Load, args: argparse.Namespace, api_version: str
) -> LoadResult:
    """``ours`` with ``[tracing]`` on, exporting every span over OTLP/HTTP to a local sink."""
    with OtlpSink() as sink:
        config = write_config(
            workdir, bootstrap, args.workers, api_version, tracing_endpoint=sink.endpoint
        )
        result = load_server("ours", config, workdir, load, args)
    result.name = "traced"
    result.notes["otlp_exports"] = sink.exports
    result.notes["otlp_bytes"] = sink.bytes
    return result

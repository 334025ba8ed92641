"""`gateway serve` as an operator runs it: a child process, one or several workers, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from gateway import samples
from gateway.embedded_broker import API_VERSION, EmbeddedBroker
from gateway.records import header
from gateway.server import free_port

from .conftest import read_topic, unique
from .ingress_helpers import EU_WEST4, SECRET, post


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_accepts_events_and_stops_cleanly_on_sigterm(
    broker: EmbeddedBroker, tmp_path: Path, workers: int
) -> None:
    prefix = unique("serve")
    port = free_port()
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
workers = {workers}
log_level = "info"
[kafka]
bootstrap_servers = "{broker.bootstrap_servers}"
api_version = "{API_VERSION}"
topic = "{prefix}.{{channel}}"
dead_letter_topic = "{prefix}.dlt"
[[sources]]
name = "event-stream"
path = "/v1/onesignal/events"
format = "event-stream"
secrets_env = "SERVE_TEST_SECRETS"
"""
    )
    env = dict(os.environ, SERVE_TEST_SECRETS=SECRET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=url, timeout=10) as client:
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "not ready within 60 s"
                time.sleep(0.2)
            ids = [str(uuid.uuid4()) for _ in range(40)]
            for event_id in ids:
                payload = samples.event_stream_payload("message.push.clicked", event_id=event_id)
                r = post(client, "/v1/onesignal/events", payload, xff=EU_WEST4)
                assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        # a clean drain exits 0 (uvicorn alone would re-raise SIGTERM and die by it)
        assert proc.wait(30) == 0
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        # the lifespan shutdown ran in every worker: the producer was flushed and closed
        assert stderr.count("ingress stopped: producer flushed and closed") == workers, stderr
        found = {
            header(r.headers, "ce_id")
            for r in read_topic(broker.bootstrap_servers, f"{prefix}.push")
        }
        assert set(ids) <= found
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

"""The allowlist's live refresh through the real ingress: a uvicorn server on loopback in front
of the broker, refreshing from a cloud.json server on loopback (never the internet)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from gateway.devkit import samples
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.ingress.app import create_app
from gateway.ingress.server import ServerThread
from gateway.metrics import IngressMetrics

from .conftest import read_topic, unique
from .ingress_helpers import (
    EU_WEST4,
    SECRET,
    gateway_config,
    post,
    running_gateway,
    scrape,
    wait_ready,
)

NEW_SENDER = "34.13.7.9"  # neither in the bundled snapshot nor in OneSignal's list
EVENTS = "/v1/onesignal/events"


@dataclass
class CloudJson:
    """What the loopback server answers to GET; changed by the test while it runs."""

    status: int = 500
    body: bytes = b"oops"
    hits: list[float] = field(default_factory=list)


@contextlib.contextmanager
def cloud_json_server(answer: CloudJson) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer.hits.append(time.monotonic())
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/ipranges/cloud.json"
    finally:
        httpd.shutdown()
        httpd.server_close()


def sample(metrics: IngressMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_refresh_lets_a_new_sender_in_without_a_restart(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    answer = CloudJson(status=500)  # the first refresh fails: the bundled floor stays
    prefix = unique("refresh")
    sync_ms = int(time.time() * 1000) - 3_600_000  # data an hour old
    with cloud_json_server(answer) as url:
        config = gateway_config(
            broker.bootstrap_servers,
            prefix,
            allowlist={"refresh_url": url, "refresh_interval_s": 3600, "refresh_retry_s": 1},
        )
        with (
            caplog.at_level(logging.INFO),
            running_gateway(config) as (base, metrics),
            httpx.Client(base_url=base, timeout=10) as client,
        ):
            wait_for(
                lambda: sample(metrics, "gateway_allowlist_refreshes_total", result="error") >= 1
            )
            assert client.get("/readyz").status_code == 200  # a failed refresh is not unready
            event_id = str(uuid.uuid4())
            payload = samples.event_stream_payload("message.push.sent", event_id=event_id)
            refused = post(client, EVENTS, payload, xff=NEW_SENDER)
            assert refused.status_code == 403
            assert refused.json()["message"] == "sender address is not allowed (ip-not-allowed)"
            assert (
                post(client, EVENTS, payload, xff="34.13.7.10", secret="wrong").status_code == 403
            )
            assert post(client, EVENTS, payload, xff="34.13.7.11", secret=None).status_code == 403
            for secret, expected in (("valid", 1), ("invalid", 1), ("missing", 1)):
                assert (
                    sample(
                        metrics,
                        "gateway_allowlist_misses_total",
                        source="event-stream",
                        secret=secret,
                    )
                    == expected
                )
            warned = [r for r in caplog.records if r.levelno == logging.WARNING]
            valid_miss = [r for r in warned if "carries a valid secret" in r.getMessage()]
            assert [r.client_ip for r in valid_miss] == [NEW_SENDER]  # type: ignore[attr-defined]
            assert all(SECRET not in r.getMessage() for r in caplog.records)

            # Google's list changes; the next try (refresh_retry_s later) picks it up
            answer.body = json.dumps(
                {
                    "syncToken": str(sync_ms),
                    "creationTime": "2026-01-01T00:00:00.000000",
                    "prefixes": [
                        {
                            "ipv4Prefix": "34.13.0.0/16",
                            "service": "Google Cloud",
                            "scope": "europe-west4",
                        }
                    ],
                }
            ).encode()
            answer.status = 200
            wait_for(lambda: sample(metrics, "gateway_allowlist_refreshes_total", result="ok") >= 1)
            accepted = post(client, EVENTS, payload, xff=NEW_SENDER)
            assert accepted.status_code == 200, accepted.text
            assert post(client, EVENTS, payload, xff=EU_WEST4).json()["status"] == "duplicate"

            scraped = scrape(config)  # nothing is set at scrape time; the gauges read live
            age = sample(metrics, "gateway_allowlist_age_seconds")
            assert 3600 <= age < 3600 + 60, scraped
            assert sample(metrics, "gateway_allowlist_refresh_failing_seconds") == 0
            assert sample(metrics, "gateway_allowlist_last_refresh_success_timestamp_seconds") > 0
            assert client.get("/readyz").json()["allowlist"]["sync_token"] == str(sync_ms)
        records = read_topic(broker.bootstrap_servers, f"{prefix}.push", expect=1)
        assert [dict(r.headers)["ce_id"].decode() for r in records] == [event_id]


def test_an_unreachable_refresh_url_harms_neither_start_readiness_nor_shutdown(
    broker: EmbeddedBroker,
) -> None:
    # a loopback port that accepts connections and never answers: the worst case of a host
    # without network (a firewall that drops packets), bounded by refresh_timeout_s
    hung: list[socket.socket] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)

    def accept() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            hung.append(conn)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/cloud.json"
    config = gateway_config(
        broker.bootstrap_servers,
        unique("hung"),
        allowlist={"refresh_url": url, "refresh_interval_s": 3600, "refresh_timeout_s": 60},
    )
    metrics = IngressMetrics(process=False)
    server = ServerThread(create_app(config, metrics=metrics), config)
    started = time.monotonic()
    try:
        server.start()
        wait_ready(server.url)
        ready_after = time.monotonic() - started
        acceptor.join(20)
        assert hung, "the refresh never connected"  # it had its chance, and is stuck in it
        with httpx.Client(base_url=server.url, timeout=10) as client:
            payload = samples.event_stream_payload("message.push.sent", event_id=str(uuid.uuid4()))
            assert post(client, EVENTS, payload).status_code == 200  # the floor serves
        assert sample(metrics, "gateway_allowlist_refreshes_total", result="ok") == 0
    finally:
        stopping = time.monotonic()
        server.stop()
        stopped_in = time.monotonic() - stopping
        for conn in hung:
            conn.close()
        listener.close()
    assert not server.thread.is_alive()
    assert ready_after < 15  # not waiting out the 60 s refresh timeout
    assert stopped_in < 10, stopped_in  # the stuck refresh is cancelled, not waited for


def test_refresh_off_makes_no_request(broker: EmbeddedBroker) -> None:
    answer = CloudJson(status=200, body=b"{}")
    with cloud_json_server(answer) as url:
        config = gateway_config(
            broker.bootstrap_servers,
            unique("off"),
            allowlist={"refresh_url": url, "refresh_interval_s": 0},
        )
        with running_gateway(config) as (base, metrics), httpx.Client(base_url=base) as client:
            payload = samples.event_stream_payload("message.push.sent", event_id=str(uuid.uuid4()))
            # a request served proves the lifespan (where the refresher would start) has run
            assert post(client, EVENTS, payload).status_code == 200
            assert sample(metrics, "gateway_allowlist_refresh_failing_seconds") == 0
    assert answer.hits == []

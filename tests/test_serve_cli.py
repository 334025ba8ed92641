"""`gateway serve` as an operator runs it: a child process, one or several workers, SIGTERM."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.records import header
from gateway.devkit import samples
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.ingress.server import free_port

from .conftest import read_topic, unique
from .faults import GatewayProcess, gateway_toml
from .ingress_helpers import EU_WEST4, post


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_accepts_events_and_stops_cleanly_on_sigterm(
    broker: EmbeddedBroker, tmp_path: Path, workers: int
) -> None:
    prefix = unique("serve")
    gw = GatewayProcess(
        gateway_toml(broker.bootstrap_servers, prefix, server={"workers": workers}), tmp_path
    )
    with gw.running():
        ids = [str(uuid.uuid4()) for _ in range(40)]
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            for event_id in ids:
                payload = samples.event_stream_payload("message.push.clicked", event_id=event_id)
                r = post(client, "/v1/onesignal/events", payload, xff=EU_WEST4)
                assert r.status_code == 200, r.text
        gw.signal(signal.SIGTERM)
        # a clean drain exits 0 (uvicorn alone would re-raise SIGTERM and die by it)
        assert gw.wait(30) == 0
    # the lifespan shutdown ran in every worker: the producer was flushed and closed
    assert gw.log().count("ingress stopped: producer flushed and closed") == workers, gw.log()
    found = {
        header(r.headers, "ce_id") for r in read_topic(broker.bootstrap_servers, f"{prefix}.push")
    }
    assert set(ids) <= found


def _requests_by_worker(text: str) -> dict[str, float]:
    """gateway_requests_total summed per worker label, from one scrape."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "gateway_requests":
            continue
        for s in family.samples:
            if s.name == "gateway_requests_total":
                worker = s.labels.get("worker", "")
                out[worker] = out.get(worker, 0.0) + s.value
    return out


def test_one_scrape_counts_the_requests_of_every_worker(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    prefix = unique("workers")
    metrics_port = free_port()
    gw = GatewayProcess(
        gateway_toml(
            broker.bootstrap_servers,
            prefix,
            server={"workers": 2, "metrics_port": metrics_port},
        ),
        tmp_path,
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    sent = 0
    with gw.running():
        by_worker: dict[str, float] = {}
        # a new connection per request, so that both workers accept some; bounded
        while sent < 400 and (len(by_worker) < 2 or min(by_worker.values()) == 0):
            for _ in range(20):
                payload = samples.event_stream_payload("message.push.sent", event_id=unique("e"))
                with httpx.Client(base_url=gw.url, timeout=10) as client:
                    assert post(client, "/v1/onesignal/events", payload).status_code == 200
                sent += 1
            by_worker = _requests_by_worker(httpx.get(metrics_url, timeout=10).text)
        # every scrape, whichever worker answers it, holds both workers' counts
        for _ in range(6):
            by_worker = _requests_by_worker(httpx.get(metrics_url, timeout=10).text)
            assert len(by_worker) == 2, by_worker
            assert all(w.isdigit() for w in by_worker), by_worker  # the workers' pids
            assert sum(by_worker.values()) == sent, (by_worker, sent)
        gw.signal(signal.SIGTERM)
        assert gw.wait(30) == 0
    assert min(by_worker.values()) > 0

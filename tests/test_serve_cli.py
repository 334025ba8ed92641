"""`gateway serve` as an operator runs it: a child process, one or several workers, SIGTERM."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import httpx
import pytest

from gateway.core.records import header
from gateway.devkit import samples
from gateway.devkit.embedded_broker import EmbeddedBroker

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

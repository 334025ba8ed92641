"""Merging the workers' metrics into one scrape (gateway.ingress.peers)."""

from __future__ import annotations

import socket
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.ingress.peers import MetricsPeers, merge_expositions


def _registry(requests: int, in_flight: float, latencies: list[float]) -> CollectorRegistry:
    r = CollectorRegistry()
    c = Counter("gateway_requests", "Requests", ["source"], registry=r)
    c.labels("event-stream").inc(requests)
    Gauge("gateway_kafka_in_flight_records", "In flight", registry=r).set(in_flight)
    h = Histogram("gateway_request_seconds", "Latency", buckets=(0.01, 0.1), registry=r)
    for v in latencies:
        h.observe(v)
    return r


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_sample_keeps_its_value_and_gains_its_worker() -> None:
    a = generate_latest(_registry(3, 1, [0.005, 0.05])).decode()
    b = generate_latest(_registry(5, 2, [0.5])).decode()
    merged = merge_expositions([("101", a), ("202", b)]).decode()
    got = _samples(merged)
    assert got[("gateway_requests_total", (("source", "event-stream"), ("worker", "101")))] == 3
    assert got[("gateway_requests_total", (("source", "event-stream"), ("worker", "202")))] == 5
    assert got[("gateway_kafka_in_flight_records", (("worker", "202"),))] == 2
    assert got[("gateway_request_seconds_bucket", (("le", "0.1"), ("worker", "101")))] == 2
    assert got[("gateway_request_seconds_count", (("worker", "202"),))] == 1
    # one HELP and TYPE per family: a valid exposition, not two concatenated
    assert merged.count("# TYPE gateway_requests_total counter") == 1
    assert merged.count("# TYPE gateway_request_seconds histogram") == 1
    for worker, text in (("101", a), ("202", b)):
        for (name, labels), value in _samples(text).items():
            assert got[(name, tuple(sorted((*labels, ("worker", worker)))))] == value


def test_a_gone_worker_is_left_out_and_its_socket_removed(tmp_path: Path) -> None:
    mine = _registry(7, 0, [])
    peers = MetricsPeers(tmp_path, mine)
    # a socket file nobody listens on any more: a worker killed without cleaning up
    dead = tmp_path / "999999.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dead))
    other = MetricsPeers(tmp_path, _registry(4, 0, []))
    other.me = "4242"
    other.path = tmp_path / "4242.sock"
    peers.start()
    other.start()
    try:
        got = _samples(peers.exposition().decode())
    finally:
        other.stop()
        peers.stop()
    workers = {dict(labels).get("worker") for (_, labels) in got}
    assert workers == {peers.me, "4242"}
    assert not dead.exists()
    assert got[("gateway_metrics_peer_failures_total", (("worker", peers.me),))] == 1
    assert not list(tmp_path.glob("*.sock"))  # each stopped worker removed its own

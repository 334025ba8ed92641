"""Prometheus metrics of the ingress, named after the pipeline's stages (source -> sink).

Each app instance gets its own registry, so several apps (tests, the demo) can live in one
process without clashing.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)

__all__ = ["IngressMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        if process:
            ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests to source routes by outcome (accepted, duplicate, dead_lettered, "
            "forbidden_ip, forbidden_secret, bad_request, too_large, unsupported_media_type, "
            "unavailable).",
            ["source", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "gateway_request_seconds",
            "Time from request start to response, source routes only.",
            ["source"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_seconds = Histogram(
            "gateway_publish_seconds",
            "Time from send to Kafka acknowledgement (acks=all).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.published = Counter(
            "gateway_published_records",
            "Records acknowledged by Kafka, by topic.",
            ["topic"],
            registry=r,
        )
        self.publish_failures = Counter(
            "gateway_publish_failures",
            "Publishes that did not end in an acknowledgement, by reason "
            "(timeout, backpressure, error, not_connected).",
            ["reason"],
            registry=r,
        )
        self.dead_letters = Counter(
            "gateway_dead_letters",
            "Payloads sent to the dead-letter topic, by reason.",
            ["source", "reason"],
            registry=r,
        )
        self.events = Counter(
            "gateway_events",
            "Normalized events by kind (as published).",
            ["kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_kafka_in_flight_records",
            "Records sent to the producer and not yet acknowledged or failed (read at scrape).",
            registry=r,
        )
        self.dedupe_entries = Gauge(
            "gateway_dedupe_entries", "Event ids in the dedupe window.", registry=r
        )
        self.allowlist_ranges = Gauge(
            "gateway_allowlist_ranges", "CIDR ranges in the sender allowlist.", registry=r
        )
        self.allowlist_refreshes = Counter(
            "gateway_allowlist_refreshes",
            "Allowlist refreshes by result (ok, error).",
            ["result"],
            registry=r,
        )

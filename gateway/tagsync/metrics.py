"""Prometheus metrics of the tag-sync pipeline (Kafka source -> rules -> OneSignal sink).

Defined once at import on the default registry, so several workers in one process (tests)
share them; label values are bounded (statuses, reasons, configured rule keys and app ids,
partitions).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = [
    "AUTH_FAILING",
    "AUTH_PAUSED_PARTITIONS",
    "AUTH_PROBES",
    "COALESCED",
    "COMMITTED",
    "CONSUMER_LAG",
    "DEAD_LETTERED",
    "DERIVED",
    "EVENTS",
    "IN_FLIGHT",
    "KEY_RELOADS",
    "PAUSED",
    "PENDING_EVENTS",
    "REQUESTS",
    "REQUEST_SECONDS",
    "RETRIED",
    "SKIPPED",
    "TEMPLATE_MISSING",
    "serve_metrics",
]

EVENTS = Counter(
    "gateway_tagsync_events_consumed",
    "Kafka records consumed from the normalized topics.",
    ["topic"],
)
SKIPPED = Counter(
    "gateway_tagsync_events_skipped",
    "Records that lead to no update (undecodable, no-rule, no-tags, no-alias, superseded,"
    " unauthenticated).",
    ["reason"],
)
TEMPLATE_MISSING = Counter(
    "gateway_tagsync_template_fields_missing",
    "Tags skipped for an event because a template field was missing.",
    ["rule"],
)
DERIVED = Counter(
    "gateway_tagsync_tag_updates_derived",
    "Tag values (set or delete) derived from events by the rules.",
)
COALESCED = Counter(
    "gateway_tagsync_updates_coalesced",
    "Tag values dropped because a newer value for the same user and key replaced them.",
)
REQUESTS = Counter(
    "gateway_tagsync_requests",
    "Update user requests by outcome (ok, retry, permanent, auth, error) and HTTP status.",
    ["outcome", "status"],
)
RETRIED = Counter(
    "gateway_tagsync_requests_retried",
    "Update user requests scheduled for another attempt, by reason.",
    ["reason"],
)
DEAD_LETTERED = Counter(
    "gateway_tagsync_dead_lettered",
    "Updates or records written to the tag-sync dead-letter topic, by reason.",
    ["reason"],
)
COMMITTED = Counter(
    "gateway_tagsync_offsets_committed",
    "Offset commits made (each may cover many records).",
)
CONSUMER_LAG = Gauge(
    "gateway_tagsync_consumer_lag",
    "Records between the partition's high watermark and the last committed offset.",
    ["topic", "partition"],
)
PENDING_EVENTS = Gauge(
    "gateway_tagsync_pending_events",
    "Consumed records whose updates are not done yet (not committable).",
)
IN_FLIGHT = Gauge("gateway_tagsync_requests_in_flight", "Update user requests in flight.")
PAUSED = Gauge("gateway_tagsync_paused", "1 while partitions are paused for backpressure.")
AUTH_FAILING = Gauge(
    "gateway_tagsync_app_auth_failing",
    "1 while OneSignal refuses the app's API key (401/403): its updates wait, not dead-lettered.",
    ["app_id"],
)
AUTH_PAUSED_PARTITIONS = Gauge(
    "gateway_tagsync_auth_paused_partitions",
    "Partitions paused because they hold updates of an app whose API key is refused.",
)
AUTH_PROBES = Counter(
    "gateway_tagsync_auth_probes",
    "Held updates sent to try a refused app's API key again, by result (accepted, refused).",
    ["result"],
)
KEY_RELOADS = Counter(
    "gateway_tagsync_api_key_changes",
    "Times a re-read API key (timer or SIGHUP) differed from the one in use.",
    ["app_id"],
)
REQUEST_SECONDS = Histogram(
    "gateway_tagsync_request_duration_seconds",
    "Latency of Update user requests (one attempt).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0),
)


def serve_metrics(port: int, addr: str = "127.0.0.1") -> Callable[[], None] | None:
    """Expose /metrics on ``addr``:``port`` (0: off); ``tag_sync.metrics_host`` names ``addr``.

    Returns what stops the server (the worker leaves it to the process's end).
    """
    if not port:
        return None
    server, _ = start_http_server(port, addr=addr)

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop

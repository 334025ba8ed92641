"""Prometheus metrics of the ingress, named after the pipeline's stages (source -> sink).

Each app instance gets its own registry, so several apps (tests, the demo) can live in one
process without clashing.

The per-request counters and histograms are :class:`LoopCounter` and :class:`LoopHistogram`:
prometheus-client's own take a lock on every increment (several per request, ~13% of the
request handler's time in py-spy), but these are only ever changed on the event loop's
thread, so plain numbers do, and prometheus-client reads them at scrape time through a
collector. The exposition is the same as ``Counter`` and ``Histogram`` give.

Every label value comes from a bounded, known set, never from input as it is: an event's kind,
a topic, a source, a reason or outcome outside its set counts as ``other`` (:data:`OTHER`). A
sender posting random kinds therefore adds no series (each one costs memory for good, and
every scrape's size).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.core.kinds import KNOWN_KINDS

__all__ = [
    "CONNECTION_REFUSAL_REASONS",
    "DEAD_LETTER_REASONS",
    "OTHER",
    "PUBLISH_FAILURE_REASONS",
    "IngressMetrics",
    "LoopCounter",
    "LoopHistogram",
]

OTHER = "other"
# Why the ingress dead-letters a body: core/body.py's BadRequest codes, core/normalize's
# NormalizationError reasons and core/ingest.py's own (tests/test_hostile_names.py checks the
# code names no other).
DEAD_LETTER_REASONS: frozenset[str] = frozenset(
    {
        "empty-body",
        "invalid-json",
        "invalid-utf8",
        "lone-surrogate",
        "too-deep",
        "unsupported-media-type",
        "unsupported-charset",
        "not-json",
        "not-an-object",
        "no-kind",
        "unsupported-format",
        "unknown-kind",
        "unknown-channel",
        "not-a-web-sdk-event",
        "internal-error",
        "record-too-large",
    }
)
# kafka/sink.py's reasons for a publish that got no acknowledgement (spool: nor a spool append).
PUBLISH_FAILURE_REASONS: frozenset[str] = frozenset(
    {"timeout", "backpressure", "error", "not_connected", "spool"}
)

# gateway/ingress/protocol.py's reasons for closing a connection before any route
CONNECTION_REFUSAL_REASONS = ("head_too_large", "trailers_too_large", "head_timeout", "upgrade")

_Child = TypeVar("_Child")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _CounterValue:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _LoopMetric(Collector, Generic[_Child]):
    """Children by label values, created on first use; registered as a collector."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Child] = {}
        # per label, the values it may take (others count as OTHER); None = any
        self._allowed: list[frozenset[str] | None] = [None] * len(self.labelnames)
        if not self.labelnames:
            self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> _Child:
        raise NotImplementedError

    def allow(self, label: str, values: Collection[str]) -> None:
        """Bound ``label`` to ``values``: any other value counts as :data:`OTHER`."""
        self._allowed[self.labelnames.index(label)] = frozenset(values)

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            values = tuple(
                v if allowed is None or v in allowed else OTHER
                for v, allowed in zip(values, self._allowed, strict=True)
            )
            child = self._children.get(values)
            if child is None:
                child = self._children[values] = self._new_child()
        return child


class LoopCounter(_LoopMetric[_CounterValue]):
    """A counter (``<name>_total``) changed by one thread only; no lock per increment."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _CounterValue:
        return _CounterValue()

    def inc(self, amount: float = 1.0) -> None:
        self._children[()].inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value, created=child.created)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class _HistogramValue:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bucket "le" is inclusive: bisect_left puts a value equal to a bound in that bucket
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopHistogram(_LoopMetric[_HistogramValue]):
    """A histogram changed by one thread only; no lock per observation."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = _LATENCY_BUCKETS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _HistogramValue:
        return _HistogramValue(self.bounds)

    def observe(self, value: float) -> None:
        self._children[()].observe(value)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = [_le(b) for b in self.bounds] + ["+Inf"]
        for values, child in list(self._children.items()):
            cumulative = 0
            buckets = []
            for le, count in zip(les, list(child.counts), strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(values, buckets, child.sum)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


def _le(bound: float) -> str:
    # as prometheus-client's Histogram writes "le"
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        if process:
            ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = LoopCounter(
            "gateway_requests",
            "Requests to source routes by outcome (accepted, duplicate, dead_lettered, "
            "forbidden_ip, forbidden_secret, bad_request, too_large, unsupported_media_type, "
            "unavailable).",
            ["source", "outcome"],
            registry=r,
        )
        self.request_seconds = LoopHistogram(
            "gateway_request_seconds",
            "Time from request start to response, source routes only.",
            ["source"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_seconds = LoopHistogram(
            "gateway_publish_seconds",
            "Time from send to Kafka acknowledgement (acks=all).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.published = LoopCounter(
            "gateway_published_records",
            "Records acknowledged by Kafka, by topic.",
            ["topic"],
            registry=r,
        )
        self.publish_failures = LoopCounter(
            "gateway_publish_failures",
            "Publishes that did not end in an acknowledgement, by reason "
            "(timeout, backpressure, error, not_connected).",
            ["reason"],
            registry=r,
        )
        self.publish_failures.allow("reason", PUBLISH_FAILURE_REASONS)
        self.dead_letters = LoopCounter(
            "gateway_dead_letters",
            "Payloads sent to the dead-letter topic, by reason.",
            ["source", "reason"],
            registry=r,
        )
        self.dead_letters.allow("reason", DEAD_LETTER_REASONS)
        self.dedupe_conflicts = LoopCounter(
            "gateway_dedupe_conflicts",
            "Events whose id was already held (or in flight) for an event of another kind: "
            "published anyway (a template that hard-codes the id), by source.",
            ["source"],
            registry=r,
        )
        self.events = LoopCounter(
            "gateway_events",
            "Normalized events by kind (as published).",
            ["kind"],
            registry=r,
        )
        self.events.allow("kind", KNOWN_KINDS)
        self.producer_stalls = LoopCounter(
            "gateway_producer_stalls",
            "Times the Kafka producer settled no record for kafka.stall_timeout_s while records"
            " were outstanding, and was replaced.",
            registry=r,
        )
        self.producer_restarts = LoopCounter(
            "gateway_producer_process_restarts",
            "Times the Kafka producer process (kafka.producer = process) died and was replaced.",
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_kafka_in_flight_records",
            "Records sent to the producer and not yet acknowledged or failed (read at scrape).",
            registry=r,
        )
        # the durable local spool (spool.enabled); the gauges read the spool at scrape time
        self.spool_bytes = Gauge(
            "gateway_spool_bytes", "Bytes of the spool's segment files on disk.", registry=r
        )
        self.spool_records = Gauge(
            "gateway_spool_records",
            "Spooled records not yet acknowledged by Kafka.",
            registry=r,
        )
        self.spool_oldest_age = Gauge(
            "gateway_spool_oldest_age_seconds",
            "Age of the oldest spooled record not yet delivered (0 = spool empty).",
            registry=r,
        )
        self.spool_keys_waiting = Gauge(
            "gateway_spool_keys_waiting",
            "Record keys with records in the spool: their new records queue behind them.",
            registry=r,
        )
        self.spool_max_bytes = Gauge(
            "gateway_spool_max_bytes", "spool.max_bytes (0 = spool off).", registry=r
        )
        self.spool_appended = LoopCounter(
            "gateway_spool_appended_records",
            "Records written to the spool and fsynced (their requests were answered 2xx), by"
            " why (kafka_down, not_acknowledged, key_waiting).",
            ["reason"],
            registry=r,
        )
        self.spool_drained = LoopCounter(
            "gateway_spool_drained_records",
            "Spooled records acknowledged by Kafka (rate = the drain rate).",
            registry=r,
        )
        self.spool_replayed = LoopCounter(
            "gateway_spool_replayed_records",
            "Records found in the spool at start-up; those that had reached Kafka before a"
            " crash are delivered twice (at-least-once).",
            registry=r,
        )
        self.spool_errors = LoopCounter(
            "gateway_spool_errors",
            "Spool appends answered 503, by reason (full, disk: a write or fsync error).",
            ["reason"],
            registry=r,
        )
        for reason in ("full", "disk"):
            self.spool_errors.labels(reason)
        self.spool_order_breaks = LoopCounter(
            "gateway_spool_order_breaks",
            "Drained records acknowledged after an earlier record of their key failed (that one"
            " is sent again and lands after them): per-key order broken; expected 0.",
            registry=r,
        )
        self.spool_truncated_bytes = LoopCounter(
            "gateway_spool_truncated_bytes",
            "Bytes of torn tails cut off segments at start-up (never acknowledged records).",
            registry=r,
        )
        self.spool_fsync_seconds = LoopHistogram(
            "gateway_spool_commit_seconds",
            "Time from a spool append to its group commit's fsync.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dedupe_entries = Gauge(
            "gateway_dedupe_entries",
            "Event ids in the dedupe windows (one per source), summed.",
            registry=r,
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
        for result in ("ok", "error"):  # both exist from the start, so increase() sees the first
            self.allowlist_refreshes.labels(result)
        self.allowlist_age = Gauge(
            "gateway_allowlist_age_seconds",
            "Now minus the allowlist data's own time (cloud.json syncToken, else creationTime); "
            "NaN if the data has no time.",
            registry=r,
        )
        self.allowlist_last_refresh_success = Gauge(
            "gateway_allowlist_last_refresh_success_timestamp_seconds",
            "When this process last refreshed the allowlist successfully (0 = not yet).",
            registry=r,
        )
        self.allowlist_refresh_failing = Gauge(
            "gateway_allowlist_refresh_failing_seconds",
            "Seconds since allowlist refresh started to fail (since the last success, else the "
            "first failure); 0 while it works or is off.",
            registry=r,
        )
        self.subscription_checks = LoopCounter(
            "gateway_subscription_checks",
            "Web-push events whose subscription id was checked against OneSignal"
            " (verify_subscriptions), by result (found, not_found, unchecked) and where the"
            " answer came from (cache, lookup, or local: an id that cannot be one, not asked).",
            ["source", "result", "via"],
            registry=r,
        )
        self.subscription_lookups = LoopCounter(
            "gateway_subscription_lookups",
            "Requests to OneSignal's View user identity (by subscription), by answer (found,"
            " not_found, rate_limited, refused_key, error).",
            ["source", "answer"],
            registry=r,
        )
        self.subscription_cache = Gauge(
            "gateway_subscription_cache_entries",
            "Subscription ids held in the verification caches (found and not found), summed.",
            registry=r,
        )
        # the HTTP protocol's own refusals, before any route (gateway/ingress/protocol.py)
        self.connection_refusals = LoopCounter(
            "gateway_connection_refusals",
            "Connections answered and closed by the HTTP protocol before any route, by reason:"
            " head_too_large (431: over server.max_head_bytes or max_header_count),"
            " trailers_too_large (431), head_timeout (408: no complete head within"
            " server.head_timeout_s), upgrade (400: Upgrade such as h2c).",
            ["reason"],
            registry=r,
        )
        for reason in CONNECTION_REFUSAL_REASONS:
            self.connection_refusals.labels(reason)
        self.allowlist_misses = LoopCounter(
            "gateway_allowlist_misses",
            "Requests refused because the sender address is not in the allowlist, by whether "
            "they carried a valid shared secret (valid, invalid, missing). A valid one is most "
            "likely OneSignal at an address the allowlist does not know: that event is lost.",
            ["source", "secret"],
            registry=r,
        )

    def bound(self, *, sources: Collection[str], topics: Collection[str]) -> None:
        """Bound the source and topic labels to the configured ones (create_app calls it)."""
        by_label: Mapping[str, Collection[str]] = {"source": sources, "topic": topics}
        for metric in (
            self.requests,
            self.request_seconds,
            self.published,
            self.dead_letters,
            self.dedupe_conflicts,
            self.allowlist_misses,
        ):
            for label in metric.labelnames:
                if label in by_label:
                    metric.allow(label, by_label[label])

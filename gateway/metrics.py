"""Prometheus metrics of the ingress, named after the pipeline's stages (source -> sink).

Each app instance gets its own registry, so several apps (tests, the demo) can live in one
process without clashing.

The per-request counters and histograms are :class:`LoopCounter` and :class:`LoopHistogram`:
prometheus-client's own take a lock on every increment (several per request, ~13% of the
request handler's time in py-spy), but these are only ever changed on the event loop's
thread, so plain numbers do, and prometheus-client reads them at scrape time through a
collector. The exposition is the same as ``Counter`` and ``Histogram`` give.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence
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

__all__ = ["IngressMetrics", "LoopCounter", "LoopHistogram"]

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
        if not self.labelnames:
            self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> _Child:
        raise NotImplementedError

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
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
        self.dead_letters = LoopCounter(
            "gateway_dead_letters",
            "Payloads sent to the dead-letter topic, by reason.",
            ["source", "reason"],
            registry=r,
        )
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
        self.allowlist_misses = LoopCounter(
            "gateway_allowlist_misses",
            "Requests refused because the sender address is not in the allowlist, by whether "
            "they carried a valid shared secret (valid, invalid, missing). A valid one is most "
            "likely OneSignal at an address the allowlist does not know: that event is lost.",
            ["source", "secret"],
            registry=r,
        )

"""The lock-free loop metrics expose exactly what prometheus-client's own types would."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.metrics import IngressMetrics, LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CREATED = re.compile(r"^(# (HELP|TYPE) )?\w+_created.*$\n?", re.M)


def exposition(registry: CollectorRegistry) -> str:
    """The text format without the ``_created`` lines (timestamps of creation differ)."""
    return _CREATED.sub("", generate_latest(registry).decode())


values = st.one_of(
    st.sampled_from(BUCKETS),  # exactly on a bound: "le" is inclusive
    st.floats(min_value=0, max_value=20, allow_nan=False),
    st.floats(min_value=0, max_value=1e-3),
)


@settings(max_examples=200, deadline=None)
@given(observations=st.lists(st.tuples(st.sampled_from(["a", "b", 'q"uote']), values), max_size=60))
def test_histogram_matches_prometheus_client(observations: list[tuple[str, float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopHistogram("lat_seconds", "doc", ["source"], buckets=BUCKETS, registry=ours)
    ref = Histogram("lat_seconds", "doc", ["source"], buckets=BUCKETS, registry=theirs)
    for label, value in observations:
        mine.labels(label).observe(value)
        ref.labels(label).observe(value)
    assert exposition(ours) == exposition(theirs)


@settings(max_examples=200, deadline=None)
@given(
    increments=st.lists(
        st.tuples(st.sampled_from(["x", "y"]), st.sampled_from(["1", "2"]), st.integers(1, 5)),
        max_size=40,
    )
)
def test_counter_matches_prometheus_client(increments: list[tuple[str, str, int]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopCounter("reqs", "doc", ["source", "outcome"], registry=ours)
    ref = Counter("reqs", "doc", ["source", "outcome"], registry=theirs)
    for a, b, n in increments:
        mine.labels(a, b).inc(n)
        ref.labels(a, b).inc(n)
    assert exposition(ours) == exposition(theirs)


def test_unlabelled_metrics_and_created_samples() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("hits", "doc", registry=registry)
    histogram = LoopHistogram("wait_seconds", "doc", buckets=(0.5, 1.0), registry=registry)
    counter.inc()
    counter.inc(2)
    histogram.observe(0.75)
    assert registry.get_sample_value("hits_total") == 3.0
    assert registry.get_sample_value("hits_created") is not None
    assert registry.get_sample_value("wait_seconds_bucket", {"le": "0.5"}) == 0.0
    assert registry.get_sample_value("wait_seconds_bucket", {"le": "1.0"}) == 1.0
    assert registry.get_sample_value("wait_seconds_bucket", {"le": "+Inf"}) == 1.0
    assert registry.get_sample_value("wait_seconds_sum") == 0.75


def test_wrong_label_count_is_refused() -> None:
    counter = LoopCounter("c", "doc", ["a", "b"])
    with pytest.raises(ValueError, match="expected labels"):
        counter.labels("only-one")


def test_ingress_metrics_keep_their_names() -> None:
    m = IngressMetrics(process=False)
    m.requests.labels("event-stream", "accepted").inc()
    m.request_seconds.labels("event-stream").observe(0.004)
    m.publish_seconds.observe(0.003)
    m.published.labels("onesignal.push").inc()
    m.events.labels("message.push.clicked").inc()
    m.dead_letters.labels("journey", "not-json").inc()
    m.publish_failures.labels("timeout").inc()
    get = m.registry.get_sample_value
    assert get("gateway_requests_total", {"source": "event-stream", "outcome": "accepted"}) == 1
    assert get("gateway_request_seconds_count", {"source": "event-stream"}) == 1
    assert get("gateway_publish_seconds_bucket", {"le": "0.005"}) == 1
    assert get("gateway_published_records_total", {"topic": "onesignal.push"}) == 1
    assert get("gateway_events_total", {"kind": "message.push.clicked"}) == 1
    assert get("gateway_dead_letters_total", {"source": "journey", "reason": "not-json"}) == 1
    assert get("gateway_publish_failures_total", {"reason": "timeout"}) == 1

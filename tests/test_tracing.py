"""OpenTelemetry: one trace from OneSignal's request, through the Kafka record, to the PATCH.

A real uvicorn ingress and the real tag-sync worker, real Kafka and the loopback OneSignal;
each process's spans go to the SDK's in-memory exporter, and the test follows the links.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.config import TracingConfig, parse_config
from gateway.core.event import Received
from gateway.core.records import build_dead_letter, header, with_attributes
from gateway.devkit import samples
from gateway.devkit.fake_onesignal import FakeOneSignal
from gateway.ingress.app import create_app
from gateway.ingress.server import ServerThread
from gateway.metrics import IngressMetrics
from gateway.tagsync.worker import run_tag_sync
from gateway.tracing import Tracing, parse_headers

from .conftest import API_VERSION, read_topic, unique
from .contract import check_record
from .ingress_helpers import gateway_config, post, wait_ready

INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"
APP = samples.DEMO_APP_ID
API_KEY = "tracing-test-app-key"


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def _parts(traceparent: str) -> tuple[str, str]:
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00" and int(flags, 16) & 1, "sampled"
    return trace_id, span_id


@contextlib.contextmanager
def _ingress(config: Any, tracing: Tracing | None) -> Iterator[str]:
    app = create_app(config, metrics=IngressMetrics(process=False), tracing=tracing)
    server = ServerThread(app, config)
    with server.running():
        wait_ready(server.url)
        yield server.url


def test_one_trace_from_the_request_through_kafka_to_the_patch(broker: Any) -> None:
    prefix = unique("trace")
    config = gateway_config(broker.bootstrap_servers, prefix)
    ingress_spans = InMemorySpanExporter()
    ingress_tracing = Tracing(TracingConfig(enabled=True), "ingress", exporter=ingress_spans)
    event = samples.event_stream_payload("message.push.clicked")
    with _ingress(config, ingress_tracing) as url, httpx.Client(base_url=url) as client:
        r = post(client, "/v1/onesignal/events", event, headers=[("traceparent", TRACEPARENT)])
        assert r.status_code == 200, r.text
        untraced = samples.event_stream_payload("message.push.clicked", event_id=unique("e"))
        assert post(client, "/v1/onesignal/events", untraced).status_code == 200
    ingress_tracing.shutdown()

    spans = ingress_spans.get_finished_spans()
    assert len(spans) == 2
    traced, fresh = spans
    # the request's span continues OneSignal's trace...
    assert traced.kind is SpanKind.SERVER
    assert _hex(traced.context.trace_id, 32) == INCOMING_TRACE
    assert traced.parent is not None and _hex(traced.parent.span_id, 16) == INCOMING_SPAN
    assert traced.attributes["http.response.status_code"] == 200
    assert traced.attributes["gateway.status"] == "accepted"
    # ...and a request without one starts its own
    assert fresh.parent is None and fresh.context.trace_id != traced.context.trace_id

    records = read_topic(broker.bootstrap_servers, f"{prefix}.push", expect=2)
    by_trace = {_parts(header(r.headers, "ce_traceparent") or "")[0]: r for r in records}
    record = by_trace[INCOMING_TRACE]
    # the record's traceparent names the request's span as its parent
    assert _parts(header(record.headers, "ce_traceparent") or "")[1] == _hex(
        traced.context.span_id, 16
    )
    assert check_record(record.headers, record.value) == []

    # tag sync continues the trace into its Update user request
    with FakeOneSignal(api_key=API_KEY) as fake:
        ts_spans = InMemorySpanExporter()
        ts_tracing = Tracing(TracingConfig(enabled=True), "tag-sync", exporter=ts_spans)
        ts_config = parse_config(
            {
                "kafka": {
                    "bootstrap_servers": broker.bootstrap_servers,
                    "api_version": API_VERSION,
                },
                "onesignal": {"api_url": fake.url, "apps": [{"app_id": APP, "api_key_env": "K"}]},
                "tag_sync": {
                    "group_id": unique("g"),
                    "topics": [f"{prefix}.push"],
                    "flush_interval_s": 0.2,
                    "metrics_port": 0,
                    "dead_letter_topic": f"{prefix}.ts-dlt",
                    "rules": [{"kinds": ["message.push.clicked"], "tags": {"clicked": "1"}}],
                },
            },
            env={"K": API_KEY},
        )
        stop = threading.Event()
        result: list[int] = []
        worker = threading.Thread(
            target=lambda: result.append(run_tag_sync(ts_config, stop=stop, tracing=ts_tracing)),
            daemon=True,
        )
        worker.start()
        try:
            # both events are one user's: one PATCH carries both
            assert fake.wait_for(lambda f: len(f.requests) >= 1, timeout_s=90)
        finally:
            stop.set()
            worker.join(30)
        assert result == [0]
        sent = fake.requests[0]

    patch_spans = [s for s in ts_spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert len(patch_spans) == 1
    patch = patch_spans[0]
    # the PATCH carries both events: it is the child of the newer one's request span
    # (through its record) and links to the other's
    assert patch.parent is not None
    assert _hex(patch.parent.span_id, 16) == _hex(fresh.context.span_id, 16)
    assert patch.context.trace_id == fresh.context.trace_id
    assert [(link.context.trace_id, link.context.span_id) for link in patch.links] == [
        (traced.context.trace_id, traced.context.span_id)
    ]
    assert patch.attributes["gateway.events"] == 2
    assert patch.attributes["http.response.status_code"] == 202  # OneSignal: Accepted
    # ...and OneSignal receives its context
    trace_id, span_id = _parts(sent.headers["traceparent"])
    assert (trace_id, span_id) == (
        _hex(patch.context.trace_id, 32),
        _hex(patch.context.span_id, 16),
    )


def test_off_by_default_records_carry_no_trace_context(broker: Any) -> None:
    prefix = unique("notrace")
    config = gateway_config(broker.bootstrap_servers, prefix)
    assert config.tracing.enabled is False
    with _ingress(config, None) as url, httpx.Client(base_url=url) as client:
        r = post(
            client,
            "/v1/onesignal/events",
            samples.event_stream_payload("message.email.clicked"),
            headers=[("traceparent", TRACEPARENT)],
        )
        assert r.status_code == 200
    (record,) = read_topic(broker.bootstrap_servers, f"{prefix}.email", expect=1)
    assert header(record.headers, "ce_traceparent") is None


def test_trace_context_in_each_record_shape() -> None:
    from gateway.core.normalize import normalize
    from gateway.core.records import build_record

    received = Received(source="s", at=samples_time(), client_ip="34.90.0.1")
    event = normalize(samples.event_stream_payload("message.sms.sent"), fmt="event-stream")
    trace = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    binary = with_attributes(
        build_record(event, received, topic_template="t.{channel}", source_name="s"), trace
    )
    assert header(binary.headers, "ce_traceparent") == TRACEPARENT
    assert header(binary.headers, "ce_tracestate") == "vendor=1"
    structured = with_attributes(
        build_record(
            event,
            received,
            topic_template="t.{channel}",
            source_name="s",
            content_mode="structured",
        ),
        {"traceparent": TRACEPARENT},
    )
    body = orjson.loads(structured.value)
    assert body["traceparent"] == TRACEPARENT and "tracestate" not in body
    letter = with_attributes(
        build_dead_letter(
            topic="dlt",
            reason="invalid-json",
            detail="x",
            body=b"{",
            source_name="s",
            received=received,
        ),
        trace,
    )
    assert header(letter.headers, "traceparent") == TRACEPARENT
    for r in (binary, structured, letter):
        assert check_record(r.headers, r.value) == []
    # nothing to add: the same record
    assert with_attributes(binary, {}) is binary


def samples_time() -> Any:
    from datetime import UTC, datetime

    return datetime(2026, 12, 1, tzinfo=UTC)


def test_exporter_headers_parse_and_never_echo_their_values() -> None:
    assert parse_headers("api-key=abc, x-team = core ,") == {"api-key": "abc", "x-team": "core"}
    with pytest.raises(ValueError) as exc:
        parse_headers("api-key=abc,secretvalue-without-equals")
    assert "secretvalue" not in str(exc.value)

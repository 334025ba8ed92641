"""OpenTelemetry traces, optional and off by default.

With ``[tracing] enabled``, each request to a source is a SERVER span that continues an
incoming W3C ``traceparent``; its context is written into the Kafka record as the CloudEvents
distributed-tracing extension (``traceparent``/``tracestate``: ``ce_traceparent`` headers in
binary mode, attributes in structured mode, plain ``traceparent`` headers on a dead letter).
Tag sync reads it back and sends each Update user request as a CLIENT span whose parent is the
newest event the update carries (and which links to the other events merged into it), with its
own ``traceparent`` header, so one trace runs from OneSignal's request to OneSignal's API.

Off, nothing here is imported by the request path: routes and senders hold ``None`` and test
for it once (the bench's ``tracing`` row measures the cost when on). The SDK is the
``tracing`` extra; enabling tracing without it is a config error at start-up.

Each process gets a TracerProvider of its own (no global state), so tests and the demo can
run several side by side; ``exporter`` lets tests pass the SDK's in-memory exporter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gateway.config import ConfigError, TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

__all__ = ["TRACE_ATTRIBUTES", "Tracing", "header_values", "parse_headers"]

# the CloudEvents distributed-tracing extension's attribute names (W3C trace context)
TRACE_ATTRIBUTES = ("traceparent", "tracestate")


def _header_entries(text: str) -> Iterator[tuple[int, str, str, str]]:
    """(position, name, "=" or "", value) of each non-blank ``k=v`` entry of ``text``."""
    for n, part in enumerate(text.split(","), 1):
        if part.strip():
            name, sep, value = part.partition("=")
            yield n, name.strip(), sep, value.strip()


def parse_headers(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` (the OTEL_EXPORTER_OTLP_HEADERS format) as a dict."""
    out: dict[str, str] = {}
    for n, name, sep, value in _header_entries(text):
        if not sep or not name:
            raise ValueError(f"entry {n} is not name=value")  # never the text: credentials
        out[name] = value
    return out


def header_values(text: str) -> list[str]:
    """Every value in ``text``, also of a malformed one: what the log scrubber must hide."""
    return [value for _, _, sep, value in _header_entries(text) if sep]


class Tracing:
    """Spans for one process (the ingress or tag sync) and the W3C propagation they need."""

    def __init__(
        self, cfg: TracingConfig, role: str, *, exporter: SpanExporter | None = None
    ) -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            raise ConfigError(
                "tracing.enabled",
                "needs the OpenTelemetry SDK: pip install 'onesignal-kafka-gateway[tracing]'",
            ) from None
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name, "service.component": role}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        if exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            self.provider.add_span_processor(BatchSpanProcessor(_exporter(cfg)))
        self.tracer = self.provider.get_tracer("gateway." + role)
        self.propagator = TraceContextTextMapPropagator()

    @contextlib.contextmanager
    def server_span(
        self, name: str, headers: Mapping[str, str], attributes: Mapping[str, Any]
    ) -> Iterator[Span]:
        """A SERVER span that continues the trace in ``headers`` (lowercase names)."""
        from opentelemetry.trace import SpanKind

        parent = self.propagator.extract(headers)
        with self.tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes)
        ) as span:
            yield span

    @contextlib.contextmanager
    def client_span(
        self,
        name: str,
        parents: Sequence[Mapping[str, str]],
        attributes: Mapping[str, Any],
    ) -> Iterator[Span]:
        """A CLIENT span, child of the last of ``parents`` (trace-context carriers), linked to
        the others: one request that carries several events' effects."""
        from opentelemetry.trace import Link, SpanKind, get_current_span

        contexts = [self.propagator.extract(p) for p in parents if p.get("traceparent")]
        links = []
        for ctx in contexts[:-1]:
            sc = get_current_span(ctx).get_span_context()
            if sc.is_valid:
                links.append(Link(sc))
        with self.tracer.start_as_current_span(
            name,
            context=contexts[-1] if contexts else None,
            kind=SpanKind.CLIENT,
            attributes=dict(attributes),
            links=links,
        ) as span:
            yield span

    def current(self) -> dict[str, str]:
        """The current span's trace context as ``traceparent`` (and ``tracestate``) values."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        return carrier

    def shutdown(self) -> None:
        self.provider.shutdown()


def _exporter(cfg: TracingConfig) -> SpanExporter:
    if cfg.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "tracing.exporter",
            "otlp needs the OTLP exporter: pip install 'onesignal-kafka-gateway[tracing]'",
        ) from None
    headers: dict[str, str] = {}
    if cfg.headers_env:
        try:
            headers = parse_headers(os.environ.get(cfg.headers_env, ""))
        except ValueError as exc:
            # never the value: it holds credentials
            raise ConfigError("tracing.headers_env", f"{cfg.headers_env}: {exc}") from None
    return OTLPSpanExporter(endpoint=cfg.endpoint, headers=headers, timeout=cfg.timeout_s)

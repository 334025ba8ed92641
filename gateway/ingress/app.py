"""The ingress: an HTTP source per configured route, ending in the Kafka sink.

One request goes: client IP (trusted proxies) -> allowlist -> shared secret -> body ->
ingest (decode, normalize, record) -> dedupe -> publish and wait for the ack -> answer.
Nothing is answered 2xx unless Kafka acknowledged it (the event's record, or its dead-letter
record); :mod:`gateway.ingress.route` says which requests are refused.

The source routes are plain ASGI callables in front of Starlette: they are the hot path, and
Starlette's request, response and middleware objects cost more per request than everything
the gateway itself does before the Kafka send. The operational routes (health, readiness,
metrics, OpenAPI) stay on Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import Config
from gateway.ingress.allowlist import Allowlist, RangeRefresher, log_if_stale
from gateway.ingress.openapi import openapi_document
from gateway.ingress.route import SourceRoute
from gateway.ingress.state import RouteState
from gateway.kafka import SinkBase, create_sink
from gateway.kafka.topics import TopicWatcher, gateway_topics
from gateway.metrics import IngressMetrics

__all__ = ["PathDispatcher", "RouteState", "create_app"]

log = logging.getLogger("gateway.ingress")


class _OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class PathDispatcher:
    """The configured source paths to their routes, everything else to Starlette."""

    def __init__(self, fallback: Starlette, routes: dict[str, SourceRoute]) -> None:
        self.fallback = fallback
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self.routes.get(scope["path"])
            if route is not None:
                await route(scope, receive, send)
                return
        await self.fallback(scope, receive, send)


def create_app(
    config: Config,
    *,
    metrics: IngressMetrics | None = None,
    allowlist: Allowlist | None = None,
    sink: SinkBase | None = None,
    clock: Callable[[], float] = time.time,
) -> ASGIApp:
    """The ingress ASGI app. The sink connects in the app's lifespan."""
    metrics = metrics or IngressMetrics()
    allowlist = allowlist or Allowlist.from_config(config.allowlist)
    warm = tuple(gateway_topics(config, tag_sync=False))
    sink = sink or create_sink(config.kafka, metrics, warm_topics=warm)
    state = RouteState(config=config, sink=sink, allowlist=allowlist, metrics=metrics, clock=clock)
    metrics.allowlist_ranges.set(allowlist.size)
    # read at scrape time, so the figures age between refreshes
    metrics.allowlist_age.set_function(lambda: state.allowlist.age_s(clock()))
    metrics.allowlist_last_refresh_success.set_function(
        lambda: state.allowlist.last_refresh_ok or 0.0
    )
    metrics.allowlist_refresh_failing.set_function(
        lambda: state.allowlist.refresh_failing_s(clock())
    )
    fallback = Starlette(routes=_operational_routes(state), lifespan=_lifespan(state, warm, clock))
    return PathDispatcher(fallback, {s.path: SourceRoute(state, s) for s in config.sources})


def _operational_routes(state: RouteState) -> list[Route]:
    """Health, readiness, metrics and the OpenAPI document."""
    metrics = state.metrics

    async def healthz(request: Request) -> Response:
        return _OrjsonResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        kafka_ok, kafka_detail = state.sink.ready()
        allow_ok = state.allowlist.loaded
        status = 200 if kafka_ok and allow_ok else 503
        return _OrjsonResponse(
            {
                "status": "ready" if status == 200 else "not-ready",
                "kafka": kafka_detail,
                "allowlist": {
                    "loaded": allow_ok,
                    "ranges": state.allowlist.size,
                    "sync_token": state.allowlist.sync_token,
                },
            },
            status_code=status,
        )

    async def metrics_route(request: Request) -> Response:
        metrics.allowlist_ranges.set(state.allowlist.size)
        metrics.dedupe_entries.set(sum(len(w) for w in state.seen.values()))
        metrics.in_flight.set(state.sink.in_flight)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    doc = openapi_document(state.config)

    async def openapi(request: Request) -> Response:
        return _OrjsonResponse(doc)

    return [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]


def _lifespan(
    state: RouteState, warm: tuple[str, ...], clock: Callable[[], float]
) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    """Start-up and shutdown: the sink, the topic watcher and the allowlist refresher."""
    config = state.config

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        refresher_stop = asyncio.Event()
        refresher_task: asyncio.Task[None] | None = None
        await state.sink.start()
        watcher = TopicWatcher(config.kafka, warm, config.topics.check_interval_s, state.sink)
        watcher.start()
        refresh_on = config.allowlist.refresh_interval_s > 0
        log_if_stale(
            state.allowlist,
            clock(),
            "the first refresh runs now, in the background"
            if refresh_on
            else "refresh is off (allowlist.refresh_interval_s = 0): run `gateway ranges update`",
        )
        if refresh_on:
            # in the background: neither start-up nor readiness waits for the network
            refresher = RangeRefresher(
                state.allowlist, config.allowlist, metrics=state.metrics, clock=clock
            )
            refresher_task = asyncio.create_task(refresher.run(refresher_stop))
        log.info(
            "ingress started",
            extra={
                "sources": [s.name for s in config.sources],
                "allowlist_ranges": state.allowlist.size,
            },
        )
        try:
            yield
        finally:
            watcher.stop()
            refresher_stop.set()
            if refresher_task:
                refresher_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher_task
            await state.sink.close(timeout_s=min(15.0, config.server.graceful_shutdown_s or 15.0))
            log.info("ingress stopped: producer flushed and closed")

    return lifespan

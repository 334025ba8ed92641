"""The ingress: an HTTP source per configured route, ending in the Kafka sink.

One request goes: client IP (trusted proxies) -> allowlist -> shared secret -> body ->
ingest (decode, normalize, record) -> dedupe -> publish and wait for the ack -> answer.
Nothing is answered 2xx unless Kafka acknowledged it (the event's record, or its dead-letter
record); :mod:`gateway.ingress.route` says which requests are refused.

The source routes are plain ASGI callables in front of Starlette: they are the hot path, and
Starlette's request, response and middleware objects cost more per request than everything
the gateway itself does before the Kafka send. Health and readiness stay on Starlette; the
operator surface (``/metrics``, ``/openapi.json``) has a port of its own
(:mod:`gateway.ingress.operator`), and the webhook port answers 404 for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import Config
from gateway.ingress.allowlist import Allowlist, RangeRefresher, log_if_stale
from gateway.ingress.openapi import openapi_document
from gateway.ingress.operator import OperatorServer
from gateway.ingress.peers import MetricsPeers
from gateway.ingress.protocol import REFUSALS_STATE_KEY
from gateway.ingress.route import SourceRoute
from gateway.ingress.state import RouteState
from gateway.kafka import SinkBase, create_sink
from gateway.kafka.topics import TopicWatcher, gateway_topics
from gateway.metrics import IngressMetrics
from gateway.tracing import Tracing

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
    tracing: Tracing | None = None,
    metrics_dir: str = "",
) -> ASGIApp:
    """The ingress ASGI app. The sink connects in the app's lifespan.

    ``tracing``: spans for the requests (tests pass one with an in-memory exporter); by
    default one is made from ``[tracing]`` when it is enabled. ``metrics_dir``: the directory
    the workers of one ``gateway serve`` share, so that one scrape answers for all of them.
    """
    metrics = metrics or IngressMetrics()
    allowlist = allowlist or Allowlist.from_config(config.allowlist)
    warm = tuple(gateway_topics(config, tag_sync=False))
    # label values from the configured vocabulary only: input never adds a series
    metrics.bound(sources=[s.name for s in config.sources], topics=warm)
    sink = sink or create_sink(config.kafka, metrics, warm_topics=warm)
    if tracing is None and config.tracing.enabled:
        tracing = Tracing(config.tracing, "ingress")
    state = RouteState(
        config=config, sink=sink, allowlist=allowlist, metrics=metrics, clock=clock, tracing=tracing
    )
    metrics.allowlist_ranges.set(allowlist.size)
    # read at scrape time, so the figures age between refreshes
    metrics.allowlist_age.set_function(lambda: state.allowlist.age_s(clock()))
    metrics.allowlist_last_refresh_success.set_function(
        lambda: state.allowlist.last_refresh_ok or 0.0
    )
    metrics.allowlist_refresh_failing.set_function(
        lambda: state.allowlist.refresh_failing_s(clock())
    )
    # read at scrape time too, on the metrics port's thread (plain reads of ints)
    metrics.allowlist_ranges.set_function(lambda: state.allowlist.size)
    metrics.dedupe_entries.set_function(lambda: sum(len(w) for w in state.seen.values()))
    metrics.in_flight.set_function(lambda: state.sink.in_flight)
    metrics.subscription_cache.set_function(lambda: sum(len(v) for v in state.verifiers))
    peers = MetricsPeers(metrics_dir, metrics.registry) if metrics_dir else None
    fallback = Starlette(
        routes=_operational_routes(state), lifespan=_lifespan(state, warm, clock, peers)
    )
    return PathDispatcher(fallback, {s.path: SourceRoute(state, s) for s in config.sources})


def _operational_routes(state: RouteState) -> list[Route]:
    """Health and readiness (a load balancer's probes); nothing else on the webhook port."""

    async def healthz(request: Request) -> Response:
        return _OrjsonResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        kafka_ok, kafka_detail = state.sink.ready()
        allow_ok = state.allowlist.loaded
        status = 200 if kafka_ok and allow_ok else 503
        body = {
            "status": "ready" if status == 200 else "not-ready",
            "kafka": kafka_detail,
            "allowlist": {
                "loaded": allow_ok,
                "ranges": state.allowlist.size,
                "sync_token": state.allowlist.sync_token,
            },
        }
        if state.sink.spool is not None:
            body["spool"] = state.sink.spool.status()
        return _OrjsonResponse(body, status_code=status)

    return [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
    ]


def _lifespan(
    state: RouteState,
    warm: tuple[str, ...],
    clock: Callable[[], float],
    peers: MetricsPeers | None,
) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[dict[str, Any]]]:
    """Start-up and shutdown: the sink, the topic watcher, the allowlist refresher and the
    metrics port."""
    config = state.config
    operator = OperatorServer(
        config.server.metrics_host,
        config.server.metrics_port,
        state.metrics.registry,
        openapi_document(config),
        peers,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        refresher_stop = asyncio.Event()
        refresher_task: asyncio.Task[None] | None = None
        if config.spool.enabled:
            from gateway.kafka.spool import Spool, SpoolError

            try:  # before Kafka: a damaged or foreign spool refuses the start
                await state.sink.open_spool(Spool(config.spool, state.metrics))
            except SpoolError as exc:
                log.critical("the spool cannot be opened: %s", exc)
                raise
        await state.sink.start()
        operator.start()
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
            # the lifespan state: uvicorn hands it to every connection's protocol, which
            # counts the connections it refuses before any route (gateway/ingress/protocol.py)
            yield {REFUSALS_STATE_KEY: state.metrics.connection_refusals}
        finally:
            operator.stop()
            watcher.stop()
            refresher_stop.set()
            if refresher_task:
                refresher_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher_task
            for verifier in state.verifiers:
                await verifier.aclose()
            await state.sink.stop_drain()
            await state.sink.close(timeout_s=min(15.0, config.server.graceful_shutdown_s or 15.0))
            await state.sink.close_spool()
            if state.tracing is not None:
                state.tracing.shutdown()  # exports the spans still batched
            log.info("ingress stopped: producer flushed and closed")

    return lifespan

"""The ingress: an HTTP source per configured route, ending in the Kafka sink.

One request goes: client IP (trusted proxies) -> allowlist -> shared secret -> body ->
parse -> normalize -> dedupe -> publish and wait for the ack -> answer. Nothing is answered
2xx unless Kafka acknowledged it (the event's record, or its dead-letter record).

OneSignal retries a refused delivery only a few times and then drops it, so once a request
passed a source's sender checks (a source with a shared secret), no body is refused: one that
cannot be decoded, normalized or even turned into a record goes byte for byte to the
dead-letter topic, and the sender gets its 2xx once that is acknowledged. Only the sender
checks (403), the method (405) and the size limit (413) refuse a request; Kafka being unable
to take a record is a 503. The web-push source has no secret: anyone can post to it, so it
still refuses bodies it cannot decode with 4xx.

The source routes are plain ASGI callables in front of Starlette: they are the hot path, and
Starlette's request, response and middleware objects cost more per request than everything
the gateway itself does before the Kafka send. The operational routes (health, readiness,
metrics, OpenAPI) stay on Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import CHANNELS, Config, SourceConfig
from gateway.core import normalize, trust
from gateway.core.body import BadRequest, TextBody, decode_body
from gateway.core.dedupe import CONFLICT, DUPLICATE, SeenWindow
from gateway.core.event import NormalizationError, NormalizedEvent, Received
from gateway.core.records import KafkaRecord, build_dead_letter, build_record, record_size
from gateway.ingress import allowlist as ranges
from gateway.ingress.openapi import openapi_document
from gateway.kafka import PublishResult, SinkBase, Unavailable, create_sink
from gateway.kafka.topics import TopicWatcher
from gateway.metrics import IngressMetrics

__all__ = ["Gateway", "create_app"]

log = logging.getLogger("gateway.ingress")

_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH"})
_OUTCOMES = (
    "accepted",
    "duplicate",
    "dead_lettered",
    "forbidden_ip",
    "forbidden_secret",
    "bad_request",
    "unsupported_media_type",
    "unavailable",
    "method_not_allowed",
    "too_large",
)
_JSON = (b"content-type", b"application/json")
# OneSignal's event.id is a UUID: a longer id header value is not one, and would not fit the
# dead letter's header (records caps it at 256 bytes), so it is not used.
_MAX_ID_CHARS = 256
_USER_QUERY_FIELDS = ("onesignal_id", "external_id")


@dataclass(slots=True)
class _Reply:
    status: int
    body: dict[str, Any]
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    close: bool = False


def _error(status: int, code: str, message: str, **headers: str) -> _Reply:
    return _Reply(
        status,
        {"error": code, "message": message},
        [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    )


class _OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


@dataclass
class Gateway:
    """What the routes share: config, the sink, the allowlist, metrics, the dedupe windows.

    Each source has its own window (``max_entries`` ids each) and its own in-flight ids, so
    one source's ids never evict or shadow another's.
    """

    config: Config
    sink: SinkBase
    allowlist: ranges.Allowlist
    metrics: IngressMetrics
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    proxies: trust.TrustedProxies = field(init=False)
    seen: dict[str, SeenWindow] = field(init=False)
    # per source, ids whose record is being published right now, with their kind: a concurrent
    # duplicate waits for the outcome
    pending: dict[str, dict[str, tuple[str, asyncio.Future[bool]]]] = field(init=False)

    def __post_init__(self) -> None:
        self.proxies = trust.TrustedProxies(self.config.server.trusted_proxies)
        dedupe = self.config.dedupe
        self.seen = {
            s.name: SeenWindow(dedupe.window_s, dedupe.max_entries) for s in self.config.sources
        }
        self.pending = {s.name: {} for s in self.config.sources}

    def received(self, source: SourceConfig, client_ip: str) -> Received:
        return Received(
            source=source.name, at=datetime.fromtimestamp(self.clock(), UTC), client_ip=client_ip
        )


def _secret_ok(
    values: list[bytes], secrets: tuple[bytes, ...], compare: Callable[[bytes, bytes], bool]
) -> bool:
    """Constant-time comparison against every accepted secret (no early exit).

    Every candidate (the header value, and without a ``Bearer`` prefix) is compared with
    every secret, whichever matches, so the time taken says nothing about which secret or
    how much of it was right. ``compare`` is the comparison (the route's is
    ``hmac.compare_digest``); the tests pass one that counts its calls.
    """
    if len(values) != 1:
        return False
    value = values[0].strip()
    candidates = [value]
    if value[:7].lower() == b"bearer ":
        candidates.append(value[7:].strip())
    ok = False
    for candidate in candidates:
        for secret in secrets:
            ok |= compare(candidate, secret)
    return ok


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by name, the first value of each (the secret reads all of its own)."""
    out: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        out.setdefault(name, value)
    return out


class _SourceRoute:
    """The ASGI handler of one configured source."""

    # constant time; an attribute so that a test can count the comparisons the route makes
    compare_secret: Callable[[bytes, bytes], bool] = staticmethod(hmac.compare_digest)

    def __init__(self, gw: Gateway, source: SourceConfig) -> None:
        self.gw = gw
        self.source = source
        self.secrets = tuple(s.reveal().encode() for s in source.secrets)
        self.secret_header = source.secret_header.encode()
        self.proxy_header = gw.config.server.proxy_header
        self.allow_text = source.format == "journey"
        self.web = source.format == "web-push"
        # a sender that proved itself with the secret loses what is refused: keep every body
        self.keep_all = source.require_secret
        self.id_header = source.id_header.encode() if source.id_header else None
        self.user_headers = {f: h.encode() for f, h in source.user_headers.items()}
        self.seen = gw.seen[source.name]
        self.pending = gw.pending[source.name]
        self.conflicts = gw.metrics.dedupe_conflicts.labels(source.name)
        self.max_body = gw.config.server.max_body_bytes
        self.outcomes = {name: gw.metrics.requests.labels(source.name, name) for name in _OUTCOMES}
        self.latency = gw.metrics.request_seconds.labels(source.name)
        self.misses = {
            label: gw.metrics.allowlist_misses.labels(source.name, label)
            for label in ("valid", "invalid", "missing")
        }
        allow = "POST, PUT, PATCH" + (", OPTIONS" if self.web else "")
        self.allow_header = allow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = _headers(scope)
        try:
            reply = await self.handle(scope, headers, receive)
        except _ClientGone:
            return
        except Exception:  # a bug: answer 500 rather than drop the connection, and say so
            log.exception("unhandled error in source route", extra={"source": self.source.name})
            reply = _error(500, "internal", "the gateway failed to handle this request")
        finally:
            self.latency.observe(time.perf_counter() - started)
        out = reply.headers
        if self.web:
            out.extend(self._cors(headers))
        body = orjson.dumps(reply.body) if reply.status != 204 else b""
        out.append(_JSON)
        out.append((b"content-length", str(len(body)).encode()))
        if reply.close:
            out.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    def _cors(self, headers: Mapping[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        origin = headers.get(b"origin")
        if origin is None:
            return []
        origins = self.source.cors_origins
        if "*" in origins:
            return [(b"access-control-allow-origin", b"*")]
        if origin.decode("latin-1") in origins:
            return [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        return []

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome].inc()

    def _secret_label(self, scope: Scope) -> str:
        """valid, invalid or missing: the secret check of a request refused for its address."""
        values = [v for k, v in scope["headers"] if k == self.secret_header]
        if not values:
            return "missing"
        return "valid" if _secret_ok(values, self.secrets, self.compare_secret) else "invalid"

    async def _read_body(self, headers: Mapping[bytes, bytes], receive: Receive) -> bytes:
        """The whole body, or :class:`_BodyTooLarge` as soon as it is over the limit.

        uvicorn has no body limit of its own: a declared length over the limit is refused
        before a byte is read, a chunked body as soon as it passes the limit.
        """
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body:
                    raise _BodyTooLarge
            except ValueError:
                pass
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def handle(
        self, scope: Scope, headers: Mapping[bytes, bytes], receive: Receive
    ) -> _Reply:
        source = self.source
        method = scope["method"]
        if method == "OPTIONS" and self.web:
            return _Reply(
                204,
                {},
                [
                    (b"access-control-allow-methods", b"POST, OPTIONS"),
                    (b"access-control-allow-headers", b"content-type, x-onesignal-event"),
                    (b"access-control-max-age", b"86400"),
                ],
            )
        if method not in _WRITE_METHODS:
            self._count("method_not_allowed")
            return _error(
                405,
                "method-not-allowed",
                f"{method} is not accepted here; send POST",
                allow=self.allow_header,
            )

        peer = scope.get("client")
        client = trust.resolve_client_ip(
            peer[0] if peer else None, scope["headers"], self.gw.proxies, self.proxy_header
        )
        if source.require_allowlisted_ip and not self.gw.allowlist.contains(client.ip):
            self._count("forbidden_ip")
            # The answer stays 403 whatever the secret says, but a miss that carries a valid
            # secret is most likely OneSignal at an address the allowlist does not know yet, and
            # OneSignal does not retry a 4xx: count it apart and say so loudly.
            secret = self._secret_label(scope)
            self.misses[secret].inc()
            extra = {
                "source": source.name,
                "client_ip": client.ip,
                "malformed_chain": client.malformed,
                "secret": secret,
                "allowlist_sync_token": self.gw.allowlist.sync_token,
            }
            if secret == "valid":  # noqa: S105 - a label, not a secret
                log.warning(
                    "refused: sender %s not in allowlist but carries a valid secret; most likely "
                    "a OneSignal sender at a new address (the event is lost: no retry of a 4xx)",
                    client.ip,
                    extra=extra,
                )
            else:
                log.info("refused: sender not in allowlist", extra=extra)
            return _error(403, "forbidden", "sender address is not allowed (ip-not-allowed)")
        if source.require_secret:
            values = [v for k, v in scope["headers"] if k == self.secret_header]
            if not _secret_ok(values, self.secrets, self.compare_secret):
                self._count("forbidden_secret")
                if not values:
                    reason = "secret-missing"
                elif len(values) > 1:
                    reason = "secret-repeated"
                else:
                    reason = "secret-invalid"
                log.info(
                    "refused: %s", reason, extra={"source": source.name, "client_ip": client.ip}
                )
                return _error(403, "forbidden", f"shared secret check failed ({reason})")

        try:
            body = await self._read_body(headers, receive)
        except _BodyTooLarge:
            self._count("too_large")
            reply = _error(
                413, "too-large", f"the request body is over the {self.max_body}-byte limit"
            )
            reply.close = True  # the rest of the body is not read
            return reply
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        received = self.gw.received(source, client.ip)
        header_id = self._header_id(headers)
        letter = _Letter(body, content_type, received, header_id)
        try:
            payload = decode_body(
                body,
                content_type,
                max_depth=self.gw.config.server.max_json_depth,
                allow_text=self.allow_text,
            )
        except BadRequest as exc:
            if self.keep_all:
                return await self._dead_letter(exc.code, exc.message, letter)
            self._count("unsupported_media_type" if exc.status == 415 else "bad_request")
            return _error(exc.status, exc.code, exc.message)

        try:
            event = normalize.normalize_for_source(
                payload,
                source,
                unknown_kinds=self.gw.config.kafka.unknown_kinds,
                fresh_id=_random_id,  # a new id per request: two id-less requests, two events
                header_id=header_id,
                user=self._user(scope, headers) if isinstance(payload, TextBody) else None,
            )
        except NormalizationError as exc:
            return await self._dead_letter(exc.reason, str(exc), letter)
        except Exception as exc:  # a bug must not cost the sender its event: keep the bytes
            return await self._internal_error(exc, letter)
        return await self._publish_event(event, letter)

    def _header_id(self, headers: Mapping[bytes, bytes]) -> str | None:
        """The configured id header's value, when present, non-empty and id-sized."""
        if self.id_header is None:
            return None
        text = _header_text(headers.get(self.id_header, b"")).strip()
        if not text or len(text) > _MAX_ID_CHARS:
            return None
        return text

    def _user(self, scope: Scope, headers: Mapping[bytes, bytes]) -> dict[str, str]:
        """User ids a Journey webhook templated into its URL query or configured headers.

        A configured header wins over the query parameter of the same field.
        """
        user: dict[str, str] = {}
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        for name in _USER_QUERY_FIELDS:
            values = query.get(name)
            if values and values[0].strip() and len(values[0]) <= _MAX_ID_CHARS:
                user[name] = values[0].strip()
        for name, header_name in self.user_headers.items():
            text = _header_text(headers.get(header_name, b"")).strip()
            if text and len(text) <= _MAX_ID_CHARS:
                user[name] = text
        return user

    async def _publish_event(self, event: NormalizedEvent, letter: _Letter) -> _Reply:
        gw = self.gw
        cfg = gw.config.kafka
        marker: asyncio.Future[bool] | None = None
        if event.deduplicate:
            state = self.seen.check(event.id, event.kind, gw.monotonic())
            if state == DUPLICATE:
                self._count("duplicate")
                return _Reply(200, {"status": "duplicate", "id": event.id})
            conflict = state == CONFLICT
            pending = self.pending.get(event.id)
            if pending is not None and pending[0] == event.kind:
                # the same event is being published by a concurrent request: share its outcome
                try:
                    ok = await asyncio.wait_for(asyncio.shield(pending[1]), cfg.ack_timeout_s)
                except TimeoutError:
                    ok = False
                if ok:
                    self._count("duplicate")
                    return _Reply(200, {"status": "duplicate", "id": event.id})
                return self._unavailable("the first delivery of this event id did not reach Kafka")
            if pending is not None:
                conflict = True
            if conflict:
                # one id, two kinds: a template that hard-codes the id, not a retry. Both are
                # events; publish this one too, and say so where an operator looks
                self.conflicts.inc()
                log.warning(
                    "event id reused by an event of another kind: published, not deduplicated",
                    extra={"source": self.source.name, "event_id": event.id, "kind": event.kind},
                )
            if pending is None:
                marker = asyncio.get_running_loop().create_future()

        try:
            record = build_record(
                event,
                letter.received,
                topic_template=cfg.topic,
                source_name=self.source.name,
                content_mode=cfg.content_mode,
            )
        except Exception as exc:  # a bug must not cost the sender its event: keep the bytes
            return await self._internal_error(exc, letter)
        if record_size(record) > cfg.max_request_size:
            # the body fits (server.max_body_bytes), but normalized it does not: keep the body
            return await self._dead_letter(
                "record-too-large",
                f"the normalized record is over kafka.max_request_size ({cfg.max_request_size})",
                letter,
            )
        if marker is not None:
            self.pending[event.id] = (event.kind, marker)
        try:
            result = await gw.sink.publish(record)
        except Unavailable as exc:
            if marker is not None:
                marker.set_result(False)
            return self._unavailable(str(exc))
        except BaseException:
            if marker is not None:
                marker.set_result(False)
            raise
        finally:
            if marker is not None:
                self.pending.pop(event.id, None)
        if marker is not None:
            marker.set_result(True)
        if event.deduplicate:
            self.seen.add(event.id, gw.monotonic(), event.kind)
        gw.metrics.events.labels(event.kind).inc()
        self._count("accepted")
        return _Reply(200, _accepted_body(event.id, result))

    async def _internal_error(self, exc: Exception, letter: _Letter) -> _Reply:
        log.error(
            "normalizing or building the record failed; the body is dead-lettered",
            exc_info=exc,
            extra={"source": self.source.name},
        )
        detail = f"{type(exc).__name__} in the gateway (a bug; see its log): {exc}"
        return await self._dead_letter("internal-error", detail, letter)

    async def _dead_letter(self, reason: str, detail: str, letter: _Letter) -> _Reply:
        extra: list[tuple[str, bytes]] = []
        if letter.header_id is not None:
            # replay reads the id from here: the request's headers are not kept otherwise
            extra.append(("dlq_event_id", letter.header_id.encode("utf-8", "backslashreplace")))
        record = build_dead_letter(
            topic=self.gw.config.kafka.dead_letter_topic,
            reason=reason,
            detail=detail,
            body=letter.body,
            source_name=self.source.name,
            received=letter.received,
            content_type=letter.content_type,
            extra_headers=extra,
        )
        return await self._publish_dead_letter(record, reason)

    async def _publish_dead_letter(self, record: KafkaRecord, reason: str) -> _Reply:
        try:
            result = await self.gw.sink.publish(record)
        except Unavailable as exc:
            return self._unavailable(str(exc))
        self.gw.metrics.dead_letters.labels(self.source.name, reason).inc()
        self._count("dead_lettered")
        log.warning(
            "payload dead-lettered",
            extra={"source": self.source.name, "reason": reason, "offset": result.offset},
        )
        body = _accepted_body(None, result)
        body.update(status="dead-lettered", reason=reason)
        return _Reply(200, body)

    def _unavailable(self, detail: str) -> _Reply:
        self._count("unavailable")
        log.warning("answered 503", extra={"source": self.source.name, "detail": detail})
        return _error(
            503,
            "unavailable",
            "the event could not be stored durably right now; retry later",
            retry_after=str(self.gw.config.kafka.retry_after_s),
        )


@dataclass(frozen=True, slots=True)
class _Letter:
    """What a dead letter of this request would keep."""

    body: bytes
    content_type: str
    received: Received
    header_id: str | None


def _header_text(value: bytes) -> str:
    # HTTP header values are bytes; OneSignal renders Liquid into them as UTF-8
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _random_id() -> str:
    return str(uuid.uuid4())


def _accepted_body(event_id: str | None, result: PublishResult) -> dict[str, Any]:
    return {
        "status": "accepted",
        "id": event_id,
        "topic": result.topic,
        "partition": result.partition,
        "offset": result.offset,
    }


class _Ingress:
    """Dispatch: the configured source paths to their handlers, the rest to Starlette."""

    def __init__(self, fallback: Starlette, routes: dict[str, _SourceRoute]) -> None:
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
    allowlist: ranges.Allowlist | None = None,
    sink: SinkBase | None = None,
    clock: Callable[[], float] = time.time,
) -> ASGIApp:
    """The ingress ASGI app. The sink connects in the app's lifespan."""
    metrics = metrics or IngressMetrics()
    allowlist = allowlist or ranges.Allowlist.from_config(config.allowlist)
    warm = tuple(
        dict.fromkeys(
            [config.kafka.topic.format(channel=c) for c in CHANNELS]
            + [config.kafka.dead_letter_topic]
        )
    )
    sink = sink or create_sink(config.kafka, metrics, warm_topics=warm)
    gw = Gateway(config=config, sink=sink, allowlist=allowlist, metrics=metrics, clock=clock)
    metrics.allowlist_ranges.set(allowlist.size)
    # read at scrape time, so the figures age between refreshes
    metrics.allowlist_age.set_function(lambda: gw.allowlist.age_s(clock()))
    metrics.allowlist_last_refresh_success.set_function(lambda: gw.allowlist.last_refresh_ok or 0.0)
    metrics.allowlist_refresh_failing.set_function(lambda: gw.allowlist.refresh_failing_s(clock()))

    async def healthz(request: Request) -> Response:
        return _OrjsonResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        kafka_ok, kafka_detail = gw.sink.ready()
        allow_ok = gw.allowlist.loaded
        status = 200 if kafka_ok and allow_ok else 503
        return _OrjsonResponse(
            {
                "status": "ready" if status == 200 else "not-ready",
                "kafka": kafka_detail,
                "allowlist": {
                    "loaded": allow_ok,
                    "ranges": gw.allowlist.size,
                    "sync_token": gw.allowlist.sync_token,
                },
            },
            status_code=status,
        )

    async def metrics_route(request: Request) -> Response:
        metrics.allowlist_ranges.set(gw.allowlist.size)
        metrics.dedupe_entries.set(sum(len(w) for w in gw.seen.values()))
        metrics.in_flight.set(gw.sink.in_flight)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    doc = openapi_document(config)

    async def openapi(request: Request) -> Response:
        return _OrjsonResponse(doc)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        refresher_stop = asyncio.Event()
        refresher_task: asyncio.Task[None] | None = None
        await gw.sink.start()
        watcher = TopicWatcher(
            config.kafka,
            list(warm),
            config.topics.check_interval_s,
            on_missing=lambda missing: setattr(gw.sink, "missing_topics", missing),
        )
        watcher.start()
        refresh_on = config.allowlist.refresh_interval_s > 0
        ranges.log_if_stale(
            gw.allowlist,
            clock(),
            "the first refresh runs now, in the background"
            if refresh_on
            else "refresh is off (allowlist.refresh_interval_s = 0): run `gateway ranges update`",
        )
        if refresh_on:
            # in the background: neither start-up nor readiness waits for the network
            refresher = ranges.RangeRefresher(
                gw.allowlist, config.allowlist, metrics=metrics, clock=clock
            )
            refresher_task = asyncio.create_task(refresher.run(refresher_stop))
        log.info(
            "ingress started",
            extra={
                "sources": [s.name for s in config.sources],
                "allowlist_ranges": gw.allowlist.size,
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
            await gw.sink.close(timeout_s=min(15.0, config.server.graceful_shutdown_s or 15.0))
            log.info("ingress stopped: producer flushed and closed")

    fallback = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics_route, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    return _Ingress(fallback, {s.path: _SourceRoute(gw, s) for s in config.sources})

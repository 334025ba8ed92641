"""The ASGI handler of one configured source: the checks, then ingest, dedupe and the sink.

OneSignal retries a refused delivery only a few times and then drops it, so once a request
passed a source's sender checks (a source with a shared secret), no body is refused: what
:func:`~gateway.core.ingest.ingest` cannot publish goes byte for byte to the dead-letter topic,
and the sender gets its 2xx once that is acknowledged. Only the sender checks (403), the method
(405) and the size limit (413) refuse a request; Kafka being unable to take a record is a 503.
The web-push source has no secret: anyone can post to it, so it refuses bodies it cannot decode
or normalize (400: only the Web SDK's event names are events), a client over its rate (429), an
``Origin`` not in ``cors_origins`` (403) and, with ``verify_subscriptions``, a subscription
OneSignal does not know (403). None of these writes anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import replace

import orjson
from starlette.types import Receive, Scope, Send

from gateway.config import SourceConfig
from gateway.core.clients import ClientLimiter
from gateway.core.dedupe import CONFLICT, DUPLICATE
from gateway.core.event import NormalizedEvent
from gateway.core.ingest import DeadLetter, Publish, Refuse, ingest
from gateway.core.records import with_attributes
from gateway.ingress.checks import (
    BodyReader,
    ClientGone,
    ClientRate,
    Cors,
    Methods,
    SenderAddress,
    SharedSecret,
)
from gateway.ingress.replies import Reply, accepted_body, error
from gateway.ingress.sources import ingest_source
from gateway.ingress.state import RouteState
from gateway.ingress.subscriptions import NOT_FOUND, UNCHECKED, verifier_for
from gateway.kafka import Unavailable
from gateway.kafka.spool.store import COMMIT_TIMEOUT_S
from gateway.logs import SampledLog
from gateway.tracing import TRACE_ATTRIBUTES

__all__ = ["OUTCOMES", "SourceRoute"]

log = logging.getLogger("gateway.ingress")

OUTCOMES = (
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
    "unknown_event",
    "forbidden_origin",
    "rate_limited",
    "unknown_subscription",
    "unverified",
)
_JSON = (b"content-type", b"application/json")
# OneSignal's event.id is a UUID: a longer id header value is not one, and would not fit the
# dead letter's header (records caps it at 256 bytes), so it is not used.
_MAX_ID_CHARS = 256
_USER_QUERY_FIELDS = ("onesignal_id", "external_id")
# the outcome a refused body counts as (a bounded set: codes come from the gateway, not the body)
_REFUSALS = {"not-a-web-sdk-event": "unknown_event"}
_STATUS_REFUSALS = {413: "too_large", 415: "unsupported_media_type"}


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by name, the first value of each (the secret reads all of its own)."""
    out: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        out.setdefault(name, value)
    return out


class SourceRoute:
    """The ASGI handler of one configured source."""

    def __init__(self, state: RouteState, source: SourceConfig) -> None:
        self.state = state
        self.source = source
        self.core = ingest_source(state.config, source)
        metrics = state.metrics
        self.outcomes = {name: metrics.requests.labels(source.name, name) for name in OUTCOMES}
        self.latency = metrics.request_seconds.labels(source.name)
        self.conflicts = metrics.dedupe_conflicts.labels(source.name)
        web = source.format == "web-push"
        self.cors = Cors(source.cors_origins, self.outcomes["forbidden_origin"]) if web else None
        self.methods = Methods(self.outcomes["method_not_allowed"], preflight=web)
        server = state.config.server
        refusals = SampledLog(log, server.refusal_log_lines, server.refusal_log_interval_s)
        self.secret = SharedSecret(
            source.name,
            source.secret_header,
            tuple(s.reveal().encode() for s in source.secrets),
            self.outcomes["forbidden_secret"],
            required=source.require_secret,
            refusals=refusals,
        )
        self.sender = SenderAddress(
            source.name,
            lambda: state.allowlist,
            state.proxies,
            state.config.server.proxy_header,
            self.secret,
            self.outcomes["forbidden_ip"],
            {
                label: metrics.allowlist_misses.labels(source.name, label)
                for label in ("valid", "invalid", "missing")
            },
            required=source.require_allowlisted_ip,
            refusals=refusals,
        )
        self.clients = (
            ClientRate(
                ClientLimiter(
                    source.client_rate_limit, source.client_rate_burst, source.client_rate_table
                ),
                state.monotonic,
                self.outcomes["rate_limited"],
            )
            if not source.require_secret and source.client_rate_limit > 0
            else None
        )
        self.verifier = verifier_for(state.config, source, metrics, state.monotonic)
        if self.verifier is not None:
            state.verifiers.append(self.verifier)
        self.body = BodyReader(state.config.server.max_body_bytes, self.outcomes["too_large"])
        self.id_header = source.id_header.encode() if source.id_header else None
        self.user_headers = {f: h.encode() for f, h in source.user_headers.items()}
        self.seen = state.seen[source.name]
        self.pending = state.pending[source.name]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = _headers(scope)
        try:
            if self.state.tracing is None:
                reply = await self.handle(scope, headers, receive)
            else:
                reply = await self._traced(scope, headers, receive)
        except ClientGone:
            return
        except Exception:  # a bug: answer 500 rather than drop the connection, and say so
            log.exception("unhandled error in source route", extra={"source": self.source.name})
            reply = error(500, "internal", "the gateway failed to handle this request")
        finally:
            self.latency.observe(time.perf_counter() - started)
        out = reply.headers
        if self.cors is not None:
            out.extend(self.cors.headers(headers))
        body = orjson.dumps(reply.body) if reply.status != 204 else b""
        out.append(_JSON)
        out.append((b"content-length", str(len(body)).encode()))
        if reply.close:
            out.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    async def handle(self, scope: Scope, headers: Mapping[bytes, bytes], receive: Receive) -> Reply:
        preflight = self.methods.check(scope["method"])
        if preflight is not None and preflight.status != 204:
            return preflight  # a 405
        client = self.sender.resolve(scope)
        if preflight is None:
            refusal = self.sender.check(scope, client) or self.secret.check(scope, client.ip)
            if refusal is not None:
                return refusal
        if self.clients is not None:
            # before anything else is looked at, so that every request costs its sender a token
            refusal = self.clients.check(client.ip)
            if refusal is not None:
                return refusal
        if self.cors is not None:
            # a write or a preflight from an origin that is not listed: refused, nothing read
            refusal = self.cors.check(headers)
            if refusal is not None:
                return refusal
        if preflight is not None:
            return preflight
        body = await self.body.read(headers, receive)
        if isinstance(body, Reply):
            return body
        decision = ingest(
            body,
            self.core,
            self.state.received(self.source.name, client.ip),
            content_type=headers.get(b"content-type", b"").decode("latin-1"),
            fresh_id=_random_id,  # a new id per request: two id-less requests, two events
            header_id=self._header_id(headers),
            user=self._user(scope, headers) if self.core.allows_text else None,
        )
        if self.state.tracing is not None and not isinstance(decision, Refuse):
            # the request's span is the record's parent: the CloudEvents tracing extension
            trace = self.state.tracing.current()
            decision = replace(decision, record=with_attributes(decision.record, trace))
        if isinstance(decision, Publish):
            if self.verifier is not None:
                checked = await self._verify(decision)
                if isinstance(checked, Reply):
                    return checked
                decision = checked
            return await self._publish(decision)
        if isinstance(decision, DeadLetter):
            return await self._dead_letter(decision)
        self._count(
            _REFUSALS.get(decision.code) or _STATUS_REFUSALS.get(decision.status, "bad_request")
        )
        return error(decision.status, decision.code, decision.message)

    async def _traced(
        self, scope: Scope, headers: Mapping[bytes, bytes], receive: Receive
    ) -> Reply:
        """``handle`` in a SERVER span continuing the request's W3C trace context."""
        assert self.state.tracing is not None
        carrier = {
            name: headers[raw].decode("latin-1")
            for name in TRACE_ATTRIBUTES
            if (raw := name.encode()) in headers
        }
        attributes = {
            "http.request.method": scope["method"],
            "url.path": self.source.path,
            "gateway.source": self.source.name,
        }
        with self.state.tracing.server_span(
            f"{scope['method']} {self.source.path}", carrier, attributes
        ) as span:
            reply = await self.handle(scope, headers, receive)
            span.set_attribute("http.response.status_code", reply.status)
            if isinstance(reply.body, dict):
                for key in ("status", "id", "reason"):
                    value = reply.body.get(key)
                    if isinstance(value, str):
                        span.set_attribute(f"gateway.{key}", value)
            return reply

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome].inc()

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

    async def _claim(self, event: NormalizedEvent) -> Reply | asyncio.Future[bool] | None:
        """Dedupe a sender id: the answer for a copy, or the marker this publish settles.

        None: publish without a marker (a concurrent copy of another kind holds the id).
        """
        pending = self.pending.get(event.id)
        if pending is not None and pending[1].done():
            # settled, and its callback has not run yet: the same, now
            self._settled(event.id, pending[0], pending[1])
        state = self.seen.check(event.id, event.kind, self.state.monotonic())
        if state == DUPLICATE:
            self._count("duplicate")
            return Reply(200, {"status": "duplicate", "id": event.id})
        conflict = state == CONFLICT
        pending = self.pending.get(event.id)
        if pending is not None and pending[0] == event.kind:
            # the same event is being published by a concurrent request: share its outcome
            timeout = self.state.config.kafka.ack_timeout_s
            if self.state.config.spool.enabled:  # then the first one may still be spooled
                timeout += COMMIT_TIMEOUT_S
            try:
                ok = await asyncio.wait_for(asyncio.shield(pending[1]), timeout)
            except TimeoutError:
                ok = False
            if ok:
                self._count("duplicate")
                return Reply(200, {"status": "duplicate", "id": event.id})
            return self._unavailable("the first delivery of this event id did not reach Kafka")
        if pending is not None or conflict:
            # one id, two kinds: a template that hard-codes the id, not a retry. Both are
            # events; publish this one too, and say so where an operator looks
            self.conflicts.inc()
            log.warning(
                "event id reused by an event of another kind: published, not deduplicated",
                extra={"source": self.source.name, "event_id": event.id, "kind": event.kind},
            )
        if pending is not None:
            return None
        marker: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.pending[event.id] = (event.kind, marker)
        marker.add_done_callback(lambda m: self._settled(event.id, event.kind, m))
        return marker

    async def _verify(self, decision: Publish) -> Publish | Reply:
        """The subscription check (verify_subscriptions): refuse an unknown subscription, and
        mark the record with what OneSignal said, or that it could not be asked."""
        assert self.verifier is not None
        result = await self.verifier.check(decision.event.subscription.get("id"))
        if result == NOT_FOUND:
            self._count("unknown_subscription")
            return error(
                403,
                "forbidden",
                "the subscription id is not one of the app's subscriptions (unknown-subscription)",
            )
        if result == UNCHECKED and self.source.verify_unreachable == "refuse":
            self._count("unverified")
            return error(
                503,
                "unverified",
                "the subscription could not be checked with OneSignal right now",
                retry_after=str(self.state.config.kafka.retry_after_s),
            )
        record = with_attributes(decision.record, {"subscriptioncheck": result})
        return Publish(decision.event, record)

    async def _publish(self, decision: Publish) -> Reply:
        event = decision.event
        marker = None
        if event.deduplicate:
            claim = await self._claim(event)
            if isinstance(claim, Reply):
                return claim
            marker = claim
        try:
            # the marker settles with the record's own fate, after a 503 too: a record that
            # missed the ack deadline stays queued in the producer, and a retry meanwhile
            # waits for it rather than sending a second copy
            result = await self.state.sink.publish(decision.record, outcome=marker)
        except Unavailable as exc:
            return self._unavailable(str(exc))
        if event.deduplicate and marker is None:
            self.seen.add(event.id, self.state.monotonic(), event.kind)
        self.state.metrics.events.labels(event.kind).inc()
        self._count("accepted")
        return Reply(200, accepted_body(event.id, result))

    def _settled(self, event_id: str, kind: str, marker: asyncio.Future[bool]) -> None:
        """The record an id's marker stood for is in Kafka (the id is seen), or lost for good."""
        entry = self.pending.get(event_id)
        if entry is None or entry[1] is not marker:
            return  # handled already
        del self.pending[event_id]
        if not marker.cancelled() and marker.result():
            self.seen.add(event_id, self.state.monotonic(), kind)

    async def _dead_letter(self, decision: DeadLetter) -> Reply:
        if decision.error is not None:
            log.error(
                "normalizing or building the record failed; the body is dead-lettered",
                exc_info=decision.error,
                extra={"source": self.source.name},
            )
        try:
            result = await self.state.sink.publish(decision.record)
        except Unavailable as exc:
            return self._unavailable(str(exc))
        self.state.metrics.dead_letters.labels(self.source.name, decision.reason).inc()
        self._count("dead_lettered")
        log.warning(
            "payload dead-lettered",
            extra={"source": self.source.name, "reason": decision.reason, "offset": result.offset},
        )
        body = accepted_body(None, result)
        body.update(status="dead-lettered", reason=decision.reason)
        return Reply(200, body)

    def _unavailable(self, detail: str) -> Reply:
        self._count("unavailable")
        log.warning("answered 503", extra={"source": self.source.name, "detail": detail})
        return error(
            503,
            "unavailable",
            "the event could not be stored durably right now; retry later",
            retry_after=str(self.state.config.kafka.retry_after_s),
        )


def _header_text(value: bytes) -> str:
    # HTTP header values are bytes; OneSignal renders Liquid into them as UTF-8
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _random_id() -> str:
    return str(uuid.uuid4())

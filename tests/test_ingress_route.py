"""The source route's promises, in process: httpx.ASGITransport in front, an in-memory sink behind.

No broker and no server: what is asserted is what the route answered and what it handed to
the sink (gateway.kafka.memory), with the sink's outcome (acknowledged, refused, late) chosen
by the test. What needs a record in Kafka or a real socket is held over real HTTP in
test_ingress.py, test_ingress_loss.py and test_ingress_outage.py; here each promise is
isolated, so a broken one fails here at once.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import uuid
from collections.abc import Awaitable
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import ASGIApp

from gateway.config import Config
from gateway.core.records import header
from gateway.devkit import samples
from gateway.ingress.app import create_app
from gateway.ingress.checks import SharedSecret, secret_ok
from gateway.kafka.memory import MemorySink, ack, held, refuse
from gateway.metrics import IngressMetrics

from .ingress_helpers import EU_WEST4, EU_WEST4_V6, ROTATED, SECRET, gateway_config

ES = "/v1/onesignal/events"


class BodyRead:
    """ASGI wrapper: counts requests whose whole body the route has read.

    After its last body chunk a source route does not yield again until it awaits the sink or
    a concurrent copy's outcome, so once this count moved the request is parked on one of
    them: a condition, not a sleep, that the request had its chance.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.count = 0
        self.changed = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                self.count += 1
                self.changed.set()
            return message

        await self.app(scope, counted, send)

    async def wait_for(self, n: int, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while self.count < n:
                self.changed.clear()
                await self.changed.wait()


def make(**kafka: Any) -> tuple[Config, MemorySink, BodyRead]:
    config = gateway_config("127.0.0.1:1", "route", kafka=kafka)  # the sink never connects
    sink = MemorySink(config.kafka)
    app = BodyRead(create_app(config, metrics=IngressMetrics(process=False), sink=sink))
    return config, sink, app


def sink_metrics(app: BodyRead) -> IngressMetrics:
    return app.app.routes[ES].state.metrics  # type: ignore[attr-defined, no-any-return]


def conflicts(metrics: IngressMetrics) -> float:
    value = metrics.registry.get_sample_value(
        "gateway_dedupe_conflicts_total", {"source": "event-stream"}
    )
    return value or 0.0


def client(app: ASGIApp) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway")


def body(event_id: str) -> bytes:
    return orjson.dumps(samples.event_stream_payload("message.push.clicked", event_id=event_id))


HEADERS = {
    "content-type": "application/json",
    "authorization": f"Bearer {SECRET}",
    "x-forwarded-for": EU_WEST4,
}


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


# -- an id is seen only once its record is acknowledged ------------------------------------


def test_a_retry_after_a_503_is_accepted_and_published() -> None:
    async def scenario() -> None:
        _, sink, app = make()
        sink.outcomes = [refuse]
        event_id = str(uuid.uuid4())
        async with client(app) as c:
            first = await c.post(ES, content=body(event_id), headers=HEADERS)
            assert first.status_code == 503 and first.headers["retry-after"]
            retry = await c.post(ES, content=body(event_id), headers=HEADERS)
            assert retry.status_code == 200
            assert retry.json()["status"] == "accepted", retry.json()
            again = await c.post(ES, content=body(event_id), headers=HEADERS)
        # the retry's record went to the sink (and, acknowledged, marked the id seen)
        assert [header(r.headers, "ce_id") for r in sink.records] == [event_id, event_id]
        assert again.status_code == 200
        assert again.json() == {"status": "duplicate", "id": event_id}

    run(scenario())


def test_a_copy_arriving_while_the_first_publishes_shares_its_failure() -> None:
    """The first copy's publish fails after the second arrived: both are answered 503, and
    the second never published a record of its own (OneSignal retries both)."""

    async def scenario() -> None:
        _, sink, app = make()
        release = asyncio.Event()
        sink.outcomes = [held(release, refuse)]
        event_id = str(uuid.uuid4())
        async with client(app) as c:
            first = asyncio.create_task(c.post(ES, content=body(event_id), headers=HEADERS))
            await app.wait_for(1)
            assert sink.entered.is_set()  # the first copy is publishing
            second = asyncio.create_task(c.post(ES, content=body(event_id), headers=HEADERS))
            await app.wait_for(2)  # the second is parked (on the first, or on a publish)
            release.set()
            answers = await asyncio.gather(first, second)
            assert [a.status_code for a in answers] == [503, 503], [a.text for a in answers]
            assert len(sink.records) == 1
            # neither was marked seen: the next retry is published and accepted
            retry = await c.post(ES, content=body(event_id), headers=HEADERS)
            assert retry.json()["status"] == "accepted"
            assert len(sink.records) == 2

    run(scenario())


def test_a_copy_arriving_while_the_first_publishes_shares_its_success() -> None:
    async def scenario() -> None:
        _, sink, app = make()
        release = asyncio.Event()
        sink.outcomes = [held(release, ack)]
        event_id = str(uuid.uuid4())
        async with client(app) as c:
            first = asyncio.create_task(c.post(ES, content=body(event_id), headers=HEADERS))
            await app.wait_for(1)
            second = asyncio.create_task(c.post(ES, content=body(event_id), headers=HEADERS))
            await app.wait_for(2)
            release.set()
            a, b = await asyncio.gather(first, second)
        assert a.status_code == b.status_code == 200
        assert a.json()["status"] == "accepted"
        assert b.json() == {"status": "duplicate", "id": event_id}
        assert len(sink.records) == 1

    run(scenario())


def test_a_copy_waits_for_the_first_at_most_the_ack_deadline() -> None:
    """A first copy that never settles (a bug, a hung sink) holds its duplicate no longer
    than ``kafka.ack_timeout_s``: the duplicate is answered 503 within [1.0, 1.2) x the
    deadline, measured on the loop's own clock."""

    async def scenario() -> None:
        _, sink, app = make(ack_timeout_s=0.5)
        never = asyncio.Event()
        sink.outcomes = [held(never, ack)]
        event_id = str(uuid.uuid4())
        loop = asyncio.get_running_loop()
        async with client(app) as c:
            first = asyncio.create_task(c.post(ES, content=body(event_id), headers=HEADERS))
            await app.wait_for(1)
            started = loop.time()
            second = await c.post(ES, content=body(event_id), headers=HEADERS)
            took = loop.time() - started
            first.cancel()
        assert second.status_code == 503
        assert 0.5 <= took < 0.6, took
        assert len(sink.records) == 1

    run(scenario())


def test_a_reused_id_of_another_kind_is_published_not_deduplicated() -> None:
    async def scenario() -> None:
        _, sink, app = make()
        metrics = sink_metrics(app)
        event_id = str(uuid.uuid4())
        other = orjson.dumps(samples.event_stream_payload("message.push.sent", event_id=event_id))
        async with client(app) as c:
            a = await c.post(ES, content=body(event_id), headers=HEADERS)
            assert conflicts(metrics) == 0
            b = await c.post(ES, content=other, headers=HEADERS)
        assert a.json()["status"] == b.json()["status"] == "accepted"
        assert len(sink.records) == 2
        assert conflicts(metrics) == 1  # counted where an operator looks

    run(scenario())


# -- the secret: constant time, every candidate against every secret ------------------------


class Counting:
    def __init__(self) -> None:
        self.pairs: list[tuple[bytes, bytes]] = []

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.pairs.append((a, b))
        return hmac.compare_digest(a, b)


SECRETS = (SECRET.encode(), ROTATED.encode(), b"third-secret-0123456789")


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        (f"Bearer {SECRET}", True),  # the first secret, after the prefix
        (f"bearer {ROTATED}", True),
        (b"third-secret-0123456789".decode(), True),  # the last secret, bare
        (SECRET, True),
        ("Bearer wrong", False),
        ("wrong", False),
    ],
)
def test_the_secret_check_compares_every_candidate_with_every_secret(
    value: str, expect: bool
) -> None:
    compare = Counting()
    assert secret_ok([value.encode()], SECRETS, compare) is expect
    raw = value.encode()
    candidates = [raw] + ([raw[7:]] if raw[:7].lower() == b"bearer " else [])
    # no early exit: every pair, in order, whichever matched (and however many)
    assert compare.pairs == list(itertools.product(candidates, SECRETS))


def test_the_secret_check_refuses_a_missing_or_repeated_header_without_comparing() -> None:
    compare = Counting()
    assert secret_ok([], SECRETS, compare) is False
    assert secret_ok([SECRET.encode(), SECRET.encode()], SECRETS, compare) is False
    assert compare.pairs == []


def test_the_route_compares_secrets_in_constant_time() -> None:
    assert SharedSecret.compare is hmac.compare_digest


def test_the_route_compares_every_pair_for_every_request() -> None:
    """The route goes through its comparison for every (candidate, secret) pair, match or
    not: a counting comparison in the route's place sees every call."""
    compare = Counting()

    async def scenario() -> None:
        _, sink, app = make()
        route = app.app.routes[ES]  # type: ignore[attr-defined]
        route.secret.compare = compare
        async with client(app) as c:
            ok = await c.post(ES, content=body(str(uuid.uuid4())), headers=HEADERS)
            bad = await c.post(
                ES,
                content=body(str(uuid.uuid4())),
                headers={**HEADERS, "authorization": "Bearer nope"},
            )
        assert ok.status_code == 200 and bad.status_code == 403
        assert len(sink.records) == 1

    run(scenario())
    # the source's two secrets (SECRET, ROTATED) and two candidates per request (with and
    # without "Bearer "): four comparisons each
    secrets = [SECRET.encode(), ROTATED.encode()]
    assert compare.pairs == [
        *itertools.product([f"Bearer {SECRET}".encode(), SECRET.encode()], secrets),
        *itertools.product([b"Bearer nope", b"nope"], secrets),
    ]


# -- the checks in front of the route: address, secret, method, CORS, size, bad bodies ------
# (moved from test_ingress.py: none of them needs a broker; that file keeps what does)

WEB = "/v1/onesignal/web-push"


def post_all(
    requests: list[tuple[str, dict[str, Any]]], **kafka: Any
) -> tuple[list[httpx.Response], MemorySink]:
    """Each (method, httpx request arguments) in turn, against one app; the answers and sink."""

    async def scenario() -> list[httpx.Response]:
        async with client(app) as c:
            return [await c.request(method, **kw) for method, kw in requests]

    _, sink, app = make(**kafka)
    return asyncio.run(asyncio.wait_for(scenario(), 20)), sink


def es_request(
    payload: Any = None,
    *,
    content: bytes | None = None,
    secret: str | None = SECRET,
    xff: str | None = EU_WEST4,
    headers: list[tuple[str, str]] | None = None,
    content_type: str = "application/json",
    path: str = ES,
) -> tuple[str, dict[str, Any]]:
    hdrs: list[tuple[str, str]] = [("content-type", content_type)]
    if secret is not None:
        hdrs.append(("authorization", f"Bearer {secret}"))
    if xff is not None:
        hdrs.append(("x-forwarded-for", xff))
    hdrs.extend(headers or [])
    body_bytes = content if content is not None else orjson.dumps(payload)
    return "POST", {"url": path, "content": body_bytes, "headers": hdrs}


def ids(sink: MemorySink) -> list[str | None]:
    return [header(r.headers, "ce_id") for r in sink.records]


def fresh(kind: str = "message.sms.sent") -> tuple[str, dict[str, Any]]:
    event_id = str(uuid.uuid4())
    return event_id, samples.event_stream_payload(kind, event_id=event_id)


@pytest.mark.parametrize(
    ("xff", "headers", "expected"),
    [
        (EU_WEST4, [], 200),
        (EU_WEST4_V6, [], 200),
        (f"::ffff:{EU_WEST4}", [], 200),
        (f"{EU_WEST4}:443", [], 200),
        # the attacker writes an allowlisted address; the LB appends the real one on the right
        (f"{EU_WEST4}, 203.0.113.7", [], 403),
        (f"{EU_WEST4}, 2001:db8::7", [], 403),
        # two header lines: the later line is the nearer hop and must not be skipped
        (EU_WEST4, [("x-forwarded-for", "203.0.113.7")], 403),
        ("garbage", [], 403),
        (None, [], 403),  # the peer itself (127.0.0.1) is not an allowed sender
        # a Forwarded header is ignored: the proxies here write X-Forwarded-For
        (None, [("forwarded", f"for={EU_WEST4}")], 403),
        ("203.0.113.7", [], 403),
    ],
)
def test_client_address_through_trusted_proxy(
    xff: str | None, headers: list[tuple[str, str]], expected: int
) -> None:
    event_id, payload = fresh()
    (r,), sink = post_all([es_request(payload, xff=xff, headers=headers)])
    assert r.status_code == expected, r.text
    if expected == 403:
        assert r.json() == {
            "error": "forbidden",
            "message": "sender address is not allowed (ip-not-allowed)",
        }
        assert event_id not in ids(sink)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([], "secret-missing"),
        ([("authorization", "Bearer not-the-secret")], "secret-invalid"),
        ([("authorization", SECRET[:-1])], "secret-invalid"),
        ([("authorization", SECRET + "x")], "secret-invalid"),
        (
            [("authorization", f"Bearer {SECRET}"), ("authorization", f"Bearer {SECRET}")],
            "secret-repeated",
        ),
    ],
)
def test_wrong_or_missing_secret_is_refused_and_never_echoed(
    headers: list[tuple[str, str]], reason: str
) -> None:
    _, payload = fresh()
    (r,), sink = post_all([es_request(payload, secret=None, headers=headers)])
    assert r.status_code == 403
    assert r.json()["message"] == f"shared secret check failed ({reason})"
    assert SECRET not in r.text and ROTATED not in r.text
    assert sink.records == []


@pytest.mark.parametrize("value", [SECRET, ROTATED, f"Bearer {SECRET}", f"bearer {ROTATED}"])
def test_every_configured_secret_is_accepted(value: str) -> None:
    _, payload = fresh()
    request = es_request(payload, secret=None, headers=[("authorization", value)])
    (r,), sink = post_all([request])
    assert r.status_code == 200, r.text
    assert len(sink.records) == 1


def test_duplicate_event_id_is_answered_2xx_and_published_once() -> None:
    event_id, payload = fresh("message.email.clicked")
    (first, second), sink = post_all([es_request(payload), es_request(payload)])
    assert first.json()["status"] == "accepted"
    assert second.status_code == 200 and second.json() == {"status": "duplicate", "id": event_id}
    assert ids(sink) == [event_id]


def test_web_push_cors_preflight() -> None:
    preflight = {
        "origin": "https://shop.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, x-onesignal-event",
    }
    (r, other), _ = post_all(
        [
            ("OPTIONS", {"url": WEB, "headers": preflight}),
            ("OPTIONS", {"url": WEB, "headers": {"origin": "https://evil.example"}}),
        ]
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "https://shop.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "x-onesignal-event" in r.headers["access-control-allow-headers"]
    assert "access-control-allow-origin" not in other.headers


def test_a_browser_post_gets_its_cors_header_and_is_published() -> None:
    payload = samples.web_push_v16_payload("notification.clicked")
    # a browser: no secret, no forwarding header, a non-allowlisted address, text/plain
    request = es_request(
        payload,
        secret=None,
        xff=None,
        content_type="text/plain;charset=UTF-8",
        headers=[("origin", "https://shop.example")],
        path=WEB,
    )
    (r,), sink = post_all([request])
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "https://shop.example"
    assert ids(sink) == [r.json()["id"]]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b'{"event.kind": ', "application/json", 400, "invalid-json"),
        (b"", "application/json", 400, "empty-body"),
        (b"[" * 200 + b"]" * 200, "application/json", 400, "too-deep"),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400, "too-deep"),
        (
            b'{"event.kind": "message.push.sent", "x": "\xff\xfe"}',
            "application/json",
            400,
            "invalid-utf8",
        ),
        (b'{"a": "\\ud800"}', "application/json", 400, "lone-surrogate"),
        (b'{"a": 1e999}', "application/json", 400, "invalid-json"),
        (
            b"event.kind=message.push.sent",
            "application/x-www-form-urlencoded",
            415,
            "unsupported-media-type",
        ),
        (b'{"a": 1}', "application/json; charset=latin-1", 415, "unsupported-charset"),
        (b"not json at all", "text/plain", 400, "invalid-json"),
    ],
)
def test_bad_bodies_get_a_clear_4xx(
    content: bytes, content_type: str, status: int, code: str
) -> None:
    request = es_request(content=content, content_type=content_type, secret=None, path=WEB)
    (r,), sink = post_all([request])
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    assert r.json()["message"]
    assert sink.records == []  # nothing written


def test_oversized_bodies_get_413_declared_or_chunked() -> None:
    async def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1000

    big = b'{"a": "' + b"x" * 70_000 + b'"}'
    streamed = es_request(content=b"")
    streamed[1]["content"] = chunks()
    config = gateway_config("127.0.0.1:1", "route", server={"max_body_bytes": 65536})
    sink = MemorySink(config.kafka)
    app = create_app(config, metrics=IngressMetrics(process=False), sink=sink)

    async def scenario() -> list[httpx.Response]:
        async with client(app) as c:
            return [await c.request(m, **kw) for m, kw in (es_request(content=big), streamed)]

    declared, chunked = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert declared.status_code == 413 and declared.json()["error"] == "too-large"
    assert declared.headers["connection"] == "close"
    assert chunked.status_code == 413
    assert sink.records == []


def test_wrong_methods_are_refused() -> None:
    (get, delete), _ = post_all(
        [
            ("GET", {"url": ES, "headers": {"x-forwarded-for": EU_WEST4}}),
            ("DELETE", {"url": ES}),
        ]
    )
    assert get.status_code == 405 and "POST" in get.headers["allow"]
    assert delete.status_code == 405


def test_identical_web_push_payloads_without_subscription_are_two_events() -> None:
    payload = samples.web_push_v16_payload("notification.clicked")
    payload.pop("subscriptionId", None)
    browser = {"secret": None, "xff": None, "content_type": "text/plain", "path": WEB}
    with_sub = {**payload, "subscriptionId": str(uuid.uuid4())}
    (first, second, third, fourth), _ = post_all(
        [
            es_request(payload, **browser),
            es_request(payload, **browser),
            # with a subscription id, an identical payload is the same event fired twice
            es_request(with_sub, **browser),
            es_request(with_sub, **browser),
        ]
    )
    assert first.json()["status"] == second.json()["status"] == "accepted"
    assert first.json()["id"] != second.json()["id"]
    assert (third.json()["status"], fourth.json()["status"]) == ("accepted", "duplicate")

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
import logging
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


async def copy_behind_a_held_first(app: Any, sink: MemorySink) -> tuple[int, float]:
    """A first attempt whose record is never acknowledged, then a copy of it: the copy's
    status and how long it waited, on the loop's own clock."""
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
    return second.status_code, took


def test_a_copy_waits_for_the_first_at_most_the_ack_deadline() -> None:
    """A first copy that never settles (a bug, a hung sink) holds its duplicate no longer
    than ``kafka.ack_timeout_s``: the duplicate is answered 503 within [1.0, 1.2) x the
    deadline, measured on the loop's own clock."""

    async def scenario() -> None:
        _, sink, app = make(ack_timeout_s=0.5)
        status, took = await copy_behind_a_held_first(app, sink)
        assert status == 503
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
    if path == WEB and not any(k == "origin" for k, _ in hdrs):
        hdrs.append(("origin", "https://shop.example"))  # a browser on the listed site
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
    assert r.json() == {"error": "forbidden", "message": f"shared secret check failed ({reason})"}
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
    assert r.headers["access-control-allow-methods"] == "POST, OPTIONS"
    assert r.headers["access-control-allow-headers"] == "content-type, x-onesignal-event"
    assert r.headers["access-control-max-age"] == "86400"
    assert r.content == b""
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
    (get, delete, options, web_get, put), sink = post_all(
        [
            ("GET", {"url": ES, "headers": {"x-forwarded-for": EU_WEST4}}),
            ("DELETE", {"url": ES}),
            ("OPTIONS", {"url": ES}),  # a preflight only where browsers post
            ("GET", {"url": WEB}),
            ("PUT", es_request(fresh()[1])[1]),
        ]
    )
    assert get.status_code == 405
    assert get.json() == {
        "error": "method-not-allowed",
        "message": "GET is not accepted here; send POST",
    }
    assert get.headers["allow"] == "POST, PUT, PATCH"
    assert delete.status_code == 405 and delete.json()["message"].startswith("DELETE ")
    assert options.status_code == 405 and options.headers["allow"] == "POST, PUT, PATCH"
    assert web_get.status_code == 405
    assert web_get.headers["allow"] == "POST, PUT, PATCH, OPTIONS"
    assert put.status_code == 200 and len(sink.records) == 1  # PUT and PATCH are writes too


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


# -- what the route answers, counts and logs, in detail --------------------------------------
# (each held because a mutation run changed it unnoticed: docs/testing.md)

JOURNEY = "/v1/onesignal/journey"


def make_sources(**kafka: Any) -> tuple[MemorySink, BodyRead]:
    """The event-stream source with an id header, the journey source with a user header."""
    config = gateway_config(
        "127.0.0.1:1",
        "route",
        kafka=kafka,
        sources=[
            {
                "name": "event-stream",
                "path": ES,
                "format": "event-stream",
                "secrets_env": "T_SECRETS",
                "id_header": "X-Event-Id",
            },
            {
                "name": "journey",
                "path": JOURNEY,
                "format": "journey",
                "secrets_env": "T_SECRETS",
                "user_headers": {"external_id": "x-external-id"},
            },
        ],
    )
    sink = MemorySink(config.kafka)
    return sink, BodyRead(create_app(config, metrics=IngressMetrics(process=False), sink=sink))


def sample(app: BodyRead, name: str, **labels: str) -> float:
    return sink_metrics(app).registry.get_sample_value(name, labels) or 0.0


def logged(caplog: pytest.LogCaptureFixture, message: str) -> list[Any]:
    return [r for r in caplog.records if r.getMessage() == message]


def without_id(marker: str) -> bytes:
    # OneSignal's in-app sample template: no event.id
    return orjson.dumps({"event_kind": "message.iam.clicked", "iam_name": marker})


def is_uuid(text: str) -> bool:
    return str(uuid.UUID(text)) == text


def test_the_id_header_is_the_event_id_stripped_up_to_256_characters() -> None:
    async def scenario() -> list[httpx.Response]:
        _sink, app = make_sources()
        async with client(app) as c:

            async def send(value: bytes | None) -> httpx.Response:
                extra = {} if value is None else {"x-event-id": value}
                marker = str(uuid.uuid4())
                return await c.post(ES, content=without_id(marker), headers={**HEADERS, **extra})

            return [
                await send(b"  id-padded\t"),
                await send(b"a" * 256),
                await send(b"b" * 257),  # too long for an id: not used
                await send(b""),
                await send(b"   "),
                await send(None),
                await send("id-\u00e9".encode()),  # UTF-8, as OneSignal renders Liquid
                await send(b"id2-\xe9"),  # not UTF-8: read as latin-1
            ]

    answers = asyncio.run(asyncio.wait_for(scenario(), 20))
    got = [a.json()["id"] for a in answers]
    assert all(a.json()["status"] == "accepted" for a in answers), [a.text for a in answers]
    assert got[0] == "id-padded"
    assert got[1] == "a" * 256
    assert all(is_uuid(i) for i in got[2:6]), got[2:6]  # a fresh id each
    assert len(set(got[2:6])) == 4
    assert got[6] == "id-\u00e9" and got[7] == "id2-\u00e9"


def test_without_an_id_header_configured_the_header_is_ignored() -> None:
    async def scenario() -> httpx.Response:
        _, _sink, app = make()
        async with client(app) as c:
            return await c.post(
                ES, content=without_id("x"), headers={**HEADERS, "x-event-id": "chosen"}
            )

    r = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert r.json()["status"] == "accepted" and is_uuid(r.json()["id"])


def test_a_journey_text_body_is_keyed_by_the_user_of_its_query_or_header() -> None:
    text_headers = {**HEADERS, "content-type": "text/plain"}

    async def scenario() -> tuple[list[httpx.Response], MemorySink]:
        sink, app = make_sources()
        async with client(app) as c:
            requests: list[tuple[str, dict[str, Any]]] = [
                ("?external_id=%20user-42%20&onesignal_id=", {}),
                ("?external_id=from-query", {"x-external-id": " from-header "}),
                ("?external_id=from-query", {"x-external-id": "  "}),  # blank: not a user
                ("?onesignal_id=" + "o" * 256, {}),
                ("?onesignal_id=" + "o" * 257 + "&external_id=" + "e" * 257, {}),  # too long
                ("", {"x-external-id": "e" * 257}),
                ("", {"x-external-id": "h" * 256}),
                ("", {"x-external-id": b"caf\xe9"}),  # not UTF-8: latin-1
                ("?external_id=a&external_id=b", {}),  # the first value
            ]
            answers = [
                await c.post(
                    JOURNEY + query, content=b"reached step 3", headers={**text_headers, **h}
                )
                for query, h in requests
            ]
        return answers, sink

    answers, sink = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert all(a.json()["status"] == "accepted" for a in answers), [a.text for a in answers]
    users = [orjson.loads(r.value)["user"] for r in sink.records]
    assert users == [
        {"external_id": "user-42"},
        {"external_id": "from-header"},  # a configured header wins over the query
        {"external_id": "from-query"},
        {"onesignal_id": "o" * 256},
        {},
        {},
        {"external_id": "h" * 256},
        {"external_id": "caf\u00e9"},
        {"external_id": "a"},
    ]
    assert sink.records[0].key == b"user-42"
    assert sink.records[4].key is None


def test_an_undecodable_body_from_a_proven_sender_is_dead_lettered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> httpx.Response:
        _, sink, app = make()
        async with client(app) as c:
            with caplog.at_level(logging.INFO, logger="gateway.ingress"):
                r = await c.post(ES, content=b'{"event.kind": ', headers=HEADERS)
        assert [rec.topic for rec in sink.records] == ["route.dlt"]
        assert sink.records[0].value == b'{"event.kind": '
        assert (
            sample(app, "gateway_dead_letters_total", source="event-stream", reason="invalid-json")
            == 1
        )
        assert (
            sample(app, "gateway_requests_total", source="event-stream", outcome="dead_lettered")
            == 1
        )
        return r

    r = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert r.status_code == 200
    assert r.json() == {
        "status": "dead-lettered",
        "id": None,
        "topic": "route.dlt",
        "partition": 0,
        "offset": 0,
        "reason": "invalid-json",
    }
    (rec,) = logged(caplog, "payload dead-lettered")
    assert rec.levelno == logging.WARNING
    assert (rec.source, rec.reason, rec.offset) == ("event-stream", "invalid-json", 0)
    assert not logged(
        caplog, "normalizing or building the record failed; the body is dead-lettered"
    )


def test_a_dead_letter_kafka_does_not_take_is_a_503_and_not_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> httpx.Response:
        _, sink, app = make()
        sink.outcomes = [refuse]
        async with client(app) as c:
            with caplog.at_level(logging.INFO, logger="gateway.ingress"):
                r = await c.post(ES, content=b"not json", headers=HEADERS)
        (rec,) = logged(caplog, "answered 503")
        assert rec.detail == "no acknowledgement from Kafka within 3.0s"
        assert (
            sample(app, "gateway_dead_letters_total", source="event-stream", reason="invalid-json")
            == 0
        )
        assert (
            sample(app, "gateway_requests_total", source="event-stream", outcome="unavailable") == 1
        )
        return r

    r = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert r.status_code == 503 and r.headers["retry-after"]


def test_a_gateway_bug_dead_letters_the_body_and_logs_the_error(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.core.ingest

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a normalizer bug")

    monkeypatch.setattr(gateway.core.ingest, "normalize_for_source", broken)

    async def scenario() -> httpx.Response:
        _, _sink, app = make()
        async with client(app) as c:
            with caplog.at_level(logging.INFO, logger="gateway.ingress"):
                return await c.post(ES, content=body(str(uuid.uuid4())), headers=HEADERS)

    r = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert r.status_code == 200 and r.json()["reason"] == "internal-error"
    (rec,) = logged(caplog, "normalizing or building the record failed; the body is dead-lettered")
    assert rec.levelno == logging.ERROR and rec.source == "event-stream"
    assert rec.exc_info is not None and isinstance(rec.exc_info[1], KeyError)


def test_a_503_says_retry_with_the_configured_retry_after_and_logs_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> httpx.Response:
        _, sink, app = make(retry_after_s=7)
        sink.outcomes = [refuse]
        async with client(app) as c:
            with caplog.at_level(logging.INFO, logger="gateway.ingress"):
                r = await c.post(ES, content=body(str(uuid.uuid4())), headers=HEADERS)
        assert (
            sample(app, "gateway_requests_total", source="event-stream", outcome="unavailable") == 1
        )
        return r

    r = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert r.status_code == 503
    assert r.headers["retry-after"] == "7"
    assert r.json() == {
        "error": "unavailable",
        "message": "the event could not be stored durably right now; retry later",
    }
    (rec,) = logged(caplog, "answered 503")
    assert rec.levelno == logging.WARNING and rec.source == "event-stream"
    assert rec.detail == "no acknowledgement from Kafka within 3.0s"  # the sink's reason


async def boom(record: Any) -> Any:
    raise RuntimeError("a sink bug")


@pytest.mark.parametrize("first_outcome", ["refused", "crashed"])
def test_a_copy_is_answered_by_the_first_copys_failure_not_by_its_own_deadline(
    first_outcome: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With a 30 s ack deadline (past this test's own 20 s bound), the copy is answered as soon
    as the first copy's publish fails, whichever way: never "duplicate", always 503."""

    async def scenario() -> list[httpx.Response]:
        _, sink, app = make(ack_timeout_s=30.0)
        release = asyncio.Event()
        sink.outcomes = [held(release, refuse if first_outcome == "refused" else boom)]
        event_id = str(uuid.uuid4())
        async with client(app) as c:
            first = asyncio.create_task(c.post(ES, content=body(event_id), headers=HEADERS))
            await app.wait_for(1)
            second = asyncio.create_task(c.post(ES, content=body(event_id), headers=HEADERS))
            await app.wait_for(2)
            with caplog.at_level(logging.INFO, logger="gateway.ingress"):
                release.set()
                answers = list(await asyncio.gather(first, second))
            assert len(sink.records) == 1
            answers.append(await c.post(ES, content=body(event_id), headers=HEADERS))
        return answers

    first, second, retry = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert first.status_code == (503 if first_outcome == "refused" else 500)
    assert second.status_code == 503, second.text
    assert retry.json()["status"] == "accepted"
    details = [r.detail for r in logged(caplog, "answered 503")]
    assert "the first delivery of this event id did not reach Kafka" in details


def test_an_event_without_a_sender_id_that_kafka_refuses_is_a_503() -> None:
    async def scenario() -> list[httpx.Response]:
        _, sink, app = make()
        sink.outcomes = [refuse, boom]
        async with client(app) as c:
            return [await c.post(ES, content=without_id("x"), headers=HEADERS) for _ in range(2)]

    refused, crashed = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert crashed.status_code == 500
    assert crashed.json() == {
        "error": "internal",
        "message": "the gateway failed to handle this request",
    }


def test_a_route_bug_is_a_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> httpx.Response:
        _, sink, app = make()
        sink.outcomes = [boom]
        async with client(app) as c:
            with caplog.at_level(logging.INFO, logger="gateway.ingress"):
                return await c.post(ES, content=body(str(uuid.uuid4())), headers=HEADERS)

    r = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert r.status_code == 500
    (rec,) = logged(caplog, "unhandled error in source route")
    assert rec.levelno == logging.ERROR and rec.source == "event-stream"
    assert rec.exc_info is not None and isinstance(rec.exc_info[1], RuntimeError)


def test_an_accepted_event_is_counted_by_kind_and_the_reply_framed() -> None:
    async def scenario() -> tuple[httpx.Response, BodyRead]:
        _, _sink, app = make()
        async with client(app) as c:
            return await c.post(ES, content=body(str(uuid.uuid4())), headers=HEADERS), app

    r, app = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert r.status_code == 200
    assert sample(app, "gateway_events_total", kind="message.push.clicked") == 1
    assert sample(app, "gateway_requests_total", source="event-stream", outcome="accepted") == 1
    assert sample(app, "gateway_request_seconds_count", source="event-stream") == 1
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content) > 0
    assert "connection" not in r.headers


def test_a_reused_id_of_another_kind_is_logged_with_its_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        _, _sink, app = make()
        event_id = str(uuid.uuid4())
        other = orjson.dumps(samples.event_stream_payload("message.push.sent", event_id=event_id))
        async with client(app) as c:
            await c.post(ES, content=body(event_id), headers=HEADERS)
            with caplog.at_level(logging.INFO, logger="gateway.ingress"):
                await c.post(ES, content=other, headers=HEADERS)
        (rec,) = logged(
            caplog, "event id reused by an event of another kind: published, not deduplicated"
        )
        assert rec.levelno == logging.WARNING
        assert (rec.source, rec.event_id, rec.kind) == (
            "event-stream",
            event_id,
            "message.push.sent",
        )

    run(scenario())


OUTSIDER = "203.0.113.7"


def test_an_outsider_is_refused_counted_by_its_secret_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> tuple[list[httpx.Response], BodyRead]:
        _, sink, app = make()
        outsider = {**HEADERS, "x-forwarded-for": OUTSIDER}
        async with client(app) as c:
            with caplog.at_level(logging.INFO, logger="gateway.ingress"):
                answers = [
                    await c.post(ES, content=body(str(uuid.uuid4())), headers=h)
                    for h in (
                        outsider,
                        {**outsider, "authorization": "Bearer wrong"},
                        {k: v for k, v in outsider.items() if k != "authorization"},
                        {**HEADERS, "x-forwarded-for": "garbage"},
                    )
                ]
        assert sink.records == []
        return answers, app

    answers, app = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert [a.status_code for a in answers] == [403] * 4
    counts = {
        secret: sample(app, "gateway_allowlist_misses_total", source="event-stream", secret=secret)
        for secret in ("valid", "invalid", "missing")
    }
    assert counts == {"valid": 2, "invalid": 1, "missing": 1}
    assert sample(app, "gateway_requests_total", source="event-stream", outcome="forbidden_ip") == 4
    assert (
        sample(app, "gateway_requests_total", source="event-stream", outcome="forbidden_secret")
        == 0
    )
    token = app.app.routes[ES].state.allowlist.sync_token  # type: ignore[attr-defined]
    loud = [
        r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("gateway")
    ]
    assert [r.getMessage() for r in loud] == [
        f"refused: sender {OUTSIDER} not in allowlist but carries a valid secret; most likely "
        "a OneSignal sender at a new address (the event is lost: no retry of a 4xx)",
        "refused: sender 127.0.0.1 not in allowlist but carries a valid secret; most likely "
        "a OneSignal sender at a new address (the event is lost: no retry of a 4xx)",
    ]
    quiet = logged(caplog, "refused: sender not in allowlist")
    assert [r.levelno for r in quiet] == [logging.INFO, logging.INFO]
    fields = [
        (r.source, r.client_ip, r.malformed_chain, r.secret, r.allowlist_sync_token)
        for r in (loud[0], quiet[0], quiet[1], loud[1])
    ]
    assert fields == [
        ("event-stream", OUTSIDER, False, "valid", token),
        ("event-stream", OUTSIDER, False, "invalid", token),
        ("event-stream", OUTSIDER, False, "missing", token),
        # an unreadable chain: the answer is the nearest trusted hop, marked malformed
        ("event-stream", "127.0.0.1", True, "valid", token),
    ]
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_a_refused_secret_is_counted_and_logged_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> BodyRead:
        _, sink, app = make()
        bare = {k: v for k, v in HEADERS.items() if k != "authorization"}
        async with client(app) as c:
            with caplog.at_level(logging.INFO, logger="gateway.ingress"):
                for extra in (
                    [],
                    [("authorization", "Bearer no")],
                    [("authorization", SECRET)] * 2,
                ):
                    r = await c.post(
                        ES, content=body(str(uuid.uuid4())), headers=[*bare.items(), *extra]
                    )
                    assert r.status_code == 403
        assert sink.records == []
        return app

    app = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert (
        sample(app, "gateway_requests_total", source="event-stream", outcome="forbidden_secret")
        == 3
    )
    refused = [r for r in caplog.records if r.getMessage().startswith("refused: secret-")]
    assert [(r.getMessage(), r.levelno) for r in refused] == [
        ("refused: secret-missing", logging.INFO),
        ("refused: secret-invalid", logging.INFO),
        ("refused: secret-repeated", logging.INFO),
    ]
    assert all((r.source, r.client_ip) == ("event-stream", EU_WEST4) for r in refused)
    assert all(SECRET not in str(r.__dict__) for r in caplog.records)


def test_only_the_browser_source_sends_cors_headers() -> None:
    config = gateway_config(
        "127.0.0.1:1",
        "route",
        sources=[
            {
                "name": "event-stream",
                "path": ES,
                "format": "event-stream",
                "secrets_env": "T_SECRETS",
            },
            {
                "name": "web-any",
                "path": WEB,
                "format": "web-push",
                "app_id": samples.DEMO_APP_ID,
                "cors_origins": ["*"],  # any origin: only when written so
            },
            {
                "name": "web-shop",
                "path": "/v1/shop",
                "format": "web-push",
                "app_id": samples.DEMO_APP_ID,
                "cors_origins": ["https://shop.example"],
            },
        ],
    )
    app = create_app(config, metrics=IngressMetrics(process=False), sink=MemorySink(config.kafka))
    web = orjson.dumps(samples.web_push_v16_payload("notification.clicked"))

    async def scenario() -> list[httpx.Response]:
        async with client(app) as c:
            return [
                await c.post(
                    ES, content=body(str(uuid.uuid4())), headers={**HEADERS, "origin": "https://a"}
                ),
                await c.post(WEB, content=web, headers={"origin": "https://a"}),
                await c.post(WEB, content=web),  # no origin: not a browser's CORS request
                await c.post("/v1/shop", content=web, headers={"origin": "https://shop.example"}),
                await c.post("/v1/shop", content=web, headers={"origin": "https://evil.example"}),
            ]

    es, any_origin, no_origin, shop, evil = asyncio.run(asyncio.wait_for(scenario(), 20))
    # an origin the source does not list is refused (cors_origins is access control)
    assert [r.status_code for r in (es, any_origin, no_origin, shop, evil)] == [200] * 4 + [403]
    assert "access-control-allow-origin" not in es.headers
    assert any_origin.headers["access-control-allow-origin"] == "*"
    assert "vary" not in any_origin.headers
    assert "access-control-allow-origin" not in no_origin.headers
    assert shop.headers["access-control-allow-origin"] == "https://shop.example"
    assert shop.headers["vary"] == "Origin"
    assert "access-control-allow-origin" not in evil.headers and "vary" not in evil.headers


# -- the body reader: limits at the byte, chunks joined, a client that leaves ----------------


class Tally:
    def __init__(self) -> None:
        self.n = 0

    def inc(self, amount: float = 1.0) -> None:
        self.n += int(amount)


def read_body(
    messages: list[dict[str, Any]], declared: int | None = None, limit: int = 10
) -> tuple[bytes | Any, Tally]:
    from gateway.ingress.checks import BodyReader

    refused = Tally()
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    headers = {} if declared is None else {b"content-length": str(declared).encode()}
    return asyncio.run(BodyReader(limit, refused).read(headers, receive)), refused


def chunked(*chunks: bytes) -> list[dict[str, Any]]:
    last = len(chunks) - 1
    return [
        {"type": "http.request", "body": c, "more_body": i < last} for i, c in enumerate(chunks)
    ]


def test_a_body_of_exactly_the_limit_is_read_one_byte_more_is_413() -> None:
    from gateway.ingress.replies import Reply

    got, refused = read_body(chunked(b"0123456789"), declared=10)
    assert got == b"0123456789" and refused.n == 0
    got, refused = read_body(chunked(b"01234", b"56789"))  # chunked, no length declared
    assert got == b"0123456789" and refused.n == 0
    over, refused = read_body([], declared=11)  # refused before a byte is read
    assert isinstance(over, Reply) and over.status == 413 and over.close and refused.n == 1
    assert over.body == {
        "error": "too-large",
        "message": "the request body is over the 10-byte limit",
    }
    over, refused = read_body(chunked(b"01234", b"56789", b"x"))
    assert isinstance(over, Reply) and over.status == 413 and refused.n == 1
    # a declared length that is not a number is no limit of its own: the bytes are counted
    from gateway.ingress.checks import BodyReader

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"abc"}

    got = asyncio.run(BodyReader(10, Tally()).read({b"content-length": b"x"}, receive))
    assert got == b"abc"


def test_the_body_is_every_chunk_joined_in_order() -> None:
    assert read_body(chunked(b"ab"))[0] == b"ab"
    assert read_body(chunked(b"ab", b"cd"))[0] == b"abcd"
    assert read_body(chunked(b"a", b"", b"bc", b"d"))[0] == b"abcd"
    # "body" and "more_body" are optional in an ASGI message (b"" and False)
    assert read_body([{"type": "http.request"}])[0] == b""
    assert (
        read_body(
            [{"type": "http.request", "body": b"x", "more_body": True}, {"type": "http.request"}]
        )[0]
        == b"x"
    )


def test_a_client_that_leaves_mid_body_gets_no_answer() -> None:
    from gateway.ingress.checks import ClientGone

    with pytest.raises(ClientGone):
        read_body(
            [
                {"type": "http.request", "body": b"ab", "more_body": True},
                {"type": "http.disconnect"},
            ]
        )


def test_an_event_stream_body_without_a_content_type_is_published_as_received() -> None:
    """OneSignal documents no Content-Type for Event Streams: none is JSON or text, not 415."""

    async def scenario() -> tuple[httpx.Response, MemorySink, BodyRead]:
        _, sink, app = make()
        bare = {k: v for k, v in HEADERS.items() if k != "content-type"}
        async with client(app) as c:
            return await c.post(ES, content=body(str(uuid.uuid4())), headers=bare), sink, app

    r, sink, app = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
    received = orjson.loads(sink.records[0].value)["received"]
    assert (received["source"], received["client_ip"]) == ("event-stream", EU_WEST4)
    # the request's own time, not a clock reading: well under a second here
    assert 0 <= sample(app, "gateway_request_seconds_sum", source="event-stream") < 5


def test_refused_bodies_are_counted_by_their_kind_of_refusal() -> None:
    async def scenario() -> BodyRead:
        _, _sink, app = make()
        async with client(app) as c:
            for content_type in (
                "application/x-www-form-urlencoded",
                "text/html",
                "application/json",
            ):
                await c.post(
                    WEB,
                    content=b"{",
                    headers={"content-type": content_type, "origin": "https://shop.example"},
                )
        return app

    app = asyncio.run(asyncio.wait_for(scenario(), 20))
    counted = {
        outcome: sample(app, "gateway_requests_total", source="web-push", outcome=outcome)
        for outcome in ("unsupported_media_type", "bad_request")
    }
    assert counted == {"unsupported_media_type": 2, "bad_request": 1}


# -- web push with verify_subscriptions: the route's decision on OneSignal's answer ----------
# OneSignal is an httpx.MockTransport in the verifier's place: the lookups are real requests
# of the real verifier, answered in process (test_hostile_webpush.py plays the same against
# the loopback OneSignal and a real broker).

VERIFY_APP = "11111111-2222-3333-4444-555555555555"
VERIFY_KEY = "verify-key-0123456789"
KNOWN_SUB = "6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f"
SITE = "https://shop.example"


class LookupOneSignal:
    """OneSignal's View user identity (by subscription): 200 for a known subscription, else
    404; ``status`` (when set) answers every lookup instead. Each lookup is recorded."""

    def __init__(self, known: tuple[str, ...] = (KNOWN_SUB,)) -> None:
        self.known = set(known)
        self.status: int | None = None
        self.asked: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.split("/")  # /apps/{app}/subscriptions/{id}/user/identity
        assert parts[1:4] == ["apps", VERIFY_APP, "subscriptions"], request.url
        assert request.headers["authorization"] == f"Key {VERIFY_KEY}"
        self.asked.append(parts[4])
        if self.status is not None:
            return httpx.Response(self.status)
        if parts[4] in self.known:
            return httpx.Response(200, json={"identity": {"onesignal_id": "u-1"}})
        return httpx.Response(404, json={"errors": ["not found"]})


def verify_app(
    tmp_path: Any, *, kafka: dict[str, Any] | None = None, **source: Any
) -> tuple[MemorySink, BodyRead, LookupOneSignal]:
    key_file = tmp_path / "key"
    key_file.write_text(VERIFY_KEY)
    config = gateway_config(
        "127.0.0.1:1",
        "route",
        kafka=kafka or {},
        sources=[
            {
                "name": "web-push",
                "path": WEB,
                "format": "web-push",
                "app_id": VERIFY_APP,
                "cors_origins": [SITE],
                "verify_subscriptions": True,
                "verify_timeout_s": 2.0,
                "verify_rate_limit": 50.0,  # OneSignal's 1/s is held in test_hostile_webpush.py
                **source,
            }
        ],
        onesignal={"apps": [{"app_id": VERIFY_APP, "api_key_file": str(key_file)}]},
    )
    sink = MemorySink(config.kafka)
    app = BodyRead(create_app(config, metrics=IngressMetrics(process=False), sink=sink))
    onesignal = LookupOneSignal()
    verifier = app.app.routes[WEB].verifier  # type: ignore[attr-defined]
    verifier.transport = httpx.MockTransport(onesignal)
    return sink, app, onesignal


def web_event(subscription_id: str | None) -> bytes:
    payload = samples.web_push_v16_payload("notification.clicked")
    payload["content"] = f"unique {uuid.uuid4()}"  # a fresh event each time, never a duplicate
    if subscription_id is None:
        payload.pop("subscriptionId", None)
    else:
        payload["subscriptionId"] = subscription_id
    return orjson.dumps(payload)


WEB_HEADERS = {"content-type": "text/plain;charset=UTF-8", "origin": SITE}


def post_web(app: BodyRead, subscription_ids: list[str | None]) -> list[httpx.Response]:
    async def scenario() -> list[httpx.Response]:
        async with client(app) as c:
            return [
                await c.post(WEB, content=web_event(s), headers=WEB_HEADERS)
                for s in subscription_ids
            ]

    return asyncio.run(asyncio.wait_for(scenario(), 20))


def web_sample(app: BodyRead, name: str, **labels: str) -> float:
    metrics = app.app.routes[WEB].state.metrics  # type: ignore[attr-defined]
    return metrics.registry.get_sample_value(name, labels) or 0.0  # type: ignore[no-any-return]


def checked(sink: MemorySink) -> list[str | None]:
    return [header(r.headers, "ce_subscriptioncheck") for r in sink.records]


def test_a_known_subscription_is_published_marked_found_and_looked_up_once(
    tmp_path: Any,
) -> None:
    sink, app, onesignal = verify_app(tmp_path)
    answers = post_web(app, [KNOWN_SUB, KNOWN_SUB])
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert [a.json()["status"] for a in answers] == ["accepted", "accepted"]
    assert checked(sink) == ["found", "found"]
    assert onesignal.asked == [KNOWN_SUB]  # the second answer came from the cache
    cache = web_sample(
        app, "gateway_subscription_checks_total", source="web-push", result="found", via="cache"
    )
    assert cache == 1
    # the route's verifier is the one the app reports on: its cache holds the id
    assert web_sample(app, "gateway_subscription_cache_entries") == 1


def test_an_unknown_subscription_is_refused_written_nowhere_and_asked_once(
    tmp_path: Any,
) -> None:
    sink, app, onesignal = verify_app(tmp_path)
    unknown = str(uuid.uuid4())
    answers = post_web(app, [unknown, unknown, None])
    assert [a.status_code for a in answers] == [403, 403, 403]
    assert all(
        a.json()
        == {
            "error": "forbidden",
            "message": "the subscription id is not one of the app's subscriptions"
            " (unknown-subscription)",
        }
        for a in answers
    ), [a.text for a in answers]
    assert sink.records == []
    assert onesignal.asked == [unknown]  # the miss is cached; no id: nothing to ask
    refused = web_sample(
        app, "gateway_requests_total", source="web-push", outcome="unknown_subscription"
    )
    assert refused == 3
    assert web_sample(app, "gateway_requests_total", source="web-push", outcome="accepted") == 0


def test_no_answer_from_onesignal_is_stored_marked_unchecked_never_found(
    tmp_path: Any,
) -> None:
    """A lookup that fails (a 500) is no answer; the pause it starts leaves the next new id
    without a lookup in time (the budget): both are stored, marked unchecked."""
    sink, app, onesignal = verify_app(tmp_path)
    onesignal.status = 500
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    answers = post_web(app, [first, second])
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert [a.json()["status"] for a in answers] == ["accepted", "accepted"]
    assert checked(sink) == ["unchecked", "unchecked"]
    assert onesignal.asked == [first]  # paused after the 500: the second was not asked
    assert web_sample(app, "gateway_requests_total", source="web-push", outcome="unverified") == 0


def test_with_verify_unreachable_refuse_no_answer_is_a_503_and_nothing_is_written(
    tmp_path: Any,
) -> None:
    sink, app, onesignal = verify_app(
        tmp_path, kafka={"retry_after_s": 7}, verify_unreachable="refuse"
    )
    (known,) = post_web(app, [KNOWN_SUB])
    assert known.status_code == 200 and checked(sink) == ["found"]  # an answer: stored
    onesignal.status = 503
    (unreachable,) = post_web(app, [str(uuid.uuid4())])
    assert unreachable.status_code == 503
    assert unreachable.headers["retry-after"] == "7"
    assert unreachable.json() == {
        "error": "unverified",
        "message": "the subscription could not be checked with OneSignal right now",
    }
    assert checked(sink) == ["found"]  # nothing more written
    counts = {
        outcome: web_sample(app, "gateway_requests_total", source="web-push", outcome=outcome)
        for outcome in ("unverified", "unavailable", "unknown_subscription")
    }
    assert counts == {"unverified": 1, "unavailable": 0, "unknown_subscription": 0}


def test_an_answer_is_believed_for_its_ttl_on_the_routes_clock(tmp_path: Any) -> None:
    """A found subscription is not asked again for ``verify_cache_ttl_s``, a missing one for
    ``verify_miss_ttl_s``, both on the clock the route is given; then OneSignal is asked again."""
    from gateway.ingress.allowlist import Allowlist
    from gateway.ingress.route import SourceRoute
    from gateway.ingress.state import RouteState

    _, app, onesignal = verify_app(tmp_path, verify_cache_ttl_s=100, verify_miss_ttl_s=10)
    config = app.app.routes[WEB].state.config  # type: ignore[attr-defined]
    now = [5000.0]
    sink = MemorySink(config.kafka)
    metrics = IngressMetrics(process=False)
    state = RouteState(
        config=config,
        sink=sink,
        allowlist=Allowlist.from_config(config.allowlist),
        metrics=metrics,
        monotonic=lambda: now[0],
    )
    route = SourceRoute(state, config.sources[0])
    assert route.verifier is not None
    route.verifier.transport = httpx.MockTransport(onesignal)
    unknown = str(uuid.uuid4())
    answers = []

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=route, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            for at in (5000.0, 5009.0, 5011.0, 5099.0, 5101.0):
                now[0] = at
                for s in (KNOWN_SUB, unknown):
                    r = await c.post(WEB, content=web_event(s), headers=WEB_HEADERS)
                    answers.append(r.status_code)

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert answers == [200, 403] * 5
    # at 5000 both are asked; the miss again at 5011 and 5099 (10 s each), the found one
    # only at 5101 (100 s)
    assert onesignal.asked == [KNOWN_SUB, unknown, unknown, unknown, KNOWN_SUB]
    assert checked(sink) == ["found"] * 5


# -- tracing: the request's SERVER span and the record's trace context ------------------------

INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"


def traced_app() -> tuple[MemorySink, BodyRead, Any]:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.config import TracingConfig
    from gateway.tracing import Tracing

    config = gateway_config("127.0.0.1:1", "route")
    spans = InMemorySpanExporter()
    tracing = Tracing(TracingConfig(enabled=True), "ingress", exporter=spans)
    sink = MemorySink(config.kafka)
    app = create_app(config, metrics=IngressMetrics(process=False), sink=sink, tracing=tracing)
    return sink, BodyRead(app), spans


def test_a_request_is_a_server_span_continuing_its_trace_and_the_records_parent() -> None:
    from opentelemetry.trace import SpanKind

    sink, app, spans = traced_app()
    event_id = str(uuid.uuid4())
    incoming = {
        "traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01",
        "tracestate": "vendor=1",
    }

    async def scenario() -> list[httpx.Response]:
        async with client(app) as c:
            return [
                await c.post(ES, content=body(event_id), headers={**HEADERS, **incoming}),
                await c.post(ES, content=b"not json", headers=HEADERS),  # a dead letter
            ]

    accepted, lettered = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert accepted.json()["status"] == "accepted", accepted.text
    assert lettered.json()["status"] == "dead-lettered", lettered.text
    first, second = spans.get_finished_spans()
    assert (first.name, first.kind) == (f"POST {ES}", SpanKind.SERVER)
    # the incoming trace continues: its trace id, its span as the parent, its trace state
    assert format(first.context.trace_id, "032x") == INCOMING_TRACE
    assert first.parent is not None and format(first.parent.span_id, "016x") == INCOMING_SPAN
    assert first.context.trace_state.get("vendor") == "1"
    assert dict(first.attributes or {}) == {
        "http.request.method": "POST",
        "url.path": ES,
        "gateway.source": "event-stream",
        "http.response.status_code": 200,
        "gateway.status": "accepted",
        "gateway.id": event_id,
    }
    # the record names the request's span as its parent (CloudEvents distributed tracing)
    span_id = format(first.context.span_id, "016x")
    record, letter = sink.records
    assert header(record.headers, "ce_traceparent") == f"00-{INCOMING_TRACE}-{span_id}-01"
    assert header(record.headers, "ce_tracestate") == "vendor=1"
    # a request without a trace context starts its own; a dead letter carries it too, and
    # the answer's reason (its id is null: not an attribute)
    assert second.parent is None and second.context.trace_id != first.context.trace_id
    assert dict(second.attributes or {}) == {
        "http.request.method": "POST",
        "url.path": ES,
        "gateway.source": "event-stream",
        "http.response.status_code": 200,
        "gateway.status": "dead-lettered",
        "gateway.reason": "invalid-json",
    }
    # (a new trace's flags may add the random-trace-id bit: the ids are what is compared)
    parent = (header(letter.headers, "traceparent") or "").split("-")[1:3]
    assert parent == [
        format(second.context.trace_id, "032x"),
        format(second.context.span_id, "016x"),
    ]


def test_a_refused_request_is_traced_with_its_status_and_writes_nothing() -> None:
    sink, app, spans = traced_app()

    async def scenario() -> list[httpx.Response]:
        async with client(app) as c:
            return [
                await c.post(WEB, content=b"{", headers=WEB_HEADERS),
                await c.post(
                    ES, content=body(str(uuid.uuid4())), headers={**HEADERS, "authorization": "x"}
                ),
            ]

    bad, forbidden = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid-json")
    assert forbidden.status_code == 403
    assert sink.records == []
    refused, outsider = spans.get_finished_spans()
    assert dict(refused.attributes or {}) == {
        "http.request.method": "POST",
        "url.path": WEB,
        "gateway.source": "web-push",
        "http.response.status_code": 400,
    }
    assert outsider.name == f"POST {ES}"
    assert outsider.attributes is not None
    assert outsider.attributes["http.response.status_code"] == 403


# -- the browser source's own checks: rate per address, CORS refusals, event names ------------


def web_app(**source: Any) -> tuple[MemorySink, BodyRead]:
    config = gateway_config(
        "127.0.0.1:1",
        "route",
        sources=[
            {
                "name": "web-push",
                "path": WEB,
                "format": "web-push",
                "app_id": VERIFY_APP,
                "cors_origins": [SITE],
                **source,
            },
            # a source with a secret: never rate limited, whatever its rate says
            {
                "name": "event-stream",
                "path": ES,
                "format": "event-stream",
                "secrets_env": "T_SECRETS",
                "client_rate_limit": 0.01,
                "client_rate_burst": 1,
            },
        ],
    )
    sink = MemorySink(config.kafka)
    return sink, BodyRead(create_app(config, metrics=IngressMetrics(process=False), sink=sink))


def from_address(ip: str, method: str = "POST") -> tuple[str, dict[str, Any]]:
    """A browser behind the trusted proxy (the load balancer writes its address)."""
    headers = {**WEB_HEADERS, "x-forwarded-for": ip}
    if method == "OPTIONS":
        return method, {"url": WEB, "headers": {"origin": SITE, "x-forwarded-for": ip}}
    return method, {"url": WEB, "content": web_event(None), "headers": headers}


def send_all(app: BodyRead, requests: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    async def scenario() -> list[httpx.Response]:
        async with client(app) as c:
            return [await c.request(method, **kw) for method, kw in requests]

    return asyncio.run(asyncio.wait_for(scenario(), 20))


def test_each_browser_address_gets_its_burst_then_429_and_a_preflight_costs_a_token() -> None:
    # one token per 100 s: none comes back while the test runs
    _, app = web_app(client_rate_limit=0.01, client_rate_burst=2)
    a, b, c = "198.51.100.1", "198.51.100.2", "198.51.100.3"
    answers = send_all(
        app,
        [
            from_address(a),
            from_address(a),
            from_address(a),  # over a's burst
            from_address(b),  # another address: its own burst
            from_address(c, "OPTIONS"),
            from_address(c),
            from_address(c),  # the preflight took one of c's two tokens
        ],
    )
    assert [r.status_code for r in answers] == [200, 200, 429, 200, 204, 200, 429]
    limited = answers[2]
    assert limited.json() == {
        "error": "rate-limited",
        "message": "too many requests from this address; retry after Retry-After",
    }
    assert int(limited.headers["retry-after"]) >= 1
    assert web_sample(app, "gateway_requests_total", source="web-push", outcome="rate_limited") == 2


def test_a_rate_of_one_per_second_is_on_and_zero_is_off_and_secret_sources_have_none() -> None:
    _, one = web_app(client_rate_limit=1.0, client_rate_burst=1)
    assert [r.status_code for r in send_all(one, [from_address("198.51.100.9")] * 2)] == [200, 429]
    _, off = web_app(client_rate_limit=0, client_rate_burst=1)
    answers = send_all(
        off,
        [
            *[from_address("198.51.100.9")] * 3,
            # the secret source, a burst of 1: OneSignal's few addresses are never limited
            *[("POST", {"url": ES, "content": body(str(uuid.uuid4())), "headers": HEADERS})] * 3,
        ],
    )
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]


def test_an_origin_not_listed_is_refused_and_counted_before_its_preflight_is_answered() -> None:
    sink, app = web_app()
    evil = {"origin": "https://evil.example"}
    answers = send_all(
        app,
        [
            ("OPTIONS", {"url": WEB, "headers": {**evil, "access-control-request-method": "POST"}}),
            ("POST", {"url": WEB, "content": web_event(None), "headers": {**WEB_HEADERS, **evil}}),
        ],
    )
    assert [r.status_code for r in answers] == [403, 403]
    assert all(
        r.json()
        == {
            "error": "forbidden",
            "message": "origin not allowed (origin-not-allowed): its Origin is not in cors_origins",
        }
        for r in answers
    )
    assert "access-control-allow-methods" not in answers[0].headers
    assert sink.records == []
    counted = web_sample(
        app, "gateway_requests_total", source="web-push", outcome="forbidden_origin"
    )
    assert counted == 2


def test_a_name_the_web_sdk_does_not_send_is_counted_as_an_unknown_event() -> None:
    sink, app = web_app()
    payload = samples.web_push_v16_payload("notification.clicked")
    payload["event"] = "notification.bounced"
    (r,) = send_all(
        app, [("POST", {"url": WEB, "content": orjson.dumps(payload), "headers": WEB_HEADERS})]
    )
    assert r.status_code == 400 and r.json()["error"] == "not-a-web-sdk-event", r.text
    assert sink.records == []
    counted = {
        outcome: web_sample(app, "gateway_requests_total", source="web-push", outcome=outcome)
        for outcome in ("unknown_event", "bad_request")
    }
    assert counted == {"unknown_event": 1, "bad_request": 0}


# -- dedupe, in detail: when an id is held, a concurrent copy of another kind, the spool -------


def test_an_id_is_held_once_acknowledged_and_an_id_less_event_never() -> None:
    """The dedupe window holds an id from its record's acknowledgement (the gauge an operator
    reads), not only once a copy arrives; an event without an id of its own gets a fresh one
    and takes no place in the window."""

    async def scenario() -> list[float | None]:
        _, _sink, app = make()
        metrics = sink_metrics(app)
        held_ids = []
        async with client(app) as c:
            for content in (body(str(uuid.uuid4())), without_id("x")):
                r = await c.post(ES, content=content, headers=HEADERS)
                assert r.json()["status"] == "accepted"
                # in process the whole request runs in one step of the loop; a server's
                # loop turns between requests: let it
                await asyncio.sleep(0)
                held_ids.append(metrics.registry.get_sample_value("gateway_dedupe_entries"))
        return held_ids

    assert asyncio.run(asyncio.wait_for(scenario(), 20)) == [1.0, 1.0]


def test_the_window_runs_from_the_acknowledgement() -> None:
    """A copy within ``dedupe.window_s`` of the first record's ack is a duplicate; one after it
    is a new event (on the route's own clock), however many copies came in between."""

    async def scenario() -> list[httpx.Response]:
        config = gateway_config("127.0.0.1:1", "route", dedupe={"window_s": 60})
        sink = MemorySink(config.kafka)
        app = create_app(config, metrics=IngressMetrics(process=False), sink=sink)
        now = [1000.0]
        app.routes[ES].state.monotonic = lambda: now[0]  # type: ignore[attr-defined]
        event_id = str(uuid.uuid4())
        answers = []
        async with client(app) as c:
            for at in (1000.0, 1059.0, 1061.0):
                now[0] = at
                answers.append(await c.post(ES, content=body(event_id), headers=HEADERS))
                await asyncio.sleep(0)  # the loop turns between requests, as a server's does
        assert [header(r.headers, "ce_id") for r in sink.records] == [event_id] * 2
        return answers

    answers = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert [a.json()["status"] for a in answers] == ["accepted", "duplicate", "accepted"]


def test_a_copy_of_an_event_published_beside_another_kind_is_a_duplicate() -> None:
    """Event A is still publishing when B, another kind with A's id, arrives: B is published
    without waiting for A, and once acknowledged its id is held for B's kind, so B's copy is a
    duplicate (not a third record) while A is still in flight."""

    async def scenario() -> None:
        _, sink, app = make()
        release = asyncio.Event()
        sink.outcomes = [held(release, ack)]
        event_id = str(uuid.uuid4())
        other = orjson.dumps(samples.event_stream_payload("message.push.sent", event_id=event_id))
        async with client(app) as c:
            a = asyncio.create_task(c.post(ES, content=body(event_id), headers=HEADERS))
            await app.wait_for(1)
            b = await c.post(ES, content=other, headers=HEADERS)
            b_copy = await c.post(ES, content=other, headers=HEADERS)
            assert not a.done()
            release.set()
            first = await a
        assert [r.json()["status"] for r in (first, b, b_copy)] == [
            "accepted",
            "accepted",
            "duplicate",
        ]
        assert len(sink.records) == 2

    run(scenario())


def test_with_the_spool_on_a_copy_waits_the_ack_deadline_plus_the_spools_commit(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the spool on, the first copy may still be on its way to disk after the ack
    deadline: a copy waits for it up to ``ack_timeout_s`` + the spool's commit deadline
    (10 s; shortened here), then 503."""
    import gateway.ingress.route

    monkeypatch.setattr(gateway.ingress.route, "COMMIT_TIMEOUT_S", 0.5)

    async def scenario() -> None:
        config = gateway_config(
            "127.0.0.1:1",
            "route",
            kafka={"ack_timeout_s": 0.5},
            spool={"enabled": True, "dir": str(tmp_path)},
        )
        sink = MemorySink(config.kafka)
        app = BodyRead(create_app(config, metrics=IngressMetrics(process=False), sink=sink))
        status, took = await copy_behind_a_held_first(app, sink)
        assert status == 503
        assert 1.0 <= took < 1.2, took
        assert len(sink.records) == 1

    run(scenario())


def test_a_late_callback_of_a_failed_marker_leaves_the_retrys_marker_alone() -> None:
    """The first attempt's marker fails; before its callback runs, the retry settles it and
    registers its own marker. The late callback must not drop the retry's: a copy arriving
    while the retry publishes still waits for it, and shares its outcome."""
    from gateway.core.normalize import normalize

    async def scenario() -> None:
        _, _sink, app = make()
        route = app.app.routes[ES]  # type: ignore[attr-defined]
        event = normalize(samples.event_stream_payload("message.sms.sent"), fmt="event-stream")
        first = await route._claim(event)
        first.set_result(False)  # lost; its callback is only scheduled
        retry = await route._claim(event)  # settles the first, and claims the id again
        assert isinstance(retry, asyncio.Future) and retry is not first
        await asyncio.sleep(0)  # the first marker's callback runs
        copy = asyncio.create_task(route._claim(event))
        await asyncio.sleep(0)
        assert not copy.done()  # waiting for the retry's outcome
        retry.set_result(True)
        shared = await copy
        assert shared.status == 200 and shared.body == {"status": "duplicate", "id": event.id}

    run(scenario())


# -- the refusal logs: sampled per source and reason, as configured ---------------------------


def refused_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused: ")]


def test_refusal_lines_are_sampled_at_the_configured_lines_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``refusal_log_lines`` per reason: an outsider repeating a refusal writes that many lines,
    for the address check and the secret check alike; the metrics count every refusal."""

    async def scenario() -> BodyRead:
        config = gateway_config(
            "127.0.0.1:1",
            "route",
            server={"refusal_log_lines": 2, "refusal_log_interval_s": 3600},
        )
        app = BodyRead(
            create_app(config, metrics=IngressMetrics(process=False), sink=MemorySink(config.kafka))
        )
        wrong = {**HEADERS, "authorization": "Bearer wrong"}
        outsider = {**wrong, "x-forwarded-for": OUTSIDER}
        async with client(app) as c:
            with caplog.at_level(logging.INFO, logger="gateway.ingress"):
                for headers in [wrong] * 4 + [outsider] * 4:
                    r = await c.post(ES, content=body(str(uuid.uuid4())), headers=headers)
                    assert r.status_code == 403
        return app

    app = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert (
        refused_lines(caplog)
        == ["refused: secret-invalid"] * 2 + ["refused: sender not in allowlist"] * 2
    )
    counted = {
        outcome: sample(app, "gateway_requests_total", source="event-stream", outcome=outcome)
        for outcome in ("forbidden_secret", "forbidden_ip")
    }
    assert counted == {"forbidden_secret": 4, "forbidden_ip": 4}


def test_a_refusal_is_written_again_once_its_interval_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One line per ``refusal_log_interval_s``: after the interval, the next refusal is
    written again (waiting out the interval on the clock the sampling reads)."""

    async def scenario() -> None:
        config = gateway_config(
            "127.0.0.1:1",
            "route",
            server={"refusal_log_lines": 1, "refusal_log_interval_s": 0.1},
        )
        app = create_app(
            config, metrics=IngressMetrics(process=False), sink=MemorySink(config.kafka)
        )
        wrong = {**HEADERS, "authorization": "Bearer wrong"}
        loop = asyncio.get_running_loop()
        async with client(app) as c:
            with caplog.at_level(logging.INFO, logger="gateway.ingress"):
                started = loop.time()
                await c.post(ES, content=body(str(uuid.uuid4())), headers=wrong)
                await asyncio.sleep(max(0.0, started + 0.15 - loop.time()))
                await c.post(ES, content=body(str(uuid.uuid4())), headers=wrong)

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert refused_lines(caplog) == ["refused: secret-invalid"] * 2

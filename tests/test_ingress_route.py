"""The source route's promises, in process: httpx.ASGITransport in front, an in-memory sink behind.

No broker and no server: what is asserted is what the route answered and what it handed to
the sink, with the sink's outcome (acknowledged, refused, late) chosen by the test. The same
promises are held against real Kafka over real HTTP in test_ingress.py and
test_ingress_outage.py; here each one is isolated, so a broken promise fails here at once.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import ASGIApp

from gateway.config import Config
from gateway.core.records import KafkaRecord, header
from gateway.devkit import samples
from gateway.ingress.app import create_app
from gateway.ingress.checks import SharedSecret, secret_ok
from gateway.kafka.sink import PublishResult, SinkBase, Unavailable
from gateway.metrics import IngressMetrics

from .ingress_helpers import EU_WEST4, ROTATED, SECRET, gateway_config

ES = "/v1/onesignal/events"
Outcome = Callable[[KafkaRecord], Awaitable[PublishResult]]


class MemorySink(SinkBase):
    """Records what it is given; each publish's outcome is the next scripted one.

    An outcome is a coroutine function: it may return a result (acknowledged), raise
    :class:`Unavailable` (the 503 path), or wait on an event the test sets.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config.kafka, IngressMetrics(process=False))
        self.records: list[KafkaRecord] = []
        self.outcomes: list[Outcome] = []
        self.entered = asyncio.Event()

    def _producer_state(self) -> tuple[bool, bool]:
        return True, True

    async def publish(self, record: KafkaRecord) -> PublishResult:
        self.records.append(record)
        self.entered.set()
        outcome = self.outcomes.pop(0) if self.outcomes else ack
        return await outcome(record)


async def ack(record: KafkaRecord) -> PublishResult:
    return PublishResult(record.topic, 0, 0)


async def refuse(record: KafkaRecord) -> PublishResult:
    raise Unavailable("timeout", "no acknowledgement from Kafka within 3.0s")


def held(release: asyncio.Event, then: Outcome) -> Outcome:
    async def outcome(record: KafkaRecord) -> PublishResult:
        await release.wait()
        return await then(record)

    return outcome


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
    sink = MemorySink(config)
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

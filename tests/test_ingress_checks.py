"""The checks in front of a source route (gateway.ingress.checks), held where a user sees them.

What an outsider on the browser route is answered (429 with Retry-After, 403 for an origin
that is not listed), what is counted and what is logged, with the sampling of refusal logs;
and how the sender address is resolved (the configured forwarding header, a request with no
peer address). In process: httpx.ASGITransport in front of an in-memory sink, or direct calls
on a check with a fake clock where a value depends on time. The checks' integration tests
(test_hostile_webpush.py, test_ingress.py) hold the same promises over real HTTP and Kafka.

Every test builds its own objects: mutmut forks each mutant from a process that already ran
the tests once, so an object memoized at import could hide a mutant (docs/testing.md).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import httpx
import netaddr
import orjson
import pytest

from gateway.config import Config
from gateway.core import trust
from gateway.core.clients import ClientLimiter
from gateway.devkit import samples
from gateway.ingress.allowlist import Allowlist
from gateway.ingress.app import create_app
from gateway.ingress.checks import ClientRate, Cors, SenderAddress, SharedSecret
from gateway.ingress.replies import Reply
from gateway.kafka.memory import MemorySink
from gateway.logs import SampledLog
from gateway.metrics import IngressMetrics

from .ingress_helpers import EU_WEST4, SECRET, gateway_config

ES = "/v1/onesignal/events"
WEB = "/v1/onesignal/web-push"
SITE = "https://shop.example"
OUTSIDER = "203.0.113.7"


class Tally:
    def __init__(self) -> None:
        self.n = 0

    def inc(self, amount: float = 1.0) -> None:
        self.n += int(amount)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def app_for(config: Config) -> tuple[Any, MemorySink, IngressMetrics]:
    sink = MemorySink(config.kafka)
    metrics = IngressMetrics(process=False)
    return create_app(config, metrics=metrics, sink=sink), sink, metrics


def requests_total(metrics: IngressMetrics, source: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "gateway_requests_total", {"source": source, "outcome": outcome}
    )
    return value or 0.0


def send_all(
    app: Any, requests: list[tuple[str, str, dict[str, Any]]], peer: Any = ("127.0.0.1", 40000)
) -> list[httpx.Response]:
    """Each (method, path, httpx arguments) in turn, from the ASGI peer ``peer``."""

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=peer)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            return [await c.request(method, path, **kw) for method, path, kw in requests]

    return asyncio.run(asyncio.wait_for(scenario(), 20))


def web_config(**source: Any) -> Config:
    return gateway_config(
        "127.0.0.1:1",  # the sink never connects
        "checks",
        sources=[
            {
                "name": "web-push",
                "path": WEB,
                "format": "web-push",
                "app_id": samples.DEMO_APP_ID,
                "cors_origins": [SITE],
                **source,
            }
        ],
    )


def browser(origin: str | None = SITE, **headers: str) -> tuple[str, str, dict[str, Any]]:
    """A web-push SDK post: text/plain JSON, no secret, the page's Origin."""
    payload = samples.web_push_v16_payload("notification.clicked")
    payload["subscriptionId"] = str(uuid.uuid4())  # a new event each time, never a duplicate
    hdrs = {"content-type": "text/plain;charset=UTF-8", **headers}
    if origin is not None:
        hdrs["origin"] = origin
    return "POST", WEB, {"content": orjson.dumps(payload), "headers": hdrs}


def event_stream(**headers: str) -> tuple[str, str, dict[str, Any]]:
    event_id = str(uuid.uuid4())
    payload = samples.event_stream_payload("message.push.clicked", event_id=event_id)
    hdrs = {
        "content-type": "application/json",
        "authorization": f"Bearer {SECRET}",
        "x-forwarded-for": EU_WEST4,
        **headers,
    }
    hdrs = {k: v for k, v in hdrs.items() if v}  # "" drops a header
    return "POST", ES, {"content": orjson.dumps(payload), "headers": hdrs}


# -- the per-client rate limit of a source without a secret ----------------------------------

RATE_LIMITED = {
    "error": "rate-limited",
    "message": "too many requests from this address; retry after Retry-After",
}


def test_a_client_past_its_burst_is_told_429_and_the_whole_seconds_to_wait() -> None:
    clock, refused = Clock(), Tally()
    rate = ClientRate(ClientLimiter(4.0, 2, max_clients=16), clock, refused)
    assert [rate.check(OUTSIDER), rate.check(OUTSIDER)] == [None, None]  # the burst
    # the next token is 0.25 s away: refused, and told to wait a whole second, not 0
    refusal = rate.check(OUTSIDER)
    assert isinstance(refusal, Reply)
    assert (refusal.status, refusal.body) == (429, RATE_LIMITED)
    assert refusal.headers == [(b"retry-after", b"1")]
    assert refused.n == 1
    clock.now += 0.25  # the 0.25 s the bucket needs (Retry-After rounded it up)
    assert rate.check(OUTSIDER) is None
    assert refused.n == 1


def test_retry_after_is_the_wait_rounded_up_to_whole_seconds() -> None:
    clock, refused = Clock(), Tally()
    rate = ClientRate(ClientLimiter(0.25, 1, max_clients=16), clock, refused)  # 4 s a token
    assert rate.check(OUTSIDER) is None
    waits = []
    for _ in range(3):
        refusal = rate.check(OUTSIDER)
        assert isinstance(refusal, Reply) and refusal.status == 429
        waits.append(dict(refusal.headers)[b"retry-after"])
        clock.now += 1.25
    # 4 s, then 2.75 s, then 1.5 s until the next token
    assert waits == [b"4", b"3", b"2"]
    assert refused.n == 3


def test_each_client_address_has_a_bucket_of_its_own() -> None:
    refused = Tally()
    rate = ClientRate(ClientLimiter(1.0, 1, max_clients=16), Clock(), refused)
    assert rate.check("198.51.100.1") is None
    assert isinstance(rate.check("198.51.100.1"), Reply)
    # another address at the same instant is not held by the first one's empty bucket
    assert rate.check("198.51.100.2") is None
    assert rate.check("2001:db8:1::1") is None
    assert refused.n == 1


def test_the_browser_route_answers_429_past_the_rate_and_writes_nothing() -> None:
    # one token every 100 s: the third request from one address waits 100 s for its token
    app, sink, metrics = app_for(web_config(client_rate_limit=0.01, client_rate_burst=2))
    first, second, third, other = send_all(
        app,
        [browser(), browser(), browser(), browser(**{"x-forwarded-for": "198.51.100.2"})],
    )
    assert [r.status_code for r in (first, second)] == [200, 200]
    assert third.status_code == 429
    assert third.json() == RATE_LIMITED
    assert third.headers["retry-after"] == "100"
    # 127.0.0.1 is a trusted proxy: the client it forwards is counted apart
    assert other.status_code == 200
    assert len(sink.records) == 3
    assert requests_total(metrics, "web-push", "rate_limited") == 1


# -- CORS as access control on the browser route -------------------------------------------


def test_a_post_from_an_unlisted_or_missing_origin_is_403_counted_and_not_written() -> None:
    app, sink, metrics = app_for(web_config())
    listed, evil, sandboxed, none, preflight = send_all(
        app,
        [
            browser(),
            browser("https://evil.example"),
            browser("null"),  # a sandboxed iframe, a file: page
            browser(None),
            ("OPTIONS", WEB, {"headers": {"origin": "https://evil.example"}}),
        ],
    )
    assert listed.status_code == 200
    unlisted = {
        "error": "forbidden",
        "message": "origin not allowed (origin-not-allowed): its Origin is not in cors_origins",
    }
    assert [(r.status_code, r.json()) for r in (evil, sandboxed, preflight)] == [
        (403, unlisted)
    ] * 3
    assert (none.status_code, none.json()) == (
        403,
        {
            "error": "forbidden",
            "message": "origin not allowed (origin-not-allowed): no Origin header",
        },
    )
    for r in (evil, sandboxed, none, preflight):
        assert "access-control-allow-origin" not in r.headers
    assert len(sink.records) == 1
    assert requests_total(metrics, "web-push", "forbidden_origin") == 4


def test_a_star_lets_every_origin_on_a_listed_origin_only_itself() -> None:
    refused = Tally()
    anyone = Cors(("*",), refused)
    for origin in (None, b"null", b"https://evil.example"):
        headers = {} if origin is None else {b"origin": origin}
        assert anyone.check(headers) is None
    listed = Cors((SITE, "http://[::1]:8080"), refused)
    assert listed.check({b"origin": b"http://[::1]:8080"}) is None
    assert listed.check({b"origin": SITE.encode()}) is None
    assert refused.n == 0
    assert isinstance(listed.check({b"origin": b"https://SHOP.example"}), Reply)
    assert refused.n == 1


# -- refusal logs: sampled per source and reason, the metrics count every one --------------


def test_refusal_lines_are_sampled_per_reason_and_the_metrics_count_them_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = gateway_config("127.0.0.1:1", "checks", server={"refusal_log_lines": 1})
    app, sink, metrics = app_for(config)
    outsider = {"x-forwarded-for": OUTSIDER}
    with caplog.at_level(logging.INFO, logger="gateway.ingress"):
        answers = send_all(
            app,
            [
                event_stream(authorization=""),
                event_stream(authorization=""),
                event_stream(authorization="Bearer wrong"),
                event_stream(authorization="", **outsider),
                event_stream(authorization="Bearer wrong", **outsider),
                # a valid secret from an address the allowlist does not know: every one said
                event_stream(**outsider),
                event_stream(**outsider),
            ],
        )
    assert [r.status_code for r in answers] == [403] * 7
    assert sink.records == []
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.ingress"]
    # one line per reason in the interval, whatever the secret or sender of the next ones
    assert lines.count("refused: secret-missing") == 1
    assert lines.count("refused: secret-invalid") == 1
    assert lines.count("refused: sender not in allowlist") == 1
    loud = [
        r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("gateway")
    ]
    assert len(loud) == 2 and all("carries a valid secret" in r.getMessage() for r in loud)
    assert requests_total(metrics, "event-stream", "forbidden_secret") == 3
    assert requests_total(metrics, "event-stream", "forbidden_ip") == 4


def test_the_summary_of_suppressed_refusals_names_their_source_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    sampler = SampledLog(logging.getLogger("gateway.ingress"), 1, 60.0, clock=clock)
    secret = SharedSecret(
        "event-stream",
        "authorization",
        (SECRET.encode(),),
        Tally(),
        required=True,
        refusals=sampler,
    )
    misses = {label: Tally() for label in ("valid", "invalid", "missing")}
    sender = SenderAddress(
        "event-stream",
        lambda: Allowlist(netaddr.IPSet(["34.90.0.0/16"])),
        trust.TrustedProxies(("127.0.0.1/32",)),
        "x-forwarded-for",
        secret,
        Tally(),
        misses,
        required=True,
        refusals=sampler,  # shared, as the route shares one sampler between its checks
    )
    bare: dict[str, Any] = {"headers": [], "client": ("127.0.0.1", 40000)}
    outsider = {**bare, "headers": [(b"x-forwarded-for", OUTSIDER.encode())]}
    with caplog.at_level(logging.INFO, logger="gateway.ingress"):
        for _ in range(3):
            assert secret.check(bare, EU_WEST4) is not None
            assert sender.check(outsider, sender.resolve(outsider)) is not None
        clock.now += 60.0  # the next interval: its first line says what the last one dropped
        assert secret.check(bare, EU_WEST4) is not None
        assert sender.check(outsider, sender.resolve(outsider)) is not None
    summaries = [r for r in caplog.records if hasattr(r, "suppressed_key")]
    assert [(r.suppressed_key, r.suppressed) for r in summaries] == [  # type: ignore[attr-defined]
        ("event-stream:secret-missing", 2),
        ("event-stream:ip-not-allowed", 2),
    ]
    assert misses["missing"].n == 4


# -- the sender address: the configured forwarding header, no peer address -----------------


def test_the_sender_is_read_from_the_configured_forwarding_header_only() -> None:
    config = gateway_config("127.0.0.1:1", "checks", server={"proxy_header": "forwarded"})
    app, sink, metrics = app_for(config)
    forwarded, xff = send_all(
        app,
        [
            event_stream(**{"x-forwarded-for": "", "forwarded": f"for={EU_WEST4}"}),
            # the proxies write Forwarded: an X-Forwarded-For is anyone's text
            event_stream(),
        ],
    )
    assert forwarded.status_code == 200, forwarded.text
    assert xff.status_code == 403
    assert xff.json()["message"] == "sender address is not allowed (ip-not-allowed)"
    assert len(sink.records) == 1
    assert requests_total(metrics, "event-stream", "forbidden_ip") == 1


def test_a_request_without_a_peer_address_is_refused_not_failed() -> None:
    # a Unix socket: the ASGI scope's client is None, so no forwarding header is believed
    app, sink, metrics = app_for(gateway_config("127.0.0.1:1", "checks"))
    (r,) = send_all(app, [event_stream()], peer=None)
    assert (r.status_code, r.json()) == (
        403,
        {"error": "forbidden", "message": "sender address is not allowed (ip-not-allowed)"},
    )
    assert sink.records == []
    assert requests_total(metrics, "event-stream", "forbidden_ip") == 1

"""Hostile senders on the web-push route: anyone can post to it, so nothing from it may pass
for OneSignal's word.

Each attack is played against a real server on loopback, in front of a real broker, from an
outsider: a client socket bound to 127.0.0.9, neither a trusted proxy nor allowlisted. A
refusal is proven to have written nothing by the end offsets of every topic of the test's
prefix, read after a later request was acknowledged (so the refused one had its chance).
docs/reliability.md lists each attack with the figures these tests print.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition

from gateway.config import ConfigError, parse_config
from gateway.core.clients import ClientLimiter, client_key
from gateway.core.records import header
from gateway.devkit import samples
from gateway.devkit.fake_onesignal import FakeOneSignal
from gateway.ingress.subscriptions import SubscriptionCache

from .conftest import KAFKA_API_VERSION, Broker, read_topic, unique
from .ingress_helpers import gateway_config, running_gateway

WEB = "/v1/onesignal/web-push"
SITE = "https://shop.example"
OUTSIDER = "127.0.0.9"
APP = "11111111-2222-3333-4444-555555555555"


# -- pure: the per-client table -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=50),
    burst=st.integers(min_value=1, max_value=20),
    gaps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200),
)
def test_a_client_never_gets_more_than_its_burst_plus_its_rate(
    rate: float, burst: int, gaps: list[float]
) -> None:
    limiter = ClientLimiter(rate, burst, max_clients=4)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        wait = limiter.take("198.51.100.7", now)
        if wait == 0:
            allowed += 1
        else:
            assert 0 < wait <= 1 / rate + 1e-9
    assert allowed <= burst + rate * now + 1e-6


def test_a_refused_client_gets_a_token_back_after_the_wait_it_was_told() -> None:
    limiter = ClientLimiter(2.0, 3, max_clients=4)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("a", 0.0)
    assert wait == pytest.approx(0.5)
    assert limiter.take("a", wait - 0.01) > 0
    assert limiter.take("a", wait + 0.001) == 0.0
    assert limiter.take("b", 0.0) == 0.0  # another client has its own bucket


def test_the_table_is_bounded_and_forgets_the_least_recently_seen() -> None:
    limiter = ClientLimiter(1.0, 1, max_clients=100)
    for i in range(10_000):
        limiter.take(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100 and limiter.evicted == 9_900
    limiter.take("10.0.0.1", 0.0)  # long forgotten: a full bucket again
    assert len(limiter) == 100


def test_ipv6_clients_count_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:203.0.113.5") == "203.0.113.5"
    assert client_key("203.0.113.5") == "203.0.113.5"
    assert client_key("not an address") == "not an address"
    limiter = ClientLimiter(1.0, 2, max_clients=8)
    hits = [limiter.take(f"2001:db8:1:2::{i:x}", 0.0) for i in range(1, 4)]
    assert hits[:2] == [0.0, 0.0] and hits[2] > 0  # one host rotating its addresses


# -- config -----------------------------------------------------------------------------------


def _web_source(**over: Any) -> dict[str, Any]:
    return {"name": "web", "path": "/w", "format": "web-push", **over}


def test_a_web_push_source_without_cors_origins_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [_web_source()]}, env={})
    assert err.value.key == "sources[0].cors_origins"
    assert '["*"]' in err.value.problem


@pytest.mark.parametrize("bad", ["null", "https://shop.example/", "shop.example", "HTTPS://X.IO"])
def test_cors_origins_must_be_origins(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [_web_source(cors_origins=[SITE, bad])]}, env={})
    assert err.value.key == "sources[0].cors_origins[1]"


def test_a_star_is_taken_only_when_written() -> None:
    cfg = parse_config({"sources": [_web_source(cors_origins=["*"])]}, env={})
    assert cfg.sources[0].cors_origins == ("*",)
    cfg = parse_config({"sources": [_web_source(cors_origins=[SITE, "http://[::1]:8080"])]}, env={})
    assert cfg.sources[0].cors_origins == (SITE, "http://[::1]:8080")


# -- against a real server, from an outsider address ----------------------------------------


class Written:
    """The records of every topic of a prefix: the end offsets, summed."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.prefix = prefix
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            api_version=KAFKA_API_VERSION,
            enable_auto_commit=False,
        )

    def total(self) -> int:
        topics = [t for t in self.consumer.topics() if t.startswith(f"{self.prefix}.")]
        tps = [
            TopicPartition(t, p)
            for t in topics
            for p in (self.consumer.partitions_for_topic(t) or ())
        ]
        return sum(self.consumer.end_offsets(tps).values()) if tps else 0

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class Env:
    def __init__(self, broker: Broker, prefix: str, url: str, metrics: Any) -> None:
        self.broker = broker
        self.prefix = prefix
        self.url = url
        self.metrics = metrics
        self.written = Written(broker.bootstrap_servers, prefix)

    @contextlib.contextmanager
    def client(self, address: str = OUTSIDER) -> Iterator[httpx.Client]:
        transport = httpx.HTTPTransport(local_address=address)
        with httpx.Client(base_url=self.url, transport=transport, timeout=20) as c:
            yield c

    def records(self, suffix: str, expect: int | None = None) -> list[Any]:
        return read_topic(self.broker.bootstrap_servers, f"{self.prefix}.{suffix}", expect=expect)

    def outcome(self, name: str) -> float:
        return float(self.metrics.requests.labels("web-push", name).value)


def browser_post(
    c: httpx.Client,
    payload: Any,
    *,
    origin: str | None = SITE,
    content: bytes | None = None,
    extra: dict[str, str] | None = None,
) -> httpx.Response:
    headers = {"content-type": "text/plain;charset=UTF-8", **(extra or {})}
    if origin is not None:
        headers["origin"] = origin
    body = content if content is not None else orjson.dumps(payload)
    return c.post(WEB, content=body, headers=headers)


def honest(event: str = "notification.clicked") -> dict[str, Any]:
    payload = samples.web_push_v16_payload(event)
    payload["content"] = f"unique {unique()}"  # a fresh content hash: never a duplicate
    return payload


@pytest.fixture(scope="module")
def env(broker: Broker) -> Iterator[Env]:
    prefix = unique("hwp")
    # a high rate here: the rate limit has its own server below
    config = gateway_config(
        broker.bootstrap_servers,
        prefix,
        sources=[
            {
                "name": "web-push",
                "path": WEB,
                "format": "web-push",
                "app_id": APP,
                "cors_origins": [SITE],
                "client_rate_limit": 1000.0,
                "client_rate_burst": 1000,
            }
        ],
    )
    with running_gateway(config) as (url, metrics):
        e = Env(broker, prefix, url, metrics)
        try:
            yield e
        finally:
            e.written.close()


def refused_and_nothing_written(
    env: Env, c: httpx.Client, attempt: httpx.Response, marker_payload: Any = None
) -> None:
    """``attempt`` wrote nothing: a later honest request is acknowledged, and the prefix's
    topics grew by that one record only."""
    assert attempt.status_code >= 400
    before = env.written.total()
    marker = browser_post(c, marker_payload or honest())
    assert marker.status_code == 200, marker.text
    assert env.written.total() == before + 1


def test_a_forged_bounce_is_refused_and_written_nowhere(env: Env) -> None:
    forged = {"event": "message.email.bounced", "subscriptionId": "s-1", "notificationId": "n-1"}
    with env.client() as c:
        first = browser_post(c, honest())  # the topics exist: the offsets can be read
        assert first.status_code == 200, first.text
        before = env.written.total()
        refused = env.outcome("unknown_event")
        r = browser_post(c, forged)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "not-a-web-sdk-event"
        assert "notification.clicked" in r.json()["message"]
        assert env.written.total() == before
        refused_and_nothing_written(env, c, r)
    assert env.outcome("unknown_event") == refused + 1
    print(f"\nforged message.email.bounced from {OUTSIDER}: {r.status_code}, 0 records written")


@pytest.mark.parametrize(
    "name",
    ["message.push.clicked", "notification.Snoozed", "notification.willdisplay", "", None, 7],
)
def test_every_name_the_web_sdk_does_not_send_is_refused(env: Env, name: Any) -> None:
    with env.client() as c:
        assert browser_post(c, honest()).status_code == 200
        r = browser_post(c, {"event": name, "notificationId": "n"})
        assert r.status_code == 400, r.text
        refused_and_nothing_written(env, c, r)


@pytest.mark.parametrize(
    ("origin", "why"),
    [
        ("https://evil.example", "not in cors_origins"),
        ("null", "not in cors_origins"),  # a sandboxed iframe, a file: page, a data: URL
        ("https://shop.example.evil.example", "not in cors_origins"),
        ("https://SHOP.example", "not in cors_origins"),
        (None, "no Origin header"),
    ],
)
def test_a_post_from_an_origin_not_listed_is_refused_and_written_nowhere(
    env: Env, origin: str | None, why: str
) -> None:
    with env.client() as c:
        assert browser_post(c, honest()).status_code == 200
        before = env.written.total()
        refused = env.outcome("forbidden_origin")
        r = browser_post(c, honest(), origin=origin)
        assert r.status_code == 403, r.text
        assert why in r.json()["message"]
        assert "access-control-allow-origin" not in r.headers
        assert env.written.total() == before
        refused_and_nothing_written(env, c, r)
    assert env.outcome("forbidden_origin") == refused + 1


def test_the_preflight_answers_the_listed_origin_only(env: Env) -> None:
    ask = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    with env.client() as c:
        ok = c.options(WEB, headers={"origin": SITE, **ask})
        evil = c.options(WEB, headers={"origin": "https://evil.example", **ask})
        none = c.options(WEB, headers=ask)
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == SITE
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert (evil.status_code, none.status_code) == (403, 403)
    assert "access-control-allow-origin" not in evil.headers


def test_an_honest_browser_event_is_stored_marked_unauthenticated(env: Env) -> None:
    payload = honest("notification.willDisplay")
    with env.client() as c:
        r = browser_post(c, payload)
    assert r.status_code == 200, r.text
    assert r.json()["topic"] == f"{env.prefix}.unauthenticated"
    event_id = r.json()["id"]
    rec = next(x for x in env.records("unauthenticated") if header(x.headers, "ce_id") == event_id)
    assert header(rec.headers, "ce_authtype") == "unauthenticated"
    assert header(rec.headers, "ce_source") == "gateway:unauthenticated/web-push"
    assert header(rec.headers, "ce_type") == "com.onesignal.message.push.displayed"
    value = orjson.loads(rec.value)
    assert value["app_id"] == APP and value["received"]["client_ip"] == OUTSIDER


# -- the per-client rate limit ----------------------------------------------------------------

RATE, BURST = 4.0, 10


@pytest.fixture(scope="module")
def limited(broker: Broker) -> Iterator[Env]:
    prefix = unique("hwr")
    config = gateway_config(
        broker.bootstrap_servers,
        prefix,
        sources=[
            {
                "name": "web-push",
                "path": WEB,
                "format": "web-push",
                "app_id": APP,
                "cors_origins": [SITE],
                "client_rate_limit": RATE,
                "client_rate_burst": BURST,
            }
        ],
    )
    with running_gateway(config) as (url, metrics):
        e = Env(broker, prefix, url, metrics)
        try:
            yield e
        finally:
            e.written.close()


def test_one_outsider_gets_its_burst_and_its_rate_then_429(limited: Env) -> None:
    statuses: list[int] = []
    retry_after: list[str] = []
    with limited.client() as c:
        started = time.monotonic()
        while time.monotonic() - started < 2.0 and len(statuses) < 400:
            r = browser_post(c, honest())
            statuses.append(r.status_code)
            if r.status_code == 429:
                retry_after.append(r.headers["retry-after"])
                assert r.json()["error"] == "rate-limited"
        elapsed = time.monotonic() - started
        accepted = statuses.count(200)
        # another outsider is not held by the first one's limit
        with limited.client("127.0.0.10") as other:
            assert browser_post(other, honest()).status_code == 200
    assert set(statuses) <= {200, 429}
    assert statuses[:BURST] == [200] * BURST
    assert 429 in statuses
    assert accepted <= BURST + RATE * elapsed + 1
    assert all(int(v) >= 1 for v in retry_after)
    assert limited.outcome("rate_limited") == statuses.count(429)
    print(
        f"\none outsider, {elapsed:.1f} s sequential: {len(statuses)} requests, {accepted}"
        f" accepted ({accepted / elapsed:.1f}/s; ceiling burst {BURST} + {RATE}/s ="
        f" {BURST + RATE * elapsed:.0f}), {statuses.count(429)} answered 429"
        f" (Retry-After {retry_after[0] if retry_after else '-'} s)"
    )


def test_clients_behind_a_trusted_proxy_are_limited_one_by_one(limited: Env) -> None:
    # 127.0.0.1 is a trusted proxy: the client is the address it forwards
    with httpx.Client(base_url=limited.url, timeout=20) as c:

        def via_proxy(client_ip: str) -> int:
            r = browser_post(c, honest(), extra={"x-forwarded-for": client_ip})
            return r.status_code

        first = [via_proxy("198.51.100.1") for _ in range(BURST + 5)]
        second = via_proxy("198.51.100.2")
    assert first[:BURST] == [200] * BURST and 429 in first[BURST:]
    assert second == 200


# -- optional verification of the subscription id, against the loopback OneSignal ----------


def test_the_subscription_cache_holds_answers_for_their_ttl_and_is_bounded() -> None:
    cache = SubscriptionCache(size=3, found_ttl_s=100.0, miss_ttl_s=10.0)
    cache.put("a", True, 0.0)
    cache.put("b", False, 0.0)
    assert (cache.get("a", 99.9), cache.get("b", 9.9)) == (True, False)
    assert (cache.get("a", 100.0), cache.get("b", 10.0)) == (None, None)
    for i in range(10):
        cache.put(f"k{i}", True, 0.0)
    assert len(cache) == 3 and cache.get("k9", 1.0) and cache.get("k0", 1.0) is None


@given(st.lists(st.tuples(st.integers(0, 20), st.booleans(), st.floats(0, 5)), max_size=60))
def test_the_cache_never_answers_past_expiry_nor_grows_past_its_size(
    ops: list[tuple[int, bool, float]],
) -> None:
    cache = SubscriptionCache(size=5, found_ttl_s=3.0, miss_ttl_s=1.0)
    now = 0.0
    truth: dict[str, tuple[bool, float]] = {}
    for key, found, gap in ops:
        now += gap
        cache.put(str(key), found, now)
        truth[str(key)] = (found, now + (3.0 if found else 1.0))
        assert len(cache) <= 5
        for k, (was, expires) in truth.items():
            got = cache.get(k, now)
            assert got is None or (got == was and now < expires)


def test_verify_subscriptions_needs_the_apps_key() -> None:
    source = _web_source(cors_origins=["*"], app_id=APP, verify_subscriptions=True)
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [source]}, env={})
    assert err.value.key == "sources[0].verify_subscriptions" and "[[onesignal.apps]]" in str(err)
    with pytest.raises(ConfigError, match="needs the source's app_id"):
        parse_config({"sources": [{**source, "app_id": ""}]}, env={})
    apps = {"apps": [{"app_id": APP, "api_key_env": "K"}]}
    with pytest.raises(ConfigError, match="has no key"):
        parse_config({"sources": [source], "onesignal": apps}, env={})
    cfg = parse_config({"sources": [source], "onesignal": apps}, env={"K": "key"})
    assert cfg.sources[0].verify_subscriptions


KEY = "verify-key-0123456789"
KNOWN = "6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f"
SLOW_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def verified(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Env, FakeOneSignal]]:
    prefix = unique("hwv")
    key_file = tmp_path_factory.mktemp("verify") / "key"
    key_file.write_text(KEY)
    base = {
        "format": "web-push",
        "app_id": APP,
        "cors_origins": [SITE],
        "client_rate_limit": 1000.0,  # the rate limit is tested on a server of its own
        "client_rate_burst": 1000,
    }
    with FakeOneSignal(api_key=KEY) as fake:
        fake.add_subscription(APP, KNOWN)
        config = gateway_config(
            broker.bootstrap_servers,
            prefix,
            sources=[
                {
                    **base,
                    "name": "web-push",
                    "path": WEB,
                    "verify_subscriptions": True,
                    "verify_rate_limit": 50.0,
                    "verify_timeout_s": SLOW_TIMEOUT_S,
                },
                {
                    **base,
                    "name": "strict",
                    "path": "/strict",
                    "verify_subscriptions": True,
                    "verify_unreachable": "refuse",
                    "verify_rate_limit": 50.0,
                    "verify_timeout_s": SLOW_TIMEOUT_S,
                },
                {
                    **base,
                    "name": "paced",
                    "path": "/paced",
                    "verify_subscriptions": True,
                    "verify_rate_limit": 1.0,
                    "verify_timeout_s": 2.5,
                },
            ],
            onesignal={
                "api_url": fake.url,
                "apps": [{"app_id": APP, "api_key_file": str(key_file)}],
            },
        )
        with running_gateway(config) as (url, metrics):
            e = Env(broker, prefix, url, metrics)
            try:
                yield e, fake
            finally:
                e.written.close()


def with_subscription(subscription_id: str, event: str = "notification.clicked") -> dict[str, Any]:
    payload = honest(event)
    payload["subscriptionId"] = subscription_id
    return payload


def test_a_known_subscription_is_looked_up_once_and_marked_found(
    verified: tuple[Env, FakeOneSignal],
) -> None:
    env, fake = verified
    before = len([x for x in fake.lookups if x.alias_id == KNOWN])
    checks = env.metrics.subscription_checks
    cached = checks.labels("web-push", "found", "cache").value
    with env.client() as c:
        answers = [browser_post(c, with_subscription(KNOWN)) for _ in range(5)]
    assert checks.labels("web-push", "found", "cache").value - cached >= 4
    assert [r.status_code for r in answers] == [200] * 5, answers[0].text
    asked = [x for x in fake.lookups if x.alias_id == KNOWN]
    assert len(asked) - before == 1  # one request to OneSignal for five events: the cache
    assert asked[-1].headers["authorization"] == f"Key {KEY}"
    assert asked[-1].path == f"/apps/{APP}/subscriptions/{KNOWN}/user/identity"
    ids = {r.json()["id"] for r in answers}
    recs = [x for x in env.records("unauthenticated") if header(x.headers, "ce_id") in ids]
    assert len(recs) == 5
    assert {header(x.headers, "ce_subscriptioncheck") for x in recs} == {"found"}
    assert {header(x.headers, "ce_authtype") for x in recs} == {"unauthenticated"}
    print(f"\n5 events of one known subscription: {len(asked) - before} lookup at OneSignal")


def test_an_unknown_subscription_is_refused_written_nowhere_and_asked_once(
    verified: tuple[Env, FakeOneSignal],
) -> None:
    env, fake = verified
    unknown = str(uuid.uuid4())
    with env.client() as c:
        assert browser_post(c, with_subscription(KNOWN)).status_code == 200
        before = env.written.total()
        refused = env.outcome("unknown_subscription")
        answers = [browser_post(c, with_subscription(unknown)) for _ in range(4)]
        assert env.written.total() == before
        refused_and_nothing_written(env, c, answers[-1], with_subscription(KNOWN))
    assert [r.status_code for r in answers] == [403] * 4
    assert "unknown-subscription" in answers[0].json()["message"]
    assert len([x for x in fake.lookups if x.alias_id == unknown]) == 1  # the miss is cached
    lookups = env.metrics.subscription_lookups.labels("web-push", "not_found").value
    assert lookups >= 1
    assert env.outcome("unknown_subscription") == refused + 4


@pytest.mark.parametrize("subscription", [None, "", "not-a-uuid", "../../users/by/x", "1" * 36])
def test_an_event_without_a_subscription_uuid_is_refused_without_asking(
    verified: tuple[Env, FakeOneSignal], subscription: str | None
) -> None:
    env, fake = verified
    payload = honest()
    payload.pop("subscriptionId", None)
    if subscription is not None:
        payload["subscriptionId"] = subscription
    asked = len(fake.lookups)
    with env.client() as c:
        assert browser_post(c, with_subscription(KNOWN)).status_code == 200
        r = browser_post(c, payload)
        assert r.status_code == 403, r.text
        refused_and_nothing_written(env, c, r, with_subscription(KNOWN))
    assert len(fake.lookups) == asked


def test_no_answer_in_time_is_stored_unchecked_or_refused_never_found(
    verified: tuple[Env, FakeOneSignal],
) -> None:
    env, fake = verified
    slow, strict = str(uuid.uuid4()), str(uuid.uuid4())
    for sub in (slow, strict):
        fake.add_subscription(APP, sub)
        fake.script(delay_s=SLOW_TIMEOUT_S + 1.0, alias_id=sub)  # answers, but too late
    with env.client() as c:
        marked = browser_post(c, with_subscription(slow))
        refused = c.post(
            "/strict",
            content=orjson.dumps(with_subscription(strict)),
            headers={"origin": SITE, "content-type": "text/plain"},
        )
    assert marked.status_code == 200, marked.text
    rec = next(
        x
        for x in env.records("unauthenticated")
        if header(x.headers, "ce_id") == marked.json()["id"]
    )
    assert header(rec.headers, "ce_subscriptioncheck") == "unchecked"
    assert refused.status_code == 503 and refused.json()["error"] == "unverified"
    assert "retry-after" in refused.headers
    # the late answer is cached once it comes: the next event of that subscription is found
    assert fake.wait_for(lambda f: any(x.alias_id == slow for x in f.lookups), 10)
    deadline = time.monotonic() + 10
    with env.client() as c:
        while True:
            again = browser_post(c, with_subscription(slow))
            found = next(
                x
                for x in env.records("unauthenticated")
                if header(x.headers, "ce_id") == again.json()["id"]
            )
            if header(found.headers, "ce_subscriptioncheck") == "found":
                break
            assert time.monotonic() < deadline, "the late answer was never cached"
            time.sleep(0.3)


def test_lookups_keep_to_onesignals_rate_of_one_per_second(
    verified: tuple[Env, FakeOneSignal],
) -> None:
    env, fake = verified
    subs = [str(uuid.uuid4()) for _ in range(6)]
    for sub in subs:
        fake.add_subscription(APP, sub)
    fake.view_rate_limit = 1.0  # OneSignal's: a lookup faster than that would get a 429

    async def burst() -> list[httpx.Response]:
        transport = httpx.AsyncHTTPTransport(local_address=OUTSIDER)
        async with httpx.AsyncClient(base_url=env.url, transport=transport, timeout=20) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        "/paced",
                        content=orjson.dumps(with_subscription(s)),
                        headers={"origin": SITE, "content-type": "text/plain"},
                    )
                    for s in subs
                )
            )

    started = time.monotonic()
    try:
        answers = asyncio.run(burst())
    finally:
        fake.view_rate_limit = None
    elapsed = time.monotonic() - started
    assert [r.status_code for r in answers] == [200] * len(subs)
    asked = sorted(x.at for x in fake.lookups if x.alias_id in subs)
    gaps = [b - a for a, b in itertools.pairwise(asked)]
    # at 1 lookup/s, counted from each answer: arrivals at least ~1 s apart; none refused 429
    assert all(g >= 0.9 for g in gaps), gaps
    assert all(x.status == 200 for x in fake.lookups if x.alias_id in subs)
    marks = [
        header(x.headers, "ce_subscriptioncheck")
        for x in env.records("unauthenticated")
        if header(x.headers, "ce_id") in {r.json()["id"] for r in answers}
    ]
    assert len(marks) == len(subs) and set(marks) <= {"found", "unchecked"}
    assert "found" in marks
    print(
        f"\n{len(subs)} new subscriptions at once on a 1/s budget: {len(asked)} lookups in"
        f" {elapsed:.1f} s (gaps {', '.join(f'{g:.2f}' for g in gaps)} s),"
        f" {marks.count('found')} found, {marks.count('unchecked')} stored unchecked"
    )


def test_the_client_rate_is_on_where_anyone_gets_in_and_off_for_onesignals_addresses() -> None:
    cfg = parse_config(
        {
            "sources": [
                _web_source(cors_origins=["*"]),
                {"name": "ip-only", "path": "/ip", "require_secret": False},
                {
                    "name": "open",
                    "path": "/o",
                    "require_secret": False,
                    "require_allowlisted_ip": False,
                },
                _web_source(name="w2", path="/w2", cors_origins=["*"], client_rate_limit=2.0),
            ]
        },
        env={},
    )
    assert [s.client_rate_limit for s in cfg.sources] == [5.0, 0.0, 5.0, 2.0]


def test_a_429_from_onesignal_pauses_the_lookups_for_its_retry_after(
    verified: tuple[Env, FakeOneSignal],
) -> None:
    env, fake = verified
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    for sub in (first, second):
        fake.add_subscription(APP, sub)
    fake.script(status=429, retry_after=2, alias_id=first)

    def strict(sub: str) -> httpx.Response:
        with env.client() as c:
            return c.post(
                "/strict",
                content=orjson.dumps(with_subscription(sub)),
                headers={"origin": SITE, "content-type": "text/plain"},
            )

    throttled = strict(first)
    paused_at = time.monotonic()
    during = strict(second)  # within the pause: not asked, and not stored as verified
    asked_during = [x for x in fake.lookups if x.alias_id == second]
    assert throttled.status_code == 503 and during.status_code == 503, during.text
    assert asked_during == []
    time.sleep(max(0.0, 2.2 - (time.monotonic() - paused_at)))
    after = strict(second)
    assert after.status_code == 200, after.text
    assert [x.status for x in fake.lookups if x.alias_id == second] == [200]
    print(
        "\nOneSignal 429 (Retry-After 2): the next new id refused unverified without a lookup,"
        " found after the pause"
    )

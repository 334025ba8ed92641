"""The ingress end to end: a real uvicorn server on loopback, the real (mock-cluster) broker.

What the route answers without a record reaching Kafka (the sender address, the secret, the
method, CORS, the size limit, 4xx for bad web-push bodies, sequential duplicates) is held in
process against the in-memory sink, in test_ingress_route.py.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_kafka_event

from gateway.config import Config
from gateway.core.kinds import KNOWN_KINDS
from gateway.core.records import header
from gateway.devkit import samples
from gateway.devkit.embedded_broker import EmbeddedBroker

from .conftest import read_topic, unique
from .ingress_helpers import (
    EU_WEST4,
    EU_WEST4_V6,
    SECRET,
    gateway_config,
    operator_url,
    post,
    running_gateway,
    scrape,
)

ES = "/v1/onesignal/events"
WEB = "/v1/onesignal/web-push"
JOURNEY = "/v1/onesignal/journey"
MESSAGE_KINDS = sorted(
    k
    for k in KNOWN_KINDS
    if k.startswith("message.") and k not in ("message.push.displayed", "message.push.dismissed")
)
CHANNELS = ("push", "email", "sms", "iam", "live_activity", "journey")


class Env:
    def __init__(self, broker: EmbeddedBroker, prefix: str, config: Config, url: str, metrics: Any):
        self.broker = broker
        self.prefix = prefix
        self.config = config
        self.url = url
        self.metrics = metrics
        self.client = httpx.Client(base_url=url, timeout=30)

    def records(self, channel: str, expect: int | None = None) -> list[Any]:
        return read_topic(self.broker.bootstrap_servers, f"{self.prefix}.{channel}", expect=expect)

    def dead_letters(self, expect: int | None = None) -> list[Any]:
        return read_topic(self.broker.bootstrap_servers, f"{self.prefix}.dlt", expect=expect)

    def all_ids(self) -> list[str]:
        ids = []
        for channel in CHANNELS:
            for rec in self.records(channel):
                ids.append(header(rec.headers, "ce_id"))
        return ids


@pytest.fixture(scope="module", params=["process", "thread"])
def env(broker: EmbeddedBroker, request: pytest.FixtureRequest) -> Iterator[Env]:
    """The gateway with each producer mode: a child process (default), or in-process."""
    prefix = unique("ing")
    config = gateway_config(broker.bootstrap_servers, prefix, kafka={"producer": request.param})
    with running_gateway(config) as (url, metrics):
        e = Env(broker, prefix, config, url, metrics)
        yield e
        e.client.close()


def _ce(rec: Any) -> Any:
    headers = {k: v for k, v in rec.headers}
    return from_kafka_event(KafkaMessage(headers=headers, key=rec.key, value=rec.value))


# ---------------------------------------------------------------------------------------------
# every kind, every layout


@pytest.mark.parametrize("layout", samples.LAYOUTS)
def test_every_kind_in_every_layout_lands_as_a_valid_cloudevent(env: Env, layout: str) -> None:
    sent: dict[str, str] = {}
    for kind in MESSAGE_KINDS:
        event_id = str(uuid.uuid4())
        payload = samples.event_stream_payload(kind, layout=layout, event_id=event_id)
        r = post(env.client, ES, payload)
        assert r.status_code == 200, (kind, r.text)
        body = r.json()
        assert body["status"] == "accepted" and body["id"] == event_id
        channel = kind.split(".")[1]
        assert body["topic"] == f"{env.prefix}.{channel}"
        sent[event_id] = kind

    found: dict[str, Any] = {}
    for channel in ("push", "email", "sms", "iam", "live_activity"):
        for rec in env.records(channel):
            found[header(rec.headers, "ce_id") or ""] = rec
    for event_id, kind in sent.items():
        rec = found[event_id]
        ce = _ce(rec)  # an SDK that is not ours must read it
        assert ce.get_type() == f"com.onesignal.{kind}"
        assert ce.get_id() == event_id
        assert ce.get_source() == f"onesignal:app/{samples.DEMO_APP_ID}"
        assert ce.get_time() is not None
        value = orjson.loads(rec.value)
        assert value["kind"] == kind
        assert value["app_id"] == samples.DEMO_APP_ID
        assert value["received"]["client_ip"] == EU_WEST4
        assert value["received"]["source"] == "event-stream"
        assert value["raw"]  # the payload as received is kept
        assert rec.key == ce.get_subject().encode()
        assert value["user"].get("external_id") == "user-42"


def test_legacy_kind_spellings_are_published_under_todays_names(env: Env) -> None:
    legacy = {
        "message.iam.displayed": "message.iam.impression",
        "message.iam.pagedisplayed": "message.iam.page_displayed",
        "message.email.hardbounced": "message.email.bounced",
        "message.email.supressed": "message.email.suppressed",
        "message.email.resporedasspam": "message.email.reported_as_spam",
        "message.push receivedp": "message.push.received",
    }
    ids = {}
    for old, new in legacy.items():
        event_id = str(uuid.uuid4())
        payload = samples.event_stream_payload(new, layout="flat-dotted", event_id=event_id)
        payload["event.kind"] = old
        r = post(env.client, ES, payload)
        assert r.status_code == 200, r.text
        ids[event_id] = new
    got = {}
    for channel in ("push", "email", "iam"):
        for rec in env.records(channel):
            got[header(rec.headers, "ce_id")] = header(rec.headers, "ce_type")
    for event_id, new in ids.items():
        assert got[event_id] == f"com.onesignal.{new}"


def test_structured_mode_is_read_by_the_cloudevents_sdk(broker: EmbeddedBroker) -> None:
    prefix = unique("struct")
    config = gateway_config(broker.bootstrap_servers, prefix, kafka={"content_mode": "structured"})
    with running_gateway(config) as (url, _), httpx.Client(base_url=url) as client:
        event_id = str(uuid.uuid4())
        r = post(
            client, ES, samples.event_stream_payload("message.email.opened", event_id=event_id)
        )
        assert r.status_code == 200
        (rec,) = read_topic(broker.bootstrap_servers, f"{prefix}.email", expect=1)
        assert header(rec.headers, "content-type") == "application/cloudevents+json"
        ce = _ce(rec)
        assert ce.get_id() == event_id
        assert ce.get_type() == "com.onesignal.message.email.opened"
        assert ce.get_data()["kind"] == "message.email.opened"


# ---------------------------------------------------------------------------------------------
# web push and journeys


@pytest.mark.parametrize(
    ("version", "event", "kind"),
    [
        ("v16", "notification.willDisplay", "message.push.displayed"),
        ("v16", "notification.clicked", "message.push.clicked"),
        ("v16", "notification.dismissed", "message.push.dismissed"),
        ("v15", "notification.displayed", "message.push.displayed"),
        ("v15", "notification.clicked", "message.push.clicked"),
        ("v15", "notification.dismissed", "message.push.dismissed"),
    ],
)
def test_web_push_payloads_from_browsers(env: Env, version: str, event: str, kind: str) -> None:
    builder = samples.web_push_v16_payload if version == "v16" else samples.web_push_v15_payload
    payload = builder(event)
    payload["content"] = f"unique {uuid.uuid4()}"  # a fresh content hash, so not a duplicate
    # a browser: no secret, no forwarding header, a loopback (non-allowlisted) address,
    # the no-cors text/plain content type
    r = post(
        env.client,
        WEB,
        payload,
        secret=None,
        xff=None,
        content_type="text/plain;charset=UTF-8",
        headers=[("origin", "https://shop.example")],
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "https://shop.example"
    event_id = r.json()["id"]
    # anyone can post here: the record goes to the unauthenticated topic, marked as such
    rec = next(x for x in env.records("unauthenticated") if header(x.headers, "ce_id") == event_id)
    value = orjson.loads(rec.value)
    assert value["kind"] == kind
    assert value["raw"] == payload
    assert value["app_id"] == "11111111-2222-3333-4444-555555555555"
    assert header(rec.headers, "ce_source") == "gateway:unauthenticated/web-push"
    assert header(rec.headers, "ce_authtype") == "unauthenticated"
    assert event_id not in [header(x.headers, "ce_id") for x in env.records("push")]


def test_journey_json_and_plain_text(env: Env) -> None:
    payload = samples.journey_payload()
    r = post(env.client, JOURNEY, payload)
    assert r.status_code == 200, r.text
    event_id = r.json()["id"]
    rec = next(x for x in env.records("journey") if header(x.headers, "ce_id") == event_id)
    assert orjson.loads(rec.value)["kind"] == "journey.webhook"

    marker = f"user reached step {uuid.uuid4()}"
    r = post(env.client, JOURNEY, content=marker.encode(), content_type="text/plain")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "accepted"  # an event of its own (tests/test_ingress_loss.py)
    rec = next(x for x in env.records("journey") if header(x.headers, "ce_id") == r.json()["id"])
    assert orjson.loads(rec.value)["data"] == {"text": marker}


def test_payload_without_kind_is_dead_lettered_with_its_bytes(env: Env) -> None:
    body = orjson.dumps({"hello": str(uuid.uuid4())})
    r = post(env.client, ES, content=body)
    assert r.status_code == 200
    assert r.json()["reason"] == "no-kind"
    dl = [x for x in env.dead_letters() if x.value == body]
    assert len(dl) == 1 and header(dl[0].headers, "dlq_client_ip") == EU_WEST4


def test_unknown_kinds_pass_through_or_dead_letter_as_configured(
    env: Env, broker: EmbeddedBroker
) -> None:
    event_id = str(uuid.uuid4())
    payload = samples.event_stream_payload(
        "message.push.sent", layout="flat-dotted", event_id=event_id
    )
    payload["event.kind"] = "message.push.teleported"
    r = post(env.client, ES, payload)
    assert r.status_code == 200 and r.json()["status"] == "accepted"

    prefix = unique("unk")
    config = gateway_config(
        broker.bootstrap_servers, prefix, kafka={"unknown_kinds": "dead-letter"}
    )
    with running_gateway(config) as (url, _), httpx.Client(base_url=url) as client:
        r = post(client, ES, payload)
        assert r.status_code == 200 and r.json()["reason"] == "unknown-kind"
        assert len(read_topic(broker.bootstrap_servers, f"{prefix}.dlt", expect=1)) == 1


# ---------------------------------------------------------------------------------------------
# trust: client address and secrets


def _fresh(kind: str = "message.sms.sent") -> tuple[str, dict[str, Any]]:
    event_id = str(uuid.uuid4())
    return event_id, samples.event_stream_payload(kind, event_id=event_id)


def test_forwarding_headers_from_an_untrusted_peer_are_ignored(broker: EmbeddedBroker) -> None:
    prefix = unique("untrusted")
    config = gateway_config(
        broker.bootstrap_servers, prefix, server={"trusted_proxies": ["10.9.8.7/32"]}
    )
    with running_gateway(config) as (url, _), httpx.Client(base_url=url) as client:
        _, payload = _fresh()
        r = post(client, ES, payload, xff=EU_WEST4)
        assert r.status_code == 403
        r = post(client, ES, payload, xff=None, headers=[("forwarded", f'for="{EU_WEST4}"')])
        assert r.status_code == 403


def test_ipv6_peer_and_rfc7239_forwarded(broker: EmbeddedBroker) -> None:
    prefix = unique("v6")
    config = gateway_config(broker.bootstrap_servers, prefix, server={"proxy_header": "forwarded"})
    with running_gateway(config, host="::1") as (url, _), httpx.Client(base_url=url) as client:
        assert url.startswith("http://[::1]:")
        _, payload = _fresh()
        r = post(
            client,
            ES,
            payload,
            xff=None,
            headers=[("forwarded", f'for="[{EU_WEST4_V6}]:4711";proto=https')],
        )
        assert r.status_code == 200, r.text
        (rec,) = read_topic(broker.bootstrap_servers, f"{prefix}.sms", expect=1)
        assert orjson.loads(rec.value)["received"]["client_ip"] == EU_WEST4_V6
        # X-Forwarded-For is not the configured header here: ignored, the peer ::1 is not allowed
        r = post(client, ES, _fresh()[1], xff=EU_WEST4)
        assert r.status_code == 403
        r = post(
            client,
            ES,
            _fresh()[1],
            xff=None,
            headers=[("forwarded", f"for={EU_WEST4}, for=_hidden")],
        )
        assert r.status_code == 403


# ---------------------------------------------------------------------------------------------
# duplicates


def test_concurrent_duplicates_publish_once(env: Env) -> None:
    event_id, payload = _fresh("message.push.clicked")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda _: post(env.client, ES, payload).json()["status"], range(16))
        )
    assert results.count("accepted") == 1
    assert env.all_ids().count(event_id) == 1


# ---------------------------------------------------------------------------------------------
# operations routes


def test_health_ready_metrics_openapi(env: Env) -> None:
    assert env.client.get("/healthz").json() == {"status": "alive"}
    ready = env.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["allowlist"]["ranges"] >= 17
    # the operator surface is on its own port; the webhook port does not serve it
    assert env.client.get("/metrics").status_code == 404
    assert env.client.get("/openapi.json").status_code == 404
    text = scrape(env.config)
    assert 'gateway_requests_total{outcome="accepted",source="event-stream"}' in text
    assert 'gateway_requests_total{outcome="forbidden_secret",source="event-stream"}' in text
    assert "gateway_publish_seconds_bucket" in text
    assert SECRET not in text
    doc = httpx.get(f"{operator_url(env.config)}/openapi.json").json()
    assert set(doc["paths"]) == {ES, WEB, JOURNEY}
    assert doc["components"]["securitySchemes"]["event-stream_secret"]["name"] == "authorization"

"""The ingress loss paths, end to end: a real uvicorn server on loopback, the real broker.

Every case here was a lost event before: answered 200 "duplicate" and never stored, or refused
with 4xx to an authenticated sender (OneSignal drops what it cannot deliver).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_kafka_event

from gateway.config import Config
from gateway.core import ingest as ingest_module
from gateway.core.records import header
from gateway.devkit import samples
from gateway.devkit.embedded_broker import EmbeddedBroker

from .conftest import read_topic, unique
from .ingress_helpers import EU_WEST4, SECRET, gateway_config, post, running_gateway, scrape

ES = "/v1/onesignal/events"
JOURNEY = "/v1/onesignal/journey"
WEB = "/v1/onesignal/web-push"


class Env:
    def __init__(self, broker: EmbeddedBroker, prefix: str, config: Config, url: str, metrics: Any):
        self.bootstrap = broker.bootstrap_servers
        self.prefix = prefix
        self.config = config
        self.metrics = metrics
        self.client = httpx.Client(base_url=url, timeout=30)

    def records(self, channel: str, expect: int | None = None) -> list[Any]:
        return read_topic(self.bootstrap, f"{self.prefix}.{channel}", expect=expect)

    def dead_letters(self, expect: int | None = None) -> list[Any]:
        return read_topic(self.bootstrap, f"{self.prefix}.dlt", expect=expect)

    def metric(self, name: str) -> str:
        text = scrape(self.config)
        return "\n".join(line for line in text.splitlines() if line.startswith(name))


def _config(broker: EmbeddedBroker, prefix: str, **kafka: Any) -> Config:
    return gateway_config(
        broker.bootstrap_servers,
        prefix,
        kafka=kafka,
        sources=[
            {
                "name": "event-stream",
                "path": ES,
                "format": "event-stream",
                "secrets_env": "T_SECRETS",
                "id_header": "X-Event-Id",  # validated and lowercased
            },
            {
                "name": "journey",
                "path": JOURNEY,
                "format": "journey",
                "secrets_env": "T_SECRETS",
                "user_headers": {"external_id": "x-external-id"},
            },
            {
                "name": "web-push",
                "path": WEB,
                "format": "web-push",
                "app_id": "11111111-2222-3333-4444-555555555555",
                "cors_origins": ["*"],
            },
        ],
    )


@pytest.fixture(scope="module")
def env(broker: EmbeddedBroker) -> Iterator[Env]:
    prefix = unique("loss")
    config = _config(broker, prefix)
    with running_gateway(config) as (url, metrics):
        e = Env(broker, prefix, config, url, metrics)
        yield e
        e.client.close()


def _ce(rec: Any) -> Any:
    return from_kafka_event(KafkaMessage(headers=dict(rec.headers), key=rec.key, value=rec.value))


def _click_without_id(marker: str) -> dict[str, Any]:
    # OneSignal's in-app sample template: no event.id, no user, no timestamp
    return {"event_kind": "message.iam.clicked", "iam_name": marker, "target_id": "buy"}


# ---------------------------------------------------------------------------------------------
# item 1: dedupe only on sender ids


def test_identical_bodies_without_an_id_are_two_events_marked_generated(env: Env) -> None:
    marker = str(uuid.uuid4())
    first = post(env.client, ES, _click_without_id(marker))
    second = post(env.client, ES, _click_without_id(marker))
    assert first.json()["status"] == second.json()["status"] == "accepted", second.text
    assert first.json()["id"] != second.json()["id"]
    mine = [r for r in env.records("iam") if orjson.loads(r.value)["message"].get("name") == marker]
    assert len(mine) == 2
    for rec in mine:
        assert header(rec.headers, "ce_idgenerated") == "true"
        assert _ce(rec).get_extension("idgenerated") == "true"  # an SDK reads the extension


def test_sender_ids_are_not_marked_generated(env: Env) -> None:
    event_id = str(uuid.uuid4())
    payload = samples.event_stream_payload("message.sms.sent", event_id=event_id)
    assert post(env.client, ES, payload).json()["id"] == event_id
    rec = next(r for r in env.records("sms") if header(r.headers, "ce_id") == event_id)
    assert header(rec.headers, "ce_idgenerated") is None


def test_structured_mode_carries_idgenerated_as_a_top_level_attribute(
    broker: EmbeddedBroker,
) -> None:
    prefix = unique("lossst")
    config = _config(broker, prefix, content_mode="structured")
    with running_gateway(config) as (url, _), httpx.Client(base_url=url) as client:
        r = post(client, ES, _click_without_id("structured"))
        assert r.status_code == 200, r.text
        (rec,) = read_topic(broker.bootstrap_servers, f"{prefix}.iam", expect=1)
        body = orjson.loads(rec.value)
        assert body["idgenerated"] is True and body["id"] == r.json()["id"]
        assert _ce(rec).get_extension("idgenerated") is True


def test_one_id_with_two_kinds_is_published_twice_and_counted(env: Env) -> None:
    event_id = str(uuid.uuid4())  # a template that hard-codes the id
    sent = samples.event_stream_payload("message.push.sent", event_id=event_id)
    clicked = samples.event_stream_payload("message.push.clicked", event_id=event_id)
    assert post(env.client, ES, sent).json()["status"] == "accepted"
    r = post(env.client, ES, clicked)
    assert r.json()["status"] == "accepted", r.text
    # a retry of the second one is a duplicate again
    assert post(env.client, ES, clicked).json()["status"] == "duplicate"
    kinds = sorted(
        header(rec.headers, "ce_type") or ""
        for rec in env.records("push")
        if header(rec.headers, "ce_id") == event_id
    )
    assert kinds == ["com.onesignal.message.push.clicked", "com.onesignal.message.push.sent"]
    assert 'gateway_dedupe_conflicts_total{source="event-stream"} 1.0' in env.metric(
        "gateway_dedupe_conflicts_total"
    )


def test_each_source_has_its_own_window(env: Env) -> None:
    event_id = str(uuid.uuid4())
    es = samples.event_stream_payload("message.email.opened", event_id=event_id)
    journey = {"event.id": event_id, "user.external_id": "user-7"}
    assert post(env.client, ES, es).json()["status"] == "accepted"
    r = post(env.client, JOURNEY, journey)
    assert r.json()["status"] == "accepted", r.text
    assert post(env.client, JOURNEY, journey).json()["status"] == "duplicate"
    assert post(env.client, ES, es).json()["status"] == "duplicate"


# ---------------------------------------------------------------------------------------------
# item 3: the id from a header


def test_id_header_is_the_event_id_and_wins_over_the_body(env: Env) -> None:
    header_id, body_id = str(uuid.uuid4()), str(uuid.uuid4())
    payload = samples.event_stream_payload("message.email.clicked", event_id=body_id)
    r = post(env.client, ES, payload, headers=[("x-event-id", header_id)])
    assert r.json() == {**r.json(), "status": "accepted", "id": header_id}
    # the same header id again is OneSignal's retry; the body's id alone is not
    again = post(env.client, ES, payload, headers=[("x-event-id", header_id)])
    assert again.json() == {"status": "duplicate", "id": header_id}
    rec = next(r for r in env.records("email") if header(r.headers, "ce_id") == header_id)
    assert header(rec.headers, "ce_idgenerated") is None
    assert orjson.loads(rec.value)["raw"]["Event Data"]["event.id"] == body_id  # still kept

    # an id header on an id-less body makes it deduplicable
    marker = str(uuid.uuid4())
    hid = str(uuid.uuid4())
    for expected in ("accepted", "duplicate"):
        got = post(env.client, ES, _click_without_id(marker), headers=[("x-event-id", hid)])
        assert got.json()["status"] == expected
    # an empty header is no id
    blank = post(env.client, ES, _click_without_id(marker), headers=[("x-event-id", "")])
    assert blank.json()["status"] == "accepted" and blank.json()["id"] != ""


# ---------------------------------------------------------------------------------------------
# item 2: an authenticated sender's body is kept, whatever it is


BAD_BODIES = [
    (b'{"event.kind": ', "application/json", "invalid-json"),
    (b"not json at all", "text/plain", "invalid-json"),
    (b'{"a": 1e999}', "application/json", "invalid-json"),
    (b"", "application/json", "empty-body"),
    (b"   ", "application/json", "empty-body"),
    (b"[" * 200 + b"]" * 200, "application/json", "too-deep"),
    (b'{"event.kind": "message.push.sent", "x": "\xff\xfe"}', "application/json", "invalid-utf8"),
    (b'{"a": "\\ud800"}', "application/json", "lone-surrogate"),
    (b'{"\\udc00": "x"}', "application/json", "lone-surrogate"),
    (b"event.kind=x", "application/x-www-form-urlencoded", "unsupported-media-type"),
    (b'{"a": 1}', "application/json; charset=latin-1", "unsupported-charset"),
    (b"[1, 2]", "application/json", "not-an-object"),
    (b"42", "application/json", "not-an-object"),
    (b'"a string"', "application/json", "not-an-object"),
]


@pytest.mark.parametrize(("content", "content_type", "reason"), BAD_BODIES)
def test_bad_bodies_from_authenticated_senders_are_dead_lettered_byte_for_byte(
    env: Env, content: bytes, content_type: str, reason: str
) -> None:
    r = post(env.client, ES, content=content, content_type=content_type)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "dead-lettered" and r.json()["reason"] == reason
    place = (r.json()["partition"], r.json()["offset"])
    dl = [x for x in env.dead_letters() if (x.partition, x.offset) == place]
    assert len(dl) == 1 and dl[0].value == content
    assert header(dl[0].headers, "dlq_reason") == reason
    assert header(dl[0].headers, "dlq_source") == "event-stream"
    assert header(dl[0].headers, "dlq_client_ip") == EU_WEST4


def test_the_same_bodies_on_the_web_push_source_are_still_refused(env: Env) -> None:
    for content, content_type, reason in BAD_BODIES:
        if reason in ("not-an-object",):
            continue  # parsed JSON: normalization dead-letters it, as before
        r = post(env.client, WEB, content=content, content_type=content_type, secret=None)
        assert r.status_code in (400, 415), (reason, r.text)
        assert r.json()["error"] == reason


def test_unauthenticated_and_wrong_method_requests_still_write_nothing(env: Env) -> None:
    marker = uuid.uuid4().bytes.hex().encode()
    body = b"not json " + marker
    assert post(env.client, ES, content=body, secret="wrong").status_code == 403
    assert post(env.client, ES, content=body, xff="203.0.113.7").status_code == 403
    assert env.client.request("DELETE", ES, content=body).status_code == 405
    # a later accepted dead letter proves the refused ones had their chance to be written
    proof = body + b" proof"
    r = post(env.client, ES, content=proof)
    assert r.json()["status"] == "dead-lettered"
    values = [x.value for x in env.dead_letters(expect=None)]
    assert proof in values and body not in values


def test_a_body_of_almost_a_megabyte_is_kept_and_one_over_the_limit_is_413(env: Env) -> None:
    limit = env.config.server.max_body_bytes
    assert limit == 1_048_576 - 4096
    event_id = str(uuid.uuid4())
    payload = samples.event_stream_payload("message.push.failed", event_id=event_id)
    big = orjson.dumps(payload)[:-1] + b', "pad": "' + b"x" * 900_000 + b'"}'
    r = post(env.client, ES, content=big)
    assert r.status_code == 200 and r.json()["status"] == "accepted", r.text[:300]
    # at the limit but invalid JSON: dead-lettered whole
    edge = b"{" + b"y" * (limit - 1)
    r = post(env.client, ES, content=edge)
    assert r.status_code == 200 and r.json()["reason"] == "invalid-json", r.text[:300]
    place = (r.json()["partition"], r.json()["offset"])
    dl = [x for x in env.dead_letters() if (x.partition, x.offset) == place]
    assert [x.value for x in dl] == [edge]
    # one byte over: refused from the declared length, before a byte of the body is read (sent
    # on a raw socket: a client writing a whole 1 MiB body could meet the close as a reset)
    port = int(str(env.client.base_url).rstrip("/").rsplit(":", 1)[1])
    head = (
        f"POST {ES} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {SECRET}\r\n"
        f"X-Forwarded-For: {EU_WEST4}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {limit + 1}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_a_normalized_record_over_the_producer_limit_is_dead_lettered(env: Env) -> None:
    # numbers grow when re-serialized (1e15 -> 1000000000000000.0), and the title is stored
    # three times (raw, title, title_by_language): a body under the limit, a record over it
    title = "t" * 400_000
    body = orjson.dumps({"event.kind": "message.push.sent", "message.title": title})
    body = body[:-1] + b', "n": [' + b",".join([b"1e15"] * 20_000) + b"]}"
    assert len(body) < env.config.server.max_body_bytes
    r = post(env.client, ES, content=body)
    assert r.status_code == 200 and r.json()["reason"] == "record-too-large", r.text[:300]


def test_a_failure_inside_normalization_dead_letters_the_bytes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in normalization")

    # the server runs in this process: the route calls the patched function
    monkeypatch.setattr(ingest_module, "normalize_for_source", broken)
    body = orjson.dumps(samples.event_stream_payload("message.sms.sent", event_id="x-bug"))
    r = post(env.client, ES, content=body)
    assert r.status_code == 200 and r.json()["reason"] == "internal-error", r.text
    monkeypatch.undo()

    def broken_record(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug in record building")

    monkeypatch.setattr(ingest_module, "build_record", broken_record)
    r = post(env.client, ES, content=body)
    assert r.status_code == 200 and r.json()["reason"] == "internal-error", r.text
    monkeypatch.undo()
    dl = [x for x in env.dead_letters() if x.value == body]
    assert len(dl) == 2
    assert all(header(x.headers, "dlq_reason") == "internal-error" for x in dl)
    assert "RuntimeError" in (header(dl[0].headers, "dlq_detail") or "") + (
        header(dl[1].headers, "dlq_detail") or ""
    )


# ---------------------------------------------------------------------------------------------
# item 5: plain-text Journey bodies are events


def test_journey_text_is_an_event_keyed_by_the_query_user(env: Env) -> None:
    text = f'user reached step "{uuid.uuid4()}"\nwith a newline and {{ an unset tag }}'
    r = env.client.post(
        f"{JOURNEY}?external_id=user-42&onesignal_id=",
        content=text.encode(),
        headers={
            "content-type": "text/plain",
            "authorization": f"Bearer {SECRET}",
            "x-forwarded-for": EU_WEST4,
        },
    )
    assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
    rec = next(x for x in env.records("journey") if header(x.headers, "ce_id") == r.json()["id"])
    value = orjson.loads(rec.value)
    assert value["kind"] == "journey.webhook.text" and value["channel"] == "journey"
    assert value["data"] == {"text": text} and value["raw"] == text
    assert value["user"] == {"external_id": "user-42"}
    assert rec.key == b"user-42"
    assert header(rec.headers, "ce_type") == "com.onesignal.journey.webhook.text"
    assert header(rec.headers, "ce_idgenerated") == "true"


def test_journey_text_from_a_header_user_and_unkeyed(env: Env) -> None:
    r = post(
        env.client,
        f"{JOURNEY}?external_id=from-query",
        content=b"42",  # parses as JSON, but was sent as text: it is text
        content_type="text/plain",
        headers=[("x-external-id", "from-header")],
    )
    assert r.json()["status"] == "accepted", r.text
    r2 = post(env.client, JOURNEY, content=b"42", content_type="text/plain")
    assert r2.json()["status"] == "accepted" and r2.json()["id"] != r.json()["id"]
    got = {header(x.headers, "ce_id"): x for x in env.records("journey")}
    assert got[r.json()["id"]].key == b"from-header"
    assert got[r2.json()["id"]].key is None
    assert orjson.loads(got[r2.json()["id"]].value)["data"] == {"text": "42"}

"""ingest(): one body from one source decided, with no I/O: publish, dead-letter or refuse.

The ingress route and replay both call it; here each branch is held on its own, and the
real-broker tests (test_ingress.py, test_ingress_loss.py, test_ops.py) hold it end to end.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.core import ingest as ingest_module
from gateway.core.event import Received
from gateway.core.ingest import DeadLetter, Publish, Refuse, Source, ingest
from gateway.core.records import header
from gateway.devkit import samples
from gateway.ingress.sources import ingest_source

RECEIVED = Received(source="es", at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), client_ip="1.2.3.4")
ES = Source(
    name="es",
    format="event-stream",
    topic_template="t.{channel}",
    dead_letter_topic="t.dlt",
    max_record_bytes=1_000_000,
)
WEB = Source(
    name="web",
    format="web-push",
    topic_template="t.{channel}",
    dead_letter_topic="t.dlt",
    max_record_bytes=1_000_000,
    dead_letter_every_body=False,
)
JOURNEY = Source(
    name="j",
    format="journey",
    topic_template="t.{channel}",
    dead_letter_topic="t.dlt",
    max_record_bytes=1_000_000,
)


def decide(body: bytes, source: Source = ES, **kw: Any) -> Any:
    kw.setdefault("content_type", "application/json")
    kw.setdefault("fresh_id", lambda: "fresh")
    return ingest(body, source, RECEIVED, **kw)


def test_a_body_with_a_kind_is_published_on_its_channel() -> None:
    payload = samples.event_stream_payload("message.email.opened", event_id="e-1")
    decision = decide(orjson.dumps(payload))
    assert isinstance(decision, Publish)
    assert decision.event.id == "e-1" and decision.event.deduplicate
    assert decision.record.topic == "t.email"
    assert header(decision.record.headers, "ce_id") == "e-1"


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b'{"event.kind": ', "application/json", "invalid-json"),
        (b"", "application/json", "empty-body"),
        (b"a=b", "application/x-www-form-urlencoded", "unsupported-media-type"),
        (b'{"hello": 1}', "application/json", "no-kind"),
        (b"[1]", "application/json", "not-an-object"),
        (b"plain", "text/plain", "invalid-json"),
    ],
)
def test_what_an_authenticated_sender_sent_is_dead_lettered_byte_for_byte(
    body: bytes, content_type: str, reason: str
) -> None:
    decision = decide(body, content_type=content_type, header_id="hid-1")
    assert isinstance(decision, DeadLetter) and decision.reason == reason
    assert decision.error is None
    rec = decision.record
    assert rec.topic == "t.dlt" and rec.value == body
    assert header(rec.headers, "dlq_reason") == reason
    assert header(rec.headers, "dlq_source") == "es"
    assert header(rec.headers, "dlq_event_id") == "hid-1"  # replay reads the id from here


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'{"event": ', "application/json", 400, "invalid-json"),
        (b"a=b", "application/x-www-form-urlencoded", 415, "unsupported-media-type"),
    ],
)
def test_a_source_anyone_can_post_to_refuses_what_it_cannot_decode(
    body: bytes, content_type: str, status: int, code: str
) -> None:
    decision = decide(body, WEB, content_type=content_type)
    assert isinstance(decision, Refuse)
    assert (decision.status, decision.code) == (status, code) and decision.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"no": "event"}',
        b'{"event": "message.email.bounced", "notificationId": "n"}',
        b'{"event": "notification.Snoozed"}',
        b"[1, 2]",
    ],
)
def test_a_web_push_body_that_decodes_but_is_no_web_sdk_event_is_refused(body: bytes) -> None:
    # nobody vouches for the sender: nothing of it goes anywhere, not even the dead letters
    decision = decide(body, WEB, content_type="text/plain")
    assert isinstance(decision, Refuse) and decision.status == 400
    assert decision.code in ("not-a-web-sdk-event", "not-an-object") and decision.message


def test_the_same_body_from_a_source_with_a_secret_is_dead_lettered() -> None:
    decision = decide(b'{"no": "event"}', ES, content_type="application/json")
    assert isinstance(decision, DeadLetter) and decision.reason == "no-kind"


def test_a_plain_text_journey_body_is_an_event_keyed_by_the_given_user() -> None:
    decision = decide(
        b"reached step 3", JOURNEY, content_type="text/plain", user={"external_id": "u"}
    )
    assert isinstance(decision, Publish)
    assert decision.event.kind == "journey.webhook.text"
    assert decision.event.id == "fresh" and not decision.event.deduplicate
    assert decision.record.key == b"u"


def test_an_unknown_kind_is_dead_lettered_only_when_configured() -> None:
    payload = {"event.kind": "message.push.teleported", "event.id": "e-2"}
    assert isinstance(decide(orjson.dumps(payload)), Publish)
    strict = dataclasses.replace(ES, unknown_kinds="dead-letter")
    decision = decide(orjson.dumps(payload), strict)
    assert isinstance(decision, DeadLetter) and decision.reason == "unknown-kind"


def test_a_record_over_the_producer_limit_is_dead_lettered() -> None:
    payload = samples.event_stream_payload("message.push.sent", event_id="e-3")
    small = dataclasses.replace(ES, max_record_bytes=100)
    decision = decide(orjson.dumps(payload), small)
    assert isinstance(decision, DeadLetter) and decision.reason == "record-too-large"
    assert "kafka.max_request_size (100)" in decision.detail


def test_a_bug_dead_letters_the_bytes_and_carries_the_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ingest_module, "build_record", broken)
    body = orjson.dumps(samples.event_stream_payload("message.sms.sent", event_id="e-4"))
    decision = decide(body)
    assert isinstance(decision, DeadLetter) and decision.reason == "internal-error"
    assert isinstance(decision.error, RuntimeError)
    assert decision.detail.startswith("RuntimeError in the gateway")
    assert decision.record.value == body


@given(st.binary(max_size=200), st.sampled_from(["application/json", "text/plain", "", "x/y"]))
def test_an_authenticated_source_never_refuses(body: bytes, content_type: str) -> None:
    for source in (ES, JOURNEY):
        decision = decide(body, source, content_type=content_type)
        assert isinstance(decision, Publish | DeadLetter)
        if isinstance(decision, DeadLetter):
            assert decision.record.value == body


def test_the_view_of_a_configured_source_carries_the_settings_that_decide() -> None:
    cfg = parse_config(
        {
            "server": {"max_json_depth": 20},
            "kafka": {
                "topic": "x.{channel}",
                "dead_letter_topic": "x.dlt",
                "unknown_kinds": "dead-letter",
                "content_mode": "structured",
                "unauthenticated_topic": "x.anyone",
            },
            "sources": [
                {
                    "name": "w",
                    "path": "/w",
                    "format": "web-push",
                    "cors_origins": ["*"],
                    "app_id": "a",
                    "mapping": {"kind": "/k"},
                }
            ],
        },
        env={},
    )
    view = ingest_source(cfg, cfg.sources[0])
    assert view == Source(
        name="w",
        format="web-push",
        topic_template="x.{channel}",
        dead_letter_topic="x.dlt",
        max_record_bytes=cfg.kafka.max_request_size,
        max_json_depth=20,
        unknown_kinds="dead-letter",
        content_mode="structured",
        app_id="a",
        mapping={"kind": "/k"},
        dead_letter_every_body=cfg.sources[0].require_secret,
        unauthenticated_topic="x.anyone",
    )

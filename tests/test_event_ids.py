"""Event ids, plain-text Journey bodies, dead-letter headers and the body limit: the pure parts.

The end-to-end cases are in tests/test_ingress_loss.py.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import RECORD_HEADROOM_BYTES, ConfigError, SourceConfig, parse_config
from gateway.core.body import BadRequest, TextBody, decode_body
from gateway.core.event import NormalizationError, Received
from gateway.core.normalize import JOURNEY_TEXT_KIND, normalize_for_source
from gateway.core.records import build_dead_letter, build_record, decode_record, header, record_size
from gateway.tagsync.rules import compile_rules, derive

ES = SourceConfig(name="es", path="/es", format="event-stream", require_secret=False)
JOURNEY = SourceConfig(name="j", path="/j", format="journey", require_secret=False)
WEB = SourceConfig(name="w", path="/w", format="web-push", require_secret=False)
RECEIVED = Received(source="es", at=datetime(2026, 1, 2, tzinfo=UTC), client_ip="34.90.12.34")


def _ids() -> Any:
    counter = itertools.count()
    return lambda: f"fresh-{next(counter)}"


def _norm(payload: Any, source: SourceConfig = ES, **kw: Any) -> Any:
    return normalize_for_source(payload, source, unknown_kinds="publish", fresh_id=_ids(), **kw)


# ---------------------------------------------------------------------------------------------
# ids


def test_a_body_without_an_id_gets_a_fresh_one_and_is_not_deduplicated() -> None:
    ev = _norm({"event_kind": "message.iam.clicked"})
    assert (ev.id, ev.id_from_payload, ev.deduplicate) == ("fresh-0", False, False)


def test_a_body_id_is_the_sender_id() -> None:
    ev = _norm({"event.kind": "message.push.sent", "event.id": "e-1"})
    assert (ev.id, ev.id_from_payload, ev.deduplicate) == ("e-1", True, True)


def test_the_header_id_wins_over_the_body_id() -> None:
    payload = {"event.kind": "message.push.sent", "event.id": "body-id"}
    ev = _norm(payload, header_id=" header-id ")
    assert (ev.id, ev.id_from_payload, ev.deduplicate) == ("header-id", True, True)
    assert ev.raw == payload  # the body's id is still in raw
    assert _norm(payload, header_id="  ").id == "body-id"  # blank is no id


def test_web_push_keeps_its_content_hash_only_with_a_subscription() -> None:
    body = {"event": "notification.clicked", "notificationId": "n-1", "content": "hi"}
    without = _norm(body, WEB)
    assert (without.id, without.deduplicate) == ("fresh-0", False)
    with_sub = _norm({**body, "subscriptionId": "s-1"}, WEB)
    assert with_sub.deduplicate and with_sub.id == _norm({**body, "subscriptionId": "s-1"}, WEB).id


@given(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4))
def test_only_sender_ids_are_ever_deduplicated(extra: dict[str, str]) -> None:
    ev = _norm({"event_kind": "message.sms.sent", **extra})
    assert ev.deduplicate == ev.id_from_payload
    assert ev.deduplicate or ev.id.startswith("fresh-")


# ---------------------------------------------------------------------------------------------
# records


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_generated_ids_are_marked_in_both_content_modes(mode: str) -> None:
    for payload, generated in (
        ({"event_kind": "message.iam.clicked"}, True),
        ({"event_kind": "message.iam.clicked", "event_id": "e-9"}, False),
    ):
        rec = build_record(
            _norm(payload), RECEIVED, topic_template="t.{channel}", source_name="es",
            content_mode=mode,
        )  # fmt: skip
        attrs, _ = decode_record(rec.headers, rec.value)
        assert attrs.get("idgenerated") == ("true" if generated else None)
        if mode == "structured":
            assert ("idgenerated" in orjson.loads(rec.value)) is generated


def test_dead_letter_headers_are_capped_and_never_fail_on_odd_text() -> None:
    rec = build_dead_letter(
        topic="dlt",
        reason="internal-error",
        detail="ValueError: \ud800" + "x" * 10_000,  # an exception may quote a lone surrogate
        body=b"\xff" * 10,
        source_name="es",
        received=RECEIVED,
        content_type="text/plain; " + "p" * 5000,
        extra_headers=[("dlq_event_id", b"i" * 5000)],
    )
    assert rec.value == b"\xff" * 10
    assert sum(len(k) + len(v) for k, v in rec.headers) < RECORD_HEADROOM_BYTES // 2
    assert (header(rec.headers, "dlq_detail") or "").startswith("ValueError: \\ud800")
    assert record_size(rec) <= len(rec.value) + RECORD_HEADROOM_BYTES


# ---------------------------------------------------------------------------------------------
# plain-text Journey bodies


def test_text_bodies_come_back_as_text_only_when_sent_as_text() -> None:
    for body in (b"hello", b"42", b'"quoted"', b"[1]", b"\\ud800 and [[["):
        got = decode_body(body, "text/plain", max_depth=8, allow_text=True)
        assert isinstance(got, TextBody) and got == body.decode()
    assert decode_body(b'{"a": 1}', "text/plain", max_depth=8, allow_text=True) == {"a": 1}
    # as JSON, a string is a JSON value, not text, and a lone surrogate is its own reason
    assert not isinstance(
        decode_body(b'"s"', "application/json", max_depth=8, allow_text=True), TextBody
    )
    with pytest.raises(BadRequest) as exc:
        decode_body(b'{"a": "\\ud800"}', "application/json", max_depth=8, allow_text=True)
    assert exc.value.code == "lone-surrogate"


def test_a_journey_text_body_is_an_event_keyed_by_the_given_user() -> None:
    text = TextBody('step "reached"\n')
    ev = _norm(text, JOURNEY, user={"external_id": "u-1", "onesignal_id": ""})
    assert (ev.kind, ev.channel, ev.action) == (JOURNEY_TEXT_KIND, "journey", "webhook.text")
    assert ev.data == {"text": text} and ev.raw == text
    assert ev.user == {"external_id": "u-1"} and ev.subject == "u-1"
    assert (ev.id, ev.deduplicate) == ("fresh-0", False)
    assert _norm(text, JOURNEY).subject is None  # unkeyed
    with_id = _norm(text, JOURNEY, header_id="h-1")
    assert (with_id.id, with_id.deduplicate) == ("h-1", True)
    with pytest.raises(NormalizationError) as exc:
        _norm(text, ES)
    assert exc.value.reason == "not-json"
    # a JSON string value is not a text body
    with pytest.raises(NormalizationError) as exc:
        _norm("just a string", JOURNEY)
    assert exc.value.reason == "not-an-object"


def test_tag_rules_take_journey_text_events_in_their_stride() -> None:
    from gateway.config import TagRule

    rules = compile_rules(
        (
            TagRule(kinds=("journey.*",), tags={"journey_step": "{data.text}"}),
            TagRule(kinds=("journey.webhook.text",), tags={"x": "{raw.field}"}),
        )
    )
    ev = _norm(TextBody("step-3"), JOURNEY, user={"external_id": "u-1"})
    value = orjson.loads(
        build_record(ev, RECEIVED, topic_template="t.{channel}", source_name="j").value
    )
    out = derive(rules, value)
    assert out.tags == {"journey_step": "step-3"}  # raw.field on a text raw is a skip


# ---------------------------------------------------------------------------------------------
# config


def _cfg(**sections: Any) -> Any:
    return parse_config(sections, env={"S": "secret-of-16-chars"})


def test_the_body_limit_must_fit_the_producer_request_with_headroom() -> None:
    cfg = _cfg()
    assert cfg.server.max_body_bytes + RECORD_HEADROOM_BYTES == cfg.kafka.max_request_size
    assert cfg.kafka.max_request_size <= 1_048_588  # Kafka's default message.max.bytes
    with pytest.raises(ConfigError) as exc:
        _cfg(server={"max_body_bytes": 1_048_576})
    assert exc.value.key == "server.max_body_bytes" and "kafka.max_request_size" in str(exc.value)
    ok = _cfg(server={"max_body_bytes": 2_000_000}, kafka={"max_request_size": 2_004_096})
    assert ok.server.max_body_bytes == 2_000_000


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("x event id", "not an HTTP header name"),
        ("", None),
        ("Host", "cannot send"),
        ("x-onesignal-event-id", "cannot send"),
        ("content-type", "carries something else"),
        ("authorization", "carries something else"),  # the secret header
        ("X-Event-Id", None),
    ],
)
def test_id_header_is_validated(value: str, problem: str | None) -> None:
    source = {"name": "es", "path": "/es", "format": "event-stream", "secrets_env": "S"}
    if problem is None:
        cfg = _cfg(sources=[{**source, "id_header": value}])
        assert cfg.sources[0].id_header == value.lower()
        return
    with pytest.raises(ConfigError) as exc:
        _cfg(sources=[{**source, "id_header": value}])
    assert exc.value.key == "sources[0].id_header" and problem in str(exc.value)


def test_user_headers_are_journey_only_and_name_known_fields() -> None:
    source = {"name": "j", "path": "/j", "format": "journey", "secrets_env": "S"}
    cfg = _cfg(sources=[{**source, "user_headers": {"external_id": "X-User"}}])
    assert cfg.sources[0].user_headers == {"external_id": "x-user"}
    with pytest.raises(ConfigError, match=r"sources\[0\]\.user_headers\.tags"):
        _cfg(sources=[{**source, "user_headers": {"tags": "x-tags"}}])
    with pytest.raises(ConfigError, match=r"sources\[0\]\.user_headers: only applies"):
        _cfg(sources=[{**source, "format": "event-stream", "user_headers": {"external_id": "x"}}])

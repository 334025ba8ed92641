"""The published contract (gateway.core.schema) against the records the code really builds."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core import schema
from gateway.core.event import Received
from gateway.core.ingest import DeadLetter, Publish, Refuse, Source, ingest
from gateway.core.kinds import EVENT_STREAM_KINDS
from gateway.core.normalize import normalize
from gateway.core.records import build_dead_letter, build_record
from gateway.devkit import samples

from .contract import NOT_OURS, check_record

RECEIVED = Received(
    source="event-stream", at=datetime(2026, 12, 1, 12, 0, tzinfo=UTC), client_ip="34.90.0.1"
)
ALL = (
    schema.event_schema,
    schema.binary_headers_schema,
    schema.structured_schema,
    schema.dead_letter_headers_schema,
)


def _record(payload: Any, fmt: str = "event-stream", mode: str = "binary") -> Any:
    event = normalize(payload, fmt=fmt)
    return build_record(
        event,
        RECEIVED,
        topic_template="onesignal.{channel}",
        source_name="event-stream",
        content_mode=mode,
    )


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("strict", [False, True])
def test_each_schema_is_valid_draft_2020_12(make: Any, strict: bool) -> None:
    doc = make(strict=strict)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(doc)
    assert json.loads(json.dumps(doc)) == doc  # plain JSON, printable by `gateway schema`


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("layout", samples.LAYOUTS)
@pytest.mark.parametrize("kind", sorted(EVENT_STREAM_KINDS))
def test_every_sample_kind_and_layout_fits_the_strict_schema(
    kind: str, layout: str, mode: str
) -> None:
    r = _record(samples.event_stream_payload(kind, layout=layout), mode=mode)
    assert check_record(r.headers, r.value) == []


@pytest.mark.parametrize(
    ("payload", "fmt"),
    [
        (samples.journey_payload(), "journey"),
        (samples.web_push_v16_payload("notification.clicked"), "web-push"),
        (samples.web_push_v15_payload("notification.displayed"), "web-push"),
    ],
)
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_journey_and_web_push_records_fit(payload: Any, fmt: str, mode: str) -> None:
    r = _record(payload, fmt=fmt, mode=mode)
    assert check_record(r.headers, r.value) == []


def test_every_record_carries_the_dataschema_attribute() -> None:
    r = _record(samples.event_stream_payload("message.push.clicked"))
    assert (("ce_dataschema", schema.DATASCHEMA.encode())) in r.headers
    s = _record(samples.event_stream_payload("message.push.clicked"), mode="structured")
    assert orjson.loads(s.value)["dataschema"] == schema.DATASCHEMA


def test_a_dead_letter_fits() -> None:
    dl = build_dead_letter(
        topic="onesignal.dead-letter",
        reason="invalid-json",
        detail="Expecting value: line 1 column 1 (char 0)",
        body=b"\xff not json",
        source_name="event-stream",
        received=RECEIVED,
        content_type="application/json",
    )
    assert check_record(dl.headers, dl.value) == []


def test_the_strict_schemas_refuse_what_the_contract_does_not_say() -> None:
    r = _record(samples.event_stream_payload("message.email.bounced"))
    value = orjson.loads(r.value)
    for broken, why in [
        ({**value, "new_field": 1}, "an undocumented field"),
        ({k: v for k, v in value.items() if k != "received"}, "a missing field"),
        ({**value, "occurred_at": "yesterday"}, "a time that is not RFC 3339"),
        ({**value, "user": {**value["user"], "onesignal_id": 42}}, "a number id"),
        ({**value, "kind": "clicked"}, "a kind without a channel"),
    ]:
        assert check_record(r.headers, orjson.dumps(broken)), why
    headers = [(k, v) for k, v in r.headers if k != "ce_dataschema"]
    assert check_record(headers, r.value), "a record without dataschema"
    headers = [(k, b"com.onesignal" if k == "ce_type" else v) for k, v in r.headers]
    assert check_record(headers, r.value), "a type outside com.onesignal.*"
    # a test marks on purpose what it forges; the audit leaves those alone
    assert check_record([*r.headers, NOT_OURS], b"{") is None


def test_the_published_schema_is_open_to_later_minor_versions() -> None:
    r = _record(samples.event_stream_payload("message.sms.delivered"))
    value = {**orjson.loads(r.value), "added_in_1_1": "x"}
    jsonschema.Draft202012Validator(schema.event_schema()).validate(value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema.event_schema(strict=True)).validate(value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_field_names = st.sampled_from(
    [
        "event",
        "kind",
        "id",
        "user",
        "external_id",
        "onesignal_id",
        "subscription",
        "message",
        "title",
        "contents",
        "tags",
        "timestamp",
        "app_id",
        "url",
        "device_type",
        "token",
    ]
)


def _source(fmt: str, mode: str) -> Source:
    return Source(
        name=fmt,
        format=fmt,
        topic_template="onesignal.{channel}",
        dead_letter_topic="onesignal.dead-letter",
        max_record_bytes=1048576,
        content_mode=mode,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(_field_names | st.text(max_size=8), _json, max_size=8),
    st.sampled_from(["event-stream", "journey", "web-push"]),
    st.sampled_from(["binary", "structured"]),
)
def test_whatever_a_body_becomes_fits_the_contract(
    payload: dict[str, Any], fmt: str, mode: str
) -> None:
    # the ingress's own decision, bytes in: a published record or a dead letter, both checked
    body = json.dumps(payload).encode()
    decision = ingest(
        body, _source(fmt, mode), RECEIVED, content_type="application/json", fresh_id=lambda: "f-1"
    )
    if isinstance(decision, Refuse):
        return  # a 4xx from a source without a secret: nothing is written
    assert isinstance(decision, Publish | DeadLetter)
    r = decision.record
    assert check_record(r.headers, r.value) == []

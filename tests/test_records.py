"""CloudEvents records: what the ingress builds, the decoder (tag sync, replay) reads back."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_kafka_event

from gateway.core.event import NormalizedEvent, Received
from gateway.core.records import build_dead_letter, build_record, decode_record, header

RECEIVED = Received(
    source="event-stream", at=datetime(2026, 1, 2, 3, 4, 5, 600000, UTC), client_ip="34.90.1.2"
)


def _event(**kw: object) -> NormalizedEvent:
    base: dict[str, object] = dict(
        id="6a0c9b2e-0000-4000-8000-000000000001",
        kind="message.email.bounced",
        channel="email",
        action="bounced",
        app_id="app-1",
        occurred_at=datetime(2024, 2, 21, 23, 45, 15, tzinfo=UTC),
        user={"external_id": "user/42", "onesignal_id": "os-1"},
        raw={"event.kind": "message.email.hardbounced", "n": 1},
    )
    base.update(kw)
    return NormalizedEvent(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_round_trip_in_both_modes(mode: str) -> None:
    rec = build_record(
        _event(), RECEIVED, topic_template="os.{channel}", source_name="es", content_mode=mode
    )
    assert rec.topic == "os.email"
    assert rec.key == b"os-1"  # onesignal_id first
    attrs, value = decode_record(rec.headers, rec.value)
    assert attrs["id"] == "6a0c9b2e-0000-4000-8000-000000000001"
    assert attrs["type"] == "com.onesignal.message.email.bounced"
    assert attrs["source"] == "onesignal:app/app-1"
    assert attrs["subject"] == "os-1"
    assert attrs["time"] == "2024-02-21T23:45:15Z"
    assert value["received"] == {
        "source": "event-stream",
        "at": "2026-01-02T03:04:05.600000Z",
        "client_ip": "34.90.1.2",
    }
    assert value["raw"] == {"event.kind": "message.email.hardbounced", "n": 1}
    ce = from_kafka_event(KafkaMessage(headers=dict(rec.headers), key=rec.key, value=rec.value))
    assert ce.get_id() == attrs["id"] and ce.get_subject() == "os-1"


def test_subject_falls_back_to_external_id_then_subscription_and_time_is_optional() -> None:
    rec = build_record(
        _event(user={"external_id": "u"}, occurred_at=None),
        RECEIVED,
        topic_template="t.{channel}",
        source_name="es",
    )
    assert rec.key == b"u" and header(rec.headers, "ce_time") is None
    rec = build_record(
        _event(user={}, subscription={"id": "sub"}, app_id=None),
        RECEIVED,
        topic_template="t.{channel}",
        source_name="web",
    )
    assert rec.key == b"sub" and header(rec.headers, "ce_source") == "gateway:source/web"
    rec = build_record(_event(user={}), RECEIVED, topic_template="t.{channel}", source_name="es")
    assert rec.key is None and header(rec.headers, "ce_subject") is None


def test_foreign_records_are_refused_by_the_decoder() -> None:
    with pytest.raises(ValueError, match="not a CloudEvent"):
        decode_record([("content-type", b"application/json")], b"{}")
    with pytest.raises(ValueError):
        decode_record([("content-type", b"application/cloudevents+json")], b'{"data": 3}')
    with pytest.raises(ValueError):
        decode_record([], None)
    with pytest.raises(orjson.JSONDecodeError):
        decode_record([("ce_specversion", b"1.0")], b"not json")


def test_dead_letter_keeps_the_bytes_and_says_why() -> None:
    rec = build_dead_letter(
        topic="dlt",
        reason="no-kind",
        detail="x" * 5000,
        body=b"\x00raw",
        source_name="es",
        received=RECEIVED,
        content_type="text/plain",
    )
    assert rec.value == b"\x00raw"
    assert header(rec.headers, "dlq_reason") == "no-kind"
    assert len(header(rec.headers, "dlq_detail") or "") == 1000
    assert header(rec.headers, "dlq_client_ip") == "34.90.1.2"


def test_cached_partitioner_agrees_with_kafka_pythons_default() -> None:
    from kafka.partitioner.default import DefaultPartitioner

    from gateway.kafka.producer import KeyHashCachePartitioner

    class Cluster:
        def __init__(self, n: int) -> None:
            self.parts = set(range(n))

        def topics(self) -> set[str]:
            return {"t"}

        def partitions_for_topic(self, topic: str) -> set[int]:
            return self.parts

        def available_partitions_for_topic(self, topic: str) -> set[int]:
            return self.parts

    ours, theirs = KeyHashCachePartitioner(), DefaultPartitioner()
    for n in (1, 3, 4, 12, 50):
        cluster = Cluster(n)
        for i in range(300):
            key = f"user-{i}-\u00e9".encode()
            for _ in range(2):  # the second call is answered from the cache
                assert ours.partition("t", None, key, None, b"", cluster) == theirs.partition(
                    "t", None, key, None, b"", cluster
                )


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_an_unauthenticated_event_says_so_in_its_attributes_source_and_topic(mode: str) -> None:
    rec = build_record(
        _event(kind="message.push.clicked", channel="push", action="clicked"),
        RECEIVED,
        topic_template="os.{channel}",
        source_name="web-push",
        content_mode=mode,
        authenticated=False,
        unauthenticated_topic="os.unauthenticated",
    )
    assert rec.topic == "os.unauthenticated"
    attrs, _ = decode_record(rec.headers, rec.value)
    assert attrs["authtype"] == "unauthenticated"
    # never the app's source: a consumer keyed on onesignal:app/... does not see it
    assert attrs["source"] == "gateway:unauthenticated/web-push"
    if mode == "binary":
        assert header(rec.headers, "ce_authtype") == "unauthenticated"
    else:
        assert orjson.loads(rec.value)["authtype"] == "unauthenticated"
    # any CloudEvents SDK reads the extension attribute
    sdk = from_kafka_event(KafkaMessage(headers=dict(rec.headers), key=rec.key, value=rec.value))
    assert sdk.get_extension("authtype") == "unauthenticated"


def test_without_an_unauthenticated_topic_the_channel_topic_is_used_still_marked() -> None:
    rec = build_record(
        _event(), RECEIVED, topic_template="os.{channel}", source_name="w", authenticated=False
    )
    assert rec.topic == "os.email"
    assert header(rec.headers, "ce_authtype") == "unauthenticated"


def test_an_authenticated_event_carries_no_authtype() -> None:
    rec = build_record(_event(), RECEIVED, topic_template="os.{channel}", source_name="es")
    attrs, _ = decode_record(rec.headers, rec.value)
    assert "authtype" not in attrs
    assert attrs["source"] == "onesignal:app/app-1"

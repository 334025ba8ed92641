"""CloudEvents 1.0 Kafka records: build them (ingress) and read them back (tag sync, replay).

Binary content mode (default): the attributes are ``ce_*`` headers and the value is the
normalized event as JSON, ``content-type: application/json``. Structured mode: the value is
the whole CloudEvent as JSON, ``content-type: application/cloudevents+json``. Both follow the
CloudEvents Kafka protocol binding, so any CloudEvents SDK reads them.

An event whose sender gave no id carries the extension attribute ``idgenerated`` (``true``):
its ``id`` is a fresh UUID made by the gateway, so two records with it are two events, and a
consumer must not look for OneSignal's retries by it. (CloudEvents extension names are
lowercase letters and digits only: no ``id_generated``.)

An event from a source without a secret (web push: anyone can post to it) carries the
extension attribute ``authtype`` with the value ``unauthenticated`` (the attribute and value of
the CloudEvents Auth Context extension), a ``source`` of its own
(``gateway:unauthenticated/<source name>``, never the app's ``onesignal:app/...``), and goes to
the unauthenticated topic when one is configured: nothing it says is OneSignal's word.
Records of sources with a secret carry no ``authtype``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from gateway.core.event import NormalizedEvent, Received, rfc3339
from gateway.core.schema import DATASCHEMA

__all__ = [
    "UNAUTHENTICATED",
    "KafkaRecord",
    "build_dead_letter",
    "build_record",
    "decode_record",
    "header",
    "record_size",
    "with_attributes",
]

# the Auth Context extension's value for "no principal proved itself"
UNAUTHENTICATED = "unauthenticated"

# Caps on what a dead letter's headers may hold, so that they stay well inside
# config.RECORD_HEADROOM_BYTES whatever the request carried.
_MAX_DETAIL_BYTES = 1000
_MAX_CONTENT_TYPE_BYTES = 200
_MAX_HEADER_BYTES = 256
# The record batch framing and per-record varints kafka-python counts (at most ~100 bytes).
_RECORD_FRAMING_BYTES = 128

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers


def _dumps(obj: Any) -> bytes:
    # OPT_NON_STR_KEYS: raw payloads may hold int keys after mapping; never fail on them.
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def build_record(
    event: NormalizedEvent,
    received: Received,
    *,
    topic_template: str,
    source_name: str,
    content_mode: str = "binary",
    authenticated: bool = True,
    unauthenticated_topic: str = "",
) -> KafkaRecord:
    """The Kafka record for one normalized event, keyed by its user.

    ``authenticated`` False: the sender proved nothing (see the module docstring); the record
    goes to ``unauthenticated_topic`` when it is set, else to its channel's topic.
    """
    if not authenticated and unauthenticated_topic:
        topic = unauthenticated_topic
    else:
        topic = topic_template.format(channel=event.channel or "unknown")
    subject = event.subject
    key = subject.encode() if subject else None
    value = event.to_value(received)
    attrs: dict[str, str] = {
        "specversion": "1.0",
        "id": event.id,
        "type": event.ce_type,
        "source": (
            event.ce_source(source_name)
            if authenticated
            else f"gateway:{UNAUTHENTICATED}/{source_name}"
        ),
        "dataschema": DATASCHEMA,
    }
    if subject:
        attrs["subject"] = subject
    if value["occurred_at"] is not None:
        attrs["time"] = value["occurred_at"]
    if not authenticated:
        attrs["authtype"] = UNAUTHENTICATED
    generated = not event.id_from_payload
    if content_mode == "structured":
        body: dict[str, Any] = {**attrs}
        if generated:
            body["idgenerated"] = True  # a CloudEvents Boolean in the JSON format
        body.update(datacontenttype="application/json", data=value)
        return KafkaRecord(
            topic=topic,
            key=key,
            value=_dumps(body),
            headers=[("content-type", b"application/cloudevents+json")],
        )
    headers: Headers = [(f"ce_{k}", v.encode()) for k, v in attrs.items()]
    if generated:
        headers.append(("ce_idgenerated", b"true"))
    headers.append(("content-type", b"application/json"))
    return KafkaRecord(topic=topic, key=key, value=_dumps(value), headers=headers)


def with_attributes(record: KafkaRecord, attributes: Mapping[str, str]) -> KafkaRecord:
    """``record`` with more CloudEvents extension attributes (empty values left out).

    ``ce_<name>`` headers in binary mode, top-level members of a structured CloudEvent; a dead
    letter (not a CloudEvent) gets plain ``<name>`` headers. The attributes the ingress adds
    this way: ``subscriptioncheck`` (web push, verify_subscriptions) and the distributed-tracing
    extension's ``traceparent``/``tracestate``.
    """
    items = [(k, v) for k, v in attributes.items() if v]
    if not items:
        return record
    if header(record.headers, "content-type") == "application/cloudevents+json":
        body = orjson.loads(record.value)
        body.update(items)
        return replace(record, value=_dumps(body))
    binary = any(k == "ce_specversion" for k, _ in record.headers)
    prefix = "ce_" if binary else ""
    return replace(record, headers=[*record.headers, *((prefix + k, v.encode()) for k, v in items)])


def build_dead_letter(
    *,
    topic: str,
    reason: str,
    detail: str,
    body: bytes,
    source_name: str,
    received: Received,
    content_type: str = "",
    key: bytes | None = None,
    extra_headers: Sequence[tuple[str, bytes]] = (),
) -> KafkaRecord:
    """A dead-letter record: the original bytes as the value, the why in headers.

    Every header is capped, and text that is not valid Unicode (an exception's message may
    quote a lone surrogate) is escaped rather than failing: a dead letter must always build.
    """
    headers: Headers = [
        ("dlq_reason", _capped(reason, _MAX_HEADER_BYTES)),
        ("dlq_detail", _capped(detail, _MAX_DETAIL_BYTES)),
        ("dlq_source", _capped(source_name, _MAX_HEADER_BYTES)),
        ("dlq_received_at", rfc3339(received.at).encode()),
        ("dlq_client_ip", _capped(received.client_ip, _MAX_HEADER_BYTES)),
    ]
    if content_type:
        headers.append(("content-type", _capped(content_type, _MAX_CONTENT_TYPE_BYTES)))
    headers.extend((k, v[:_MAX_HEADER_BYTES]) for k, v in extra_headers)
    return KafkaRecord(topic=topic, key=key, value=body, headers=headers)


def _capped(text: str, limit: int) -> bytes:
    return text.encode("utf-8", "backslashreplace")[:limit]


def record_size(record: KafkaRecord) -> int:
    """An upper bound of the size kafka-python checks against ``max_request_size``."""
    size = _RECORD_FRAMING_BYTES + len(record.value) + len(record.key or b"")
    for name, value in record.headers:
        size += len(name) + len(value) + 10  # two varint lengths
    return size


def header(headers: Sequence[tuple[str, bytes | None]], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("utf-8", "replace") if v is not None else None
    return None


def decode_record(
    headers: Sequence[tuple[str, bytes | None]], value: bytes | None
) -> tuple[dict[str, str], dict[str, Any]]:
    """(CloudEvents attributes, normalized event) from a record in either content mode.

    Raises ``ValueError`` when the record is not one of ours.
    """
    if value is None:
        raise ValueError("record has no value")
    ctype = header(headers, "content-type") or ""
    if ctype.startswith("application/cloudevents+json"):
        body = orjson.loads(value)
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            raise ValueError("structured CloudEvent without an object in 'data'")
        data = body.pop("data")
        attrs = {k: _attr_text(v) for k, v in body.items() if k != "datacontenttype"}
        return attrs, data
    attrs = {
        k[3:]: (v.decode("utf-8", "replace") if v is not None else "")
        for k, v in headers
        if k.startswith("ce_")
    }
    if "specversion" not in attrs:
        raise ValueError("record has no ce_specversion header: not a CloudEvent")
    data = orjson.loads(value)
    if not isinstance(data, dict):
        raise ValueError("CloudEvent data is not a JSON object")
    return attrs, data


def _attr_text(value: Any) -> str:
    # binary mode carries a Boolean as "true"/"false": read both modes the same way
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

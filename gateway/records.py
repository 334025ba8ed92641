"""CloudEvents 1.0 Kafka records: build them (ingress) and read them back (tag sync, replay).

Binary content mode (default): the attributes are ``ce_*`` headers and the value is the
normalized event as JSON, ``content-type: application/json``. Structured mode: the value is
the whole CloudEvent as JSON, ``content-type: application/cloudevents+json``. Both follow the
CloudEvents Kafka protocol binding, so any CloudEvents SDK reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .event import NormalizedEvent, Received, rfc3339

__all__ = [
    "KafkaRecord",
    "build_dead_letter",
    "build_record",
    "decode_record",
    "header",
]

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
) -> KafkaRecord:
    """The Kafka record for one normalized event, keyed by its user."""
    topic = topic_template.format(channel=event.channel or "unknown")
    subject = event.subject
    key = subject.encode() if subject else None
    value = event.to_value(received)
    attrs: dict[str, str] = {
        "specversion": "1.0",
        "id": event.id,
        "type": event.ce_type,
        "source": event.ce_source(source_name),
    }
    if subject:
        attrs["subject"] = subject
    if value["occurred_at"] is not None:
        attrs["time"] = value["occurred_at"]
    if content_mode == "structured":
        body = {**attrs, "datacontenttype": "application/json", "data": value}
        return KafkaRecord(
            topic=topic,
            key=key,
            value=_dumps(body),
            headers=[("content-type", b"application/cloudevents+json")],
        )
    headers: Headers = [(f"ce_{k}", v.encode()) for k, v in attrs.items()]
    headers.append(("content-type", b"application/json"))
    return KafkaRecord(topic=topic, key=key, value=_dumps(value), headers=headers)


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
    """A dead-letter record: the original bytes as the value, the why in headers."""
    headers: Headers = [
        ("dlq_reason", reason.encode()),
        ("dlq_detail", detail[:1000].encode()),
        ("dlq_source", source_name.encode()),
        ("dlq_received_at", rfc3339(received.at).encode()),
        ("dlq_client_ip", received.client_ip.encode()),
    ]
    if content_type:
        headers.append(("content-type", content_type[:200].encode()))
    headers.extend(extra_headers)
    return KafkaRecord(topic=topic, key=key, value=body, headers=headers)


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
        attrs = {k: str(v) for k, v in body.items() if k != "datacontenttype"}
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

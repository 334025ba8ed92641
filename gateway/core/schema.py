"""The contract of the topics, as JSON Schema (draft 2020-12): one source for every document.

Downstream teams read what :mod:`gateway.core.records` writes. This module describes it:

- :func:`event_schema`: the normalized event, the record's value in binary content mode and the
  ``data`` of a structured one;
- :func:`binary_headers_schema`: the ``ce_*`` headers of binary content mode (Kafka headers are
  bytes; the schema describes them decoded as UTF-8 text);
- :func:`structured_schema`: the whole CloudEvent of structured content mode;
- :func:`dead_letter_headers_schema`: the headers of a dead letter (its value is the request
  body as it came, any bytes).

``gateway schema`` prints them, :mod:`gateway.ops.asyncapi` builds the AsyncAPI document from
them, and the test suite validates every record it produces against them.

The published schemas are open: a consumer written against version 1.x keeps validating
records of a later 1.y, which may carry new fields. ``strict=True`` closes every object the
gateway owns (no field it does not document), which the gateway's own tests use, so a field
added without being described here fails them. The version rule is in the README ("The
record's contract").
"""

from __future__ import annotations

from typing import Any, Final

from gateway.core.kinds import CHANNELS

__all__ = [
    "DATASCHEMA",
    "RECORD_VERSION",
    "SCHEMA_DIALECT",
    "binary_headers_schema",
    "dead_letter_headers_schema",
    "event_schema",
    "structured_schema",
]

SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
# major.minor: a minor adds optional fields or values; a major breaks readers (README).
RECORD_VERSION: Final = "1.0"
# The CloudEvents ``dataschema`` attribute every record carries: the major version only, so
# that a reader can tell a breaking change from the record itself.
DATASCHEMA: Final = "urn:onesignal-kafka-gateway:event:v1"
_ID_BASE: Final = "urn:onesignal-kafka-gateway:schema:"

_TEXT: Final = {"type": "string", "minLength": 1}
_RFC3339: Final = {"type": "string", "format": "date-time"}
# W3C trace context (version 00): version-traceid-parentid-flags
_TRACEPARENT: Final = {
    "type": "string",
    "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
    "description": "W3C trace context of the request's span (CloudEvents distributed tracing)",
}
# CloudEvents extension attribute names: lowercase ASCII letters and digits, at most 20
_EXTENSION_NAME: Final = "^[a-z0-9]{1,20}$"


def _object(
    properties: dict[str, Any], required: list[str], strict: bool, **more: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if strict:
        out["additionalProperties"] = False
    out.update(more)
    return out


def _texts(names: list[str]) -> dict[str, Any]:
    return {name: dict(_TEXT) for name in names}


def event_schema(*, strict: bool = False) -> dict[str, Any]:
    """The normalized event (the ``NormalizedEvent.to_value`` shape)."""
    by_language = {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "minProperties": 1,
        "description": "the text per language code, as OneSignal sent it",
    }
    user = _object(
        {
            **_texts(["onesignal_id", "external_id", "language"]),
            "tags": {
                "type": "object",
                "minProperties": 1,
                "description": "the user's tags as the payload carried them ('' values dropped)",
            },
        },
        [],
        strict,
        description="the user: only keys the payload carried",
    )
    subscription = _object(
        _texts(["id", "device_type", "token"]),
        [],
        strict,
        description="the subscription (device): only keys the payload carried",
    )
    urls = _object(_texts(["url", "app_url", "web_url"]), [], strict, minProperties=1)
    message = _object(
        {
            **_texts(["id", "name", "title", "contents", "template_id"]),
            "title_by_language": by_language,
            "contents_by_language": by_language,
            "urls": urls,
        },
        [],
        strict,
        description="the message: only keys the payload carried; title/contents in English "
        "where present, else the first language",
    )
    received = _object(
        {
            "source": {**_TEXT, "description": "the gateway source (route) name"},
            "at": {**_RFC3339, "description": "when the gateway received it (UTC)"},
            "client_ip": {"type": "string", "description": "the sender's address, as trusted"},
        },
        ["source", "at", "client_ip"],
        strict,
    )
    properties: dict[str, Any] = {
        "id": {
            **_TEXT,
            "description": "OneSignal's event id; a UUID made by the gateway when the sender "
            "gave none (then the idgenerated attribute is true)",
        },
        "kind": {
            "type": "string",
            "pattern": "^[^.]+\\..+$",
            "description": "today's name of the event kind, <channel>.<action>, e.g. "
            "message.push.clicked (the documented kinds are in gateway/core/kinds.py)",
        },
        "channel": {
            "type": "string",
            "minLength": 1,
            "description": "the kind's channel: " + ", ".join((*CHANNELS, "journey")) + " "
            "(an undocumented one is possible when kafka.unknown_kinds allows it)",
        },
        "action": {"type": "string", "minLength": 1, "description": "the rest of the kind"},
        "app_id": {"type": ["string", "null"], "minLength": 1},
        "occurred_at": {
            "anyOf": [_RFC3339, {"type": "null"}],
            "description": "when it happened per the payload (UTC), null when it said nothing",
        },
        "user": user,
        "subscription": subscription,
        "message": message,
        "data": {
            "type": "object",
            "description": "channel-specific fields (IAM page/target, failure reason, web-push "
            "extras); open by design",
        },
        "received": received,
        "raw": {"description": "the payload exactly as parsed from the request"},
    }
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": _ID_BASE + "event:v1",
        "title": "OneSignal event, normalized by onesignal-kafka-gateway",
        "description": f"record version {RECORD_VERSION}",
        **_object(properties, list(properties), strict),
    }


def _attributes() -> tuple[dict[str, Any], list[str]]:
    """The CloudEvents context attributes the gateway writes, as JSON values."""
    attrs: dict[str, Any] = {
        "specversion": {"const": "1.0"},
        "id": dict(_TEXT),
        "type": {"type": "string", "pattern": "^com\\.onesignal\\..+$"},
        "source": {
            "type": "string",
            "pattern": "^(onesignal:app/.+|gateway:source/.+|gateway:unauthenticated/.+)$",
            "description": "onesignal:app/<app id>, or gateway:source/<source> without one; "
            "gateway:unauthenticated/<source> for a source without a secret",
        },
        "subject": {**_TEXT, "description": "the user: onesignal_id, external_id or subscription"},
        "time": _RFC3339,
        "dataschema": {"const": DATASCHEMA},
        # the Auth Context extension: only on events of a source without a secret (web push)
        "authtype": {
            "const": "unauthenticated",
            "description": "the sender proved nothing: never OneSignal's word (README)",
        },
        # a web-push source with verify_subscriptions: what OneSignal said of the subscription
        "subscriptioncheck": {
            "enum": ["found", "unchecked"],
            "description": "found: OneSignal knows the subscription; unchecked: it could not "
            "be asked (verify_unreachable = mark)",
        },
        # the distributed-tracing extension, with [tracing] enabled
        "traceparent": _TRACEPARENT,
        "tracestate": {"type": "string"},
    }
    return attrs, ["specversion", "id", "type", "source", "dataschema"]


def binary_headers_schema(*, strict: bool = False) -> dict[str, Any]:
    """Binary content mode's headers, decoded as text: ``ce_<attribute>`` and content-type."""
    attrs, required = _attributes()
    properties = {f"ce_{name}": schema for name, schema in attrs.items()}
    properties["ce_idgenerated"] = {
        "const": "true",
        "description": "present when the gateway made the id (the sender gave none)",
    }
    properties["content-type"] = {"const": "application/json"}
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": _ID_BASE + "binary-headers:v1",
        "title": "CloudEvents binary content mode: the record's headers",
        **_object(properties, [f"ce_{n}" for n in required] + ["content-type"], strict),
    }


def structured_schema(*, strict: bool = False) -> dict[str, Any]:
    """Structured content mode's value: the whole CloudEvent, the event under ``data``."""
    attrs, required = _attributes()
    properties = dict(attrs)
    properties["idgenerated"] = {"const": True, "description": "the gateway made the id"}
    properties["datacontenttype"] = {"const": "application/json"}
    properties["data"] = {"$ref": _ID_BASE + "event:v1"}
    schema = _object(properties, [*required, "datacontenttype", "data"], strict)
    if not strict:
        # other extension attributes may come in a later minor version
        schema["propertyNames"] = {
            "anyOf": [{"enum": list(properties)}, {"pattern": _EXTENSION_NAME}]
        }
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": _ID_BASE + "structured:v1",
        "title": "CloudEvents structured content mode: the record's value",
        **schema,
        "$defs": {"event": event_schema(strict=strict)},
    }


def dead_letter_headers_schema(*, strict: bool = False) -> dict[str, Any]:
    """A dead letter's headers (decoded as text); its value is the body as received."""
    properties: dict[str, Any] = {
        "dlq_reason": {**_TEXT, "description": "a short machine-readable class, e.g. invalid-json"},
        "dlq_detail": {"type": "string", "description": "what was wrong, for a person"},
        "dlq_source": dict(_TEXT),
        "dlq_received_at": _RFC3339,
        "dlq_client_ip": {"type": "string"},
        "dlq_event_id": {
            "type": "string",
            "description": "the sender's event id from the source's id_header, kept for replay",
        },
        "dlq_user_onesignal_id": {
            "type": "string",
            "description": "a Journey webhook's onesignal_id from its URL or headers (text bodies)",
        },
        "dlq_user_external_id": {
            "type": "string",
            "description": "a Journey webhook's external_id from its URL or headers (text bodies)",
        },
        "dlq_requeued_from": {
            "type": "string",
            "description": "topic/partition/offset of the dead letter that replay --requeue"
            " appended this one for",
        },
        "content-type": {"type": "string", "description": "the request's, when it had one"},
        "traceparent": _TRACEPARENT,
        "tracestate": {"type": "string"},
    }
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": _ID_BASE + "dead-letter-headers:v1",
        "title": "A dead letter's headers",
        **_object(
            properties,
            ["dlq_reason", "dlq_detail", "dlq_source", "dlq_received_at", "dlq_client_ip"],
            False,  # extra headers (the request's id header, the attempt) may follow
        ),
    }

"""The AsyncAPI 3.0 document of the topics, built from a config and gateway.core.schema.

One channel per topic the ingress writes (the normalized events of each channel, the dead
letters), with its key, headers and payload. The schemas are the ones ``gateway schema``
prints, rendered for AsyncAPI's default schema format (a JSON Schema draft-07 superset): the
same keywords, without ``$schema``/``$id``, and the structured envelope's ``data`` pointing at
the event in ``components.schemas``. ``gateway schema asyncapi`` prints it; CI validates it
with the AsyncAPI project's own parser (.ci/asyncapi).
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.config import Config
from gateway.core import schema
from gateway.kafka.topics import has_open_source, ingress_topics

__all__ = ["asyncapi_document"]

_KAFKA_BINDING = "0.5.0"
_CHANNEL_WORDS = {
    "push": "push notifications",
    "email": "email",
    "sms": "SMS",
    "iam": "in-app messages",
    "live_activity": "iOS Live Activities",
    "journey": "Journey webhook steps",
}


# the topics that are not a channel's, by their role in ingress_topics: (channel id, text)
_OTHER_CHANNELS = {
    "unknown-channel": (
        "unknownChannel",
        "events of a channel OneSignal has not documented (kafka.unknown_channel_topic)",
    ),
    "unauthenticated": (
        "unauthenticated",
        "events of sources without a secret (web push: anyone can post them), marked "
        "authtype=unauthenticated with a source of their own: never OneSignal's word",
    ),
    "dead-letter": (
        "deadLetter",
        "requests from an authenticated sender that could not become an event, kept byte for "
        "byte with the reason in headers; `gateway replay` republishes them once fixed",
    ),
}


def _plain(doc: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k not in ("$schema", "$id", "$defs")}
    props = out.get("properties")
    if isinstance(props, dict) and "data" in props and "$ref" in props["data"]:
        out["properties"] = {**props, "data": {"$ref": "#/components/schemas/event"}}
    return out


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def asyncapi_document(config: Config, *, unauthenticated: bool | None = None) -> dict[str, Any]:
    """The document for the topics ``config`` writes to.

    ``unauthenticated``: whether a source without a secret exists (its topic is then
    described); by default, what ``config.sources`` say.
    """
    if unauthenticated is None:
        unauthenticated = has_open_source(config)
    kafka, topics = config.kafka, config.topics
    key = {
        "type": "string",
        "description": "the user: onesignal_id, else external_id, else the subscription id; "
        "absent when the event names none. One user's events share a partition, in order.",
    }
    event_message = "eventBinary" if kafka.content_mode == "binary" else "eventStructured"
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    def channel(cid: str, address: str, description: str, message: str) -> None:
        channels[cid] = {
            "address": address,
            "description": description,
            "messages": {message: _ref("messages", message)},
            "bindings": {
                "kafka": {
                    "topic": address,
                    "partitions": topics.partitions,
                    "replicas": topics.replication_factor,
                    "topicConfiguration": {"min.insync.replicas": topics.min_insync_replicas},
                    "bindingVersion": _KAFKA_BINDING,
                }
            },
        }
        operations[f"write{cid[0].upper()}{cid[1:]}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{cid}"},
            "summary": f"the gateway writes each accepted event to {address}",
            "messages": [{"$ref": f"#/channels/{cid}/messages/{message}"}],
        }

    for role, address in ingress_topics(kafka, unauthenticated=unauthenticated):
        if role.startswith("channel:"):
            ch = role.removeprefix("channel:")
            channel(
                ch.replace("_", ""),
                address,
                f"OneSignal {_CHANNEL_WORDS[ch]} events, normalized (kinds {ch}.*)",
                event_message,
            )
        else:
            cid, description = _OTHER_CHANNELS[role]
            channel(
                cid, address, description, "deadLetter" if role == "dead-letter" else event_message
            )
    binding = {"kafka": {"key": key, "bindingVersion": _KAFKA_BINDING}}
    return {
        "asyncapi": "3.0.0",
        "id": "urn:onesignal-kafka-gateway",
        "info": {
            "title": "onesignal-kafka-gateway topics",
            "version": schema.RECORD_VERSION,
            "description": "OneSignal's webhooks and Event Streams as CloudEvents 1.0 Kafka "
            f"records (Kafka protocol binding, {kafka.content_mode} content mode). Generated by "
            f"`gateway schema asyncapi` {__version__}.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "kafka": {
                "host": kafka.bootstrap_servers.split(",")[0].strip(),
                "protocol": "kafka",
                "description": "kafka.bootstrap_servers",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": {
                "event": _plain(schema.event_schema()),
                "binaryHeaders": _plain(schema.binary_headers_schema()),
                "structured": _plain(schema.structured_schema()),
                "deadLetterHeaders": _plain(schema.dead_letter_headers_schema()),
            },
            "messages": {
                "eventBinary": {
                    "name": "eventBinary",
                    "title": "A normalized event, CloudEvents binary content mode",
                    "contentType": "application/json",
                    "headers": _ref("schemas", "binaryHeaders"),
                    "payload": _ref("schemas", "event"),
                    "bindings": binding,
                },
                "eventStructured": {
                    "name": "eventStructured",
                    "title": "A normalized event, CloudEvents structured content mode",
                    "contentType": "application/cloudevents+json",
                    "payload": _ref("schemas", "structured"),
                    "bindings": binding,
                },
                "deadLetter": {
                    "name": "deadLetter",
                    "title": "A request body that could not become an event",
                    "contentType": "application/octet-stream",
                    "headers": _ref("schemas", "deadLetterHeaders"),
                    "payload": {"type": "string", "description": "the body as received"},
                    "bindings": binding,
                },
            },
        },
    }

"""The OpenAPI 3.1 document of the ingress routes, built from the config.

Used by people wiring OneSignal up, and by schemathesis to fuzz the routes.
"""

from __future__ import annotations

from typing import Any

from gateway.config import Config, SourceConfig

__all__ = ["openapi_document"]

_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
}
_ACCEPTED = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"type": "string", "enum": ["accepted", "duplicate", "dead-lettered"]},
        "id": {"type": ["string", "null"]},
        "topic": {"type": "string"},
        "partition": {"type": "integer"},
        "offset": {"type": "integer"},
        "reason": {"type": "string"},
    },
}

_FORMAT_DOCS = {
    "event-stream": "OneSignal Event Streams and event webhooks: a JSON object rendered from the "
    "stream's Liquid body (nested `Event Data`/`Message Data`, flat dotted keys, or plain nested).",
    "journey": "OneSignal Journey webhooks: a JSON object, or plain text (published as a "
    "`journey.webhook.text` event, keyed by `external_id`/`onesignal_id` query parameters).",
    "web-push": "OneSignal Web SDK webhooks sent by browsers (v15 and v16 payloads), "
    "as application/json or text/plain.",
}


def _operation(source: SourceConfig) -> dict[str, Any]:
    def err(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": _ERROR}}}

    body_schema = {"type": "object", "additionalProperties": True}
    op: dict[str, Any] = {
        "operationId": f"receive_{source.name.replace('-', '_').replace('.', '_')}",
        "summary": f"Receive one OneSignal event ({source.format})",
        "description": _FORMAT_DOCS[source.format]
        + " Answered 200 only once Kafka acknowledged the record."
        + (
            " Once the shared secret is checked, no body is refused: one that cannot be read "
            "is dead-lettered byte for byte (200, status `dead-lettered`, with its reason)."
            if source.require_secret
            else ""
        ),
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": body_schema},
                "text/plain": {"schema": {"type": "string"}},
            },
        },
        "responses": {
            "200": {
                "description": "Stored durably in Kafka (or a duplicate of an event that was).",
                "content": {"application/json": {"schema": _ACCEPTED}},
            },
            "403": err("Sender address not allowed, or shared secret missing or wrong."),
            "405": err("Method not accepted."),
            "413": err("Body over the configured limit."),
            "503": {
                "description": "Kafka could not take the event in time; retry after Retry-After.",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                "content": {"application/json": {"schema": _ERROR}},
            },
        },
    }
    if source.format == "web-push":
        op["responses"]["403"] = err("Origin not in cors_origins (or missing, or null).")
    if source.require_secret:
        op["security"] = [{f"{source.name}_secret": []}]
    else:
        # no secret, so anyone can post here: bodies that cannot be read are refused
        responses = op["responses"]
        responses["400"] = err(
            "Invalid JSON, invalid UTF-8, too deep, empty, or not an event the Web SDK sends."
        )
        responses["415"] = err("Content-Type or charset not accepted.")
        if source.client_rate_limit > 0:
            responses["429"] = {
                "description": "Too many requests from this client address; retry after "
                "Retry-After.",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                "content": {"application/json": {"schema": _ERROR}},
            }
        op["responses"] = dict(sorted(responses.items()))
    return op


def openapi_document(config: Config) -> dict[str, Any]:
    from gateway import __version__

    paths: dict[str, Any] = {}
    schemes: dict[str, Any] = {}
    for source in config.sources:
        paths[source.path] = {"post": _operation(source)}
        if source.require_secret:
            schemes[f"{source.name}_secret"] = {
                "type": "apiKey",
                "in": "header",
                "name": source.secret_header,
            }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "OneSignal Kafka gateway ingress", "version": __version__},
        "paths": paths,
    }
    if schemes:
        doc["components"] = {"securitySchemes": schemes}
    return doc

"""What a source route answers: a status, a small JSON body, a few headers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.kafka import PublishResult

__all__ = ["Reply", "accepted_body", "error"]


@dataclass(slots=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    close: bool = False  # the rest of the request body was not read


def error(status: int, code: str, message: str, **headers: str) -> Reply:
    return Reply(
        status,
        {"error": code, "message": message},
        [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    )


def accepted_body(event_id: str | None, result: PublishResult) -> dict[str, Any]:
    if result.spooled:  # durable on the spool's disk; its place in Kafka is not known yet
        return {
            "status": "accepted",
            "id": event_id,
            "topic": result.topic,
            "partition": None,
            "offset": None,
            "spooled": True,
        }
    return {
        "status": "accepted",
        "id": event_id,
        "topic": result.topic,
        "partition": result.partition,
        "offset": result.offset,
    }

"""The normalized event: one OneSignal event in one clean shape.

This is the contract between the ingress (which builds it from whatever a source sent)
and everything downstream (the Kafka record, tag sync, the topics' readers). It is plain
data: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["NormalizationError", "NormalizedEvent", "Received", "rfc3339"]


class NormalizationError(ValueError):
    """The payload parsed but cannot be turned into a normalized event.

    ``reason`` is a short machine-readable class (``no-kind``, ``not-an-object``...), sent as
    the dead-letter record's ``reason`` header; the message explains it to a person.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def rfc3339(ts: datetime) -> str:
    """UTC RFC 3339 with a 'Z' and at most microsecond precision."""
    if ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    # an aware UTC isoformat always ends in "+00:00"
    return ts.isoformat(timespec="microseconds" if ts.microsecond else "seconds")[:-6] + "Z"


@dataclass(frozen=True, slots=True)
class Received:
    """Where and when the gateway received the event (filled in by the ingress)."""

    source: str
    at: datetime
    client_ip: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "at": rfc3339(self.at), "client_ip": self.client_ip}


@dataclass(frozen=True, slots=True)
class NormalizedEvent:
    """One OneSignal event.

    - ``id``: OneSignal's ``event.id`` (``id_from_payload``: the sender supplied it, in the
      body, a mapped field or the source's ``id_header``); else a stable hash of the payload,
      which the ingress replaces by a fresh UUID (see ``normalize_for_source``).
    - ``deduplicate``: whether a repeat of ``id`` is a retry of this event. Only ids the
      sender supplied are: two real events can have identical bodies.
    - ``kind``: today's name of the event kind, e.g. ``message.push.clicked``; legacy and
      misspelled kinds are already mapped. ``channel`` and ``action`` are its two parts
      (``push``, ``clicked``).
    - ``occurred_at``: when the event happened per the payload (aware, UTC), or None.
    - ``user``: ``onesignal_id``, ``external_id``, ``tags`` (only keys that were present).
    - ``subscription``: ``id``, ``device_type``, ``token`` (only keys that were present).
    - ``message``: ``id``, ``name``, ``title``, ``contents``, ``template_id``, ``urls``.
    - ``data``: channel-specific fields (IAM page/target, failure reason, web-push extras).
    - ``raw``: the payload exactly as parsed from the request, nothing dropped.
    """

    id: str
    kind: str
    channel: str
    action: str
    app_id: str | None = None
    occurred_at: datetime | None = None
    user: dict[str, Any] = field(default_factory=dict)
    subscription: dict[str, Any] = field(default_factory=dict)
    message: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    raw: Any = None
    id_from_payload: bool = True
    original_kind: str | None = None
    deduplicate: bool = True

    @property
    def subject(self) -> str | None:
        """The user: onesignal_id, else external_id, else the subscription id."""
        for value in (
            self.user.get("onesignal_id"),
            self.user.get("external_id"),
            self.subscription.get("id"),
        ):
            if value:
                return str(value)
        return None

    @property
    def ce_type(self) -> str:
        return f"com.onesignal.{self.kind}"

    def ce_source(self, source_name: str) -> str:
        return f"onesignal:app/{self.app_id}" if self.app_id else f"gateway:source/{source_name}"

    def to_value(self, received: Received) -> dict[str, Any]:
        """The JSON object carried as the Kafka record's value."""
        return {
            "id": self.id,
            "kind": self.kind,
            "channel": self.channel,
            "action": self.action,
            "app_id": self.app_id,
            "occurred_at": rfc3339(self.occurred_at) if self.occurred_at else None,
            "user": self.user,
            "subscription": self.subscription,
            "message": self.message,
            "data": self.data,
            "received": received.to_dict(),
            "raw": self.raw,
        }

"""Realistic OneSignal payloads, for the demo, the integration tests and the benchmark.

They are rendered the way OneSignal renders Liquid templates: push titles as the non-JSON
hash string ``"{'en':'...'}"``, email titles as a plain subject, and ``""`` for every field the
event's channel does not fill. Everything is deterministic (ids are derived, no clock, no
randomness), so the same arguments always give the same body; pass ``event_id`` to vary it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

from gateway.core.kinds import split_kind

__all__ = [
    "DEMO_APP_ID",
    "DEMO_ONESIGNAL_ID",
    "LAYOUTS",
    "event_stream_payload",
    "journey_payload",
    "web_push_v15_payload",
    "web_push_v16_payload",
]

DEMO_APP_ID: Final = "0b6a1f5e-3c1d-4e0a-9f8b-2d7c6e5a4b3c"
DEMO_ONESIGNAL_ID: Final = "5c9f0d1e-7a2b-4c3d-8e4f-6a5b4c3d2e1f"

# The Event Streams body layouts seen in OneSignal's docs and in hand-written templates:
# - nested-default: the docs' example body, objects "Event Data" and "Message Data" whose keys
#   are the literal dotted Liquid names;
# - flat-dotted: one object with the dotted names as keys (timestamp quoted, as the template
#   in the data reference shows it);
# - plain-nested: real nesting ({"event": {"kind": ..}}), objects rendered unquoted;
# - snake-case: the IAM sample's and the warehouse export's column names.
LAYOUTS: Final = ("nested-default", "flat-dotted", "plain-nested", "snake-case")

_NAMESPACE: Final = uuid.UUID("fe098c1a-9c99-4330-a1db-e7042cd50a61")

_TITLES: Final[dict[str, dict[str, str]]] = {
    "push": {"en": "Flash Sale: 50% Off Today", "es": "Oferta relámpago: 50% hoy"},
    "sms": {},
    "iam": {},
    "live_activity": {"en": "Order #1234"},
}
_CONTENTS: Final[dict[str, dict[str, str]]] = {
    "push": {"en": "Everything in the spring collection", "es": "Toda la colección"},
    "sms": {"en": "Your code is 123456"},
    "iam": {},
    "live_activity": {"en": "Out for delivery"},
}
_EMAIL_SUBJECT: Final = "Your March statement is ready"
_MESSAGE_NAMES: Final = {
    "push": "Spring sale push",
    "email": "Monthly statement",
    "sms": "Login code",
    "iam": "Onboarding carousel",
    "live_activity": "Order tracking",
}
_DEVICE_TYPES: Final = {
    "push": "Android",
    "email": "Email",
    "sms": "SMS",
    "iam": "iOS",
    "live_activity": "iOS",
}
_FAILURES: Final = {
    "push": "InvalidRegistration: the push token is no longer valid",
    "email": "550 5.1.1 The email account that you tried to reach does not exist",
    "sms": "30006: Landline or unreachable carrier",
    "live_activity": "BadDeviceToken",
}


def _uuid(*parts: object) -> str:
    return str(uuid.uuid5(_NAMESPACE, "|".join(str(p) for p in parts)))


def _python_hash(texts: dict[str, str]) -> str:
    """How OneSignal renders a localized map inside quotes: ``{'en':'...'}`` (not JSON)."""
    if not texts:
        return ""
    return "{" + ",".join(f"'{k}':'{v}'" for k, v in texts.items()) + "}"


def _ruby_hash(texts: dict[str, str]) -> str:
    """Liquid's own rendering of a hash: ``{"en"=>"..."}``."""
    if not texts:
        return ""
    return "{" + ", ".join(f'"{k}"=>"{v}"' for k, v in texts.items()) + "}"


def _fields(
    kind: str,
    event_id: str | None,
    app_id: str,
    external_id: str,
    onesignal_id: str,
    timestamp: int,
) -> dict[str, Any]:
    """Every documented field of one event, "" where the channel does not fill it."""
    channel, action = split_kind(kind)
    failed = action in ("failed", "bounced", "undelivered")
    iam_page = channel == "iam" and action in ("page_displayed", "clicked")
    iam_target = channel == "iam" and action == "clicked"
    live = channel == "live_activity"
    message_id = _uuid("message", app_id, channel)
    tokens = {
        "push": f"fcm:{_uuid('token', onesignal_id)}",
        "email": f"{external_id}@example.com",
        "sms": "+15555550142",
    }
    return {
        "event.kind": kind,
        "event.id": event_id or _uuid("event", kind, app_id, onesignal_id, timestamp),
        "event.timestamp": timestamp,
        "event.datetime": datetime.fromtimestamp(timestamp, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "event.app_id": app_id,
        "event.subscription_device_type": _DEVICE_TYPES.get(channel, ""),
        "event.subscription_id": _uuid("subscription", onesignal_id, channel),
        "event.onesignal_id": onesignal_id,
        "event.external_id": external_id,
        "event.data.page_name": "Welcome" if iam_page else "",
        "event.data.page_id": _uuid("page", message_id) if iam_page else "",
        "event.data.target_name": "get_started_button" if iam_target else "",
        "event.data.target_id": _uuid("target", message_id) if iam_target else "",
        "event.data.failure_reason": _FAILURES.get(channel, "") if failed else "",
        "event.data.live_activity_id": "order-1234" if live else "",
        "event.data.live_activity_type": "OrderTracking" if live else "",
        "message.id": message_id,
        "message.name": _MESSAGE_NAMES.get(channel, ""),
        "message.title": dict(_TITLES.get(channel, {})),  # a copy: callers edit bodies
        "message.contents": dict(_CONTENTS.get(channel, {})),
        "message.template_id": _uuid("template", app_id, channel),
        "message.url": "https://shop.example.com/sale" if channel == "push" else "",
        "message.app_url": "shopapp://sale" if channel == "push" else "",
        "message.web_url": "https://shop.example.com/sale?web=1" if channel == "push" else "",
        "message.live_activity_event_kind": "update" if live else "",
        "token": tokens.get(channel, ""),
        "channel": channel,
    }


def _quoted_text(
    channel: str, texts: dict[str, str], subject: str, render: Callable[[dict[str, str]], str]
) -> str:
    """A localized map as rendered inside quotes; email has a plain subject instead."""
    return subject if channel == "email" else render(texts)


def event_stream_payload(
    kind: str,
    *,
    layout: str = "nested-default",
    event_id: str | None = None,
    app_id: str = DEMO_APP_ID,
    external_id: str = "user-42",
    onesignal_id: str = DEMO_ONESIGNAL_ID,
    timestamp: int = 1708559115,
) -> dict[str, Any]:
    """An Event Streams body for ``kind`` (written as given, legacy spellings included)."""
    f = _fields(kind, event_id, app_id, external_id, onesignal_id, timestamp)
    channel = f.pop("channel")
    token = f.pop("token")
    title, contents = f["message.title"], f["message.contents"]
    event_keys = [k for k in f if k.startswith("event.")]
    message_keys = [k for k in f if k.startswith("message.")]
    if layout in ("nested-default", "flat-dotted"):
        rendered = dict(f)
        rendered["message.title"] = _quoted_text(channel, title, _EMAIL_SUBJECT, _python_hash)
        rendered["message.contents"] = _quoted_text(channel, contents, "", _python_hash)
        if layout == "flat-dotted":
            rendered["event.timestamp"] = str(timestamp)
            return rendered
        message_data = {k: rendered[k] for k in message_keys}
        message_data["template_id"] = rendered["message.template_id"]
        return {
            "Event Data": {k: rendered[k] for k in event_keys},
            "Message Data": message_data,
        }
    if layout == "plain-nested":
        data = {k.removeprefix("event.data."): f[k] for k in event_keys if ".data." in k}
        return {
            "event": {
                "id": f["event.id"],
                "kind": f["event.kind"],
                "timestamp": timestamp,
                "datetime": f["event.datetime"],
                "app_id": app_id,
                "subscription_device_type": f["event.subscription_device_type"],
                "subscription_id": f["event.subscription_id"],
                "data": data,
            },
            "message": {
                "id": f["message.id"],
                "name": f["message.name"],
                "title": _EMAIL_SUBJECT if channel == "email" else title,
                "contents": "" if channel == "email" else contents,
                "template_id": f["message.template_id"],
                "url": f["message.url"],
                "app_url": f["message.app_url"],
                "web_url": f["message.web_url"],
                "live_activity_event_kind": f["message.live_activity_event_kind"],
            },
            "user": {
                "onesignal_id": onesignal_id,
                "external_id": external_id,
                "language": "en",
                "tags": {"plan": "gold", "country": "ES"},
                "subscription": {
                    "id": f["event.subscription_id"],
                    "subscription_token": token,
                },
            },
        }
    if layout == "snake-case":
        iam = channel == "iam"
        return {
            "event_id": f["event.id"],
            "event_kind": f["event.kind"],
            # warehouses print timestamps without a zone, with a space for the "T"
            "event_timestamp": datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "subscription_device_type": f["event.subscription_device_type"],
            "subscription_id": f["event.subscription_id"],
            "onesignal_id": onesignal_id,
            "external_id": external_id,
            "app_id": app_id,
            "template_id": f["message.template_id"],
            ("iam_id" if iam else "message_id"): f["message.id"],
            ("iam_name" if iam else "message_name"): f["message.name"],
            "message_title": _quoted_text(channel, title, _EMAIL_SUBJECT, _ruby_hash),
            "message_contents": _quoted_text(channel, contents, "", _ruby_hash),
            "failure_reason": f["event.data.failure_reason"],
            "token": token,
            "page_name": f["event.data.page_name"],
            "page_id": f["event.data.page_id"],
            "target_id": f["event.data.target_id"],
            "target_name": f["event.data.target_name"],
        }
    raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")


def journey_payload(
    *,
    layout: str = "flat-dotted",
    onesignal_id: str = DEMO_ONESIGNAL_ID,
    external_id: str = "user-42",
    tags: dict[str, str] | None = None,
    language: str = "en",
    event_id: str | None = None,
    event_kind: str | None = None,
) -> dict[str, Any]:
    """A Journey webhook step body, built from the Liquid data Journeys offer.

    ``event_id``/``event_kind`` are only in the body when given: Journeys do not offer them
    unless the admin templates them in.
    """
    tags = {"plan": "gold", "cart_items": "3"} if tags is None else tags
    if layout == "flat-dotted":
        body: dict[str, Any] = {
            "user.onesignal_id": onesignal_id,
            "user.external_id": external_id,
            "user.language": language,
        }
        body.update({f"user.tags.{k}": v for k, v in tags.items()})
        if event_id is not None:
            body["event.id"] = event_id
        if event_kind is not None:
            body["event.kind"] = event_kind
        return body
    if layout == "plain-nested":
        body = {
            "user": {
                "onesignal_id": onesignal_id,
                "external_id": external_id,
                "language": language,
                "tags": dict(tags),
            }
        }
        event = {"id": event_id, "kind": event_kind}
        if any(v is not None for v in event.values()):
            body["event"] = {k: v for k, v in event.items() if v is not None}
        return body
    raise ValueError(f"unknown journey layout {layout!r}; one of flat-dotted, plain-nested")


def _sdk_event(event: str, displayed: str) -> str:
    """Accept the SDK's names or short ones ("clicked"), answer the SDK's name."""
    name = event if event.startswith("notification.") else f"notification.{event}"
    if name in ("notification.willDisplay", "notification.displayed"):
        return displayed
    return name


def web_push_v16_payload(
    event: str,
    *,
    notification_id: str = "9a3e6c8b-1f2d-4e5a-b6c7-d8e9f0a1b2c3",
    subscription_id: str | None = "3f2e1d0c-9b8a-4765-8432-10fedcba9876",
    heading: str | None = "Flash Sale",
    content: str = "50% off everything today",
    url: str | None = "https://shop.example.com/sale",
    action_id: str = "",
    additional_data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A web-push SDK v16 webhook body (``notification.willDisplay|clicked|dismissed``).

    Keys the SDK leaves undefined are absent, as ``JSON.stringify`` drops them; ``actionId``
    is only sent on clicks (``""`` means the body, not a button, was clicked).
    """
    name = _sdk_event(event, "notification.willDisplay")
    body: dict[str, Any] = {"event": name, "notificationId": notification_id}
    if heading is not None:
        body["heading"] = heading
    body["content"] = content
    body["additionalData"] = (
        {"campaign": "spring-sale"} if additional_data is None else additional_data
    )
    if name == "notification.clicked":
        body["actionId"] = action_id
    if url is not None:
        body["url"] = url
    if subscription_id is not None:
        body["subscriptionId"] = subscription_id
    return body


def web_push_v15_payload(
    event: str,
    *,
    notification_id: str = "9a3e6c8b-1f2d-4e5a-b6c7-d8e9f0a1b2c3",
    user_id: str = "3f2e1d0c-9b8a-4765-8432-10fedcba9876",
    heading: str = "Flash Sale",
    content: str = "50% off everything today",
    url: str = "https://shop.example.com/sale",
    action: str | None = None,
) -> dict[str, Any]:
    """A web-push SDK v15-and-older webhook body (``notification.displayed|clicked|dismissed``)."""
    name = _sdk_event(event, "notification.displayed")
    body: dict[str, Any] = {
        "event": name,
        "id": notification_id,
        "userId": user_id,
        "heading": heading,
        "content": content,
        "url": url,
        "icon": "https://shop.example.com/icon-192.png",
        "buttons": [
            {"action": "shop-now", "title": "Shop now", "icon": "", "url": url},
            {"action": "later", "title": "Later", "icon": "", "url": ""},
        ],
        "data": {"campaign": "spring-sale"},
    }
    if name == "notification.clicked":
        body["action"] = "" if action is None else action
    return body

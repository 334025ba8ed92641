"""Web-push SDK webhooks: a fixed shape per SDK version, read directly.

The route has no secret: anyone can post to it. So only the event names the Web SDK itself
sends are events here, spelled exactly as it sends them; any other name (``message.email.
bounced``, ``notification.Snoozed``) is refused, or a forger could pass for OneSignal's word on
another channel. The names, from OneSignal-Website-SDK:

- v16 (``src/sw/webhooks/notifications/webhookNotificationEvent.ts`` @ fbb4a498, and the
  webhook settings of ``OneSignal.init``): ``notification.willDisplay``,
  ``notification.clicked``, ``notification.dismissed``;
- v15 and older (``src/service-worker/ServiceWorker.ts`` @ tag 151607):
  ``notification.displayed``, ``notification.clicked``, ``notification.dismissed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from gateway.core.normalize.values import _present, _text

__all__ = ["WEB_SDK_EVENTS", "_web_push_fields", "_web_push_kind"]

# the SDK's event name -> the gateway's kind
WEB_SDK_EVENTS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "notification.willDisplay": "message.push.displayed",  # v16
        "notification.displayed": "message.push.displayed",  # v15 and older
        "notification.clicked": "message.push.clicked",
        "notification.dismissed": "message.push.dismissed",
    }
)
_V16_ONLY_KEYS: Final = ("notificationId", "subscriptionId", "actionId", "additionalData")
_V15_ONLY_KEYS: Final = ("id", "userId", "action", "buttons", "icon", "data")


def _first_key(payload: dict[Any, Any], *keys: str) -> Any:
    for key in keys:
        if key in payload and payload[key] is not None:
            return payload[key]
    return None


def _web_push_fields(payload: dict[Any, Any]) -> dict[str, Any]:
    """The fixed SDK payloads: v16 (``notificationId``...) and v15 and older (``id``...)."""
    event = payload.get("event")
    event_name = event.strip() if isinstance(event, str) else ""
    if any(k in payload for k in _V16_ONLY_KEYS) or event_name == "notification.willDisplay":
        version = "v16"
    elif any(k in payload for k in _V15_ONLY_KEYS) or event_name == "notification.displayed":
        version = "v15"
    else:
        version = "v16"
    extra: dict[str, Any] = {"sdk_event": event_name or None, "sdk_version": version}
    action = _first_key(payload, "actionId", "action")
    if isinstance(action, str):
        extra["action_id"] = action  # "" is meaningful here: the body, not a button, was clicked
    elif _text(action) is not None:
        extra["action_id"] = _text(action)
    for out_key, keys in (
        ("buttons", ("buttons",)),
        ("icon", ("icon",)),
        ("additional_data", ("additionalData", "data")),
    ):
        value = _first_key(payload, *keys)
        if _present(value):
            extra[out_key] = value
    return {
        "kind": event,
        "message_id": _first_key(payload, "notificationId", "id"),
        "subscription_id": _first_key(payload, "subscriptionId", "userId"),
        "message_title": payload.get("heading"),
        "message_contents": payload.get("content"),
        "url": payload.get("url"),
        "extra_data": {k: v for k, v in extra.items() if v is not None},
    }


def _web_push_kind(name: str) -> str | None:
    """``notification.clicked`` -> ``message.push.clicked``; None for any other name."""
    return WEB_SDK_EVENTS.get(name)

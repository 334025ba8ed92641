"""Web-push SDK webhooks: a fixed shape per SDK version, read directly."""

from __future__ import annotations

from typing import Any, Final

from gateway.core.kinds import canonical_kind
from gateway.core.normalize.values import _present, _text

__all__ = ["_web_push_fields", "_web_push_kind"]

_WEB_PUSH_ACTIONS: Final = {
    "willdisplay": "displayed",
    "displayed": "displayed",
    "display": "displayed",
    "clicked": "clicked",
    "click": "clicked",
    "dismissed": "dismissed",
    "dismiss": "dismissed",
}
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
    """``notification.clicked`` -> ``message.push.clicked``; unknown names pass through."""
    low = name.lower().strip()
    if low.startswith("message."):
        return canonical_kind(low)
    suffix = low.removeprefix("notification.").strip()
    if not suffix:
        return None
    action = _WEB_PUSH_ACTIONS.get(suffix.replace("_", ""), suffix)
    return canonical_kind(f"message.push.{action}")

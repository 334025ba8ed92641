"""The normalized event of one body: the fields found, read into today's event shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

from gateway.core.body import TextBody
from gateway.core.event import NormalizationError, NormalizedEvent
from gateway.core.kinds import KNOWN_KINDS, SOURCE_FORMATS, canonical_kind, split_kind
from gateway.core.normalize.ids import content_id
from gateway.core.normalize.liquid import _DATA_FIELDS, _liquid_fields, _segment
from gateway.core.normalize.mapping import _apply_mapping
from gateway.core.normalize.values import _localized, _tags, _text, _time
from gateway.core.normalize.web_push import WEB_SDK_EVENTS, _web_push_fields, _web_push_kind

__all__ = [
    "JOURNEY_TEXT_KIND",
    "SourceShape",
    "journey_text_event",
    "normalize",
    "normalize_for_source",
]

# A Journey webhook step with a plain-text body: an event of its own (there is nothing to read
# a kind from), on the journey channel like ``journey.webhook``.
JOURNEY_TEXT_KIND: Final = "journey.webhook.text"


class SourceShape(Protocol):
    """What normalizing needs to know of a source: the config's source and core's view fit."""

    @property
    def format(self) -> str: ...
    @property
    def app_id(self) -> str: ...
    @property
    def mapping(self) -> Mapping[str, str]: ...


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        target[key] = value


def _kind(found: dict[str, Any], fmt: str) -> tuple[str, str | None]:
    """(kind, original spelling when it differed)."""
    raw = found.get("kind")
    raw_text = raw if isinstance(raw, str) and raw.strip() else _text(raw)
    kind: str | None = None
    if fmt == "web-push":
        kind = _web_push_kind(raw) if isinstance(raw, str) else None
        if kind is None:
            shown = repr(raw_text[:80]) if raw_text is not None else "none"
            raise NormalizationError(
                "not-a-web-sdk-event",
                f"'event' is {shown}, not an event the OneSignal Web SDK sends: one of "
                f"{', '.join(WEB_SDK_EVENTS)}",
            )
        return kind, raw
    if raw_text is not None:
        kind = canonical_kind(raw_text)
    if kind is None:
        if fmt == "journey":
            return "journey.webhook", None
        raise NormalizationError(
            "no-kind",
            f"no event kind in the {fmt} body: expected 'event.kind' or 'event_kind'; add it "
            "to the template or point sources.mapping.kind at it with a JSON Pointer",
        )
    return kind, (raw_text if raw_text != kind else None)


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__


def normalize(
    payload: Any,
    *,
    fmt: str,
    mapping: Mapping[str, str] | None = None,
    default_app_id: str | None = None,
) -> NormalizedEvent:
    """The normalized event for one parsed body from a source of format ``fmt``.

    Raises :class:`NormalizationError` (and nothing else) when the body cannot be one.
    """
    if fmt not in SOURCE_FORMATS:
        raise NormalizationError(
            "unsupported-format",
            f"unknown source format {fmt!r}; one of {', '.join(SOURCE_FORMATS)}",
        )
    if not isinstance(payload, dict):
        raise NormalizationError(
            "not-an-object", f"the {fmt} body is {_describe(payload)}, expected a JSON object"
        )
    found = _web_push_fields(payload) if fmt == "web-push" else _liquid_fields(payload)
    if mapping:
        found = _apply_mapping(found, payload, mapping)

    kind, original_kind = _kind(found, fmt)
    channel, action = split_kind(kind)

    event_id = _text(found.get("id"))

    user: dict[str, Any] = {}
    _put(user, "onesignal_id", _text(found.get("onesignal_id")))
    _put(user, "external_id", _text(found.get("external_id")))
    _put(user, "tags", _tags(found.get("tags")))
    _put(user, "language", _text(found.get("language")))

    subscription: dict[str, Any] = {}
    _put(subscription, "id", _text(found.get("subscription_id")))
    _put(subscription, "device_type", _text(found.get("device_type")))
    _put(subscription, "token", _text(found.get("token")))

    message: dict[str, Any] = {}
    _put(message, "id", _text(found.get("message_id")))
    _put(message, "name", _text(found.get("message_name")))
    for name in ("title", "contents"):
        text, by_language = _localized(found.get(f"message_{name}"))
        _put(message, name, text)
        _put(message, f"{name}_by_language", by_language)
    _put(message, "template_id", _text(found.get("template_id")))
    urls: dict[str, Any] = {}
    for name in ("url", "app_url", "web_url"):
        _put(urls, name, _text(found.get(name)))
    if urls:
        message["urls"] = urls

    data: dict[str, Any] = {}
    for name in _DATA_FIELDS:
        _put(data, name, _text(found.get(name)))
    extra = found.get("extra_data")
    if isinstance(extra, dict):
        for key, value in extra.items():
            if _segment(key) not in _DATA_FIELDS:
                data.setdefault(key, value)

    return NormalizedEvent(
        id=event_id if event_id is not None else content_id(payload),
        kind=kind,
        channel=channel,
        action=action,
        app_id=_text(found.get("app_id")) or (default_app_id or None),
        occurred_at=_time(found.get("timestamp")) or _time(found.get("datetime")),
        user=user,
        subscription=subscription,
        message=message,
        data=data,
        raw=payload,
        id_from_payload=event_id is not None,
        original_kind=original_kind,
        deduplicate=event_id is not None,
    )


def journey_text_event(
    text: str,
    *,
    event_id: str,
    id_from_sender: bool,
    user: Mapping[str, str],
    default_app_id: str | None = None,
) -> NormalizedEvent:
    """The event of a Journey webhook whose body is plain text, not JSON.

    The text is kept whole in ``data.text`` (and as ``raw``); the user comes from what the
    webhook's URL or headers carry (``user``: ``onesignal_id``/``external_id``), since a text
    body has no fields to read.
    """
    channel, action = split_kind(JOURNEY_TEXT_KIND)
    return NormalizedEvent(
        id=event_id,
        kind=JOURNEY_TEXT_KIND,
        channel=channel,
        action=action,
        app_id=default_app_id or None,
        user={k: v for k, v in user.items() if v},
        data={"text": text},
        raw=text,
        id_from_payload=id_from_sender,
        deduplicate=id_from_sender,
    )


def normalize_for_source(
    payload: Any,
    source: SourceShape,
    *,
    unknown_kinds: str,
    fresh_id: Callable[[], str],
    header_id: str | None = None,
    user: Mapping[str, str] | None = None,
) -> NormalizedEvent:
    """What a configured source makes of a decoded body: the ingress and replay both use this.

    Ids: ``header_id`` (the value of the source's ``id_header``) wins over an id in the body.
    The header is configured on purpose and OneSignal renders ``{{ event.id }}`` into it as it
    is, where a body id may be found by suffix matching and passes through the admin's Liquid
    quoting. An event with neither gets ``fresh_id()`` and is never deduplicated: identical
    bodies without an id (two clicks) are two events, and a content hash would merge them.
    Web-push events keep a content hash while they carry a subscription id (the browser SDK
    sends no event id, and those fields identify the event); without one, two people
    clicking one notification send identical bytes, so they get ``fresh_id()`` too.

    A Journey body that is text rather than JSON is a :data:`JOURNEY_TEXT_KIND` event keyed by
    ``user`` (what the URL or headers carried). Raises :class:`NormalizationError` for text
    from another format (``not-json``), a body that cannot be normalized, or one of an unknown
    kind when ``unknown_kinds`` is ``"dead-letter"``.
    """
    header_id = header_id.strip() if header_id else None
    if isinstance(payload, TextBody):
        if source.format != "journey":
            raise NormalizationError("not-json", "the body is plain text, not JSON")
        return journey_text_event(
            str(payload),
            event_id=header_id or fresh_id(),
            id_from_sender=bool(header_id),
            user=user or {},
            default_app_id=source.app_id or None,
        )
    event = normalize(
        payload, fmt=source.format, mapping=source.mapping, default_app_id=source.app_id or None
    )
    if header_id:
        event = dataclasses.replace(event, id=header_id, id_from_payload=True, deduplicate=True)
    elif source.format == "web-push":
        if event.subscription.get("id"):
            event = dataclasses.replace(event, deduplicate=True)
        else:
            event = dataclasses.replace(
                event, id=fresh_id(), id_from_payload=False, deduplicate=False
            )
    elif not event.id_from_payload:
        event = dataclasses.replace(event, id=fresh_id(), deduplicate=False)
    if event.kind not in KNOWN_KINDS and unknown_kinds == "dead-letter":
        raise NormalizationError("unknown-kind", f"event kind {event.kind!r} is not known")
    return event

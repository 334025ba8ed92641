"""Turn whatever a OneSignal source sent into one :class:`NormalizedEvent`.

Event Streams and Journey bodies are templates the OneSignal admin writes in Liquid, so there
is no schema to parse against: the same fact arrives as ``{"Event Data": {"event.kind": ..}}``,
``{"event.kind": ..}``, ``{"event": {"kind": ..}}`` or ``{"event_kind": ..}``. Rather than
enumerate layouts, every node of the body is indexed by its path (keys split on ``.`` too,
case-insensitive) and each field is looked up by the suffix of its documented name, shortest
path first, then by the snake-case names OneSignal's own samples and exports use. A source can
pin any field with a JSON Pointer (``mapping``) when its template is more inventive than that.

Web-push SDK webhooks have a fixed shape per SDK version and are read directly.

Everything here is pure: no I/O, no clock. The only exception raised is
:class:`NormalizationError`, whatever JSON value comes in.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final, Protocol

import orjson

from gateway.core.body import TextBody
from gateway.core.event import NormalizationError, NormalizedEvent
from gateway.core.kinds import KNOWN_KINDS, SOURCE_FORMATS, canonical_kind, split_kind

__all__ = [
    "JOURNEY_TEXT_KIND",
    "SourceShape",
    "content_id",
    "journey_text_event",
    "normalize",
    "normalize_for_source",
]


class SourceShape(Protocol):
    """What normalizing needs to know of a source: the config's source and core's view fit."""

    @property
    def format(self) -> str: ...
    @property
    def app_id(self) -> str: ...
    @property
    def mapping(self) -> Mapping[str, str]: ...


# A Journey webhook step with a plain-text body: an event of its own (there is nothing to read
# a kind from), on the journey channel like ``journey.webhook``.
JOURNEY_TEXT_KIND: Final = "journey.webhook.text"

# Fixed forever: changing it changes every content-hash event id, and with it deduplication.
_CONTENT_ID_NAMESPACE: Final = uuid.UUID("f8d415d0-9d35-4fc4-bd67-b4857773b56a")

# Bounds on work done for one body; bodies are already capped in size and depth by the ingress.
_MAX_NODES: Final = 5000
_MAX_DEPTH: Final = 64
_MAX_HASH_STRING_CHARS: Final = 8192
_MAX_CACHED_HASH_CHARS: Final = 1024  # titles are short; bounds what the cache holds
_HASH_CACHE_SIZE: Final = 512
_MAX_TIME_TEXT_CHARS: Final = 64
_MILLISECONDS_ABOVE: Final = 1e11
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# Where each canonical field may be, best first. Dotted names are OneSignal's Liquid paths and
# match as a path suffix; single names are the snake-case keys of OneSignal's IAM sample body
# and of its warehouse export (``message_events`` columns).
_CANDIDATES: Final[dict[str, tuple[str, ...]]] = {
    "id": ("event.id", "event_id"),
    "kind": ("event.kind", "event_kind"),
    "timestamp": ("event.timestamp", "event_timestamp"),
    "datetime": ("event.datetime", "event_datetime"),
    "app_id": ("event.app_id", "app_id"),
    "onesignal_id": ("event.onesignal_id", "user.onesignal_id", "onesignal_id"),
    "external_id": ("event.external_id", "user.external_id", "external_id"),
    "subscription_id": ("event.subscription_id", "user.subscription.id", "subscription_id"),
    "device_type": (
        "event.subscription_device_type",
        "subscription_device_type",
        "device_type",
    ),
    "token": ("user.subscription.subscription_token", "subscription_token", "token"),
    "tags": ("user.tags", "tags"),
    "language": ("user.language", "language"),
    "message_id": ("message.id", "message_id", "iam_id"),
    "message_name": ("message.name", "message_name", "iam_name"),
    "message_title": ("message.title", "message_title"),
    "message_contents": ("message.contents", "message_contents"),
    "template_id": ("message.template_id", "template_id"),
    "url": ("message.url", "message_url"),
    "app_url": ("message.app_url", "message_app_url"),
    "web_url": ("message.web_url", "message_web_url"),
    "live_activity_event_kind": (
        "message.live_activity_event_kind",
        "live_activity_event_kind",
    ),
    "failure_reason": ("event.data.failure_reason", "failure_reason"),
    "page_name": ("event.data.page_name", "page_name"),
    "page_id": ("event.data.page_id", "page_id"),
    "target_name": ("event.data.target_name", "target_name"),
    "target_id": ("event.data.target_id", "target_id"),
}

# Fields that land in ``data``, in this order, ahead of any other ``event.data.*`` key.
_DATA_FIELDS: Final = (
    "failure_reason",
    "page_name",
    "page_id",
    "target_name",
    "target_id",
    "live_activity_event_kind",
)
_EVENT_DATA: Final = ("event", "data")
_USER_TAGS: Final = ("user", "tags")

_NUMERIC_TEXT: Final = re.compile(r"[+-]?\d{1,20}(?:\.\d{1,9})?")
_ARRAY_INDEX: Final = re.compile(r"0|[1-9][0-9]{0,17}")
_RUBY_WORDS: Final = re.compile(r"\b(nil|true|false)\b")
_RUBY_TO_PYTHON: Final = {"nil": "None", "true": "True", "false": "False"}
# Inside quotes, what JSON, Python and Ruby-converted literals might not read verbatim.
_UNPLAIN: Final = re.compile(r"[\\\n\r\x00\ud800-\udfff]")
_LITERAL_ERRORS: Final = (ValueError, SyntaxError, RecursionError, MemoryError, TypeError)

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


_SPACES: Final = re.compile(r"[\s\-]+")


def _segment(text: str) -> str:
    """A path segment as matched: case, surrounding space, and inner space/hyphens ignored."""
    lowered = text.strip().lower()
    if lowered.replace("_", "").isalnum():  # the common case, without the regex
        return lowered
    return _SPACES.sub("_", lowered)


def _path(dotted: str) -> tuple[str, ...]:
    return tuple(_segment(s) for s in dotted.split("."))


_CANDIDATE_PATHS: Final = {
    name: tuple(_path(c) for c in cands) for name, cands in _CANDIDATES.items()
}


# ---------------------------------------------------------------------------------------------
# values


def _present(value: Any) -> bool:
    """Liquid renders a missing value as "" (or null): both mean absent."""
    if value is None:
        return False
    return not (isinstance(value, str) and not value.strip())


def _text(value: Any) -> str | None:
    """A scalar as text: ids rendered unquoted arrive as numbers and are kept as strings."""
    if isinstance(value, str):
        stripped = value.strip()
        return stripped or None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # beyond the interpreter's int-to-text digit limit
            return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        return repr(value)
    return None


def _json_scalar(value: Any) -> bool:
    """What a Kafka record can carry (orjson takes ints up to 64 bits)."""
    if value is None or isinstance(value, str | bool | float):
        return True
    return isinstance(value, int) and -(2**63) <= value < 2**64


def _ruby_unquoted(text: str) -> str:
    return _RUBY_WORDS.sub(lambda m: _RUBY_TO_PYTHON[m.group(1)], text.replace("=>", ":"))


def _ruby_hash_as_python(text: str) -> str:
    """``{"en"=>"Hi", "x"=>nil}`` as a Python literal, touching nothing inside quotes.

    A plain scan, linear in the text (a regex over quoted strings backtracks quadratically
    on crafted input such as many unterminated quotes).
    """
    out: list[str] = []
    start = 0
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                out.append(text[start : i + 1])
                start, quote = i + 1, ""
        elif ch in "'\"":
            out.append(_ruby_unquoted(text[start:i]))
            start, quote = i, ch
        i += 1
    tail = text[start:]
    out.append(tail if quote else _ruby_unquoted(tail))
    return "".join(out)


def _quoted(text: str, start: int, end: int) -> tuple[str, int] | None:
    """(content, index after it) of a plain quoted string at ``start``, closed before ``end``.

    Plain means nothing any of the three syntaxes would read differently: no backslash, no line
    break or NUL, no lone surrogate. Anything else is left to the literal parsers.
    """
    if start >= end or text[start] not in ("'", '"'):
        return None
    quote = text[start]
    close = text.find(quote, start + 1, end)
    if close < 0:
        return None
    content = text[start + 1 : close]
    if _UNPLAIN.search(content):
        return None
    return content, close + 1


def _skip_spaces(text: str, i: int, end: int) -> int:
    while i < end and text[i] == " ":
        i += 1
    return i


def _plain_hash(text: str) -> dict[str, str] | None:
    """``{'en':'Hi', 'fr':'Salut'}`` or ``{"en"=>"Hi"}`` read in one linear pass.

    Only flat maps of plain quoted strings, which is how OneSignal renders localized text;
    None for anything else (nil, numbers, escapes, duplicate keys...), which then goes to
    :func:`_literal_hash`. Where both read a text they agree (a property test checks).
    """
    end = len(text) - 1  # text[0] == "{" and text[end] == "}"
    out: dict[str, str] = {}
    i = _skip_spaces(text, 1, end)
    while True:
        key = _quoted(text, i, end)
        if key is None or key[0] in out:
            return None
        i = _skip_spaces(text, key[1], end)
        if text.startswith(":", i):
            i += 1
        elif text.startswith("=>", i):
            i += 2
        else:
            return None
        value = _quoted(text, _skip_spaces(text, i, end), end)
        if value is None:
            return None
        out[key[0]] = value[0]
        i = _skip_spaces(text, value[1], end)
        if i == end:
            return out
        if text[i] != ",":
            return None
        i = _skip_spaces(text, i + 1, end)


def _literal_hash(text: str) -> dict[Any, Any] | None:
    """Any hash literal: JSON, then Python, then Ruby ``=>`` style (literals only, never code)."""
    parsed: Any = None
    try:
        parsed = orjson.loads(text)
    except ValueError:  # orjson.JSONDecodeError, and lone surrogates
        try:
            parsed = ast.literal_eval(text)
        except _LITERAL_ERRORS:
            try:
                parsed = ast.literal_eval(_ruby_hash_as_python(text))
            except _LITERAL_ERRORS:
                return None
    return parsed if isinstance(parsed, dict) else None


def _hash_items(text: str) -> tuple[tuple[str, Any], ...] | None:
    """The kept members of a stripped, bounded hash text, as an immutable (cacheable) value."""
    parsed = _plain_hash(text)
    if parsed is None:
        parsed = _literal_hash(text)
        if parsed is None:
            return None
    return tuple((k, v) for k, v in parsed.items() if isinstance(k, str) and _json_scalar(v))


# Titles repeat across every event of one message, so most texts were parsed a moment ago.
_cached_hash_items = lru_cache(maxsize=_HASH_CACHE_SIZE)(_hash_items)


def _parse_hash_string(text: str) -> dict[str, Any] | None:
    """A hash rendered into a string by Liquid: JSON, Python-literal or Ruby ``=>`` style.

    Only literals are evaluated (never code), only for short text that looks like a hash, and
    only string keys with JSON-safe scalar values are kept. The caller gets its own dict.
    """
    text = text.strip()
    if not (2 <= len(text) <= _MAX_HASH_STRING_CHARS and text[0] == "{" and text[-1] == "}"):
        return None
    parse = _cached_hash_items if len(text) <= _MAX_CACHED_HASH_CHARS else _hash_items
    items = parse(text)
    return None if items is None else dict(items)


def _localized(value: Any) -> tuple[str | None, dict[str, str] | None]:
    """(preferred text, text by language) of a push title/contents or an email subject."""
    by_language: dict[str, Any] | None = None
    if isinstance(value, dict):
        by_language = value
    elif isinstance(value, str):
        by_language = _parse_hash_string(value)
        if by_language is None:
            return _text(value), None
    else:
        return _text(value), None
    texts: dict[str, str] = {}
    for lang, text in by_language.items():
        rendered = _text(text)
        if isinstance(lang, str) and rendered is not None:
            texts[lang] = rendered
    if not texts:
        return None, None
    return texts.get("en", next(iter(texts.values()))), texts


def _tags(value: Any) -> dict[str, Any] | None:
    """User tags: an object, or the object rendered into a string; "" values are absent."""
    if isinstance(value, str):
        value = _parse_hash_string(value)
    if not isinstance(value, dict):
        return None
    tags = {k: v for k, v in value.items() if isinstance(k, str) and _present(v)}
    return tags or None


def _time_from_number(seconds: float) -> datetime | None:
    if seconds > _MILLISECONDS_ABOVE:
        seconds /= 1000.0
    try:
        return _UNIX_EPOCH + timedelta(seconds=seconds)
    except (OverflowError, ValueError):
        return None


def _time(value: Any) -> datetime | None:
    """When the event happened: Unix seconds or milliseconds, or ISO 8601; UTC if no zone."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        try:
            return _time_from_number(float(value))
        except OverflowError:  # an int too big for a float
            return None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or len(text) > _MAX_TIME_TEXT_CHARS:
        return None
    if _NUMERIC_TEXT.fullmatch(text):
        return _time_from_number(float(text))
    if text.upper().endswith("UTC"):  # "2024-02-21 23:45:15 UTC", as warehouses print it
        text = text[:-3].strip()
    try:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


# ---------------------------------------------------------------------------------------------
# the path index


@dataclass(frozen=True, slots=True)
class _Node:
    path: tuple[str, ...]  # matched segments
    key: str  # the last segment as written (tag and data keys keep their case)
    value: Any


# Fields whose value may be an object: the rest take scalars only.
_OBJECT_FIELDS: Final = frozenset({"tags", "message_title", "message_contents"})


def _fits(name: str, value: Any) -> bool:
    """Whether a present value could be ``name``'s value at all.

    No canonical field is a boolean, and only tags and the title/contents hashes are objects.
    A value that cannot be the field must not shadow one that can: otherwise which of two
    equally good candidates wins would depend on the order of the body's keys.
    """
    if isinstance(value, bool):
        return False
    return name in _OBJECT_FIELDS or not isinstance(value, dict | list)


def _inside_tags(path: tuple[str, ...]) -> bool:
    """Whether a member sits inside a tags object (``user.tags.x``, ``{"tags": {"x": ..}}``).

    Tags are user data (an app, or the user's own device through the SDK, sets them), so no
    canonical field is ever read from inside them: a tag named ``external_id`` or ``event.kind``
    must not stand in for a field the template left out.
    """
    return "tags" in path[:-1]


class _Index:
    """Every object member of a body, findable by the suffix of its dotted path.

    The plain statement of the lookup rules, kept as the reference :func:`_liquid_fields` must
    agree with (the tests compare the two); too slow for the request path, as it builds a node
    per member and searches them per field.
    """

    __slots__ = ("by_last", "nodes")

    def __init__(self, payload: dict[Any, Any]) -> None:
        nodes: list[_Node] = []
        queue: deque[tuple[tuple[str, ...], dict[Any, Any], int]] = deque([((), payload, 0)])
        while queue and len(nodes) < _MAX_NODES:
            prefix, obj, depth = queue.popleft()
            for key, value in obj.items():
                if not isinstance(key, str):  # JSON keys are strings; skip anything else
                    continue
                written = key.split(".")
                path = prefix + tuple(_segment(s) for s in written)
                nodes.append(_Node(path, written[-1].strip(), value))
                if isinstance(value, dict) and depth + 1 < _MAX_DEPTH:
                    queue.append((path, value, depth + 1))
        nodes.sort(key=lambda n: len(n.path))  # stable: breadth-first order among equals
        self.nodes = nodes
        self.by_last: dict[str, list[_Node]] = {}
        for node in nodes:
            self.by_last.setdefault(node.path[-1], []).append(node)

    def find(self, name: str, candidates: tuple[tuple[str, ...], ...]) -> Any:
        """The first present value: candidates in order, shortest matching path first."""
        for cand in candidates:
            for node in self.by_last.get(cand[-1], ()):
                if (
                    node.path[-len(cand) :] == cand
                    and _present(node.value)
                    and _fits(name, node.value)
                    and not _inside_tags(node.path)
                ):
                    return node.value
        return None

    def children(self, parent: tuple[str, ...]) -> dict[str, Any]:
        """Members directly under ``parent`` (``event.data.x`` or ``{"data": {"x": ..}}``)."""
        out: dict[str, Any] = {}
        size = len(parent)
        for node in self.nodes:
            if (
                len(node.path) > size
                and node.path[-size - 1 : -1] == parent
                and _present(node.value)
            ):
                out.setdefault(node.key, node.value)
        return out


def _liquid_fields_by_index(payload: dict[Any, Any]) -> dict[str, Any]:
    """What :func:`_liquid_fields` finds, the slow and obvious way."""
    index = _Index(payload)
    found = {name: index.find(name, paths) for name, paths in _CANDIDATE_PATHS.items()}
    tags = _tags(found["tags"]) if found["tags"] is not None else None
    flat_tags = index.children(_USER_TAGS)  # {"user.tags.plan": ..} in Journey bodies
    if flat_tags or tags:
        found["tags"] = {**flat_tags, **(tags or {})}
    found["extra_data"] = index.children(_EVENT_DATA)
    return found


# ---------------------------------------------------------------------------------------------
# the scan the request path uses
#
# The same answers as the index in one pass over the body and without building it: a member
# can only matter if its last segment ends a candidate or it sits directly under event.data or
# user.tags, and what a member can match depends only on its path. Templates give every event of
# a source the same keys, so what the members of one object can match is worked out once per
# (path, keys) and cached; per request only the values are looked at.

_NOT_CHILD: Final = 0
_DATA_CHILD: Final = 1
_TAG_CHILD: Final = 2


@dataclass(frozen=True, slots=True)
class _Member:
    """What one object member can be, from its path alone."""

    path: tuple[str, ...]
    key: str  # as in _Node.key
    matches: tuple[tuple[str, int], ...]  # (field, _score(rank of its best candidate, path))
    child_of: int  # _NOT_CHILD, _DATA_CHILD or _TAG_CHILD
    relevant: bool  # matches or child_of: its value is looked at at all


def _candidates_by_last() -> dict[str, tuple[tuple[str, int, tuple[str, ...]], ...]]:
    table: dict[str, list[tuple[str, int, tuple[str, ...]]]] = {}
    for name, paths in _CANDIDATE_PATHS.items():
        for rank, cand in enumerate(paths):
            table.setdefault(cand[-1], []).append((name, rank, cand))
    return {last: tuple(entries) for last, entries in table.items()}


_CANDIDATES_BY_LAST: Final = _candidates_by_last()
_RANK_STEP: Final = 1 << 32  # above any path length a body can have


def _score(rank: int, path: tuple[str, ...]) -> int:
    """Orders matches as the index does: candidate rank, then path length (one int compare)."""
    return rank * _RANK_STEP + len(path)


_SHAPE_CACHE_SIZE: Final = 1024
_MAX_CACHED_SHAPE_KEYS: Final = 128  # bigger objects are not worth keeping (nor their keys)


def _member(prefix: tuple[str, ...], key: str) -> _Member:
    written = key.split(".")
    path = prefix + tuple(_segment(s) for s in written)
    best: dict[str, int] = {}
    for name, rank, cand in () if _inside_tags(path) else _CANDIDATES_BY_LAST.get(path[-1], ()):
        if path[-len(cand) :] == cand and rank < best.get(name, rank + 1):
            best[name] = rank
    child_of = _NOT_CHILD
    if len(path) > 2:
        parent = path[-3:-1]
        child_of = (
            _DATA_CHILD if parent == _EVENT_DATA else _TAG_CHILD if parent == _USER_TAGS else 0
        )
    matches = tuple((name, _score(rank, path)) for name, rank in best.items())
    relevant = bool(matches) or child_of != _NOT_CHILD
    return _Member(path, written[-1].strip(), matches, child_of, relevant)


def _build_shape(prefix: tuple[str, ...], keys: tuple[Any, ...]) -> tuple[_Member | None, ...]:
    """One entry per key, in order; None for a key that is not a string (never indexed)."""
    return tuple(_member(prefix, k) if isinstance(k, str) else None for k in keys)


_cached_shape = lru_cache(maxsize=_SHAPE_CACHE_SIZE)(_build_shape)


def _shape(prefix: tuple[str, ...], obj: dict[Any, Any]) -> tuple[_Member | None, ...]:
    keys = tuple(obj)
    if len(keys) > _MAX_CACHED_SHAPE_KEYS:
        return _build_shape(prefix, keys)
    return _cached_shape(prefix, keys)


def _first_by_key(members: list[tuple[int, str, Any]]) -> dict[str, Any]:
    """``children()``: per written key, the present value on the shortest path, then earliest."""
    out: dict[str, Any] = {}
    members.sort(key=lambda m: m[0])  # stable
    for _, key, value in members:
        out.setdefault(key, value)
    return out


def _liquid_fields(payload: dict[Any, Any]) -> dict[str, Any]:
    """Raw values of the canonical fields in a Liquid-templated body."""
    best: dict[str, tuple[int, Any]] = {}  # field -> (score, value)
    data_members: list[tuple[int, str, Any]] = []
    tag_members: list[tuple[int, str, Any]] = []
    queue: deque[tuple[tuple[str, ...], dict[Any, Any], int]] = deque([((), payload, 0)])
    count = 0
    while queue and count < _MAX_NODES:
        prefix, obj, depth = queue.popleft()
        for member, value in zip(_shape(prefix, obj), obj.values(), strict=True):
            if member is None:
                continue
            count += 1
            # _present(value), inlined: this loop is most of the cost of a request
            if (
                member.relevant
                and value is not None
                and (not isinstance(value, str) or value.strip())
            ):
                for name, score in member.matches:
                    held = best.get(name)
                    if (held is None or score < held[0]) and _fits(name, value):
                        best[name] = (score, value)
                if member.child_of == _DATA_CHILD:
                    data_members.append((len(member.path), member.key, value))
                elif member.child_of == _TAG_CHILD:
                    tag_members.append((len(member.path), member.key, value))
            if isinstance(value, dict) and depth + 1 < _MAX_DEPTH:
                queue.append((member.path, value, depth + 1))
    found: dict[str, Any] = dict.fromkeys(_CANDIDATES)
    for name, (_, value) in best.items():
        found[name] = value
    tags = _tags(found["tags"]) if found["tags"] is not None else None
    flat_tags = _first_by_key(tag_members)  # {"user.tags.plan": ..} in Journey bodies
    if flat_tags or tags:
        found["tags"] = {**flat_tags, **(tags or {})}
    found["extra_data"] = _first_by_key(data_members)
    return found


# ---------------------------------------------------------------------------------------------
# web-push SDK


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


# ---------------------------------------------------------------------------------------------
# mapping


_MISSING: Final = object()


def _resolve_pointer(document: Any, pointer: str) -> Any:
    """RFC 6901: ``/Event Data/event.kind``, ``~1`` for '/' and ``~0`` for '~'."""
    if pointer == "":
        return document
    if not pointer.startswith("/"):
        return _MISSING
    current = document
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(current, dict):
            if token not in current:
                return _MISSING
            current = current[token]
        elif isinstance(current, list):
            if not _ARRAY_INDEX.fullmatch(token) or int(token) >= len(current):
                return _MISSING
            current = current[int(token)]
        else:
            return _MISSING
    return current


def _apply_mapping(
    found: dict[str, Any], payload: dict[Any, Any], mapping: Mapping[str, str]
) -> dict[str, Any]:
    """Mapped values win; a pointer that finds nothing leaves the auto-detected value."""
    out = dict(found)
    for name, pointer in mapping.items():
        if not isinstance(pointer, str) or name not in _CANDIDATES:
            continue
        value = _resolve_pointer(payload, pointer)
        if value is not _MISSING and _present(value):
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# ids


def _canonical_json(value: Any) -> str:
    """Sorted-key JSON for anything, at any depth, with ints of any size (as hex beyond 64 bits).

    Only used when orjson declines (huge ints, lone surrogates, very deep nesting); it is
    iterative so depth cannot exhaust the stack.
    """
    out: list[str] = []
    stack: list[Any] = [value]
    literal = _Literal
    while stack:
        item = stack.pop()
        if isinstance(item, literal):
            out.append(item.text)
        elif isinstance(item, dict):
            entries = sorted(((_key_text(k), v) for k, v in item.items()), key=lambda e: e[0])
            stack.append(literal("}"))
            for i in range(len(entries) - 1, -1, -1):
                stack.append(entries[i][1])
                sep = "," if i else ""
                stack.append(literal(f"{sep}{json.dumps(entries[i][0])}:"))
            stack.append(literal("{"))
        elif isinstance(item, list | tuple):
            stack.append(literal("]"))
            for i in range(len(item) - 1, -1, -1):
                stack.append(item[i])
                if i:
                    stack.append(literal(","))
            stack.append(literal("["))
        else:
            out.append(_scalar_json(item))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class _Literal:
    text: str


def _int_text(value: int) -> str:
    try:
        return str(value)
    except ValueError:
        return f'"int:{value:x}"'


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or key is None:
        return json.dumps(key)
    if isinstance(key, int):
        return _int_text(key)
    return _scalar_json(key)


def _scalar_json(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int):
        return _int_text(value)
    if isinstance(value, float):
        return json.dumps(value) if math.isfinite(value) else "null"
    return json.dumps(f"{type(value).__name__}")


def content_id(payload: Any) -> str:
    """A stable id for a payload without one: identical content, identical id, any key order."""
    try:
        text = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        text = _canonical_json(payload)
    return str(uuid.uuid5(_CONTENT_ID_NAMESPACE, text))


# ---------------------------------------------------------------------------------------------
# assembly


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        target[key] = value


def _kind(found: dict[str, Any], fmt: str) -> tuple[str, str | None]:
    """(kind, original spelling when it differed)."""
    raw = found.get("kind")
    raw_text = raw if isinstance(raw, str) and raw.strip() else _text(raw)
    kind: str | None = None
    if raw_text is not None:
        kind = _web_push_kind(raw_text) if fmt == "web-push" else canonical_kind(raw_text)
    if kind is None:
        if fmt == "journey":
            return "journey.webhook", None
        where = (
            "'event' (notification.clicked...)"
            if fmt == "web-push"
            else "'event.kind' or 'event_kind'"
        )
        raise NormalizationError(
            "no-kind",
            f"no event kind in the {fmt} body: expected {where}; add it to the template "
            "or point sources.mapping.kind at it with a JSON Pointer",
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

"""Where each canonical field is in a Liquid-templated body (Event Streams, Journeys).

Every node of the body is indexed by its path (keys split on ``.`` too, case-insensitive) and
each field is looked up by the suffix of its documented name, shortest path first, then by the
snake-case names OneSignal's own samples and exports use. :class:`_Index` states the rules
plainly; :func:`_liquid_fields` is the one-pass scan the request path uses, and the tests
hold the two to the same answers.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from gateway.core.normalize.values import _present, _tags

__all__ = [
    "_CANDIDATES",
    "_DATA_FIELDS",
    "_liquid_fields",
    "_liquid_fields_by_index",
    "_segment",
]

# Bounds on work done for one body; bodies are already capped in size and depth by the ingress.
_MAX_NODES: Final = 5000
_MAX_DEPTH: Final = 64

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

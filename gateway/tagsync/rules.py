"""Tag rules: which string tags a normalized event sets or deletes on its OneSignal user.

Pure functions over plain data (the event is the JSON value the ingress wrote to Kafka), so
the whole rules language is tested without a broker. Rules are compiled once at start-up;
every mistake is reported with the config key it is about (``tag_sync.rules[0].tags.x``).

Rendering choices, documented in docs/tag-sync.md:

- a template is text with ``{field}`` placeholders (``{{`` and ``}}`` are literal braces);
- a placeholder whose field is missing, null or not a scalar makes *that tag* skip for that
  event (reported as a :class:`Skip`); the event's other tags still apply;
- values are always strings: booleans render ``true``/``false``, integral numbers without a
  decimal point;
- when several matching rules write the same key, the later rule wins; a ``delete`` loses to a
  later rule's value and vice versa.
"""

from __future__ import annotations

import fnmatch
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.config import ConfigError, TagRule

__all__ = [
    "COMPUTED_FIELDS",
    "RESERVED_TAG_KEYS",
    "Alias",
    "CompiledRule",
    "Derivation",
    "Skip",
    "Template",
    "compile_rules",
    "derive",
    "event_order",
    "resolve_alias",
    "unix_seconds",
]

RESERVED_TAG_KEYS = frozenset(
    {
        "message",
        "notification",
        "subscription",
        "user",
        "template",
        "app",
        "org",
        "dynamic_content",
        "data_feed",
        "journey",
        "custom_data",
    }
)

# Fields computed from the event rather than read from it.
COMPUTED_FIELDS = frozenset({"occurred_unix", "received_unix"})
# Top-level scalar fields of the normalized value.
SCALAR_FIELDS = frozenset({"id", "kind", "channel", "action", "app_id", "occurred_at"})
# Top-level objects a dotted path may walk into.
OBJECT_FIELDS = frozenset({"user", "subscription", "message", "data", "received", "raw"})

_SEGMENT = re.compile(r"^[A-Za-z0-9_\-]+$")
_ALIAS_LABELS = ("external_id", "onesignal_id")

TagValue = str | None  # None: delete the tag


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal text and field paths, alternating."""

    source: str
    parts: tuple[str | tuple[str, ...], ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(".".join(p) for p in self.parts if isinstance(p, tuple))

    def render(self, event: Mapping[str, Any]) -> str | None:
        """The rendered string, or None when a field is missing (the tag is skipped)."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            text = _field_text(event, part)
            if text is None:
                return None
            out.append(text)
        return "".join(out)


def parse_template(key: str, source: str) -> Template:
    """Parse ``source``; errors name ``key``."""
    parts: list[str | tuple[str, ...]] = []
    try:
        parsed = list(string.Formatter().parse(source))
    except ValueError as exc:
        raise ConfigError(
            key, f"bad template {source!r}: {exc} (use {{{{ for a literal brace)"
        ) from None
    for literal, field_name, spec, conversion in parsed:
        if literal:
            parts.append(literal)
        if field_name is None:
            continue
        if spec or conversion:
            raise ConfigError(
                key, f"{{{field_name}}}: format specs and !conversions are not supported"
            )
        path = tuple(field_name.split("."))
        _check_path(key, field_name, path)
        parts.append(path)
    return Template(source=source, parts=tuple(parts))


def _check_path(key: str, name: str, path: tuple[str, ...]) -> None:
    if not name or not all(_SEGMENT.match(p) for p in path):
        raise ConfigError(key, f"{{{name}}} is not a field path like {{message.id}}")
    root = path[0]
    if len(path) == 1 and (root in COMPUTED_FIELDS or root in SCALAR_FIELDS):
        return
    if len(path) > 1 and root in OBJECT_FIELDS:
        return
    known = sorted(COMPUTED_FIELDS | SCALAR_FIELDS)
    known += [f"{o}.<field>" for o in sorted(OBJECT_FIELDS)]
    raise ConfigError(key, f"unknown field {{{name}}}; one of {', '.join(known)}")


def _scalar_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value
    return None  # objects and arrays are not tag values


def _field_text(event: Mapping[str, Any], path: tuple[str, ...]) -> str | None:
    if len(path) == 1 and path[0] == "occurred_unix":
        ts = unix_seconds(event.get("occurred_at"))
        if ts is None:
            ts = unix_seconds(_walk(event, ("received", "at")))
        return None if ts is None else str(int(ts))
    if len(path) == 1 and path[0] == "received_unix":
        ts = unix_seconds(_walk(event, ("received", "at")))
        return None if ts is None else str(int(ts))
    return _scalar_text(_walk(event, path))


def _walk(obj: Any, path: tuple[str, ...]) -> Any:
    for segment in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(segment)
    return obj


def unix_seconds(value: Any) -> float | None:
    """Unix seconds of an RFC 3339 string (naive means UTC), or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.timestamp()


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One validated ``[[tag_sync.rules]]`` entry, ready to match events."""

    index: int
    kinds: tuple[str, ...]
    tags: tuple[tuple[str, Template], ...]
    delete: tuple[str, ...]
    channels: frozenset[str]
    apps: frozenset[str]
    accept_unauthenticated: bool = False

    def key(self, tag: str) -> str:
        return f"tag_sync.rules[{self.index}].tags.{tag}"

    def matches(self, event: Mapping[str, Any]) -> bool:
        kind = event.get("kind")
        if not isinstance(kind, str) or not any(fnmatch.fnmatchcase(kind, k) for k in self.kinds):
            return False
        if self.channels and event.get("channel") not in self.channels:
            return False
        return not (self.apps and event.get("app_id") not in self.apps)


def _check_tag_key(key: str, tag: str) -> None:
    if not tag or tag.strip() != tag:
        raise ConfigError(key, "a tag key must be non-empty, without surrounding spaces")
    if tag.lower() in RESERVED_TAG_KEYS:
        raise ConfigError(
            key,
            f"{tag!r} is a key OneSignal reserves ({', '.join(sorted(RESERVED_TAG_KEYS))}); "
            "choose another name",
        )


def compile_rules(rules: Sequence[TagRule]) -> tuple[CompiledRule, ...]:
    """Validate and compile the configured rules, failing with the offending key."""
    compiled: list[CompiledRule] = []
    for i, rule in enumerate(rules):
        base = f"tag_sync.rules[{i}]"
        for j, kind in enumerate(rule.kinds):
            if not kind or kind.strip() != kind:
                raise ConfigError(f"{base}.kinds[{j}]", f"not an event kind or glob: {kind!r}")
        tags: list[tuple[str, Template]] = []
        for tag, source in rule.tags.items():
            key = f"{base}.tags.{tag}"
            _check_tag_key(key, tag)
            tags.append((tag, parse_template(key, source)))
        for j, tag in enumerate(rule.delete):
            _check_tag_key(f"{base}.delete[{j}]", tag)
            if tag in rule.tags:
                raise ConfigError(f"{base}.delete[{j}]", f"{tag!r} is both set and deleted")
        compiled.append(
            CompiledRule(
                index=i,
                kinds=tuple(rule.kinds),
                tags=tuple(tags),
                delete=tuple(rule.delete),
                channels=frozenset(rule.channels),
                apps=frozenset(rule.apps),
                accept_unauthenticated=rule.accept_unauthenticated,
            )
        )
    return tuple(compiled)


@dataclass(frozen=True, slots=True)
class Alias:
    """Which OneSignal user an update is for."""

    app_id: str
    label: str
    id: str


@dataclass(frozen=True, slots=True)
class Skip:
    """A tag a rule would have set, skipped because a template field was missing."""

    rule_key: str
    field: str


@dataclass(frozen=True, slots=True)
class Derivation:
    """What one event means for its user: tag values (None = delete) and skipped tags."""

    tags: Mapping[str, TagValue]
    skipped: tuple[Skip, ...] = ()
    matched: int = 0
    # rules that matched but were not applied: the event is unauthenticated and they do not
    # accept such events
    unauthenticated: int = 0


def derive(
    rules: Sequence[CompiledRule], event: Mapping[str, Any], *, authenticated: bool = True
) -> Derivation:
    """Apply every matching rule to one event; later rules win per key.

    An event that is not ``authenticated`` (its record's ``authtype`` is ``unauthenticated``:
    a web-push event anyone could have sent) is seen only by rules that opt in with
    ``accept_unauthenticated``.
    """
    tags: dict[str, TagValue] = {}
    skipped: list[Skip] = []
    matched = 0
    ignored = 0
    for rule in rules:
        if not rule.matches(event):
            continue
        if not authenticated and not rule.accept_unauthenticated:
            ignored += 1
            continue
        matched += 1
        for tag in rule.delete:
            tags[tag] = None
        for tag, template in rule.tags:
            value = template.render(event)
            if value is None:
                missing = next(
                    (
                        ".".join(p)
                        for p in template.parts
                        if isinstance(p, tuple) and _field_text(event, p) is None
                    ),
                    template.source,
                )
                skipped.append(Skip(rule_key=rule.key(tag), field=missing))
                continue
            tags[tag] = value
    return Derivation(tags=tags, skipped=tuple(skipped), matched=matched, unauthenticated=ignored)


def resolve_alias(event: Mapping[str, Any], preferred: str) -> Alias | None:
    """The user to update: ``preferred`` alias, else the other one; None without either.

    Also None without an app id (nothing to address); the caller checks app configuration.
    """
    app_id = event.get("app_id")
    user = event.get("user")
    if not isinstance(app_id, str) or not app_id or not isinstance(user, Mapping):
        return None
    order = (preferred, *(label for label in _ALIAS_LABELS if label != preferred))
    for label in order:
        value = _scalar_text(user.get(label))
        if value:
            return Alias(app_id=app_id, label=label, id=value)
    return None


def event_order(event: Mapping[str, Any]) -> float:
    """When the event happened, for newest-wins merging (occurred_at, else received.at)."""
    ts = unix_seconds(event.get("occurred_at"))
    if ts is None:
        ts = unix_seconds(_walk(event, ("received", "at")))
    return ts if ts is not None else 0.0

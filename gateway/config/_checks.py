"""Checks of one key's value, named in the key's declaration: ``(dotted key, value) -> value``."""

from __future__ import annotations

import re
import socket

import netaddr

from gateway.config._schema import ConfigError

__all__ = [
    "MAPPABLE_FIELDS",
    "USER_HEADER_FIELDS",
    "api_version",
    "at_most_100_keys",
    "cidrs",
    "event_kinds",
    "expand_hostname",
    "header_name",
    "http_url",
    "json_pointers",
    "lowercase",
    "non_empty",
    "route_path",
    "source_name",
    "topic_name",
    "topic_template",
]

# Canonical field names a source's `mapping` may point at with a JSON Pointer.
MAPPABLE_FIELDS = (
    "id",
    "kind",
    "timestamp",
    "datetime",
    "app_id",
    "onesignal_id",
    "external_id",
    "subscription_id",
    "device_type",
    "token",
    "tags",
    "message_id",
    "message_name",
    "message_title",
    "message_contents",
    "template_id",
    "url",
    "app_url",
    "web_url",
    "failure_reason",
    "page_name",
    "page_id",
    "target_name",
    "target_id",
)
# The user fields a Journey webhook may template into a header (plain-text bodies are keyed
# by them).
USER_HEADER_FIELDS = ("onesignal_id", "external_id")
# Header names OneSignal does not let a stream or webhook set (onesignal-reference.md 1.5);
# an id or user header by one of these names could never arrive.
_UNSETTABLE_HEADERS = frozenset(
    {"content-length", "referer", "metadata-flavor", "x-google-metadata-request", "host"}
)
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,64}")
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_BUILT_IN_ROUTES = ("/healthz", "/readyz", "/metrics", "/openapi.json")


def cidrs(key: str, values: tuple[str, ...]) -> tuple[str, ...]:
    for i, value in enumerate(values):
        try:
            netaddr.IPNetwork(value)  # strict in netaddr >= 1.0 (no inet_aton forms)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise ConfigError(f"{key}[{i}]", f"not an IP address or CIDR: {value!r}") from None
    return values


def topic_name(key: str, topic: str) -> str:
    if not _TOPIC_RE.match(topic.replace("{channel}", "push")):
        raise ConfigError(key, f"not a valid Kafka topic name: {topic!r}")
    return topic


def origins(key: str, values: tuple[str, ...]) -> tuple[str, ...]:
    """Serialized origins as browsers send them in ``Origin`` (scheme://host[:port]), or "*"."""
    for i, value in enumerate(values):
        if value == "*":
            continue
        if not re.fullmatch(r"https?://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?", value):
            raise ConfigError(
                f"{key}[{i}]",
                f"{value!r} is not an origin: scheme://host[:port] in lowercase, no path or"
                ' trailing slash (https://shop.example), or "*" for any',
            )
    return values


def optional_topic_name(key: str, topic: str) -> str:
    """Empty, or a plain topic name (no ``{channel}``: input never chooses it)."""
    if topic and (not _TOPIC_RE.match(topic)):
        raise ConfigError(key, f"not a valid Kafka topic name (no placeholders): {topic!r}")
    return topic


def topic_template(key: str, template: str) -> str:
    try:
        template.format(channel="push")
    except (KeyError, IndexError, ValueError):
        raise ConfigError(key, "may only use the placeholder {channel}") from None
    return topic_name(key, template)


def api_version(key: str, version: str) -> str:
    if version and not re.fullmatch(r"\d+(\.\d+){1,2}", version):
        raise ConfigError(key, f"must look like '2.3' or be empty, got {version!r}")
    return version


def http_url(key: str, url: str) -> str:
    """The URL without a trailing slash (paths are appended to it)."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(key, "must start with http:// or https://")
    return url


def source_name(key: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(key, "must be 1-64 letters, digits, '.', '_' or '-'")
    return name


def route_path(key: str, path: str) -> str:
    if not path.startswith("/") or path in _BUILT_IN_ROUTES:
        raise ConfigError(key, f"must start with '/' and not be a built-in route: {path!r}")
    return path


def json_pointers(key: str, mapping: dict[str, str]) -> dict[str, str]:
    for field_name, pointer in mapping.items():
        if field_name not in MAPPABLE_FIELDS:
            raise ConfigError(
                f"{key}.{field_name}", f"unknown field; one of {', '.join(MAPPABLE_FIELDS)}"
            )
        if not pointer.startswith("/"):
            raise ConfigError(f"{key}.{field_name}", "must be a JSON Pointer such as '/event/kind'")
    return mapping


def lowercase(key: str, value: str) -> str:
    return value.lower()


def header_name(key: str, name: str, *, secret_header: str) -> str:
    """A request header name OneSignal can set, lowercased (ASGI gives names lowercased)."""
    lowered = name.strip().lower()
    if not _HEADER_NAME.fullmatch(lowered):
        raise ConfigError(key, f"not an HTTP header name (1-64 token characters): {name!r}")
    if lowered in _UNSETTABLE_HEADERS or lowered.startswith("x-onesignal"):
        raise ConfigError(key, f"OneSignal cannot send a header named {lowered!r}")
    if lowered in ("content-type", secret_header):
        raise ConfigError(key, f"{lowered!r} carries something else; name a header of its own")
    return lowered


def non_empty(key: str, value: str) -> str:
    if not value:
        raise ConfigError(key, "is required")
    return value


def at_most_100_keys(key: str, value: int) -> int:
    if value > 100:
        raise ConfigError(key, "OneSignal accepts at most 100")
    return value


def expand_hostname(key: str, value: str) -> str:
    return value.replace("{hostname}", socket.gethostname())


def event_kinds(key: str, kinds: tuple[str, ...]) -> tuple[str, ...]:
    if not kinds:
        raise ConfigError(key, "must list at least one event kind (globs allowed)")
    return kinds

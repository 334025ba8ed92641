"""One validated configuration object, read from a TOML file at start-up.

Every setting is checked here, once, and every error names the key it is about
(``sources[1].format: must be one of event-stream, journey, web-push``). Secrets
are never in the file: the file names environment variables, and the values are
held in :class:`Secret`, whose ``repr`` and ``str`` never show them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netaddr

__all__ = [
    "RECORD_HEADROOM_BYTES",
    "AllowlistConfig",
    "Config",
    "ConfigError",
    "DedupeConfig",
    "KafkaConfig",
    "OneSignalApp",
    "OneSignalConfig",
    "Secret",
    "ServerConfig",
    "SourceConfig",
    "TagRule",
    "TagSyncConfig",
    "TopicsConfig",
    "load_config",
    "parse_config",
    "read_api_key",
]

from gateway.core.kinds import CHANNELS as CHANNELS
from gateway.core.kinds import SOURCE_FORMATS as SOURCE_FORMATS

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


# Bytes a Kafka record may need beyond the request body it carries: the dead-letter headers
# (records.build_dead_letter caps each of them so that their sum stays below this), the key and
# the record batch framing. A body up to ``kafka.max_request_size`` minus this always fits.
RECORD_HEADROOM_BYTES = 4096
# kafka-python's default max_request_size, below Kafka's default message.max.bytes (1048588).
_KAFKA_MAX_REQUEST_SIZE = 1_048_576
# Header names OneSignal does not let a stream or webhook set (onesignal-reference.md 1.5);
# an id or user header by one of these names could never arrive.
_UNSETTABLE_HEADERS = frozenset(
    {"content-length", "referer", "metadata-flavor", "x-google-metadata-request", "host"}
)
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,64}")
# The user fields a Journey webhook may template into a header (plain-text bodies are keyed
# by them).
USER_HEADER_FIELDS = ("onesignal_id", "external_id")


class ConfigError(ValueError):
    """A configuration problem, with the dotted key it concerns in the message."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class Secret:
    """A secret value that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:  # only for tests of config parsing
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    proxy_header: str = "x-forwarded-for"
    max_body_bytes: int = _KAFKA_MAX_REQUEST_SIZE - RECORD_HEADROOM_BYTES
    max_json_depth: int = 64
    timeout_keep_alive: int = 620
    limit_concurrency: int = 0
    workers: int = 1
    graceful_shutdown_s: float = 20.0
    log_level: str = "info"
    access_log: bool = False


@dataclass(frozen=True)
class AllowlistConfig:
    scopes: tuple[str, ...] = ("europe-west4",)
    snapshot: str = ""
    include_onesignal_published: bool = True
    extra_cidrs: tuple[str, ...] = ()
    # On by default: Google's ranges change, and a sender whose new address is missing from a
    # stale set is answered 403, which OneSignal does not retry (the event is lost).
    refresh_url: str = "https://www.gstatic.com/ipranges/cloud.json"
    refresh_interval_s: float = 86400.0
    refresh_retry_s: float = 900.0
    refresh_timeout_s: float = 10.0


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "localhost:9092"
    api_version: str = ""
    client_id: str = "onesignal-gateway"
    topic: str = "onesignal.{channel}"
    dead_letter_topic: str = "onesignal.dead-letter"
    content_mode: str = "binary"
    unknown_kinds: str = "publish"
    producer: str = "process"
    ack_timeout_s: float = 5.0
    max_in_flight: int = 5000
    retry_after_s: int = 5
    linger_ms: int = 0
    batch_size: int = 262144
    compression_type: str = ""
    request_timeout_ms: int = 10000
    delivery_timeout_ms: int = 30000
    max_block_ms: int = 2000
    # no record settled (acknowledged or failed) for this long while some are outstanding: the
    # producer is stuck and is replaced; 0 = delivery_timeout_ms + request_timeout_ms + 5 s
    stall_timeout_s: float = 0.0
    max_request_size: int = _KAFKA_MAX_REQUEST_SIZE
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: Secret | None = None
    ssl_cafile: str = ""

    @property
    def stall_after_s(self) -> float:
        if self.stall_timeout_s > 0:
            return self.stall_timeout_s
        return (self.delivery_timeout_ms + self.request_timeout_ms) / 1000 + 5.0

    def api_version_tuple(self) -> tuple[int, ...] | None:
        if not self.api_version:
            return None
        return tuple(int(p) for p in self.api_version.split("."))

    def client_options(self) -> dict[str, Any]:
        """Options shared by every kafka-python client this process makes."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.api_version:
            opts["api_version"] = self.api_version_tuple()
        if self.sasl_mechanism:
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            opts["sasl_plain_password"] = self.sasl_password.reveal() if self.sasl_password else ""
        if self.ssl_cafile:
            opts["ssl_cafile"] = self.ssl_cafile
        return opts


@dataclass(frozen=True)
class TopicsConfig:
    """What ``gateway topics create`` makes, and what check-config and readiness hold topics to."""

    partitions: int = 12
    replication_factor: int = 3
    min_insync_replicas: int = 2
    # how often the ingress lists Kafka's topics to say in /readyz which of its own are missing
    check_interval_s: float = 30.0


@dataclass(frozen=True)
class DedupeConfig:
    window_s: float = 3600.0
    max_entries: int = 1_000_000


@dataclass(frozen=True)
class SourceConfig:
    name: str
    path: str
    format: str
    require_allowlisted_ip: bool = True
    secret_header: str = "authorization"  # noqa: S105 - a header name, not a secret
    secrets_env: str = ""
    secrets: tuple[Secret, ...] = ()
    require_secret: bool = True
    app_id: str = ""
    cors_origins: tuple[str, ...] = ("*",)
    mapping: Mapping[str, str] = field(default_factory=dict)
    id_header: str = ""
    user_headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class OneSignalApp:
    app_id: str
    api_key_env: str
    api_key: Secret | None
    api_key_file: str = ""

    @property
    def api_key_source(self) -> str:
        """Where the key is read from, for messages (never the key)."""
        return f"file {self.api_key_file}" if self.api_key_file else f"${self.api_key_env}"


@dataclass(frozen=True)
class OneSignalConfig:
    api_url: str = "https://api.onesignal.com"
    timeout_s: float = 10.0
    apps: tuple[OneSignalApp, ...] = ()


@dataclass(frozen=True)
class TagRule:
    kinds: tuple[str, ...]
    tags: Mapping[str, str] = field(default_factory=dict)
    delete: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    apps: tuple[str, ...] = ()


@dataclass(frozen=True)
class TagSyncConfig:
    group_id: str = "onesignal-tag-sync"
    topics: tuple[str, ...] = ()
    alias_label: str = "external_id"
    flush_interval_s: float = 1.0
    max_keys_per_request: int = 100
    per_user_interval_s: float = 1.0
    app_rate_limit: float = 500.0
    max_concurrency: int = 64
    http_client: str = "auto"
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    max_retry_elapsed_s: float = 900.0
    dead_letter_topic: str = "onesignal.tag-sync.dead-letter"
    delete_value: str = ""
    max_poll_records: int = 500
    max_pending_events: int = 100_000
    catch_up_partitions: int = 6
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 2000
    group_instance_id: str = ""
    shutdown_timeout_s: float = 10.0
    metrics_port: int = 9102
    auth_retry_s: float = 30.0
    rules: tuple[TagRule, ...] = ()

    def resolved_topics(self, template: str) -> tuple[str, ...]:
        if self.topics:
            return self.topics
        return tuple(dict.fromkeys(template.format(channel=c) for c in CHANNELS))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    allowlist: AllowlistConfig = field(default_factory=AllowlistConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    sources: tuple[SourceConfig, ...] = ()
    onesignal: OneSignalConfig = field(default_factory=OneSignalConfig)
    tag_sync: TagSyncConfig = field(default_factory=TagSyncConfig)
    path: str = ""


# ---------------------------------------------------------------------------------------------
# parsing


class _Section:
    """Typed reads from one TOML table, with the table's dotted name for error messages."""

    def __init__(self, data: Any, key: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(key, f"must be a table, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.key = key
        self.used: set[str] = set()

    def _name(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def _get(self, name: str, default: Any) -> Any:
        self.used.add(name)
        return self.data.get(name, default)

    def text(self, name: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            raise ConfigError(self._name(name), f"must be a string, got {value!r}")
        if choices and value not in choices:
            raise ConfigError(
                self._name(name), f"must be one of {', '.join(choices)}, got {value!r}"
            )
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self._name(name), f"must be true or false, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int | None = None) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self._name(name), f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(self._name(name), f"must be at least {minimum}, got {value}")
        return value

    def number(self, name: str, default: float, minimum: float | None = None) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self._name(name), f"must be a number, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(self._name(name), f"must be at least {minimum}, got {value}")
        return float(value)

    def texts(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(name, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(self._name(name), f"must be a list of strings, got {value!r}")
        return tuple(value)

    def table(self, name: str) -> _Section:
        return _Section(self._get(name, {}), self._name(name))

    def tables(self, name: str) -> list[_Section]:
        value = self._get(name, [])
        if not isinstance(value, list):
            raise ConfigError(self._name(name), "must be an array of tables ([[...]])")
        return [_Section(item, f"{self._name(name)}[{i}]") for i, item in enumerate(value)]

    def text_map(self, name: str) -> dict[str, str]:
        value = self._get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(self._name(name), "must be a table of strings")
        for k, v in value.items():
            if not isinstance(v, str):
                raise ConfigError(f"{self._name(name)}.{k}", f"must be a string, got {v!r}")
        return dict(value)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(self._name(unknown[0]), "unknown key (check the spelling)")


def _env_secret(env: Mapping[str, str], key: str, var: str, *, required: bool) -> Secret | None:
    if not var:
        if required:
            raise ConfigError(key, "must name an environment variable")
        return None
    value = env.get(var)
    if value is None or value.strip() == "":
        if required:
            raise ConfigError(key, f"environment variable {var} is not set or empty")
        return None
    return Secret(value.strip())


def read_api_key(app: OneSignalApp, env: Mapping[str, str] | None = None) -> Secret | None:
    """The app's API key as its source holds it now (``api_key_file`` or ``api_key_env``),
    or None when the source is empty or unset. Raises OSError for a file it cannot read.

    Called at start-up and again while tag sync runs, so a key rotated in its file (a mounted
    secret is updated in place) is picked up without a restart.
    """
    if app.api_key_file:
        value = Path(app.api_key_file).read_text(encoding="utf-8").strip()
        return Secret(value) if value else None
    env = os.environ if env is None else env
    return _env_secret(env, "", app.api_key_env, required=False)


def _cidrs(key: str, values: tuple[str, ...]) -> tuple[str, ...]:
    for i, value in enumerate(values):
        try:
            netaddr.IPNetwork(value)  # strict in netaddr >= 1.0 (no inet_aton forms)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise ConfigError(f"{key}[{i}]", f"not an IP address or CIDR: {value!r}") from None
    return values


def _template_ok(key: str, template: str) -> str:
    try:
        template.format(channel="push")
    except (KeyError, IndexError, ValueError):
        raise ConfigError(key, "may only use the placeholder {channel}") from None
    return template


_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def _topic_ok(key: str, topic: str) -> str:
    if not _TOPIC_RE.match(topic.replace("{channel}", "push")):
        raise ConfigError(key, f"not a valid Kafka topic name: {topic!r}")
    return topic


def _header_name(key: str, name: str, *, secret_header: str) -> str:
    """A request header name OneSignal can set, lowercased (ASGI gives names lowercased)."""
    lowered = name.strip().lower()
    if not _HEADER_NAME.fullmatch(lowered):
        raise ConfigError(key, f"not an HTTP header name (1-64 token characters): {name!r}")
    if lowered in _UNSETTABLE_HEADERS or lowered.startswith("x-onesignal"):
        raise ConfigError(key, f"OneSignal cannot send a header named {lowered!r}")
    if lowered in ("content-type", secret_header):
        raise ConfigError(key, f"{lowered!r} carries something else; name a header of its own")
    return lowered


def parse_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML; ``env`` resolves the secrets' variables."""
    env = os.environ if env is None else env
    root = _Section(dict(data), "")

    s = root.table("server")
    server = ServerConfig(
        host=s.text("host", ServerConfig.host),
        port=s.integer("port", ServerConfig.port, minimum=0),
        trusted_proxies=_cidrs(
            "server.trusted_proxies", s.texts("trusted_proxies", ServerConfig.trusted_proxies)
        ),
        proxy_header=s.text("proxy_header", "x-forwarded-for", ("x-forwarded-for", "forwarded")),
        max_body_bytes=s.integer("max_body_bytes", ServerConfig.max_body_bytes, minimum=256),
        max_json_depth=s.integer("max_json_depth", ServerConfig.max_json_depth, minimum=2),
        timeout_keep_alive=s.integer(
            "timeout_keep_alive", ServerConfig.timeout_keep_alive, minimum=1
        ),
        limit_concurrency=s.integer("limit_concurrency", 0, minimum=0),
        workers=s.integer("workers", 1, minimum=1),
        graceful_shutdown_s=s.number("graceful_shutdown_s", 20.0, minimum=0),
        log_level=s.text("log_level", "info", ("debug", "info", "warning", "error")),
        access_log=s.flag("access_log", False),
    )
    s.finish()

    a = root.table("allowlist")
    allowlist = AllowlistConfig(
        scopes=a.texts("scopes", AllowlistConfig.scopes),
        snapshot=a.text("snapshot", ""),
        include_onesignal_published=a.flag("include_onesignal_published", True),
        extra_cidrs=_cidrs("allowlist.extra_cidrs", a.texts("extra_cidrs", ())),
        refresh_url=a.text("refresh_url", AllowlistConfig.refresh_url),
        refresh_interval_s=a.number(
            "refresh_interval_s", AllowlistConfig.refresh_interval_s, minimum=0
        ),
        refresh_retry_s=a.number("refresh_retry_s", AllowlistConfig.refresh_retry_s, minimum=1),
        refresh_timeout_s=a.number(
            "refresh_timeout_s", AllowlistConfig.refresh_timeout_s, minimum=0.1
        ),
    )
    if allowlist.refresh_interval_s and not allowlist.refresh_url:
        raise ConfigError(
            "allowlist.refresh_url", "must be set when refresh_interval_s > 0 (0 turns refresh off)"
        )
    if allowlist.refresh_url and not allowlist.refresh_url.startswith(("http://", "https://")):
        raise ConfigError("allowlist.refresh_url", "must start with http:// or https://")
    if allowlist.refresh_interval_s and allowlist.refresh_interval_s < 60:
        raise ConfigError("allowlist.refresh_interval_s", "must be 0 (off) or at least 60")
    a.finish()

    k = root.table("kafka")
    kafka = KafkaConfig(
        bootstrap_servers=k.text("bootstrap_servers", KafkaConfig.bootstrap_servers),
        api_version=k.text("api_version", ""),
        client_id=k.text("client_id", KafkaConfig.client_id),
        topic=_topic_ok(
            "kafka.topic", _template_ok("kafka.topic", k.text("topic", KafkaConfig.topic))
        ),
        dead_letter_topic=_topic_ok(
            "kafka.dead_letter_topic", k.text("dead_letter_topic", KafkaConfig.dead_letter_topic)
        ),
        content_mode=k.text("content_mode", "binary", ("binary", "structured")),
        unknown_kinds=k.text("unknown_kinds", "publish", ("publish", "dead-letter")),
        producer=k.text("producer", "process", ("process", "thread")),
        ack_timeout_s=k.number("ack_timeout_s", 5.0, minimum=0.1),
        max_in_flight=k.integer("max_in_flight", 5000, minimum=1),
        retry_after_s=k.integer("retry_after_s", 5, minimum=1),
        linger_ms=k.integer("linger_ms", 0, minimum=0),
        batch_size=k.integer("batch_size", 262144, minimum=1024),
        compression_type=k.text("compression_type", "", ("", "gzip", "snappy", "lz4", "zstd")),
        request_timeout_ms=k.integer("request_timeout_ms", 10000, minimum=100),
        delivery_timeout_ms=k.integer("delivery_timeout_ms", 30000, minimum=100),
        max_block_ms=k.integer("max_block_ms", 2000, minimum=0),
        stall_timeout_s=k.number("stall_timeout_s", KafkaConfig.stall_timeout_s, minimum=0),
        max_request_size=k.integer(
            "max_request_size", KafkaConfig.max_request_size, minimum=2 * RECORD_HEADROOM_BYTES
        ),
        security_protocol=k.text(
            "security_protocol", "PLAINTEXT", ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        ),
        sasl_mechanism=k.text(
            "sasl_mechanism", "", ("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
        ),
        sasl_username=k.text("sasl_username", ""),
        sasl_password=_env_secret(
            env, "kafka.sasl_password_env", k.text("sasl_password_env", ""), required=False
        ),
        ssl_cafile=k.text("ssl_cafile", ""),
    )
    if kafka.api_version and not re.fullmatch(r"\d+(\.\d+){1,2}", kafka.api_version):
        raise ConfigError(
            "kafka.api_version", f"must look like '2.3' or be empty, got {kafka.api_version!r}"
        )
    if 0 < kafka.stall_timeout_s * 1000 <= kafka.delivery_timeout_ms:
        raise ConfigError(
            "kafka.stall_timeout_s",
            "must exceed delivery_timeout_ms (every record settles within it unless the producer"
            " is stuck), or be 0 for delivery_timeout_ms + request_timeout_ms + 5 s",
        )
    if kafka.delivery_timeout_ms < kafka.linger_ms + kafka.request_timeout_ms:
        raise ConfigError(
            "kafka.delivery_timeout_ms", "must be at least linger_ms + request_timeout_ms"
        )
    if server.max_body_bytes + RECORD_HEADROOM_BYTES > kafka.max_request_size:
        # a body the route accepts must fit the producer, or its record (or dead letter) fails
        # after the sender was told to wait: refuse the config instead
        raise ConfigError(
            "server.max_body_bytes",
            f"{server.max_body_bytes} bytes plus {RECORD_HEADROOM_BYTES} of record headers "
            f"exceeds kafka.max_request_size ({kafka.max_request_size}); lower it to at most "
            f"{kafka.max_request_size - RECORD_HEADROOM_BYTES} or raise kafka.max_request_size "
            "(and the brokers' message.max.bytes with it)",
        )
    k.finish()

    tp = root.table("topics")
    topics = TopicsConfig(
        partitions=tp.integer("partitions", TopicsConfig.partitions, minimum=1),
        replication_factor=tp.integer(
            "replication_factor", TopicsConfig.replication_factor, minimum=1
        ),
        min_insync_replicas=tp.integer(
            "min_insync_replicas", TopicsConfig.min_insync_replicas, minimum=1
        ),
        check_interval_s=tp.number("check_interval_s", TopicsConfig.check_interval_s, minimum=0),
    )
    if topics.min_insync_replicas > topics.replication_factor:
        raise ConfigError(
            "topics.min_insync_replicas",
            f"must not exceed topics.replication_factor ({topics.replication_factor}):"
            " no write could ever be acknowledged",
        )
    tp.finish()

    d = root.table("dedupe")
    dedupe = DedupeConfig(
        window_s=d.number("window_s", 3600.0, minimum=0),
        max_entries=d.integer("max_entries", 1_000_000, minimum=0),
    )
    d.finish()

    sources: list[SourceConfig] = []
    seen_paths: set[str] = set()
    seen_names: set[str] = set()
    for t in root.tables("sources"):
        fmt = t.text("format", "event-stream", SOURCE_FORMATS)
        name = t.text("name", "")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(f"{t.key}.name", "must be 1-64 letters, digits, '.', '_' or '-'")
        path = t.text("path", "")
        if not path.startswith("/") or path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            raise ConfigError(
                f"{t.key}.path", f"must start with '/' and not be a built-in route: {path!r}"
            )
        if path in seen_paths or name in seen_names:
            raise ConfigError(t.key, f"duplicate source name or path ({name!r}, {path!r})")
        seen_paths.add(path)
        seen_names.add(name)
        web = fmt == "web-push"
        require_secret = t.flag("require_secret", not web)
        secrets_env = t.text("secrets_env", "")
        secrets: tuple[Secret, ...] = ()
        if secrets_env:
            raw = env.get(secrets_env, "")
            secrets = tuple(Secret(p.strip()) for p in raw.split(",") if p.strip())
        if require_secret and not secrets:
            why = "is not set or empty" if secrets_env else "is required when require_secret = true"
            raise ConfigError(
                f"{t.key}.secrets_env",
                f"{secrets_env or 'secrets_env'} {why} (comma-separated accepted secrets)",
            )
        mapping = t.text_map("mapping")
        for field_name, pointer in mapping.items():
            if field_name not in MAPPABLE_FIELDS:
                raise ConfigError(
                    f"{t.key}.mapping.{field_name}",
                    f"unknown field; one of {', '.join(MAPPABLE_FIELDS)}",
                )
            if not pointer.startswith("/"):
                raise ConfigError(
                    f"{t.key}.mapping.{field_name}", "must be a JSON Pointer such as '/event/kind'"
                )
        secret_header = t.text("secret_header", "authorization").lower()
        id_header = t.text("id_header", "")
        if id_header:
            id_header = _header_name(f"{t.key}.id_header", id_header, secret_header=secret_header)
        user_headers = t.text_map("user_headers")
        for field_name, header_name in user_headers.items():
            if field_name not in USER_HEADER_FIELDS:
                raise ConfigError(
                    f"{t.key}.user_headers.{field_name}",
                    f"unknown field; one of {', '.join(USER_HEADER_FIELDS)}",
                )
            user_headers[field_name] = _header_name(
                f"{t.key}.user_headers.{field_name}", header_name, secret_header=secret_header
            )
        if user_headers and fmt != "journey":
            raise ConfigError(
                f"{t.key}.user_headers", 'only applies to format = "journey" (plain-text bodies)'
            )
        sources.append(
            SourceConfig(
                name=name,
                path=path,
                format=fmt,
                require_allowlisted_ip=t.flag("require_allowlisted_ip", not web),
                secret_header=secret_header,
                secrets_env=secrets_env,
                secrets=secrets,
                require_secret=require_secret,
                app_id=t.text("app_id", ""),
                cors_origins=t.texts("cors_origins", ("*",)),
                mapping=mapping,
                id_header=id_header,
                user_headers=user_headers,
            )
        )
        t.finish()

    o = root.table("onesignal")
    apps: list[OneSignalApp] = []
    for t in o.tables("apps"):
        app_id = t.text("app_id", "")
        if not app_id:
            raise ConfigError(f"{t.key}.app_id", "is required")
        key_env = t.text("api_key_env", "")
        key_file = t.text("api_key_file", "")
        if key_env and key_file:
            raise ConfigError(f"{t.key}.api_key_file", "set api_key_env or api_key_file, not both")
        app = OneSignalApp(app_id=app_id, api_key_env=key_env, api_key=None, api_key_file=key_file)
        try:
            key = read_api_key(app, env)
        except OSError as exc:
            raise ConfigError(
                f"{t.key}.api_key_file", f"cannot read {key_file}: {exc.strerror}"
            ) from None
        apps.append(dataclasses.replace(app, api_key=key))
        t.finish()
    onesignal = OneSignalConfig(
        api_url=o.text("api_url", OneSignalConfig.api_url).rstrip("/"),
        timeout_s=o.number("timeout_s", 10.0, minimum=0.1),
        apps=tuple(apps),
    )
    if not onesignal.api_url.startswith(("http://", "https://")):
        raise ConfigError("onesignal.api_url", "must start with http:// or https://")
    o.finish()

    ts = root.table("tag_sync")
    rules: list[TagRule] = []
    for t in ts.tables("rules"):
        kinds = t.texts("kinds", ())
        if not kinds:
            raise ConfigError(f"{t.key}.kinds", "must list at least one event kind (globs allowed)")
        tags = t.text_map("tags")
        delete = t.texts("delete", ())
        if not tags and not delete:
            raise ConfigError(t.key, "needs `tags` or `delete`")
        rules.append(
            TagRule(
                kinds=kinds,
                tags=tags,
                delete=delete,
                channels=t.texts("channels", ()),
                apps=t.texts("apps", ()),
            )
        )
        t.finish()
    tag_sync = TagSyncConfig(
        group_id=ts.text("group_id", TagSyncConfig.group_id),
        topics=ts.texts("topics", ()),
        alias_label=ts.text("alias_label", "external_id", ("external_id", "onesignal_id")),
        flush_interval_s=ts.number("flush_interval_s", 1.0, minimum=0),
        max_keys_per_request=ts.integer("max_keys_per_request", 100, minimum=1),
        per_user_interval_s=ts.number("per_user_interval_s", 1.0, minimum=0),
        app_rate_limit=ts.number("app_rate_limit", 500.0, minimum=0.1),
        max_concurrency=ts.integer("max_concurrency", 64, minimum=1),
        http_client=ts.text("http_client", "auto", ("auto", "httpx")),
        max_attempts=ts.integer("max_attempts", 8, minimum=1),
        backoff_base_s=ts.number("backoff_base_s", 1.0, minimum=0),
        backoff_cap_s=ts.number("backoff_cap_s", 60.0, minimum=0),
        max_retry_elapsed_s=ts.number("max_retry_elapsed_s", 900.0, minimum=0),
        dead_letter_topic=_topic_ok(
            "tag_sync.dead_letter_topic",
            ts.text("dead_letter_topic", TagSyncConfig.dead_letter_topic),
        ),
        delete_value=ts.text("delete_value", "", ("", "null")),
        max_poll_records=ts.integer("max_poll_records", 500, minimum=1),
        max_pending_events=ts.integer("max_pending_events", 100_000, minimum=1),
        catch_up_partitions=ts.integer("catch_up_partitions", 6, minimum=0),
        session_timeout_ms=ts.integer("session_timeout_ms", 10000, minimum=1000),
        heartbeat_interval_ms=ts.integer("heartbeat_interval_ms", 2000, minimum=100),
        group_instance_id=ts.text("group_instance_id", "").replace(
            "{hostname}", socket.gethostname()
        ),
        shutdown_timeout_s=ts.number("shutdown_timeout_s", 10.0, minimum=0),
        metrics_port=ts.integer("metrics_port", 9102, minimum=0),
        auth_retry_s=ts.number("auth_retry_s", TagSyncConfig.auth_retry_s, minimum=0.5),
        rules=tuple(rules),
    )
    if tag_sync.heartbeat_interval_ms * 3 > tag_sync.session_timeout_ms:
        raise ConfigError(
            "tag_sync.heartbeat_interval_ms", "must be at most a third of session_timeout_ms"
        )
    if tag_sync.max_keys_per_request > 100:
        raise ConfigError("tag_sync.max_keys_per_request", "OneSignal accepts at most 100")
    ts.finish()

    root.finish()
    return Config(
        server=server,
        allowlist=allowlist,
        kafka=kafka,
        dedupe=dedupe,
        topics=topics,
        sources=tuple(sources),
        onesignal=onesignal,
        tag_sync=tag_sync,
    )


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{p} is not valid TOML: {exc}") from None
    return dataclasses.replace(parse_config(data, env), path=str(p))

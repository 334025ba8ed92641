"""The configuration tree: frozen dataclasses whose fields declare the keys of the file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from gateway.config import _checks as checks
from gateway.config._schema import Setting

__all__ = [
    "CHANNELS",
    "RECORD_HEADROOM_BYTES",
    "SOURCE_FORMATS",
    "AllowlistConfig",
    "Config",
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
]

from gateway.core.kinds import CHANNELS as CHANNELS  # core owns the vocabularies
from gateway.core.kinds import SOURCE_FORMATS as SOURCE_FORMATS

# Bytes a Kafka record may need beyond the request body it carries: the dead-letter headers
# (records.build_dead_letter caps each of them so that their sum stays below this), the key and
# the record batch framing. A body up to ``kafka.max_request_size`` minus this always fits.
RECORD_HEADROOM_BYTES = 4096
# kafka-python's default max_request_size, below Kafka's default message.max.bytes (1048588).
_KAFKA_MAX_REQUEST_SIZE = 1_048_576


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
    host: Annotated[str, Setting("address the HTTP server listens on")] = "0.0.0.0"
    port: Annotated[int, Setting("TCP port of the HTTP server", minimum=0)] = 8080
    trusted_proxies: Annotated[
        tuple[str, ...],
        Setting(
            "CIDRs of the proxies whose forwarding header is believed (never 0.0.0.0/0)",
            check=checks.cidrs,
        ),
    ] = ("127.0.0.1/32", "::1/128")
    proxy_header: Annotated[
        str,
        Setting(
            "the one forwarding header the proxies write; the other is ignored",
            choices=("x-forwarded-for", "forwarded"),
        ),
    ] = "x-forwarded-for"
    max_body_bytes: Annotated[
        int,
        Setting(
            f"larger bodies answer 413; at most kafka.max_request_size - {RECORD_HEADROOM_BYTES}",
            minimum=256,
        ),
    ] = _KAFKA_MAX_REQUEST_SIZE - RECORD_HEADROOM_BYTES
    max_json_depth: Annotated[
        int, Setting("deeper JSON is dead-lettered (too-deep); 400 on web-push", minimum=2)
    ] = 64
    timeout_keep_alive: Annotated[
        int, Setting("seconds; above the Google LB's fixed 600 s backend keep-alive", minimum=1)
    ] = 620
    limit_concurrency: Annotated[
        int, Setting("uvicorn --limit-concurrency; 0 = unlimited (keep-alives count)", minimum=0)
    ] = 0
    workers: Annotated[
        int,
        Setting(
            "worker processes, each its own producer and dedupe window (like replicas)", minimum=1
        ),
    ] = 1
    graceful_shutdown_s: Annotated[
        float, Setting("SIGTERM: time to drain in-flight requests before closing", minimum=0)
    ] = 20.0
    log_level: Annotated[
        str, Setting("log level", choices=("debug", "info", "warning", "error"))
    ] = "info"
    access_log: Annotated[bool, Setting("log every request")] = False


@dataclass(frozen=True)
class AllowlistConfig:
    scopes: Annotated[
        tuple[str, ...], Setting('Google Cloud regions (cloud.json "scope") OneSignal sends from')
    ] = ("europe-west4",)
    snapshot: Annotated[
        str,
        Setting("a cloud.json-format snapshot file; empty = the snapshot bundled with the package"),
    ] = ""
    include_onesignal_published: Annotated[
        bool, Setting("also allow the ranges OneSignal has published")
    ] = True
    extra_cidrs: Annotated[
        tuple[str, ...], Setting("also allowed (e.g. a test sender)", check=checks.cidrs)
    ] = ()
    # On by default: Google's ranges change, and a sender whose new address is missing from a
    # stale set is answered 403, which OneSignal does not retry (the event is lost).
    refresh_url: Annotated[str, Setting("where the live refresh reads Google's current ranges")] = (
        "https://www.gstatic.com/ipranges/cloud.json"
    )
    refresh_interval_s: Annotated[
        float,
        Setting(
            "seconds between refreshes; 0 = off (no network at all); else at least 60", minimum=0
        ),
    ] = 86400.0
    refresh_retry_s: Annotated[
        float, Setting("seconds after a failed refresh before the next try", minimum=1)
    ] = 900.0
    refresh_timeout_s: Annotated[
        float, Setting("per HTTP attempt, so an offline host fails fast and quietly", minimum=0.1)
    ] = 10.0


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: Annotated[str, Setting("comma-separated host:port list")] = "localhost:9092"
    api_version: Annotated[
        str,
        Setting(
            'kafka-python pin such as "2.3"; empty = negotiate (production)',
            check=checks.api_version,
        ),
    ] = ""
    client_id: Annotated[str, Setting("Kafka client id")] = "onesignal-gateway"
    topic: Annotated[
        str,
        Setting(
            "topic template; {channel}: push, email, sms, iam, live_activity, journey",
            check=checks.topic_template,
        ),
    ] = "onesignal.{channel}"
    dead_letter_topic: Annotated[
        str, Setting("where unreadable or refused events go", check=checks.topic_name)
    ] = "onesignal.dead-letter"
    content_mode: Annotated[
        str,
        Setting(
            "CloudEvents binary (ce_* headers) or structured", choices=("binary", "structured")
        ),
    ] = "binary"
    unknown_kinds: Annotated[
        str,
        Setting(
            "what happens to event kinds OneSignal has not documented",
            choices=("publish", "dead-letter"),
        ),
    ] = "publish"
    producer: Annotated[
        str,
        Setting(
            "where kafka-python runs: a child process per server process, or a thread",
            choices=("process", "thread"),
        ),
    ] = "process"
    ack_timeout_s: Annotated[
        float, Setting("no ack within this: 503 + Retry-After (OneSignal retries)", minimum=0.1)
    ] = 5.0
    max_in_flight: Annotated[
        int, Setting("unacknowledged records before new requests get 503", minimum=1)
    ] = 5000
    retry_after_s: Annotated[int, Setting("the Retry-After sent with 503", minimum=1)] = 5
    linger_ms: Annotated[
        int, Setting("every request waits for its ack, so linger only adds latency", minimum=0)
    ] = 0
    batch_size: Annotated[int, Setting("bytes per partition batch", minimum=1024)] = 262144
    compression_type: Annotated[
        str,
        Setting(
            "the codec's package must be installed", choices=("", "gzip", "snappy", "lz4", "zstd")
        ),
    ] = ""
    request_timeout_ms: Annotated[int, Setting("Kafka request timeout", minimum=100)] = 10000
    delivery_timeout_ms: Annotated[
        int, Setting("at least linger_ms + request_timeout_ms", minimum=100)
    ] = 30000
    max_block_ms: Annotated[int, Setting("how long a send may wait for metadata", minimum=0)] = 2000
    # no record settled (acknowledged or failed) for this long while some are outstanding: the
    # producer is stuck and is replaced
    stall_timeout_s: Annotated[
        float,
        Setting(
            "no record settled this long while some wait: replace the producer; 0 ="
            " delivery_timeout_ms + request_timeout_ms + 5 s, else more than delivery_timeout_ms",
            minimum=0,
        ),
    ] = 0.0
    max_request_size: Annotated[
        int,
        Setting(
            "the producer's largest request; at most the brokers' message.max.bytes",
            minimum=2 * RECORD_HEADROOM_BYTES,
        ),
    ] = _KAFKA_MAX_REQUEST_SIZE
    security_protocol: Annotated[
        str,
        Setting(
            "how to reach the brokers", choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        ),
    ] = "PLAINTEXT"
    sasl_mechanism: Annotated[
        str,
        Setting(
            "SASL mechanism; empty = none", choices=("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
        ),
    ] = ""
    sasl_username: Annotated[str, Setting("SASL user name")] = ""
    sasl_password_env: Annotated[str, Setting("environment variable holding the SASL password")] = (
        ""
    )
    sasl_password: Secret | None = None  # read from sasl_password_env
    ssl_cafile: Annotated[str, Setting("CA bundle for SSL; empty = the system's")] = ""

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

    partitions: Annotated[
        int, Setting("partitions of each topic gateway topics create makes", minimum=1)
    ] = 12
    replication_factor: Annotated[int, Setting("replicas of each topic", minimum=1)] = 3
    min_insync_replicas: Annotated[
        int, Setting("min.insync.replicas; at most replication_factor", minimum=1)
    ] = 2
    check_interval_s: Annotated[
        float,
        Setting("how often the ingress lists Kafka's topics for /readyz (missing ones)", minimum=0),
    ] = 30.0


@dataclass(frozen=True)
class DedupeConfig:
    window_s: Annotated[
        float,
        Setting(
            "a repeated event id within this window is answered 2xx, not republished", minimum=0
        ),
    ] = 3600.0
    max_entries: Annotated[
        int, Setting("ids held per source (fixed memory, about 49 bytes an id)", minimum=0)
    ] = 1_000_000


_WEB_PUSH_OFF = "false for web-push"


@dataclass(frozen=True)
class SourceConfig:
    name: Annotated[str, Setting("the source's name in metrics and logs", check=checks.source_name)]
    path: Annotated[str, Setting("the route it answers", check=checks.route_path)]
    format: Annotated[
        str, Setting("what the route receives", when_absent="event-stream", choices=SOURCE_FORMATS)
    ]
    require_allowlisted_ip: Annotated[
        bool, Setting("only senders in the allowlist", default_note=_WEB_PUSH_OFF)
    ] = True
    secret_header: Annotated[
        str,
        Setting(
            'the header carrying the secret ("Bearer <secret>" is accepted too)',
            check=checks.lowercase,
        ),
    ] = "authorization"  # noqa: S105 - a header name, not a secret
    secrets_env: Annotated[
        str,
        Setting("environment variable with the accepted secrets, comma-separated (for rotation)"),
    ] = ""
    secrets: tuple[Secret, ...] = ()  # read from secrets_env
    require_secret: Annotated[
        bool, Setting("refuse requests without an accepted secret", default_note=_WEB_PUSH_OFF)
    ] = True
    app_id: Annotated[str, Setting("used when the payload carries no app id")] = ""
    cors_origins: Annotated[
        tuple[str, ...], Setting("web-push only: origins allowed to POST from browsers")
    ] = ("*",)
    mapping: Annotated[
        Mapping[str, str],
        Setting(
            "where to find fields in a custom body, as JSON Pointers", check=checks.json_pointers
        ),
    ] = field(default_factory=dict)
    id_header: Annotated[
        str, Setting("a request header whose value is the event id; empty = none")
    ] = ""
    user_headers: Annotated[
        Mapping[str, str],
        Setting("journey only: headers carrying onesignal_id / external_id of a plain-text body"),
    ] = field(default_factory=dict)


@dataclass(frozen=True)
class OneSignalApp:
    app_id: Annotated[str, Setting("the OneSignal app id", check=checks.non_empty)]
    api_key_env: Annotated[
        str, Setting("environment variable holding the app's REST API key", when_absent="")
    ]
    api_key: Secret | None  # read from api_key_env or api_key_file
    api_key_file: Annotated[
        str, Setting("or a file holding the key (not both); re-read while tag sync runs")
    ] = ""

    @property
    def api_key_source(self) -> str:
        """Where the key is read from, for messages (never the key)."""
        return f"file {self.api_key_file}" if self.api_key_file else f"${self.api_key_env}"


@dataclass(frozen=True)
class OneSignalConfig:
    api_url: Annotated[str, Setting("the OneSignal REST API", check=checks.http_url)] = (
        "https://api.onesignal.com"
    )
    timeout_s: Annotated[float, Setting("per request", minimum=0.1)] = 10.0
    apps: tuple[OneSignalApp, ...] = ()  # [[onesignal.apps]]


@dataclass(frozen=True)
class TagRule:
    kinds: Annotated[
        tuple[str, ...],
        Setting("event kinds it applies to (shell-style globs)", check=checks.event_kinds),
    ]
    tags: Annotated[Mapping[str, str], Setting("tag key -> template of its new value")] = field(
        default_factory=dict
    )
    delete: Annotated[tuple[str, ...], Setting("tag keys to delete")] = ()
    channels: Annotated[tuple[str, ...], Setting("only events of these channels; empty = all")] = ()
    apps: Annotated[tuple[str, ...], Setting("only events of these app ids; empty = all")] = ()


@dataclass(frozen=True)
class TagSyncConfig:
    group_id: Annotated[str, Setting("Kafka consumer group")] = "onesignal-tag-sync"
    topics: Annotated[
        tuple[str, ...],
        Setting("topics to consume; empty = the kafka.topic template for every channel"),
    ] = ()
    alias_label: Annotated[
        str,
        Setting(
            "the user alias to address; the other is used when an event lacks it",
            choices=("external_id", "onesignal_id"),
        ),
    ] = "external_id"
    flush_interval_s: Annotated[
        float, Setting("updates for one user within this window are merged", minimum=0)
    ] = 1.0
    max_keys_per_request: Annotated[
        int,
        Setting(
            "property updates per request (OneSignal: at most 100)",
            minimum=1,
            check=checks.at_most_100_keys,
        ),
    ] = 100
    per_user_interval_s: Annotated[
        float, Setting("OneSignal: 1 request per second per user", minimum=0)
    ] = 1.0
    app_rate_limit: Annotated[
        float, Setting("requests/s per app (OneSignal allows 1,000)", minimum=0.1)
    ] = 500.0
    max_concurrency: Annotated[int, Setting("requests in flight", minimum=1)] = 64
    http_client: Annotated[
        str,
        Setting(
            "auto: built-in HTTP/1.1 client, httpx if an HTTP(S)_PROXY applies",
            choices=("auto", "httpx"),
        ),
    ] = "auto"
    max_attempts: Annotated[int, Setting("then the update is dead-lettered", minimum=1)] = 8
    backoff_base_s: Annotated[
        float, Setting("full-jitter exponential backoff, at least Retry-After on 429", minimum=0)
    ] = 1.0
    backoff_cap_s: Annotated[float, Setting("the backoff's cap", minimum=0)] = 60.0
    max_retry_elapsed_s: Annotated[
        float, Setting("give up (dead-letter) after retrying this long", minimum=0)
    ] = 900.0
    dead_letter_topic: Annotated[
        str, Setting("where updates that failed go", check=checks.topic_name)
    ] = "onesignal.tag-sync.dead-letter"
    delete_value: Annotated[
        str,
        Setting(
            'how a deleted tag is sent: "" (documented) or "null" (what the SDKs send)',
            choices=("", "null"),
        ),
    ] = ""
    max_poll_records: Annotated[int, Setting("records per consumer poll", minimum=1)] = 500
    max_pending_events: Annotated[
        int, Setting("events read ahead before the consumer pauses (about 200 B each)", minimum=1)
    ] = 100_000
    catch_up_partitions: Annotated[
        int, Setting("behind a backlog, partitions read at a time (0 = all at once)", minimum=0)
    ] = 6
    session_timeout_ms: Annotated[
        int, Setting("a crashed worker's partitions move after this long", minimum=1000)
    ] = 10000
    heartbeat_interval_ms: Annotated[
        int, Setting("at most a third of session_timeout_ms", minimum=100)
    ] = 2000
    group_instance_id: Annotated[
        str,
        Setting(
            'static membership (fewer rebalances on restarts); "{hostname}" expands',
            check=checks.expand_hostname,
        ),
    ] = ""
    shutdown_timeout_s: Annotated[
        float, Setting("SIGTERM: time to finish in-flight requests before committing", minimum=0)
    ] = 10.0
    metrics_port: Annotated[
        int, Setting("Prometheus /metrics of the worker; 0 = off", minimum=0)
    ] = 9102
    auth_retry_s: Annotated[
        float,
        Setting("401/403: how often the keys are re-read and the held update retried", minimum=0.5),
    ] = 30.0
    rules: tuple[TagRule, ...] = ()  # [[tag_sync.rules]]

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

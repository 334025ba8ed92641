"""The configuration tree: frozen dataclasses whose fields declare the keys of the file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from gateway.config import _checks as checks
from gateway.config._schema import Setting

__all__ = [
    "CHANNELS",
    "MIN_SECRET_CHARS",
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
    "SpoolConfig",
    "TagRule",
    "TagSyncConfig",
    "TopicsConfig",
    "TracingConfig",
]

from gateway.core.kinds import CHANNELS as CHANNELS  # core owns the vocabularies
from gateway.core.kinds import SOURCE_FORMATS as SOURCE_FORMATS

# Bytes a Kafka record may need beyond the request body it carries: the dead-letter headers
# (records.build_dead_letter caps each of them so that their sum stays below this), the key and
# the record batch framing. A body up to ``kafka.max_request_size`` minus this always fits.
RECORD_HEADROOM_BYTES = 4096
# A shared secret shorter than this is refused at start-up: it is guessable, and a short value
# would also be scrubbed from log lines where it merely occurs as a word.
MIN_SECRET_CHARS = 16
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
    # the operator surface is nobody's business on the public port; loopback unless an
    # operator opens it (0.0.0.0 in a container that Prometheus scrapes over the network)
    metrics_host: Annotated[
        str, Setting("address of /metrics and /openapi.json (never on server.port)")
    ] = "127.0.0.1"
    metrics_port: Annotated[
        int,
        Setting(
            "TCP port of /metrics and /openapi.json; 0 = off; shared by every worker",
            minimum=0,
        ),
    ] = 9101
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
    max_head_bytes: Annotated[
        int,
        Setting("request line + header fields, in bytes; larger heads answer 431", minimum=1024),
    ] = 65536
    max_header_count: Annotated[
        int, Setting("header fields in a request head; more answer 431", minimum=8)
    ] = 100
    head_timeout_s: Annotated[
        float,
        Setting(
            "seconds for a complete request head, from connect or a reused connection's first"
            " byte; then 408",
            minimum=0.1,
        ),
    ] = 30.0
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
    access_log: Annotated[bool, Setting("log every request (paths without query strings)")] = False
    refusal_log_lines: Annotated[
        int,
        Setting(
            "refusal lines (403, bad request heads) written per interval for each source and"
            " reason; the rest are counted in a summary line and the metrics",
            minimum=0,
        ),
    ] = 10
    refusal_log_interval_s: Annotated[
        float, Setting("seconds: the interval of refusal_log_lines", minimum=0.1)
    ] = 60.0


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
    unauthenticated_topic: Annotated[
        str,
        Setting(
            "events of sources without a secret (web-push); empty = the topic template",
            check=checks.optional_topic_name,
        ),
    ] = "onesignal.unauthenticated"
    content_mode: Annotated[
        str,
        Setting(
            "CloudEvents binary (ce_* headers) or structured", choices=("binary", "structured")
        ),
    ] = "binary"
    unknown_kinds: Annotated[
        str,
        Setting(
            "event kinds OneSignal has not documented, of a known channel: publish or"
            " dead-letter (an unknown channel: unknown_channel_topic)",
            choices=("publish", "dead-letter"),
        ),
    ] = "publish"
    unknown_channel_topic: Annotated[
        str,
        Setting(
            "where events of an unknown channel go (a body never names a topic); empty = the"
            " dead-letter topic",
            check=checks.optional_topic_name,
        ),
    ] = ""
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
class TracingConfig:
    """OpenTelemetry traces (off by default; needs the ``tracing`` extra)."""

    enabled: Annotated[
        bool, Setting("a span per request, per record's PATCH; W3C trace context propagated")
    ] = False
    exporter: Annotated[
        str,
        Setting(
            "otlp: OTLP/HTTP (protobuf) to endpoint; console: JSON lines on stdout",
            choices=("otlp", "console"),
        ),
    ] = "otlp"
    endpoint: Annotated[str, Setting("the OTLP/HTTP traces endpoint")] = (
        "http://localhost:4318/v1/traces"
    )
    headers_env: Annotated[
        str, Setting('environment variable with exporter headers, "k1=v1,k2=v2" (auth)')
    ] = ""
    timeout_s: Annotated[float, Setting("per export request", minimum=0.1)] = 10.0
    service_name: Annotated[str, Setting("resource service.name")] = "onesignal-kafka-gateway"
    sample_ratio: Annotated[
        float,
        Setting(
            "share of new traces recorded; a request that carries a sampled traceparent is "
            "always recorded (parent-based)",
            minimum=0,
        ),
    ] = 1.0


@dataclass(frozen=True)
class SpoolConfig:
    """A durable local spool: what Kafka cannot take is written here (fsynced) and answered
    2xx, then delivered to Kafka, oldest first and in order per key, when it is back."""

    enabled: Annotated[
        bool, Setting("on: requests Kafka cannot take are spooled to disk; one worker only")
    ] = False
    dir: Annotated[
        str,
        Setting("the spool directory, owned by one process (a lock); a volume per replica"),
    ] = "/var/lib/gateway/spool"
    max_bytes: Annotated[
        int, Setting("spool size on disk; when full, 503 with Retry-After", minimum=4096)
    ] = 1073741824
    segment_bytes: Annotated[
        int,
        Setting(
            "a segment file is closed past this size; deleted once all of it is delivered",
            minimum=4096,
        ),
    ] = 16 * 1024 * 1024
    skip_corrupt: Annotated[
        bool,
        Setting("start past damage in the middle of a segment (the damaged bytes are lost)"),
    ] = False
    drain_batch: Annotated[
        int, Setting("spooled records sent to Kafka at a time while draining", minimum=1)
    ] = 256
    drain_retry_s: Annotated[
        float, Setting("while Kafka is away, how often the drain tries one record", minimum=0.05)
    ] = 1.0


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
        Setting(
            "environment variable with the accepted secrets, comma-separated (for rotation;"
            f" a comma always separates); each at least {MIN_SECRET_CHARS} characters"
        ),
    ] = ""
    secrets_file: Annotated[
        str,
        Setting(
            "or: a file with the accepted secrets, one per line (commas kept; blank lines"
            " skipped); not with secrets_env"
        ),
    ] = ""
    secrets: tuple[Secret, ...] = ()  # read from secrets_env or secrets_file
    require_secret: Annotated[
        bool, Setting("refuse requests without an accepted secret", default_note=_WEB_PUSH_OFF)
    ] = True
    app_id: Annotated[str, Setting("used when the payload carries no app id")] = ""
    cors_origins: Annotated[
        tuple[str, ...],
        Setting(
            'web-push only, and required there: the origins allowed to POST (others: 403); "*"'
            " = any",
            check=checks.origins,
        ),
    ] = ()
    client_rate_limit: Annotated[
        float,
        Setting(
            "sources without a secret: requests/s per client address (IPv6: per /64), then"
            " 429; 0 = off",
            minimum=0,
            default_note="0 when require_allowlisted_ip: OneSignal's own few addresses",
        ),
    ] = 5.0
    client_rate_burst: Annotated[
        int,
        Setting("requests a client address may send at once before the rate applies", minimum=1),
    ] = 30
    client_rate_table: Annotated[
        int,
        Setting(
            "client addresses tracked, about 230 bytes each (the least recently seen is forgotten)",
            minimum=1,
        ),
    ] = 65536
    verify_subscriptions: Annotated[
        bool,
        Setting(
            "web-push only: look the posted subscription id up in app_id's OneSignal app (needs"
            " its [[onesignal.apps]] key); unknown ones are refused"
        ),
    ] = False
    verify_cache_ttl_s: Annotated[
        float, Setting("how long a subscription found in OneSignal is believed", minimum=1)
    ] = 3600.0
    verify_miss_ttl_s: Annotated[
        float, Setting("how long a subscription OneSignal does not know stays refused", minimum=1)
    ] = 600.0
    verify_cache_size: Annotated[
        int,
        Setting("subscription ids remembered, found or not (about 260 bytes each)", minimum=1),
    ] = 100_000
    verify_rate_limit: Annotated[
        float,
        Setting(
            "lookups/s to OneSignal (its view endpoints allow 1 per second per app)", minimum=0.01
        ),
    ] = 1.0
    verify_timeout_s: Annotated[
        float,
        Setting(
            "a request waits at most this for its lookup (queue included), then unverified",
            minimum=0.1,
        ),
    ] = 3.0
    verify_unreachable: Annotated[
        str,
        Setting(
            "no answer from OneSignal in time (or no lookup left): store the event marked"
            " subscriptioncheck=unchecked, or refuse it (503)",
            choices=("mark", "refuse"),
        ),
    ] = "mark"
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
    accept_unauthenticated: Annotated[
        bool,
        Setting("also events of sources without a secret (web-push: anyone can forge them)"),
    ] = False


@dataclass(frozen=True)
class TagSyncConfig:
    group_id: Annotated[str, Setting("Kafka consumer group")] = "onesignal-tag-sync"
    topics: Annotated[
        tuple[str, ...],
        Setting(
            "topics to consume; empty = the kafka.topic template for every message channel"
            " (and for journey when a rule names it in channels or kinds, and"
            " kafka.unauthenticated_topic when a rule has accept_unauthenticated)"
        ),
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
    max_poll_interval_ms: Annotated[
        int,
        Setting(
            "longest gap between polls; also how long a rebalance waits for members to rejoin"
            " and a JoinGroup for its answer (+5 s); at least session_timeout_ms",
            minimum=1000,
        ),
    ] = 60000
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
    metrics_host: Annotated[
        str, Setting("address of the worker's /metrics (0.0.0.0: every interface)")
    ] = "127.0.0.1"
    metrics_port: Annotated[
        int, Setting("Prometheus /metrics of the worker; 0 = off", minimum=0)
    ] = 9102
    auth_retry_s: Annotated[
        float,
        Setting("401/403: how often the keys are re-read and the held update retried", minimum=0.5),
    ] = 30.0
    rules: tuple[TagRule, ...] = ()  # [[tag_sync.rules]]

    def resolved_topics(self, template: str, unauthenticated_topic: str = "") -> tuple[str, ...]:
        """The topics to consume: ``topics``, else every channel's, plus the unauthenticated
        topic when a rule accepts its events."""
        if self.topics:
            return self.topics
        names = [template.format(channel=c) for c in CHANNELS]
        if any(_names_journey(r) for r in self.rules):
            # Journey webhooks' events are on a topic of their own; read it only for a rule
            # that asks for them, so that a catch-all rule keeps to message events
            names.append(template.format(channel="journey"))
        if unauthenticated_topic and any(r.accept_unauthenticated for r in self.rules):
            names.append(unauthenticated_topic)
        return tuple(dict.fromkeys(names))


def _names_journey(rule: TagRule) -> bool:
    """The rule asks for Journey webhooks' events: by channel, or by a kind of theirs."""
    return "journey" in rule.channels or any(k.startswith("journey") for k in rule.kinds)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    allowlist: AllowlistConfig = field(default_factory=AllowlistConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    sources: tuple[SourceConfig, ...] = ()
    onesignal: OneSignalConfig = field(default_factory=OneSignalConfig)
    tag_sync: TagSyncConfig = field(default_factory=TagSyncConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    path: str = ""

"""Reading a config file: the declared keys of each table, then the rules that span keys."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from gateway.config._checks import USER_HEADER_FIELDS, header_name
from gateway.config._model import (
    MIN_SECRET_CHARS,
    RECORD_HEADROOM_BYTES,
    AllowlistConfig,
    Config,
    DedupeConfig,
    KafkaConfig,
    OneSignalApp,
    OneSignalConfig,
    Secret,
    ServerConfig,
    SourceConfig,
    SpoolConfig,
    TagRule,
    TagSyncConfig,
    TopicsConfig,
    TracingConfig,
)
from gateway.config._schema import ConfigError, Table, read_key, read_keys

__all__ = ["load_config", "parse_config", "read_api_key", "secret_by_default"]

T = TypeVar("T")


def secret_by_default(fmt: str) -> bool:
    """Whether a source of format ``fmt`` requires a secret (and an allowlisted address) unless
    its table says otherwise: all but web push, which browsers send."""
    return fmt != "web-push"


def parse_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML; ``env`` resolves the secrets' variables."""
    env = os.environ if env is None else env
    root = Table(dict(data), "")
    server = _read(ServerConfig, root.table("server"))
    allowlist = _read(AllowlistConfig, root.table("allowlist"), _refresh_is_consistent)
    kafka = _read_kafka(root.table("kafka"), env, server)
    topics = _read(TopicsConfig, root.table("topics"), _min_insync_within_replication)
    dedupe = _read(DedupeConfig, root.table("dedupe"))
    spool = _read(SpoolConfig, root.table("spool"))
    _one_spool_owner(server, spool)
    sources = _read_sources(root.tables("sources"), env)
    onesignal = _read_onesignal(root.table("onesignal"), env)
    _verified_sources_have_a_key(sources, onesignal)
    tag_sync = _read_tag_sync(root.table("tag_sync"))
    tracing = _read(TracingConfig, root.table("tracing"), _ratio_at_most_one)
    root.finish()
    return Config(
        server=server,
        allowlist=allowlist,
        kafka=kafka,
        dedupe=dedupe,
        topics=topics,
        spool=spool,
        sources=sources,
        onesignal=onesignal,
        tag_sync=tag_sync,
        tracing=tracing,
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
    return _env_secret(env, app.api_key_env)


def _read(cls: type[T], table: Table, *rules: Callable[[T], None]) -> T:
    """A table of declared keys only, held to ``rules`` before its unknown keys are refused."""
    made = cls(**read_keys(cls, table))
    for rule in rules:
        rule(made)
    table.finish()
    return made


def _env_secret(env: Mapping[str, str], var: str) -> Secret | None:
    value = env.get(var) if var else None
    if value is None or value.strip() == "":
        return None
    return Secret(value.strip())


def _read_kafka(table: Table, env: Mapping[str, str], server: ServerConfig) -> KafkaConfig:
    values = read_keys(KafkaConfig, table)
    kafka = KafkaConfig(**values, sasl_password=_env_secret(env, values["sasl_password_env"]))
    _stall_beyond_delivery(kafka)
    _delivery_covers_linger_and_request(kafka)
    _body_fits_a_request(server, kafka)
    _metrics_port_of_its_own(server)
    table.finish()
    return kafka


def _read_sources(tables: list[Table], env: Mapping[str, str]) -> tuple[SourceConfig, ...]:
    sources: list[SourceConfig] = []
    for table in tables:
        source = _read_source(table, env)
        if any(s.path == source.path or s.name == source.name for s in sources):
            raise ConfigError(
                table.name, f"duplicate source name or path ({source.name!r}, {source.path!r})"
            )
        sources.append(source)
    return tuple(sources)


def _read_source(table: Table, env: Mapping[str, str]) -> SourceConfig:
    fmt = read_key(SourceConfig, table, "format")
    browsers = not secret_by_default(fmt)  # browsers send these: no allowlist, no secret
    # OneSignal sends from a few addresses at thousands of events/s: a per-address rate would
    # refuse its events, so it is off by default where only allowlisted senders get in
    # (the key's type is checked by read_keys below)
    allowlisted = table.data.get("require_allowlisted_ip", not browsers) is not False
    values = read_keys(
        SourceConfig,
        table,
        defaults={
            "require_allowlisted_ip": not browsers,
            "require_secret": not browsers,
            "client_rate_limit": 0.0 if allowlisted else 5.0,
        },
    )
    values["secrets"] = _source_secrets(table.name, values, env)
    values["id_header"], values["user_headers"] = _source_headers(table.name, values)
    if browsers and not values["cors_origins"]:
        # a browser sends its page's Origin; without a list, every site could post here
        raise ConfigError(
            f"{table.name}.cors_origins",
            'required on a web-push source: the origins of your site (["https://shop.example"]),'
            ' or ["*"] to accept a POST from any origin',
        )
    table.finish()
    return SourceConfig(**values)


def _source_secrets(
    name: str, values: dict[str, Any], env: Mapping[str, str]
) -> tuple[Secret, ...]:
    """The accepted secrets: ``secrets_env`` split at every comma, or ``secrets_file``'s lines.

    Errors name the variable or the file (and the secret's position), never a value.
    """
    var, path = values["secrets_env"], values["secrets_file"]
    if var and path:
        raise ConfigError(f"{name}.secrets_file", "set secrets_env or secrets_file, not both")
    if path:
        where = f"{name}.secrets_file"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(where, f"{path} is not UTF-8 text") from None
        parts = [line.strip() for line in text.splitlines()]
        source, unit = path, "line"
        numbered = [(i + 1, p) for i, p in enumerate(parts) if p]
    else:
        where = f"{name}.secrets_env"
        raw = env.get(var, "") if var else ""
        source, unit = f"${var}", "comma-separated value"
        numbered = [(i + 1, p.strip()) for i, p in enumerate(raw.split(",")) if p.strip()]
    for number, secret in numbered:
        if len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(
                where,
                f"{source}: secret at {unit} {number} is shorter than {MIN_SECRET_CHARS}"
                " characters",
            )
    secrets = tuple(Secret(secret) for _, secret in numbered)
    if values["require_secret"] and not secrets:
        if path:
            why = f"{path} holds no secret"
        elif var:
            why = f"{var} is not set or empty"
        else:
            why = "secrets_env is required when require_secret = true"
        raise ConfigError(where, f"{why} (comma-separated accepted secrets, or secrets_file)")
    return secrets


def _source_headers(name: str, values: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The id and user header names, lowercased; none may be the secret's header."""
    secret_header = values["secret_header"]
    id_header = values["id_header"]
    if id_header:
        id_header = header_name(f"{name}.id_header", id_header, secret_header=secret_header)
    user_headers = dict(values["user_headers"])
    for field_name, header in user_headers.items():
        key = f"{name}.user_headers.{field_name}"
        if field_name not in USER_HEADER_FIELDS:
            raise ConfigError(key, f"unknown field; one of {', '.join(USER_HEADER_FIELDS)}")
        user_headers[field_name] = header_name(key, header, secret_header=secret_header)
    if user_headers and values["format"] != "journey":
        raise ConfigError(
            f"{name}.user_headers", 'only applies to format = "journey" (plain-text bodies)'
        )
    return id_header, user_headers


def _read_onesignal(table: Table, env: Mapping[str, str]) -> OneSignalConfig:
    apps = tuple(_read_app(t, env) for t in table.tables("apps"))
    onesignal = OneSignalConfig(**read_keys(OneSignalConfig, table), apps=apps)
    table.finish()
    return onesignal


def _read_app(table: Table, env: Mapping[str, str]) -> OneSignalApp:
    app = OneSignalApp(**read_keys(OneSignalApp, table), api_key=None)
    if app.api_key_env and app.api_key_file:
        raise ConfigError(f"{table.name}.api_key_file", "set api_key_env or api_key_file, not both")
    try:
        key = read_api_key(app, env)
    except OSError as exc:
        raise ConfigError(
            f"{table.name}.api_key_file", f"cannot read {app.api_key_file}: {exc.strerror}"
        ) from None
    table.finish()
    return dataclasses.replace(app, api_key=key)


def _read_tag_sync(table: Table) -> TagSyncConfig:
    rules = tuple(_read_rule(t) for t in table.tables("rules"))
    tag_sync = TagSyncConfig(**read_keys(TagSyncConfig, table), rules=rules)
    if tag_sync.heartbeat_interval_ms * 3 > tag_sync.session_timeout_ms:
        raise ConfigError(
            "tag_sync.heartbeat_interval_ms", "must be at most a third of session_timeout_ms"
        )
    if tag_sync.max_poll_interval_ms < tag_sync.session_timeout_ms:
        raise ConfigError("tag_sync.max_poll_interval_ms", "must be at least session_timeout_ms")
    table.finish()
    return tag_sync


def _read_rule(table: Table) -> TagRule:
    rule = TagRule(**read_keys(TagRule, table))
    if not rule.tags and not rule.delete:
        raise ConfigError(table.name, "needs `tags` or `delete`")
    table.finish()
    return rule


# ---------------------------------------------------------------------------------------------
# rules that span keys


def _verified_sources_have_a_key(
    sources: tuple[SourceConfig, ...], onesignal: OneSignalConfig
) -> None:
    for i, source in enumerate(sources):
        if not source.verify_subscriptions:
            continue
        key = f"sources[{i}].verify_subscriptions"
        if source.format != "web-push":
            raise ConfigError(key, 'only applies to format = "web-push"')
        if not source.app_id:
            raise ConfigError(key, "needs the source's app_id: the app the subscriptions are in")
        app = next((a for a in onesignal.apps if a.app_id == source.app_id), None)
        if app is None or app.api_key is None:
            where = "has no key (set its api_key_env or api_key_file)" if app else "is missing"
            raise ConfigError(
                key,
                f"needs the app's REST API key: the [[onesignal.apps]] entry for app_id"
                f" {source.app_id} {where}",
            )


def _refresh_is_consistent(allowlist: AllowlistConfig) -> None:
    if allowlist.refresh_interval_s and not allowlist.refresh_url:
        raise ConfigError(
            "allowlist.refresh_url", "must be set when refresh_interval_s > 0 (0 turns refresh off)"
        )
    if allowlist.refresh_url and not allowlist.refresh_url.startswith(("http://", "https://")):
        raise ConfigError("allowlist.refresh_url", "must start with http:// or https://")
    if allowlist.refresh_interval_s and allowlist.refresh_interval_s < 60:
        raise ConfigError("allowlist.refresh_interval_s", "must be 0 (off) or at least 60")


def _stall_beyond_delivery(kafka: KafkaConfig) -> None:
    if 0 < kafka.stall_timeout_s * 1000 <= kafka.delivery_timeout_ms:
        raise ConfigError(
            "kafka.stall_timeout_s",
            "must exceed delivery_timeout_ms (every record settles within it unless the producer"
            " is stuck), or be 0 for delivery_timeout_ms + request_timeout_ms + 5 s",
        )


def _delivery_covers_linger_and_request(kafka: KafkaConfig) -> None:
    if kafka.delivery_timeout_ms < kafka.linger_ms + kafka.request_timeout_ms:
        raise ConfigError(
            "kafka.delivery_timeout_ms", "must be at least linger_ms + request_timeout_ms"
        )


def _body_fits_a_request(server: ServerConfig, kafka: KafkaConfig) -> None:
    # a body the route accepts must fit the producer, or its record (or dead letter) fails
    # after the sender was told to wait: refuse the config instead
    if server.max_body_bytes + RECORD_HEADROOM_BYTES > kafka.max_request_size:
        raise ConfigError(
            "server.max_body_bytes",
            f"{server.max_body_bytes} bytes plus {RECORD_HEADROOM_BYTES} of record headers "
            f"exceeds kafka.max_request_size ({kafka.max_request_size}); lower it to at most "
            f"{kafka.max_request_size - RECORD_HEADROOM_BYTES} or raise kafka.max_request_size "
            "(and the brokers' message.max.bytes with it)",
        )


def _metrics_port_of_its_own(server: ServerConfig) -> None:
    # the webhook port faces the internet: the operator surface never shares it
    if server.metrics_port and server.metrics_port == server.port:
        raise ConfigError(
            "server.metrics_port",
            f"must differ from server.port ({server.port}): /metrics and /openapi.json are"
            " never served on the webhook port (0 turns them off)",
        )


def _min_insync_within_replication(topics: TopicsConfig) -> None:
    if topics.min_insync_replicas > topics.replication_factor:
        raise ConfigError(
            "topics.min_insync_replicas",
            f"must not exceed topics.replication_factor ({topics.replication_factor}):"
            " no write could ever be acknowledged",
        )


def _ratio_at_most_one(t: TracingConfig) -> None:
    if t.sample_ratio > 1:
        raise ConfigError("tracing.sample_ratio", f"must be at most 1, got {t.sample_ratio}")


def _one_spool_owner(server: ServerConfig, spool: SpoolConfig) -> None:
    # one process owns a spool directory (a lock): worker processes would share one
    if spool.enabled and server.workers > 1:
        raise ConfigError(
            "spool.enabled",
            f"one process owns a spool directory, but server.workers = {server.workers}: run"
            " one worker per replica (and a volume per replica) with the spool on",
        )

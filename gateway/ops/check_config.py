"""``gateway check-config``: what an operator wants to know before starting a replica."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable
from typing import TextIO, TypeVar

import httpx

from gateway.config import Config
from gateway.ingress.allowlist import Allowlist, RangesError
from gateway.kafka.topics import TopicStatus, describe_topics, durability_warnings, gateway_topics
from gateway.tagsync.rules import compile_rules

T = TypeVar("T")

__all__ = ["check_config"]


def bootstrap_reachable(bootstrap_servers: str, timeout_s: float) -> bool:
    """Whether any bootstrap server accepts a TCP connection.

    kafka-python 3 waits without a bound for metadata when ``api_version`` is pinned and no
    broker answers, so an unreachable cluster is caught here, before the first metadata call.
    """
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


def _kafka_reachable(cfg: Config, timeout_s: float = 10.0) -> tuple[bool, str]:
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    from gateway.kafka.clients import start_client

    if not bootstrap_reachable(cfg.kafka.bootstrap_servers, timeout_s=min(timeout_s, 5.0)):
        return False, "no bootstrap server accepts a TCP connection"

    def probe() -> tuple[bool, str]:
        try:
            consumer = start_client(
                KafkaConsumer, **cfg.kafka.client_options(), request_timeout_ms=10000
            )
        except (KafkaError, ValueError, OSError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        try:
            return True, f"{len(consumer.topics())} topics visible"
        except KafkaError as exc:
            return False, f"{type(exc).__name__}: {exc}"
        finally:
            consumer.close()

    outcome = _bounded(probe, timeout_s, "check-kafka")
    if outcome is None:
        return False, f"no metadata from Kafka within {timeout_s:.0f}s"
    return outcome


def _bounded(fn: Callable[[], T], timeout_s: float, name: str) -> T | None:
    """``fn()`` on a daemon thread, or None if it has not returned within ``timeout_s``.

    kafka-python blocks without a bound on a broker that accepts connections but never
    answers; the check must not hang with it.
    """
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn()), name=name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return out[0] if out else None


def _onesignal_key_ok(cfg: Config, app_id: str, key: str) -> tuple[bool, str]:
    """Look up a user that does not exist: 404 means the key was accepted, 401/403 not."""
    probe = f"check-config-{uuid.uuid4().hex}"
    url = f"{cfg.onesignal.api_url}/apps/{app_id}/users/by/external_id/{probe}"
    try:
        r = httpx.get(url, headers={"Authorization": f"Key {key}"}, timeout=cfg.onesignal.timeout_s)
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if r.status_code in (200, 404):
        return True, f"key accepted (HTTP {r.status_code})"
    return False, f"HTTP {r.status_code}"


def _check_topics(cfg: Config, out: TextIO, timeout_s: float = 15.0) -> int:
    """Each gateway topic against ``[topics]``: missing, or too weak to survive a broker loss."""

    def probe() -> list[TopicStatus] | str:
        try:
            return describe_topics(cfg.kafka, gateway_topics(cfg))
        except Exception as exc:  # an admin API the cluster refuses, an ACL
            return f"{type(exc).__name__}: {exc}"

    result = _bounded(probe, timeout_s, "check-topics")
    if result is None:
        print(f"topics: FAILED: no answer from Kafka within {timeout_s:.0f}s", file=out)
        return 1
    if isinstance(result, str):
        print(f"topics: FAILED: {result}", file=out)
        return 1
    problems = 0
    for status in result:
        issues = status.problems(cfg.topics)
        problems += bool(issues)
        verdict = "ok" if not issues else "FAILED: " + "; ".join(issues)
        print(f"topic {status.name}: {status.describe()}: {verdict}", file=out)
    return problems


def check_config(cfg: Config, *, online: bool, out: TextIO) -> int:
    """Print one line per check; 0 when all passed, 1 otherwise.

    Raises :class:`ConfigError` for tag rules the worker would refuse: loading the file does
    not compile them, and a config whose rules fail is as invalid as one that fails to load.
    """
    compile_rules(cfg.tag_sync.rules)  # what TagSyncWorker does at start-up
    problems = 0
    print(f"config: {cfg.path} is valid", file=out)
    print(
        f"server: {cfg.server.host}:{cfg.server.port}, trusted proxies "
        f"{', '.join(cfg.server.trusted_proxies) or '(none)'} via {cfg.server.proxy_header}",
        file=out,
    )
    for src in cfg.sources:
        secret = (
            f"{len(src.secrets)} secret(s) from ${src.secrets_env} in header {src.secret_header}"
            if src.require_secret
            else "no secret required"
        )
        ip = "allowlisted senders only" if src.require_allowlisted_ip else "any sender address"
        print(f"source {src.name}: {src.path} ({src.format}); {ip}; {secret}", file=out)
    try:
        allow = Allowlist.from_config(cfg.allowlist)
        print(
            f"allowlist: {allow.size} ranges (scopes {', '.join(cfg.allowlist.scopes)}, "
            f"syncToken {allow.sync_token})",
            file=out,
        )
    except (RangesError, OSError) as exc:
        problems += 1
        print(f"allowlist: FAILED: {exc}", file=out)
    ok, detail = _kafka_reachable(cfg)
    problems += not ok
    print(f"kafka {cfg.kafka.bootstrap_servers}: {'ok' if ok else 'FAILED'}: {detail}", file=out)
    for warning in durability_warnings(cfg.topics):
        print(f"topics: WARNING: {warning}", file=out)
    if ok:
        problems += _check_topics(cfg, out)
    for app in cfg.onesignal.apps:
        if app.api_key is None:
            problems += 1
            print(f"onesignal app {app.app_id}: FAILED: {app.api_key_source} is not set", file=out)
            continue
        if online:
            ok, detail = _onesignal_key_ok(cfg, app.app_id, app.api_key.reveal())
            problems += not ok
            print(f"onesignal app {app.app_id}: {'ok' if ok else 'FAILED'}: {detail}", file=out)
        else:
            print(
                f"onesignal app {app.app_id}: key present in {app.api_key_source} "
                "(use --online to try it)",
                file=out,
            )
    print("all checks passed" if not problems else f"{problems} problem(s)", file=out)
    return 0 if not problems else 1

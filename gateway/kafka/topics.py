"""The gateway's own topics: create them, check them, and notice when one is missing.

Production clusters often run with ``auto.create.topics.enable=false``, and a topic created by
auto-creation gets the broker's defaults, which may not keep an acknowledged record through a
broker loss. So the topics are made on purpose (``gateway topics create``), with the partitions,
replication factor and ``min.insync.replicas`` of the ``[topics]`` section, and
``gateway check-config`` holds the existing ones to the same numbers.

What keeps an acknowledged record through one broker loss: with ``acks=all`` a record is
acknowledged once every in-sync replica has it, and the in-sync set may shrink to
``min.insync.replicas`` members. With ``min.insync.replicas`` >= 2 an acknowledged record is on
at least two brokers; with 1 it may be on one only. Staying writable through that loss also
needs ``replication.factor`` >= ``min.insync.replicas`` + 1.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from gateway.config import Config, KafkaConfig, TopicsConfig
from gateway.core.kinds import TOPIC_CHANNELS
from gateway.kafka.sink import SinkBase

__all__ = [
    "TopicStatus",
    "TopicWatcher",
    "create_topics",
    "describe_topics",
    "durability_warnings",
    "gateway_topics",
    "has_open_source",
    "ingress_topics",
]

log = logging.getLogger("gateway.kafka.topics")


def ingress_topics(kafka: KafkaConfig, *, unauthenticated: bool) -> list[tuple[str, str]]:
    """(role, topic) of every topic the ingress writes, in order: ``channel:<channel>`` for
    each of TOPIC_CHANNELS, ``dead-letter``, ``unknown-channel`` (when configured),
    ``unauthenticated`` (when configured and ``unauthenticated``: some source has no secret).

    The ingress writes no other topic: this is the vocabulary (core/ingest.py decides);
    :func:`gateway_topics` and the AsyncAPI document both read it.
    """
    out = [(f"channel:{c}", kafka.topic.format(channel=c)) for c in TOPIC_CHANNELS]
    out.append(("dead-letter", kafka.dead_letter_topic))
    if kafka.unknown_channel_topic:
        out.append(("unknown-channel", kafka.unknown_channel_topic))
    if kafka.unauthenticated_topic and unauthenticated:
        out.append(("unauthenticated", kafka.unauthenticated_topic))
    return out


def has_open_source(cfg: Config) -> bool:
    """Whether a source takes events without a secret (web push: anyone can post to it)."""
    return any(not s.require_secret for s in cfg.sources)


def gateway_topics(cfg: Config, *, tag_sync: bool = True) -> list[str]:
    """Every topic the ingress writes (:func:`ingress_topics`), and tag sync's dead letters."""
    names = [t for _, t in ingress_topics(cfg.kafka, unauthenticated=has_open_source(cfg))]
    if tag_sync and (cfg.onesignal.apps or cfg.tag_sync.rules):
        names.append(cfg.tag_sync.dead_letter_topic)
    return list(dict.fromkeys(names))


def durability_warnings(t: TopicsConfig) -> list[str]:
    """What the configured numbers themselves cannot promise (a single-node setup, say)."""
    out = []
    if t.min_insync_replicas < 2:
        out.append(
            f"topics.min_insync_replicas = {t.min_insync_replicas}: an acknowledged record may"
            " live on one broker only and be lost with it (use 2 or more)"
        )
    if t.replication_factor < t.min_insync_replicas + 1:
        out.append(
            f"topics.replication_factor = {t.replication_factor}: one broker down stops writes"
            f" (needs min_insync_replicas + 1 = {t.min_insync_replicas + 1})"
        )
    return out


@dataclass(frozen=True)
class TopicStatus:
    name: str
    exists: bool
    partitions: int = 0
    replication_factor: int = 0
    min_insync_replicas: int = 0
    unclean_leader_election: bool = False

    def problems(self, want: TopicsConfig) -> list[str]:
        if not self.exists:
            return ["missing (create it: gateway topics create)"]
        out = []
        if self.replication_factor < want.replication_factor:
            out.append(
                f"replication factor {self.replication_factor} < {want.replication_factor}"
                " (topics.replication_factor)"
            )
        if self.min_insync_replicas < want.min_insync_replicas:
            out.append(
                f"min.insync.replicas {self.min_insync_replicas} < {want.min_insync_replicas}"
                " (topics.min_insync_replicas)"
            )
        if self.min_insync_replicas < 2 <= want.min_insync_replicas:
            out.append("an acknowledged record may live on one broker only")
        if self.unclean_leader_election:
            out.append("unclean.leader.election.enable=true can lose acknowledged records")
        return out

    def describe(self) -> str:
        if not self.exists:
            return "missing"
        return (
            f"{self.partitions} partitions, replication factor {self.replication_factor},"
            f" min.insync.replicas {self.min_insync_replicas}"
        )


def _admin(kafka: KafkaConfig, timeout_ms: int = 10000) -> Any:
    from kafka import KafkaAdminClient

    from gateway.kafka.clients import start_client

    # bootstrapping is bounded by the same timeout (kafka-python's own default is 30 s, so a
    # topic check against an absent Kafka took 30 s whatever it asked for)
    return start_client(
        KafkaAdminClient,
        **kafka.client_options(),
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
    )


def _topic_configs(admin: Any, names: list[str]) -> dict[str, dict[str, str]]:
    """Each topic's effective configs (broker defaults included), as strings."""
    from kafka.admin import ConfigResource, ConfigResourceType

    resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
    described = admin.describe_configs(resources, config_filter="all").get("topic", {})
    return {
        name: {
            key: str(entry.get("value") if isinstance(entry, dict) else entry)
            for key, entry in (configs or {}).items()
        }
        for name, configs in described.items()
    }


def describe_topics(kafka: KafkaConfig, names: Iterable[str]) -> list[TopicStatus]:
    """Each named topic as Kafka has it now (missing ones included)."""
    names = list(names)
    admin = _admin(kafka)
    try:
        existing = set(admin.list_topics())
        present = [n for n in names if n in existing]
        described = {t["name"]: t for t in admin.describe_topics(present)} if present else {}
        configs = _topic_configs(admin, present) if present else {}
    finally:
        admin.close()
    out = []
    for name in names:
        if name not in described:
            out.append(TopicStatus(name, exists=False))
            continue
        parts = described[name].get("partitions") or []
        conf = configs.get(name, {})
        out.append(
            TopicStatus(
                name,
                exists=True,
                partitions=len(parts),
                replication_factor=min((len(p["replica_nodes"]) for p in parts), default=0),
                min_insync_replicas=int(conf.get("min.insync.replicas", "1") or 1),
                unclean_leader_election=conf.get("unclean.leader.election.enable") == "true",
            )
        )
    return out


def create_topics(cfg: Config, *, dry_run: bool, out: TextIO) -> int:
    """Create the missing topics with the ``[topics]`` numbers; report the existing ones."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    want = cfg.topics
    for warning in durability_warnings(want):
        print(f"warning: {warning}", file=out)
    statuses = describe_topics(cfg.kafka, gateway_topics(cfg))
    missing = [s.name for s in statuses if not s.exists]
    problems = 0
    for s in statuses:
        if s.exists:
            issues = s.problems(want)
            problems += bool(issues)
            verdict = "ok" if not issues else "PROBLEM: " + "; ".join(issues)
            print(f"topic {s.name}: exists, {s.describe()}: {verdict}", file=out)
    if not missing:
        print("nothing to create", file=out)
        return 1 if problems else 0
    plan = (
        f"{want.partitions} partitions, replication factor {want.replication_factor},"
        f" min.insync.replicas {want.min_insync_replicas}"
    )
    if dry_run:
        for name in missing:
            print(f"topic {name}: would create ({plan})", file=out)
        return 1 if problems else 0
    admin = _admin(cfg.kafka, timeout_ms=30000)
    try:
        new = [
            NewTopic(
                name,
                want.partitions,
                want.replication_factor,
                topic_configs={
                    "min.insync.replicas": str(want.min_insync_replicas),
                    "unclean.leader.election.enable": "false",
                },
            )
            for name in missing
        ]
        try:
            response = admin.create_topics(new, timeout_ms=30000)
        except TopicAlreadyExistsError:  # another replica or operator was quicker
            response = None
    finally:
        admin.close()
    errors, existed = _creation_errors(response)
    made = [n for n in missing if n not in errors and n not in existed]
    visible = _wait_visible(cfg.kafka, made)
    for name in missing:
        if name in errors:
            problems += 1
            print(f"topic {name}: FAILED: {errors[name]}", file=out)
        elif name in existed:
            print(f"topic {name}: already exists (made meanwhile)", file=out)
        elif name not in visible:
            problems += 1
            print(f"topic {name}: FAILED: created, but not visible with leaders in 30s", file=out)
        else:
            print(f"topic {name}: created ({plan})", file=out)
    return 1 if problems else 0


def _wait_visible(kafka: KafkaConfig, names: list[str], timeout_s: float = 30.0) -> set[str]:
    """Until every new topic has a leader for every partition, in several reads in a row.

    The controller answers CreateTopics before every broker has applied the new metadata; a
    read served by a broker that lags says the topic is missing. Each read may be served by
    another broker, so several agreeing reads in a row stand for the cluster.
    """
    if not names:
        return set()
    deadline = time.monotonic() + timeout_s
    agreeing = 0
    seen: set[str] = set()
    while time.monotonic() < deadline:
        try:
            seen = {s.name for s in _led(kafka, names)}
        except Exception:  # a node still starting, a timeout: read again
            seen = set()
        agreeing = agreeing + 1 if seen == set(names) else 0
        if agreeing >= 5:
            break
        time.sleep(0.1)
    return seen


def _led(kafka: KafkaConfig, names: list[str]) -> list[TopicStatus]:
    admin = _admin(kafka)
    try:
        described = admin.describe_topics(names)
    finally:
        admin.close()
    return [
        TopicStatus(t["name"], exists=True, partitions=len(t["partitions"]))
        for t in described
        if t.get("error_code", 0) == 0
        and t.get("partitions")
        and all(p["leader_id"] >= 0 for p in t["partitions"])
    ]


def _creation_errors(response: Any) -> tuple[dict[str, str], set[str]]:
    """(the topics Kafka refused, with why; the ones that existed already)."""
    if response is None:
        return {}, set()
    errors: dict[str, str] = {}
    existed: set[str] = set()
    body = response.to_object() if hasattr(response, "to_object") else {}
    for t in body.get("topics") or body.get("topic_errors") or []:
        name = t.get("name") or t.get("topic")
        code = t.get("error_code", 0)
        if code == 36:  # TOPIC_ALREADY_EXISTS: another replica or an operator was quicker
            existed.add(name)
        elif code != 0:
            errors[name] = f"error {code}: {t.get('error_message')}"
    return errors, existed


class TopicWatcher:
    """Lists Kafka's topics now and then and sets the sink's ``missing_topics``, which its
    readiness names.

    Runs on a thread of its own: kafka-python's admin client blocks. A failed listing keeps
    the last answer (Kafka being down is the sink's business, not this one's).
    """

    def __init__(
        self, kafka: KafkaConfig, topics: Sequence[str], interval_s: float, sink: SinkBase
    ) -> None:
        self.kafka = kafka
        self.topics = tuple(topics)
        self.interval_s = interval_s
        self.sink = sink
        self._stop = threading.Event()

    def check_once(self) -> frozenset[str] | None:
        try:
            admin = _admin(self.kafka, timeout_ms=5000)
            try:
                existing = set(admin.list_topics())
            finally:
                admin.close()
        except Exception as exc:  # no broker, auth: the sink reports those
            log.debug("topic listing failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            return None
        missing = frozenset(t for t in self.topics if t not in existing)
        if missing != self.sink.missing_topics:
            if missing:
                log.error(
                    "topics missing in Kafka: create them with 'gateway topics create'",
                    extra={"topics": sorted(missing)},
                )
            else:
                log.info("every gateway topic exists in Kafka")
        self.sink.missing_topics = missing
        return missing

    def _run(self) -> None:
        while not self._stop.is_set():
            missing = self.check_once()
            # while a topic is missing look again soon: a broker that auto-creates topics
            # makes them on the producer's first metadata request, moments after start
            self._stop.wait(min(self.interval_s, 2.0) if missing else self.interval_s)

    def start(self) -> None:
        if self.interval_s <= 0:
            return
        threading.Thread(target=self._run, name="topic-watcher", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

"""``tagsync``: the tag-sync worker's events/s draining a backlog into the loopback OneSignal.

Worker and fake run in processes of their own. By default the backlog interleaves users (each
user's events are spread over the whole backlog), so merging gets no free ride;
``--tagsync-order grouped`` puts each user's events back to back. Done is when both hold: the
group's committed offsets reach the end of every partition, and the fake holds every user's
final tags (a commit ahead of delivery would show as the first without the second).

The embedded broker (librdkafka's mock cluster) keeps at most 5 MiB per partition and silently
drops the oldest record batches beyond that (its topics have 4 partitions and it does not take
CreateTopics from kafka-python), so the backlog is spread over enough topics, each user's
events on one of them, and the run stops if any partition's log start is not 0.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from bench.common import XFF, child_env, free_port, python, stop_process, tail
from gateway.devkit import samples

if TYPE_CHECKING:
    from kafka import KafkaConsumer, TopicPartition

    from gateway.core.records import KafkaRecord

# librdkafka's mock cluster keeps 5 MiB per partition (then drops the oldest batches): the
# tag-sync backlog is spread so that each partition holds at most this much
MOCK_PARTITION_BUDGET_BYTES = 4 * 1024 * 1024
MOCK_PARTITIONS = 4  # per auto-created topic
# after every offset is committed, how long the fake may take to show the final tags
COMMIT_AHEAD_GRACE_S = 10.0
BASE_TS = 1_708_559_115


@dataclass
class Backlog:
    """The records to drain: ``per_user`` events for each of ``n_users`` users."""

    records: list[tuple[int, KafkaRecord]]
    n_users: int
    per_user: int
    prefix: str
    topics: list[str]
    n_bytes: int
    build_s: float

    @property
    def n_events(self) -> int:
        return self.per_user * self.n_users

    @property
    def final_ts(self) -> str:
        """Every user's newest event's time: the tag the fake must end with."""
        return str(BASE_TS + self.per_user - 1)


@dataclass
class Drain:
    """When each condition was first seen, on the monotonic clock; None if it never was."""

    started: float
    partitions: int
    consuming_at: float | None = None
    committed_at: float | None = None
    final_at: float | None = None
    done_at: float | None = None


def _record_bytes(r: KafkaRecord) -> int:
    return len(r.value) + len(r.key or b"") + sum(len(k) + len(v) for k, v in r.headers)


def build_backlog(args: argparse.Namespace) -> Backlog:
    """Normalized records as the gateway writes them, in ``--tagsync-order``."""
    from gateway.core.event import Received
    from gateway.core.normalize import normalize
    from gateway.core.records import build_record

    n_users = args.tagsync_users
    per_user = max(1, args.tagsync_events // n_users)
    prefix = f"bench.tagsync.{uuid.uuid4().hex[:8]}"
    received = Received(source="event-stream", at=datetime.now(UTC), client_ip=XFF)
    built = time.perf_counter()
    records = []
    if args.tagsync_order == "interleaved":
        order = [(u, j) for j in range(per_user) for u in range(n_users)]
    else:  # each user's events back to back: what per-user merging does best with
        order = [(u, j) for u in range(n_users) for j in range(per_user)]
    for u, j in order:
        payload = samples.event_stream_payload(
            "message.push.clicked",
            event_id=str(uuid.uuid4()),
            external_id=f"bench-user-{u}",
            onesignal_id=str(uuid.UUID(int=u + 1)),
            timestamp=BASE_TS + j,
        )
        event = normalize(payload, fmt="event-stream")
        records.append(
            (u, build_record(event, received, topic_template=prefix, source_name="event-stream"))
        )
    built = time.perf_counter() - built
    n_bytes = sum(_record_bytes(r) for _, r in records)
    # the same layout against Apache Kafka (its auto-created topics have 4 partitions too), so
    # the two backends' figures differ in the broker only
    n_topics = max(1, math.ceil(n_bytes / (MOCK_PARTITIONS * MOCK_PARTITION_BUDGET_BYTES)))
    topics = [f"{prefix}.{i}" for i in range(n_topics)]
    return Backlog(records, n_users, per_user, prefix, topics, n_bytes, built)


def produce_backlog(backlog: Backlog, kafka_opts: dict[str, Any], batch_size: int) -> float:
    """Writes the backlog, each user's events to one topic; returns the seconds it took.

    Batched as the gateway's own producer batches (kafka.batch_size): the mock cluster answers
    a fetch with one record batch per partition, so the batch size sets how much a fetch
    returns. With kafka-python's 16 KiB default (6 of these records) every read would be a
    round trip per 6 records, which no backlog the gateway wrote would show, nor a real broker.
    """
    from kafka import KafkaProducer

    producer = KafkaProducer(**kafka_opts, acks="all", linger_ms=5, batch_size=batch_size)
    topics = backlog.topics
    produced = time.perf_counter()
    try:
        for u, r in backlog.records:
            producer.send(topics[u % len(topics)], value=r.value, key=r.key, headers=r.headers)
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=10)
    return time.perf_counter() - produced


@contextmanager
def fake_onesignal(workdir: Path, key: str, app_rate: float) -> Iterator[str]:
    """The loopback OneSignal in a process of its own; yields its URL."""
    fake_log = workdir / "fake.log"
    proc = None
    try:
        with open(fake_log, "wb") as flog:
            proc = subprocess.Popen(
                [
                    *(python(), "-m", "bench.apps.fake_onesignal_server"),
                    *("--api-key-env", "BENCH_OS_KEY", "--app-rate-limit", str(app_rate)),
                ],
                stdout=subprocess.PIPE,
                stderr=flog,
                stdin=subprocess.DEVNULL,
                env=child_env(BENCH_OS_KEY=key),
            )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("URL "):
            raise RuntimeError(f"fake OneSignal did not start: {tail(fake_log)}")
        yield line.split()[1]
    finally:
        stop_process(proc)


def write_worker_config(
    path: Path,
    bootstrap: str,
    args: argparse.Namespace,
    fake_url: str,
    group: str,
    topics: list[str],
) -> int:
    """The worker's config: one rule, the fake as OneSignal; returns its metrics port."""
    metrics_port = free_port()  # polled: when the worker starts reading
    path.write_text(
        f"""
[server]
log_level = "warning"

[kafka]
bootstrap_servers = "{bootstrap}"
api_version = "{args.api_version}"

[onesignal]
api_url = "{fake_url}"

[[onesignal.apps]]
app_id = "{samples.DEMO_APP_ID}"
api_key_env = "BENCH_OS_KEY"

[tag_sync]
group_id = "{group}"
topics = {orjson.dumps(topics).decode()}
app_rate_limit = {args.tagsync_app_rate}
metrics_port = {metrics_port}

[[tag_sync.rules]]
kinds = ["message.push.clicked", "message.email.clicked"]
tags = {{ last_clicked_at = "{{occurred_unix}}", last_clicked_channel = "{{channel}}" }}
"""
    )
    return metrics_port


def held_partitions(
    probe: KafkaConsumer, topics: list[str], n_events: int
) -> dict[TopicPartition, int]:
    """Every partition's end offset, once the broker is seen to hold the whole backlog."""
    from kafka import TopicPartition

    tps = [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(probe.partitions_for_topic(topic) or ())
    ]
    ends: dict[TopicPartition, int] = probe.end_offsets(tps)
    starts = probe.beginning_offsets(tps)
    if sum(ends.values()) != n_events or any(starts.values()):
        raise RuntimeError(
            f"the broker does not hold the whole backlog: {sum(ends.values())} records "
            f"produced of {n_events}, {sum(starts.values())} already dropped from the "
            "partitions' starts (the mock cluster keeps 5 MiB per partition)"
        )
    return ends


def _tagsync_consumed(port: int) -> float:
    """The worker's ``gateway_tagsync_events_consumed_total`` (0 until it serves metrics)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0.0
    metric = r"^gateway_tagsync_events_consumed_total(?:\{[^}]*\})? ([\d.e+]+)$"
    found = re.findall(metric, text, re.M)
    return sum(float(v) for v in found)


def wait_drained(
    worker: subprocess.Popen[bytes],
    worker_log: Path,
    probe: KafkaConsumer,
    ends: dict[TopicPartition, int],
    fake_url: str,
    backlog: Backlog,
    metrics_port: int,
    drain: Drain,
    timeout_s: float,
) -> None:
    """Polls until every offset is committed and every final tag delivered (into ``drain``)."""
    final_params = {"key": "last_clicked_at", "value": backlog.final_ts}
    while time.monotonic() < drain.started + timeout_s:
        if worker.poll() is not None:
            raise RuntimeError(f"tag-sync worker exited: {tail(worker_log)}")
        now = time.monotonic()
        if drain.consuming_at is None:
            # the clock of the figure starts at the first record the worker read: process
            # start and the group join are one-off, not throughput
            if _tagsync_consumed(metrics_port) > 0:
                drain.consuming_at = now
            else:
                time.sleep(0.02)
                continue
        if drain.committed_at is None:
            committed = {tp: probe.committed(tp) or 0 for tp in ends}
            if all(committed[tp] >= end for tp, end in ends.items()):
                drain.committed_at = now
        if drain.final_at is None and drain.committed_at is not None:
            # asked once the commit holds (the fake is not loaded with polls meanwhile):
            # when both hold is when the later of the two was seen
            got = httpx.get(f"{fake_url}/_bench/final", params=final_params, timeout=30)
            if got.json()["users"] >= backlog.n_users:
                drain.final_at = now
        if drain.committed_at is not None and drain.final_at is not None:
            drain.done_at = max(drain.committed_at, drain.final_at)
            return
        if drain.committed_at is not None and now - drain.committed_at > COMMIT_AHEAD_GRACE_S:
            return  # committed, yet the fake does not hold the final state: a lost update
        time.sleep(0.25)


def _worker(cfg: Path, worker_log: Path, key: str) -> subprocess.Popen[bytes]:
    with open(worker_log, "wb") as wlog:
        return subprocess.Popen(
            [python(), "-m", "gateway.tagsync", "--config", str(cfg), "--log-level", "warning"],
            stdout=wlog,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(BENCH_OS_KEY=key),
        )


def tagsync(bootstrap: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The tag-sync worker draining a backlog of N events for U users to a loopback OneSignal."""
    from kafka import KafkaConsumer

    backlog = build_backlog(args)
    kafka_opts: dict[str, Any] = {"bootstrap_servers": bootstrap.split(",")}
    if args.api_version:
        kafka_opts["api_version"] = tuple(int(p) for p in args.api_version.split("."))
    produced = produce_backlog(backlog, kafka_opts, args.tagsync_batch_size)
    key = "bench-key-" + uuid.uuid4().hex
    group = f"bench-tagsync-{uuid.uuid4().hex[:8]}"
    cfg, worker_log = workdir / "tagsync.toml", workdir / "tagsync.log"
    worker = None
    with ExitStack() as stack:
        fake_url = stack.enter_context(fake_onesignal(workdir, key, args.tagsync_app_rate))
        metrics_port = write_worker_config(cfg, bootstrap, args, fake_url, group, backlog.topics)
        probe = KafkaConsumer(**kafka_opts, group_id=group, enable_auto_commit=False)
        stack.callback(probe.close)
        ends = held_partitions(probe, backlog.topics, backlog.n_events)
        drain = Drain(started=time.monotonic(), partitions=len(ends))
        try:
            worker = _worker(cfg, worker_log, key)
            wait_drained(
                worker,
                worker_log,
                probe,
                ends,
                fake_url,
                backlog,
                metrics_port,
                drain,
                args.tagsync_timeout,
            )
            stats = httpx.get(f"{fake_url}/_bench/stats", params={"full": "1"}, timeout=30).json()
        finally:
            stop_process(worker)
    return tagsync_figures(backlog, drain, stats, produced, args)


def _per_s(n: float, seconds: float | None) -> float:
    return n / seconds if seconds and seconds == seconds else math.nan


def tagsync_figures(
    backlog: Backlog,
    drain: Drain,
    stats: dict[str, Any],
    produced_s: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every figure the report prints (and ``--json`` keeps) from one drain."""
    n_events, started, done_at = backlog.n_events, drain.started, drain.done_at
    tags = stats.get("tags", {})
    final_ok = sum(1 for t in tags.values() if t.get("last_clicked_at") == backlog.final_ts)
    first, last = stats.get("first_at"), stats.get("last_at")
    drain_s = (done_at - first) if (done_at and first) else math.nan
    sending = (last - first) if (last and first) else math.nan
    from_launch = (done_at - started) if done_at else math.nan
    consuming = (done_at - drain.consuming_at) if done_at and drain.consuming_at else math.nan
    requests = stats.get("requests", 0)
    return {
        "order": args.tagsync_order,
        "events": n_events,
        "users": backlog.n_users,
        "events_per_user": backlog.per_user,
        "app_rate_limit": args.tagsync_app_rate,
        "build_s": backlog.build_s,
        "produce_records_per_s": n_events / produced_s,
        "produce_batch_size": args.tagsync_batch_size,
        "topics": len(backlog.topics),
        "partitions": drain.partitions,
        "backlog_mb": backlog.n_bytes / 1e6,
        "finished": done_at is not None,
        "committed_s_from_launch": (drain.committed_at - started)
        if drain.committed_at
        else math.nan,
        "final_state_s_from_launch": (drain.final_at - started) if drain.final_at else math.nan,
        # every offset committed, yet some user lacks their final tags after the grace
        "committed_ahead_of_delivery": drain.committed_at is not None and drain.final_at is None,
        "wall_s_from_launch": from_launch,
        "events_per_s_from_launch": _per_s(n_events, from_launch),
        "drain_s": drain_s,
        "events_per_s_from_first_patch": _per_s(n_events, drain_s),
        "consuming_s": consuming,
        "events_per_s": _per_s(n_events, consuming),
        "requests": requests,
        "requests_per_s": _per_s(requests, sending),
        "events_per_request": n_events / requests if requests else math.nan,
        "statuses": stats.get("statuses", {}),
        "user_limited_429": stats.get("user_limited"),
        "min_gap_between_a_users_requests_s": stats.get("min_gap_s"),
        "users_with_final_tags": final_ok,
        # at most one request per user per interval, and per app per second: a bound on
        # requests/s; events/s can exceed it only by merging a user's events into one request
        "reachable_requests_per_s": min(args.tagsync_app_rate, backlog.n_users / 1.0),
    }

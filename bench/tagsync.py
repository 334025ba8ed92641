"""``tagsync``: the tag-sync worker's events/s draining a backlog into the loopback OneSignal."""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.common import XFF, child_env, free_port, python, stop_process, tail
from gateway.devkit import samples

# librdkafka's mock cluster keeps 5 MiB per partition (then drops the oldest batches): the
# tag-sync backlog is spread so that each partition holds at most this much
MOCK_PARTITION_BUDGET_BYTES = 4 * 1024 * 1024
MOCK_PARTITIONS = 4  # per auto-created topic
# after every offset is committed, how long the fake may take to show the final tags
COMMIT_AHEAD_GRACE_S = 10.0


def _tagsync_consumed(port: int) -> float:
    """The worker's ``gateway_tagsync_events_consumed_total`` (0 until it serves metrics)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0.0
    metric = r"^gateway_tagsync_events_consumed_total(?:\{[^}]*\})? ([\d.e+]+)$"
    found = re.findall(metric, text, re.M)
    return sum(float(v) for v in found)


def tagsync(bootstrap: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The tag-sync worker draining a backlog of N events for U users to a loopback OneSignal.

    Worker and fake run in processes of their own. By default the backlog interleaves users
    (each user's events are spread over the whole backlog), so merging gets no free ride;
    ``--tagsync-order grouped`` puts each user's events back to back. Done is when both hold:
    the group's committed offsets reach the end of every partition, and the fake holds every
    user's final tags (a commit ahead of delivery would show as the first without the second).

    The embedded broker (librdkafka's mock cluster) keeps at most 5 MiB per partition and
    silently drops the oldest record batches beyond that (its topics have 4 partitions and it
    does not take CreateTopics from kafka-python), so the backlog is spread over enough
    topics, each user's events on one of them, and the run stops if any partition's log
    start is not 0.
    """
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from gateway.core.event import Received
    from gateway.core.normalize import normalize
    from gateway.core.records import build_record

    n_events, n_users = args.tagsync_events, args.tagsync_users
    per_user = max(1, n_events // n_users)
    n_events = per_user * n_users
    prefix = f"bench.tagsync.{uuid.uuid4().hex[:8]}"
    group = f"bench-tagsync-{uuid.uuid4().hex[:8]}"
    base_ts = 1_708_559_115
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
            timestamp=base_ts + j,
        )
        event = normalize(payload, fmt="event-stream")
        records.append(
            (u, build_record(event, received, topic_template=prefix, source_name="event-stream"))
        )
    built = time.perf_counter() - built

    kafka_opts: dict[str, Any] = {"bootstrap_servers": bootstrap.split(",")}
    if args.api_version:
        kafka_opts["api_version"] = tuple(int(p) for p in args.api_version.split("."))
    backlog_bytes = sum(
        len(r.value) + len(r.key or b"") + sum(len(k) + len(v) for k, v in r.headers)
        for _, r in records
    )
    # the same layout against Apache Kafka (its auto-created topics have 4 partitions too), so
    # the two backends' figures differ in the broker only
    n_topics = max(1, math.ceil(backlog_bytes / (MOCK_PARTITIONS * MOCK_PARTITION_BUDGET_BYTES)))
    topics = [f"{prefix}.{i}" for i in range(n_topics)]
    # Batched as the gateway's own producer batches (kafka.batch_size): the mock cluster answers
    # a fetch with one record batch per partition, so the batch size sets how much a fetch
    # returns; kafka-python's 16 KiB default (6 of these records) made every read a round trip
    # per 6 records, which no backlog the gateway wrote would show, nor a real broker.
    producer = KafkaProducer(
        **kafka_opts, acks="all", linger_ms=5, batch_size=args.tagsync_batch_size
    )
    produced = time.perf_counter()
    try:
        for u, r in records:
            producer.send(topics[u % n_topics], value=r.value, key=r.key, headers=r.headers)
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=10)
    produced = time.perf_counter() - produced

    key = "bench-key-" + uuid.uuid4().hex
    app_rate = args.tagsync_app_rate
    cfg = workdir / "tagsync.toml"
    fake_proc = worker = None
    fake_log, worker_log = workdir / "fake.log", workdir / "tagsync.log"
    probe = None
    try:
        with open(fake_log, "wb") as flog:
            fake_proc = subprocess.Popen(
                [
                    *(python(), "-m", "bench.apps.fake_onesignal_server"),
                    *("--api-key-env", "BENCH_OS_KEY", "--app-rate-limit", str(app_rate)),
                ],
                stdout=subprocess.PIPE,
                stderr=flog,
                stdin=subprocess.DEVNULL,
                env=child_env(BENCH_OS_KEY=key),
            )
        assert fake_proc.stdout is not None
        line = fake_proc.stdout.readline().decode()
        if not line.startswith("URL "):
            raise RuntimeError(f"fake OneSignal did not start: {tail(fake_log)}")
        fake_url = line.split()[1]
        metrics_port = free_port()  # polled: when the worker starts reading
        cfg.write_text(
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
app_rate_limit = {app_rate}
metrics_port = {metrics_port}

[[tag_sync.rules]]
kinds = ["message.push.clicked", "message.email.clicked"]
tags = {{ last_clicked_at = "{{occurred_unix}}", last_clicked_channel = "{{channel}}" }}
"""
        )
        probe = KafkaConsumer(**kafka_opts, group_id=group, enable_auto_commit=False)
        tps = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(probe.partitions_for_topic(topic) or ())
        ]
        ends = probe.end_offsets(tps)
        starts = probe.beginning_offsets(tps)
        if sum(ends.values()) != n_events or any(starts.values()):
            raise RuntimeError(
                f"the broker does not hold the whole backlog: {sum(ends.values())} records "
                f"produced of {n_events}, {sum(starts.values())} already dropped from the "
                "partitions' starts (the mock cluster keeps 5 MiB per partition)"
            )
        want = str(base_ts + per_user - 1)
        started = time.monotonic()
        with open(worker_log, "wb") as wlog:
            worker = subprocess.Popen(
                [python(), "-m", "gateway.tagsync", "--config", str(cfg), "--log-level", "warning"],
                stdout=wlog,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(BENCH_OS_KEY=key),
            )
        deadline = started + args.tagsync_timeout
        committed_at = final_at = done_at = consuming_at = None
        final_params = {"key": "last_clicked_at", "value": want}
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise RuntimeError(f"tag-sync worker exited: {tail(worker_log)}")
            now = time.monotonic()
            if consuming_at is None:
                # the clock of the figure starts at the first record the worker read: process
                # start and the group join are one-off, not throughput
                if _tagsync_consumed(metrics_port) > 0:
                    consuming_at = now
                else:
                    time.sleep(0.02)
                    continue
            if committed_at is None:
                committed = {tp: probe.committed(tp) or 0 for tp in tps}
                if all(committed[tp] >= ends[tp] for tp in tps):
                    committed_at = now
            if final_at is None and committed_at is not None:
                # asked once the commit holds (the fake is not loaded with polls meanwhile):
                # when both hold is when the later of the two was seen
                got = httpx.get(f"{fake_url}/_bench/final", params=final_params, timeout=30)
                if got.json()["users"] >= n_users:
                    final_at = now
            if committed_at is not None and final_at is not None:
                done_at = max(committed_at, final_at)
                break
            if committed_at is not None and now - committed_at > COMMIT_AHEAD_GRACE_S:
                break  # committed, yet the fake does not hold the final state: a lost update
            time.sleep(0.25)
        stats = httpx.get(f"{fake_url}/_bench/stats", params={"full": "1"}, timeout=30).json()
    finally:
        if probe is not None:
            probe.close()
        stop_process(worker)
        stop_process(fake_proc)
    tags = stats.get("tags", {})
    final_ok = sum(1 for t in tags.values() if t.get("last_clicked_at") == want)
    first, last = stats.get("first_at"), stats.get("last_at")
    drain = (done_at - first) if (done_at and first) else math.nan
    sending = (last - first) if (last and first) else math.nan
    requests = stats.get("requests", 0)
    return {
        "order": args.tagsync_order,
        "events": n_events,
        "users": n_users,
        "events_per_user": per_user,
        "app_rate_limit": app_rate,
        "build_s": built,
        "produce_records_per_s": n_events / produced,
        "produce_batch_size": args.tagsync_batch_size,
        "topics": n_topics,
        "partitions": len(tps),
        "backlog_mb": backlog_bytes / 1e6,
        "finished": done_at is not None,
        "committed_s_from_launch": (committed_at - started) if committed_at else math.nan,
        "final_state_s_from_launch": (final_at - started) if final_at else math.nan,
        # every offset committed, yet some user lacks their final tags after the grace
        "committed_ahead_of_delivery": committed_at is not None and final_at is None,
        "wall_s_from_launch": (done_at - started) if done_at else math.nan,
        "events_per_s_from_launch": n_events / (done_at - started) if done_at else math.nan,
        "drain_s": drain,
        "events_per_s_from_first_patch": n_events / drain if drain == drain else math.nan,
        "consuming_s": (done_at - consuming_at) if done_at and consuming_at else math.nan,
        "events_per_s": n_events / (done_at - consuming_at)
        if done_at and consuming_at
        else math.nan,
        "requests": requests,
        "requests_per_s": requests / sending if sending and sending == sending else math.nan,
        "events_per_request": n_events / requests if requests else math.nan,
        "statuses": stats.get("statuses", {}),
        "user_limited_429": stats.get("user_limited"),
        "min_gap_between_a_users_requests_s": stats.get("min_gap_s"),
        "users_with_final_tags": final_ok,
        # at most one request per user per interval, and per app per second: a bound on
        # requests/s; events/s can exceed it only by merging a user's events into one request
        "reachable_requests_per_s": min(app_rate, n_users / 1.0),
    }

"""A rotated API key: tag sync holds the app's updates (nothing dead-lettered, nothing committed
past the first undelivered record) until it reads the new key, then delivers every final tag.

Against the real broker fixture and the loopback fake OneSignal; every assertion is about what
crossed a socket (the fake's request log and tags, the group's committed offsets, the
dead-letter topic) or the worker's own metrics.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY

from gateway.config import Config, parse_config
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.devkit.fake_onesignal import FakeOneSignal, LoggedRequest
from gateway.logs import JsonFormatter

from .conftest import KAFKA_API_VERSION, unique
from .test_tagsync_worker import (
    RULES,
    ev,
    group_report,
    produce,
    running,
    wait_until,
    write_config,
)

APP = "aaaaaaaa-0000-4000-8000-000000000001"  # its key is rotated
OTHER = "bbbbbbbb-0000-4000-8000-000000000002"  # keeps its key
OLD_KEY, NEW_KEY, OTHER_KEY = "old-app-key-0123456789", "new-app-key-9876543210", "other-key-42"
ROOT = Path(__file__).resolve().parents[1]


def kafka_section(broker: EmbeddedBroker) -> dict[str, Any]:
    kafka: dict[str, Any] = {"bootstrap_servers": broker.bootstrap_servers}
    if KAFKA_API_VERSION is not None:
        kafka["api_version"] = ".".join(map(str, KAFKA_API_VERSION))
    return kafka


def client_version() -> dict[str, Any]:
    return {} if KAFKA_API_VERSION is None else {"api_version": KAFKA_API_VERSION}


def dead_lettered(broker: EmbeddedBroker, topic: str) -> int:
    """Records in the dead-letter topic (0 if it does not exist)."""
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers.split(","), **client_version())
    try:
        parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        return sum(c.end_offsets(tps).values()) if tps else 0
    finally:
        c.close()


def committed(broker: EmbeddedBroker, group: str, topic: str) -> int | None:
    """The group's committed offset of partition 0 (where these tests produce)."""
    c = KafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers.split(","),
        group_id=group,
        enable_auto_commit=False,
        **client_version(),
    )
    try:
        return c.committed(TopicPartition(topic, 0))  # type: ignore[no-any-return]
    finally:
        c.close(autocommit=False)


def end_offset(broker: EmbeddedBroker, topic: str) -> int:
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers.split(","), **client_version())
    try:
        tp = TopicPartition(topic, 0)
        return int(c.end_offsets([tp])[tp])
    finally:
        c.close()


def all_committed(broker: EmbeddedBroker, group: str, topic: str) -> bool:
    return committed(broker, group, topic) == end_offset(broker, topic)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def refused(fake: FakeOneSignal, app_id: str = APP) -> list[LoggedRequest]:
    return [r for r in fake.requests if r.app_id == app_id and r.status in (401, 403)]


def config_data(
    broker: EmbeddedBroker,
    fake: FakeOneSignal,
    topics: list[str],
    group: str,
    key_file: Path,
    **ts: Any,
) -> dict[str, Any]:
    tag_sync: dict[str, Any] = {
        "group_id": group,
        "topics": topics,
        "flush_interval_s": 0.2,
        "backoff_base_s": 0.05,
        "backoff_cap_s": 0.3,
        "max_concurrency": 1,  # one request in flight: exactly one is refused at first
        "metrics_port": 0,
        "dead_letter_topic": f"{topics[0]}.dlt",
        "rules": RULES,
    }
    tag_sync.update(ts)
    return {
        "kafka": kafka_section(broker),
        "onesignal": {
            "api_url": fake.url,
            "apps": [
                {"app_id": APP, "api_key_file": str(key_file)},
                {"app_id": OTHER, "api_key_env": "OTHER_KEY"},
            ],
        },
        "tag_sync": tag_sync,
    }


def make_config(*args: Any, **kw: Any) -> Config:
    return parse_config(config_data(*args, **kw), env={"OTHER_KEY": OTHER_KEY})


@pytest.fixture
def fake() -> Iterator[FakeOneSignal]:
    with FakeOneSignal(api_key={APP: OLD_KEY, OTHER: OTHER_KEY}) as f:
        yield f


def clicks(app_id: str, users: list[str], t: int) -> list[Any]:
    return [ev({"external_id": u}, t=t, app_id=app_id) for u in users]


def final_clicked(fake: FakeOneSignal, app_id: str, users: list[str], t: int) -> bool:
    want = str(1_700_000_000 + t)
    return all(fake.tags(app_id, "external_id", u).get("last_clicked_at") == want for u in users)


def test_a_refused_key_holds_the_backlog_until_the_rotated_key_is_read(
    broker: EmbeddedBroker, fake: FakeOneSignal, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the other app's events on a topic of their own: partitions not shared with the held app
    topic, other, group = unique("ts-auth"), unique("ts-auth-other"), unique("g")
    key_file = tmp_path / "app.key"
    key_file.write_text(OLD_KEY + "\n")
    retry_s = 1.0
    cfg = make_config(broker, fake, [topic, other], group, key_file, auth_retry_s=retry_s)
    users = [f"u{i}" for i in range(5)]
    lines: list[str] = []
    formatter = JsonFormatter()

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))

    capture = Capture(logging.INFO)
    logging.getLogger("gateway").addHandler(capture)
    caplog.set_level(logging.INFO, logger="gateway")
    dlt_before = sum(
        metric("gateway_tagsync_dead_lettered_total", reason=r)
        for r in ("http-401", "http-403", "retries-exhausted")
    )
    try:
        # the first round is produced before the worker starts, so that its topics exist when
        # the group forms (see running(): a group formed before them rebalances when they
        # come, and beside the rest of the suite such a rejoin has stalled for over 45 s)
        produce(broker, topic, clicks(APP, users, 0), partition=0)
        produce(broker, other, clicks(OTHER, ["o1"], 0), partition=0)
        with running(cfg):
            # the old key works: the round delivered and committed on both topics
            assert wait_until(
                lambda: all_committed(broker, group, topic) and all_committed(broker, group, other)
            ), f"{group_report(broker, group, topic)} / {group_report(broker, group, other)}"
            held_from = end_offset(broker, topic)  # the first record to be refused

            fake.rotate_key(APP, NEW_KEY, refuse_status=401)
            produce(broker, topic, clicks(APP, users, 1) + clicks(APP, users, 2), partition=0)
            produce(broker, other, clicks(OTHER, ["o1", "o2"], 3), partition=0)
            # The other app, on a partition of its own, keeps flowing and committing ...
            assert fake.wait_for(lambda f: final_clicked(f, OTHER, ["o1", "o2"], 3))
            assert wait_until(lambda: all_committed(broker, group, other))
            # ... while the refused app is probed again (the first refused request, then two
            # probes a retry interval apart): the held work has had its chance.
            assert fake.wait_for(lambda f: len(refused(f)) >= 3, timeout_s=20)
            assert metric("gateway_tagsync_app_auth_failing", app_id=APP) == 1
            assert metric("gateway_tagsync_app_auth_failing", app_id=OTHER) == 0
            assert metric("gateway_tagsync_auth_paused_partitions") == 1
            assert committed(broker, group, topic) == held_from  # not one record past
            assert dead_lettered(broker, f"{topic}.dlt") == 0
            probes = [r.at for r in refused(fake)]
            # not a tight loop: one probe per auth_retry_s (one request in flight at a time)
            assert all(b - a >= retry_s - 0.05 for a, b in itertools.pairwise(probes))
            assert all(r.headers["authorization"] == f"Key {OLD_KEY}" for r in refused(fake))

            # the new key lands in the file: read on the timer, probed at once, all delivered
            key_file.write_text(NEW_KEY + "\n")
            assert fake.wait_for(lambda f: final_clicked(f, APP, users, 2), timeout_s=20)
            assert wait_until(lambda: all_committed(broker, group, topic))
            assert metric("gateway_tagsync_app_auth_failing", app_id=APP) == 0
            assert wait_until(lambda: metric("gateway_tagsync_auth_paused_partitions") == 0)
    finally:
        logging.getLogger("gateway").removeHandler(capture)

    after = [r for r in fake.requests if r.app_id == APP and r.status == 202]
    assert after and after[-1].headers["authorization"] == f"Key {NEW_KEY}"
    assert dead_lettered(broker, f"{topic}.dlt") == 0
    assert dlt_before == sum(
        metric("gateway_tagsync_dead_lettered_total", reason=r)
        for r in ("http-401", "http-403", "retries-exhausted")
    )
    text = "\n".join(lines)
    assert "refuses the app's API key" in text and "API key changed" in text
    assert OLD_KEY not in text and NEW_KEY not in text and OTHER_KEY not in text


def test_sighup_rereads_the_key_file_and_resumes_after_a_403(
    broker: EmbeddedBroker, fake: FakeOneSignal, tmp_path: Path
) -> None:
    """The worker process with a retry interval far beyond the test: only SIGHUP can have
    brought the new key in."""
    topic, group = unique("ts-hup"), unique("g")
    key_file = tmp_path / "app.key"
    key_file.write_text(OLD_KEY)
    fake.rotate_key(APP, NEW_KEY, refuse_status=403)
    data = config_data(broker, fake, [topic], group, key_file, auth_retry_s=600.0)
    path = write_config(tmp_path, data)
    log = tmp_path / "worker.log"
    users = ["h1", "h2", "h3"]
    produce(broker, topic, clicks(APP, users, 1) + clicks(APP, users, 2), partition=0)
    worker = subprocess.Popen(
        [sys.executable, "-m", "gateway.tagsync", "--config", str(path)],
        cwd=ROOT,
        env=dict(os.environ, OTHER_KEY=OTHER_KEY, PYTHONUNBUFFERED="1"),
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    try:
        assert fake.wait_for(lambda f: len(refused(f)) >= 1, timeout_s=45), log.read_text()
        # the refused request was answered and its offset is still the group's position
        assert wait_until(lambda: "refuses the app's API key" in log.read_text(), timeout_s=10)
        assert committed(broker, group, topic) is None
        key_file.write_text(NEW_KEY)
        worker.send_signal(signal.SIGHUP)
        assert fake.wait_for(lambda f: final_clicked(f, APP, users, 2), timeout_s=20), (
            log.read_text()[-3000:]
        )
        assert wait_until(lambda: all_committed(broker, group, topic))
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    assert [r.status for r in refused(fake)] == [403] * len(refused(fake))
    assert len(refused(fake)) == 1  # one request in flight; no probe before the SIGHUP
    assert dead_lettered(broker, f"{topic}.dlt") == 0
    text = log.read_text()
    assert "SIGHUP" in text and OLD_KEY not in text and NEW_KEY not in text

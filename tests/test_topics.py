"""The gateway's topics on a cluster that does not auto-create them (three Apache Kafka nodes).

``gateway topics plan|create`` makes them with the ``[topics]`` numbers, ``check-config`` holds
existing topics to those numbers, and readiness names a missing topic instead of hanging.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from gateway import cli
from gateway.config import load_config
from gateway.devkit import samples
from gateway.devkit.kafka_cluster import KafkaCluster
from gateway.ingress.app import create_app
from gateway.ingress.server import ServerThread
from gateway.kafka.topics import describe_topics, gateway_topics
from gateway.metrics import IngressMetrics

from .conftest import unique
from .ingress_helpers import EU_WEST4, SECRET, post

pytestmark = pytest.mark.slow


def _config(path: Path, bootstrap: str, prefix: str, **topics: int | float) -> Path:
    section = "\n".join(f"{k} = {v}" for k, v in topics.items())
    path.write_text(
        f"""
[server]
trusted_proxies = ["127.0.0.1/32"]

[kafka]
bootstrap_servers = "{bootstrap}"
topic = "{prefix}.{{channel}}"
dead_letter_topic = "{prefix}.dlt"
ack_timeout_s = 3.0

[topics]
{section}

[[sources]]
name = "event-stream"
path = "/v1/onesignal/events"
format = "event-stream"
secrets_env = "T_SECRETS"
"""
    )
    return path


def test_plan_create_and_check(
    cluster3: KafkaCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("T_SECRETS", SECRET)
    prefix = unique("tp")
    path = _config(tmp_path / "gw.toml", cluster3.bootstrap_servers, prefix, partitions=3)
    cfg = load_config(path, env={"T_SECRETS": SECRET})
    names = gateway_topics(cfg)
    channels = ("push", "email", "sms", "iam", "live_activity", "journey")
    assert names == [f"{prefix}.{c}" for c in channels] + [f"{prefix}.dlt"]

    capsys.readouterr()
    assert cli.main(["topics", "plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("would create (3 partitions, replication factor 3") == len(names), out
    assert not any(s.exists for s in describe_topics(cfg.kafka, names)), "plan created topics"

    # before create, check-config names every missing topic and fails
    assert cli.main(["check-config", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    for name in names:
        assert f"topic {name}: missing: FAILED: missing" in out, out

    assert cli.main(["topics", "create", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count(": created (") == len(names), out
    for status in describe_topics(cfg.kafka, names):
        assert status.exists and status.partitions == 3, status
        assert status.replication_factor == 3 and status.min_insync_replicas == 2, status
        assert not status.unclean_leader_election

    # again: nothing to do, and it says the existing ones are fine
    assert cli.main(["topics", "create", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "nothing to create" in out and out.count(": ok") == len(names), out

    assert cli.main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out, out
    assert SECRET not in out


def test_check_config_reports_topics_that_cannot_survive_a_broker_loss(
    cluster3: KafkaCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("T_SECRETS", SECRET)
    prefix = unique("tw")
    path = _config(tmp_path / "gw.toml", cluster3.bootstrap_servers, prefix)
    assert cli.main(["topics", "create", "--config", str(path)]) == 0
    # someone made the dead-letter topic by hand: one replica; and push with min ISR 1
    cluster3.create_topic(f"{prefix}-weak.dlt", 2, 1)
    cluster3.create_topic(f"{prefix}-weak.push", 2, 3, **{"min.insync.replicas": "1"})
    weak = _config(tmp_path / "weak.toml", cluster3.bootstrap_servers, f"{prefix}-weak")
    capsys.readouterr()
    assert cli.main(["check-config", "--config", str(weak)]) == 1
    out = capsys.readouterr().out
    assert f"topic {prefix}-weak.dlt: 2 partitions, replication factor 1" in out, out
    assert "replication factor 1 < 3 (topics.replication_factor)" in out, out
    assert "min.insync.replicas 1 < 2 (topics.min_insync_replicas)" in out, out
    assert "an acknowledged record may live on one broker only" in out, out
    assert f"topic {prefix}-weak.email: missing" in out, out

    # a config that asks for a single replica is told what that costs, in words
    single = _config(
        tmp_path / "single.toml",
        cluster3.bootstrap_servers,
        prefix,
        replication_factor=1,
        min_insync_replicas=1,
    )
    cli.main(["check-config", "--config", str(single)])
    out = capsys.readouterr().out
    assert "topics: WARNING: topics.min_insync_replicas = 1" in out, out
    assert "topics: WARNING: topics.replication_factor = 1: one broker down stops writes" in out


def _readyz(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=5)


def _wait(cond: object, timeout_s: float) -> object:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = cond()  # type: ignore[operator]
        if last:
            return last
        time.sleep(0.2)
    return last


def test_readiness_names_missing_topics_and_recovers_when_they_exist(
    cluster3: KafkaCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("T_SECRETS", SECRET)
    prefix = unique("tr")
    path = _config(tmp_path / "gw.toml", cluster3.bootstrap_servers, prefix, check_interval_s=1.0)
    cfg = load_config(path, env={"T_SECRETS": SECRET})
    app = create_app(cfg, metrics=IngressMetrics(process=False))
    server = ServerThread(app, cfg, host="127.0.0.1")
    with server.running():
        url = server.url

        def names_missing() -> bool:
            r = _readyz(url)
            return r.status_code == 503 and "topics missing in Kafka" in r.text

        assert _wait(names_missing, 20), _readyz(url).text
        detail = _readyz(url).json()["kafka"]
        assert f"{prefix}.push" in detail and "gateway topics create" in detail, detail

        # a request for a missing topic is answered 503 within the bound, not held
        with httpx.Client(base_url=url, timeout=15) as client:
            body = samples.event_stream_payload("message.push.clicked", event_id=unique("ev"))
            started = time.monotonic()
            r = post(client, "/v1/onesignal/events", body, xff=EU_WEST4)
            assert r.status_code == 503, r.text
            assert time.monotonic() - started < cfg.kafka.ack_timeout_s + 3.0

            assert cli.main(["topics", "create", "--config", str(path)]) == 0
            assert _wait(lambda: _readyz(url).status_code == 200, 20), _readyz(url).text
            r = post(client, "/v1/onesignal/events", body, xff=EU_WEST4)
            assert r.status_code == 200 and r.json()["status"] == "accepted", r.text

"""Operations: the deploy files agree with the code, and the operator commands work end to end.

Docker cannot run here, so compose.yaml, the Dockerfile and the Prometheus/Grafana files are
checked by reading them: every command they run is a real subcommand, every port and metric
name they use is the one the code serves. ``replay``, ``ranges update`` and ``check-config``
run against the real broker fixture and real HTTP servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import re
import select
import shlex
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import yaml
from kafka import KafkaConsumer, TopicPartition
from prometheus_client.metrics import MetricWrapperBase

import gateway.tagsync.metrics as tagsync_metrics
from gateway import cli
from gateway.config import CHANNELS, Config, ServerConfig, TagSyncConfig, load_config
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.devkit.fake_onesignal import FakeOneSignal
from gateway.ingress.allowlist import ONESIGNAL_PUBLISHED, fetch_cloud_json, load_snapshot
from gateway.ingress.server import free_port
from gateway.metrics import IngressMetrics

from .conftest import APACHE, API_VERSION, KAFKA_API_VERSION, read_topic, unique
from .ingress_helpers import EU_WEST4, SECRET, gateway_config, post, running_gateway

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


# ---------------------------------------------------------------------------------------------
# helpers


def _subcommands() -> set[str]:
    parser = cli.build_parser()
    for action in parser._actions:
        if action.dest == "command":
            return set(action.choices)  # type: ignore[arg-type]
    raise AssertionError("gateway's parser has no subcommands")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


_DEFAULT = re.compile(r"^\$\{(\w+):-(.*)\}$")


def _service_env(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as the container sees it with nothing set in the shell."""
    env: dict[str, str] = {}
    for name, value in (service.get("environment") or {}).items():
        text = str(value)
        m = _DEFAULT.match(text)
        env[name] = m.group(2) if m else text
    return env


def _compose_config(service: str) -> Config:
    """The config file a compose service mounts, loaded with that service's environment."""
    svc = _compose()["services"][service]
    env = _service_env(svc)
    target = env["GATEWAY_CONFIG"]
    for volume in svc["volumes"]:
        local, mounted = volume.split(":")[:2]
        if mounted == target:
            return load_config(ROOT / local, env=env)
    raise AssertionError(f"{service}: nothing is mounted at GATEWAY_CONFIG={target}")


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    out: dict[int, int] = {}
    for spec in service.get("ports", []):
        host, container = str(spec).rsplit(":", 1)
        out[int(container)] = int(host.rsplit(":", 1)[-1])
    return out


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage and earlier ones, continuations joined."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        lines.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a line continuation"
    return lines


def _metric_names() -> set[str]:
    """Every series name the gateway exposes: counters' _total, histograms' _bucket..."""
    families = list(IngressMetrics(process=False).registry.collect())
    for obj in vars(tagsync_metrics).values():
        if isinstance(obj, MetricWrapperBase):
            families.extend(obj.describe())
    names: set[str] = set()
    for fam in families:
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",),
        }[fam.type]
        names.update(fam.name + s for s in suffixes)
    return names


_METRIC_IN_EXPR = re.compile(r"\b(gateway_[a-z0-9_]+)")


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


# ---------------------------------------------------------------------------------------------
# the deploy files


def _drain_pty(master: int) -> str:
    """Everything written to a pty whose other end is closed, then close it.

    One os.read returns only the chunk that is ready, not all that was written.
    """
    chunks: list[bytes] = []
    try:
        while select.select([master], [], [], 1.0)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the writer closed its end and everything was read
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_compose_runs_real_subcommands_on_the_configured_ports() -> None:
    compose = _compose()
    services = compose["services"]
    commands = _subcommands()
    gw, ts = services["gateway"], services["tag-sync"]
    assert gw["command"][0] == "serve" and gw["command"][0] in commands
    assert ts["command"][0] == "tag-sync" and ts["command"][0] in commands
    for svc in (gw, ts):
        assert svc["build"] == "." and svc["image"] == gw["image"], "one image for both"
        for volume in svc["volumes"]:
            local = volume.split(":")[0]
            assert (ROOT / local).exists(), f"compose mounts {local}, which does not exist"
        assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"

    gw_cfg, ts_cfg = _compose_config("gateway"), _compose_config("tag-sync")
    assert _published(gw) == {
        gw_cfg.server.port: gw_cfg.server.port,
        gw_cfg.server.metrics_port: gw_cfg.server.metrics_port,
    }
    # the operator surface: published on the host's loopback only, never on the webhook port
    metrics_spec = [p for p in gw["ports"] if p.endswith(f":{gw_cfg.server.metrics_port}")]
    assert metrics_spec == [f"127.0.0.1:{gw_cfg.server.metrics_port}:{gw_cfg.server.metrics_port}"]
    assert gw_cfg.server.metrics_port != gw_cfg.server.port
    assert "0.0.0.0" in (gw_cfg.server.metrics_host, ts_cfg.tag_sync.metrics_host)
    assert gw_cfg.server.host == "0.0.0.0", "the ingress must listen beyond the container"
    assert ts_cfg.tag_sync.metrics_port in _published(ts)
    health = urlsplit(_service_env(ts)["GATEWAY_HEALTHCHECK_URL"])
    assert health.port == ts_cfg.tag_sync.metrics_port and health.path == "/metrics"

    # the broker the gateway dials is one the compose network advertises
    kafka_env = _service_env(services["kafka"])
    advertised = dict(
        reversed(item.split("://", 1))
        for item in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    assert gw_cfg.kafka.bootstrap_servers in advertised
    assert gw_cfg.kafka.api_version == "", "negotiate with Apache Kafka; the pin is for the mock"


def test_compose_kafka_is_a_one_node_kraft_controller_and_broker() -> None:
    services = _compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _service_env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = {
        name: int(addr.rsplit(":", 1)[1])
        for name, addr in (item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    }
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(listeners) <= set(protocols)
    (voter,) = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    node, _, hostport = voter.partition("@")
    assert node == str(env["KAFKA_NODE_ID"])
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert int(hostport.rsplit(":", 1)[1]) == listeners[controller]
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners
    for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","):
        name, _, addr = item.partition("://")
        assert name in listeners and name != controller
        assert int(addr.rsplit(":", 1)[1]) == listeners[name]
    assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 1
    # kafka-storage format takes a base64url UUID
    cluster = str(kafka["environment"]["CLUSTER_ID"])
    assert len(base64.urlsafe_b64decode(cluster + "==")) == 16

    # kafka-init creates every topic the gateway and tag sync use
    script = " ".join(services["kafka-init"]["command"])
    created = set(shlex.split(script.split("for t in", 1)[1].split(";", 1)[0].replace("\\", "")))
    cfg = _compose_config("gateway")
    wanted = {cfg.kafka.topic.format(channel=c) for c in CHANNELS}
    wanted |= {cfg.kafka.dead_letter_topic, cfg.tag_sync.dead_letter_topic}
    wanted |= set(cfg.tag_sync.resolved_topics(cfg.kafka.topic))
    assert wanted <= created, f"not created: {sorted(wanted - created)}"


def test_dockerfile_is_slim_non_root_one_image_with_a_healthcheck() -> None:
    instructions = _dockerfile()
    froms = [args for word, args in instructions if word == "FROM"]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    user = [args for word, args in final if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    (entrypoint,) = [json.loads(args) for word, args in final if word == "ENTRYPOINT"]
    assert entrypoint == ["gateway"]
    (cmd,) = [json.loads(args) for word, args in final if word == "CMD"]
    assert cmd[0] in _subcommands()
    exposed = {int(p) for word, args in final if word == "EXPOSE" for p in args.split()}
    assert {ServerConfig.port, ServerConfig.metrics_port, TagSyncConfig.metrics_port} <= exposed
    env = " ".join(args for word, args in final if word == "ENV")
    config_path = re.search(r"GATEWAY_CONFIG=(\S+)", env)
    health_url = re.search(r"GATEWAY_HEALTHCHECK_URL=(\S+)", env)
    assert config_path and health_url
    health = urlsplit(health_url.group(1))
    assert health.port == ServerConfig.port and health.path == "/healthz"
    (check,) = [args for word, args in final if word == "HEALTHCHECK"]
    assert "GATEWAY_HEALTHCHECK_URL" in check
    # the compose stack mounts its config where the image looks for it
    assert _service_env(_compose()["services"]["gateway"])["GATEWAY_CONFIG"] == config_path.group(1)
    for word, args in instructions:
        if word == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"


def test_every_deploy_config_loads() -> None:
    env = _service_env(_compose()["services"]["gateway"])
    files = sorted(DEPLOY.glob("**/*.toml"))
    assert files
    for path in files:
        cfg = load_config(path, env=env)
        assert cfg.sources, path


def test_prometheus_scrapes_both_services_on_their_ports() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: (job.get("metrics_path", "/metrics"), job["static_configs"][0]["targets"])
        for job in prom["scrape_configs"]
    }
    cfg = _compose_config("gateway")
    assert targets["gateway"] == ("/metrics", [f"gateway:{cfg.server.metrics_port}"])
    assert targets["tag-sync"] == ("/metrics", [f"tag-sync:{cfg.tag_sync.metrics_port}"])
    mounts = {
        v.split(":")[1]: v.split(":")[0] for v in _compose()["services"]["prometheus"]["volumes"]
    }
    for rule_file in prom["rule_files"]:
        assert (ROOT / mounts[rule_file]).exists()


def test_dashboard_and_alerts_use_only_metrics_the_code_exposes() -> None:
    known = _metric_names()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    rules = yaml.safe_load((DEPLOY / "prometheus.rules.yml").read_text())
    used: dict[str, set[str]] = {"dashboard": set(), "rules": set()}
    for where, doc in (("dashboard", dashboard), ("rules", rules)):
        for expr in _exprs(doc):
            used[where].update(_METRIC_IN_EXPR.findall(expr))
    for where, names in used.items():
        assert names, where
        assert names <= known, f"{where} uses metrics the code does not expose: {names - known}"
    # what the dashboard is for: the ingress and tag sync at a glance
    for name in (
        "gateway_requests_total",
        "gateway_publish_seconds_bucket",
        "gateway_request_seconds_bucket",
        "gateway_kafka_in_flight_records",
        "gateway_dead_letters_total",
        "gateway_allowlist_ranges",
        "gateway_allowlist_age_seconds",
        "gateway_allowlist_misses_total",
        "gateway_tagsync_requests_total",
        "gateway_tagsync_requests_retried_total",
        "gateway_tagsync_dead_lettered_total",
        "gateway_tagsync_consumer_lag",
        "gateway_tagsync_pending_events",
    ):
        assert name in used["dashboard"], name
    # the provisioned datasource is the one every panel names
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == uid for p in panels)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------
# gateway replay


def _toml_config(path: Path, bootstrap: str, prefix: str, source_extra: str = "") -> Path:
    path.write_text(
        f"""
[allowlist]
refresh_interval_s = 0

[kafka]
bootstrap_servers = "{bootstrap}"
api_version = "{API_VERSION}"
topic = "{prefix}.{{channel}}"
dead_letter_topic = "{prefix}.dlt"

[[sources]]
name = "event-stream"
path = "/v1/onesignal/events"
format = "event-stream"
secrets_env = "T_SECRETS"
{source_extra}
"""
    )
    return path


def _committed(bootstrap: str, topic: str, partition: int, group: str) -> int | None:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","), api_version=KAFKA_API_VERSION, group_id=group
    )
    try:
        return consumer.committed(TopicPartition(topic, partition))  # type: ignore[no-any-return]
    finally:
        consumer.close()


def test_replay_publishes_fixed_dead_letters_once_and_reports_the_rest(
    broker: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bootstrap = broker.bootstrap_servers
    prefix = unique("replay")
    event_id = str(uuid.uuid4())
    custom = {"evt": {"type": "message.push.clicked", "uuid": event_id}, "who": "user-7", "ts": 1}
    hopeless = {"something": "else entirely"}
    # 1. the real ingress dead-letters both: its template is not one it can read
    with (
        running_gateway(gateway_config(bootstrap, prefix)) as (url, _),
        httpx.Client(base_url=url) as client,
    ):
        for payload in (custom, hopeless):
            r = post(client, "/v1/onesignal/events", payload)
            assert r.status_code == 200 and r.json()["reason"] == "no-kind", r.text
    dead = read_topic(bootstrap, f"{prefix}.dlt", expect=2)
    assert len(dead) == 2
    (fixable,) = [r for r in dead if orjson.loads(r.value) == custom]
    (broken,) = [r for r in dead if orjson.loads(r.value) == hopeless]
    original_at = dict(fixable.headers)["dlq_received_at"].decode()

    # 2. the config is fixed with a mapping; replay publishes the one it now understands
    monkeypatch.setenv("T_SECRETS", SECRET)
    fixed = _toml_config(
        tmp_path / "fixed.toml",
        bootstrap,
        prefix,
        'mapping = { kind = "/evt/type", id = "/evt/uuid", external_id = "/who" }',
    )
    capsys.readouterr()
    assert cli.main(["replay", "--config", str(fixed)]) == 1  # one still fails
    out = capsys.readouterr().out
    assert "2 read, 1 replayed, 1 still failing" in out, out
    assert "still failing by reason: no-kind 1" in out, out
    assert f"partition {broken.partition} offset {broken.offset}: no-kind" in out, out
    (rec,) = read_topic(bootstrap, f"{prefix}.push", expect=1)
    headers = dict(rec.headers)
    assert headers["ce_id"].decode() == event_id
    assert headers["ce_type"] == b"com.onesignal.message.push.clicked"
    value = orjson.loads(rec.value)
    assert value["received"] == {"source": "event-stream", "at": original_at, "client_ip": EU_WEST4}
    assert value["user"]["external_id"] == "user-7" and value["raw"] == custom
    assert rec.key == b"user-7"
    # committed exactly past what was published or reported, per partition (the two keyless
    # dead letters may share one)
    last: dict[tuple[str, int], int] = {}
    for r in dead:
        last[(r.topic, r.partition)] = max(last.get((r.topic, r.partition), -1), r.offset)
    for (topic, partition), offset in last.items():
        assert _committed(bootstrap, topic, partition, f"{prefix}.dlt.replay") == offset + 1

    # 3. a re-run continues where the last stopped: nothing left
    assert cli.main(["replay", "--config", str(fixed)]) == 0
    assert "0 read, 0 replayed, 0 still failing" in capsys.readouterr().out
    assert len(read_topic(bootstrap, f"{prefix}.push")) == 1

    # 4. a dry run from the beginning publishes nothing, commits nothing, shows a bar on a tty
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        monkeypatch.setattr("sys.stderr", tty)
        code = cli.main(["replay", "--config", str(fixed), "--from-beginning", "--dry-run"])
    monkeypatch.undo()
    bar = _drain_pty(master)
    assert code == 1
    out = capsys.readouterr().out
    assert "2 read, 1 would replay, 1 still failing" in out and "dry run" in out, out
    assert f"replay {prefix}.dlt [" in bar and "2/2" in bar, bar
    assert len(read_topic(bootstrap, f"{prefix}.push")) == 1

    # 5. --requeue appends what still fails, so the group meets it again after the next fix
    monkeypatch.setenv("T_SECRETS", SECRET)
    assert cli.main(["replay", "--config", str(fixed), "--group", f"{prefix}.g2", "--requeue"]) == 1
    assert "requeued 1" in capsys.readouterr().out
    dead = read_topic(bootstrap, f"{prefix}.dlt", expect=3)
    (requeued,) = [r for r in dead if dict(r.headers).get("dlq_requeued_from")]
    assert orjson.loads(requeued.value) == hopeless
    headers = dict(requeued.headers)
    assert headers["dlq_reason"] == b"no-kind"
    assert headers["dlq_received_at"] == dict(broken.headers)["dlq_received_at"]
    assert headers["dlq_client_ip"] == EU_WEST4.encode()
    place = f"{prefix}.dlt/{broken.partition}/{broken.offset}"
    assert headers["dlq_requeued_from"] == place.encode()
    assert cli.main(["replay", "--config", str(fixed)]) == 1
    assert "1 read, 0 replayed, 1 still failing" in capsys.readouterr().out


def test_replay_stops_at_once_when_no_broker_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("T_SECRETS", SECRET)
    closed = f"127.0.0.1:{free_port()}"
    path = _toml_config(tmp_path / "gw.toml", closed, unique("replay"))
    started = time.monotonic()
    assert cli.main(["replay", "--config", str(path)]) == 1
    assert (
        f"stopped early: no Kafka bootstrap server answers at {closed}" in capsys.readouterr().out
    )
    assert time.monotonic() - started < 15


# ---------------------------------------------------------------------------------------------
# gateway ranges update


CLOUD_JSON = {
    "syncToken": "1750000000000",
    "creationTime": "2025-06-15T10:00:00.000000",
    "prefixes": [
        {"ipv4Prefix": "34.90.0.0/15", "service": "Google Cloud", "scope": "europe-west4"},
        {"ipv4Prefix": "34.7.0.0/16", "service": "Google Cloud", "scope": "europe-west4"},
        {"ipv6Prefix": "2600:1900:4060::/44", "service": "Google Cloud", "scope": "europe-west4"},
        {"ipv4Prefix": "35.192.0.0/14", "service": "Google Cloud", "scope": "us-central1"},
    ],
}


@contextlib.contextmanager
def _serve_cloud_json(body: bytes) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ipranges/cloud.json"
    finally:
        server.shutdown()
        server.server_close()


def test_ranges_update_downloads_diffs_writes_and_show_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    body = orjson.dumps(CLOUD_JSON)
    snapshot = tmp_path / "cloud.json"
    with _serve_cloud_json(body) as url:
        master, slave = os.openpty()
        with os.fdopen(slave, "w") as tty:
            monkeypatch.setattr("sys.stderr", tty)
            code = cli.main(["ranges", "update", "--snapshot", str(snapshot), "--url", url])
        monkeypatch.undo()
        progress = _drain_pty(master)
    assert code == 0
    out = capsys.readouterr().out
    # against the bundled snapshot (OneSignal's 17): one new, two kept, fourteen gone
    assert "+ 34.7.0.0/16" in out.splitlines()
    assert "- 35.204.0.0/16" in out.splitlines()
    assert "+ 35.192.0.0/14" not in out, "another region's range was not filtered out"
    assert f"1 added, {len(ONESIGNAL_PUBLISHED) - 2} removed; syncToken 0 -> 1750000000000" in out
    assert "downloading cloud.json" in progress, progress
    written = load_snapshot(str(snapshot), ["europe-west4"])
    assert set(written.cidrs) == {"34.90.0.0/15", "34.7.0.0/16", "2600:1900:4060::/44"}

    assert cli.main(["ranges", "show", "--snapshot", str(snapshot)]) == 0
    shown = capsys.readouterr().out
    assert "syncToken: 1750000000000" in shown and "prefixes: 3" in shown
    assert "  34.7.0.0/16" in shown.splitlines()


def test_fetch_cloud_json_reports_progress_against_content_length() -> None:
    body = orjson.dumps(CLOUD_JSON)
    seen: list[tuple[int, int | None]] = []

    async def fetch(url: str) -> bytes:
        async with httpx.AsyncClient() as client:
            return await fetch_cloud_json(client, url, progress=lambda d, t: seen.append((d, t)))

    with _serve_cloud_json(body) as url:
        data = asyncio.run(fetch(url))
    assert data == body
    assert seen and seen[-1] == (len(body), len(body))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# ---------------------------------------------------------------------------------------------
# gateway check-config

APP_ID = "5eb5a37e-b458-11e3-ac11-000c2940e62c"
APP_KEY = "os-app-key-7f3a9c1e55d2"
STREAM_SECRET = "stream-secret-4b1d0e9f"


def _check_config_file(path: Path, bootstrap: str, api_url: str) -> Path:
    prefix = unique("cc")
    path.write_text(
        f"""
[kafka]
bootstrap_servers = "{bootstrap}"
api_version = "{API_VERSION}"
topic = "{prefix}.{{channel}}"
dead_letter_topic = "{prefix}.dlt"

[topics]  # one broker in the tests
partitions = 2
replication_factor = 1
min_insync_replicas = 1

[[sources]]
name = "event-stream"
path = "/v1/onesignal/events"
format = "event-stream"
secrets_env = "T_STREAM_SECRETS"

[onesignal]
api_url = "{api_url}"
timeout_s = 5.0

[[onesignal.apps]]
app_id = "{APP_ID}"
api_key_env = "T_APP_KEY"
"""
    )
    return path


@pytest.mark.timeout(40)
def test_check_config_passes_against_the_broker_without_printing_secrets(
    broker: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("T_STREAM_SECRETS", STREAM_SECRET)
    monkeypatch.setenv("T_APP_KEY", APP_KEY)
    path = _check_config_file(tmp_path / "gw.toml", broker.bootstrap_servers, "http://127.0.0.1:9")
    capsys.readouterr()
    if APACHE:  # the embedded mock has no admin API to create topics with
        assert cli.main(["topics", "create", "--config", str(path)]) == 0
    code = cli.main(["check-config", "--config", str(path)])
    out, err = capsys.readouterr()
    assert APP_KEY not in out + err and STREAM_SECRET not in out + err
    assert "key present in $T_APP_KEY" in out
    assert "topics: WARNING: topics.min_insync_replicas = 1" in out, out
    if APACHE:
        assert code == 0, out
        assert "all checks passed" in out
    else:  # the mock cannot create them, and check-config says so, per topic
        assert code == 1 and "missing (create it: gateway topics create)" in out, out


def test_check_config_online_tries_the_api_key(
    broker: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("T_STREAM_SECRETS", STREAM_SECRET)
    monkeypatch.setenv("T_APP_KEY", APP_KEY)
    with FakeOneSignal(api_key={APP_ID: APP_KEY}) as fake:
        path = _check_config_file(tmp_path / "gw.toml", broker.bootstrap_servers, fake.url)
        capsys.readouterr()
        cli.main(["check-config", "--config", str(path), "--online"])
        out, err = capsys.readouterr()
        assert f"onesignal app {APP_ID}: ok: key accepted (HTTP 404)" in out, out
        assert APP_KEY not in out + err

        monkeypatch.setenv("T_APP_KEY", "not-the-key-0000")
        assert cli.main(["check-config", "--config", str(path), "--online"]) == 1
        out, err = capsys.readouterr()
        assert f"onesignal app {APP_ID}: FAILED: HTTP 401" in out, out
        assert "not-the-key-0000" not in out + err


@pytest.mark.timeout(40)
def test_check_config_fails_on_an_unreachable_bootstrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("T_STREAM_SECRETS", STREAM_SECRET)
    monkeypatch.setenv("T_APP_KEY", APP_KEY)
    closed = f"127.0.0.1:{free_port()}"
    path = _check_config_file(tmp_path / "gw.toml", closed, "http://127.0.0.1:9")
    started = time.monotonic()
    assert cli.main(["check-config", "--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert f"kafka {closed}: FAILED" in out, out
    assert "KafkaConfigurationError" not in out, "failed for its own config, not the broker"
    assert "1 problem(s)" in out
    assert STREAM_SECRET not in out + err and APP_KEY not in out + err
    assert time.monotonic() - started < 30

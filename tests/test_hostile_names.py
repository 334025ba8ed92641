"""Input never chooses names or sizes inside the gateway (issue 13), played from an outsider.

An outsider is a client socket bound to 127.0.0.9: neither a trusted proxy nor allowlisted, so
it reaches only what anyone on the internet reaches (the web-push route, which takes anonymous
browsers, and the public port's other paths). Authenticated traffic comes from the trusted
proxy 127.0.0.1 with an allowlisted X-Forwarded-For, as OneSignal's does through the load
balancer. Every test runs against a real uvicorn server and real Kafka (the ``broker`` fixture),
except the pure ones (the hash reader, the reason sets), which are timed in process.

Figures are printed (``pytest -s``) with the figure the old code gave, measured before the fix.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaAdminClient

import gateway
from gateway.config import Config, parse_config
from gateway.core.event import Received
from gateway.core.normalize.hashes import _read_hash
from gateway.core.records import build_dead_letter, header
from gateway.devkit import samples
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.ingress.operator import OperatorServer
from gateway.ingress.server import free_port
from gateway.metrics import DEAD_LETTER_REASONS, PUBLISH_FAILURE_REASONS, IngressMetrics
from gateway.ops.replay import ReplayError, renormalize
from gateway.tagsync import metrics as tagsync_metrics

from .conftest import API_VERSION, KAFKA_API_VERSION, read_topic, unique
from .ingress_helpers import (
    EU_WEST4,
    SECRET,
    gateway_config,
    operator_url,
    post,
    running_gateway,
    scrape,
)
from .test_normalize import _literal_oracle

ES = "/v1/onesignal/events"
JOURNEY = "/v1/onesignal/journey"
WEB = "/v1/onesignal/web-push"
OUTSIDER = "127.0.0.9"
ORIGIN = "https://shop.example"
WEB_HEADERS = {"content-type": "application/json", "origin": ORIGIN}


def outsider(url: str) -> httpx.Client:
    """A client whose socket is bound to 127.0.0.9: no trusted proxy, not allowlisted."""
    transport = httpx.HTTPTransport(local_address=OUTSIDER)
    return httpx.Client(base_url=url, transport=transport, timeout=30)


def _topics(bootstrap: str, prefix: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), api_version=KAFKA_API_VERSION)
    try:
        return {t for t in admin.list_topics() if t.startswith(prefix + ".")}
    finally:
        admin.close()


def _no_client_rate(bootstrap: str, prefix: str) -> Config:
    """The test config with the web-push source's per-client rate limit off: these tests
    send one outsider's many requests on purpose, to measure what each costs."""
    base = gateway_config(bootstrap, prefix)
    sources: list[dict[str, Any]] = [
        {"name": "event-stream", "path": ES, "format": "event-stream", "secrets_env": "T_SECRETS"},
        {
            "name": "web-push",
            "path": WEB,
            "format": "web-push",
            "app_id": base.sources[-1].app_id,
            "cors_origins": [ORIGIN],
            "client_rate_limit": 0,
        },
    ]
    return gateway_config(bootstrap, prefix, sources=sources)


def _web_push(event: str, **extra: Any) -> bytes:
    return orjson.dumps({"event": event, "subscription_id": str(uuid.uuid4()), **extra})


# ---------------------------------------------------------------------------------------------
# topics come from the configured vocabulary only


def test_outsider_channels_never_create_topics(broker: EmbeddedBroker) -> None:
    prefix = unique("names")
    config = _no_client_rate(broker.bootstrap_servers, prefix)
    n = 60
    with running_gateway(config) as (url, _), outsider(url) as client:
        before = _topics(broker.bootstrap_servers, prefix)
        started = time.monotonic()
        answers = [
            client.post(
                WEB,
                content=_web_push(f"message.c{uuid.uuid4().hex[:8]}.clicked"),
                headers=WEB_HEADERS,
            )
            for _ in range(n)
        ]
        per_post_ms = (time.monotonic() - started) / n * 1000
        # the web-push route takes only the Web SDK's own event names
        assert {r.status_code for r in answers} == {400}, answers[0].text
        assert {r.json()["error"] for r in answers} == {"not-a-web-sdk-event"}
        # the work had its chance: a good event from the same outsider is published after them,
        # to the topic of events nobody vouched for
        good = client.post(WEB, content=_web_push("notification.clicked"), headers=WEB_HEADERS)
        assert good.status_code == 200, good.text
        assert good.json()["topic"] == f"{prefix}.unauthenticated", good.text
        after = _topics(broker.bootstrap_servers, prefix)
    assert after - before <= {f"{prefix}.unauthenticated"}, sorted(after - before)
    allowed = {f"{prefix}.{c}" for c in ("push", "email", "sms", "iam", "live_activity", "journey")}
    assert after <= allowed | {f"{prefix}.dlt", f"{prefix}.unauthenticated"}, sorted(after)
    print(
        f"\n  {n} outsider posts of random channels: {len(after - before)} new topics"
        f" ({sorted(after - before)}), {per_post_ms:.1f} ms per post"
        " (before the fix: 300 posts made 300 topics, 250 ms per post)"
    )


def test_authenticated_unknown_channels_are_dead_lettered_or_go_to_one_topic(
    broker: EmbeddedBroker,
) -> None:
    prefix = unique("names")
    body = samples.event_stream_payload(
        "message.push.sent", event_id=str(uuid.uuid4()), layout="plain-nested"
    )
    body["event"]["kind"] = "message.whatsapp.sent"
    config = gateway_config(broker.bootstrap_servers, prefix)
    with running_gateway(config) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        r = post(client, ES, body)
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["reason"]) == ("dead-lettered", "unknown-channel")
        no_kind = post(client, ES, {"event": {"kind": "just-a-word", "id": str(uuid.uuid4())}})
        assert no_kind.json()["reason"] == "unknown-channel", no_kind.text
    letters = read_topic(broker.bootstrap_servers, f"{prefix}.dlt", expect=2)
    assert [header(x.headers, "dlq_reason") for x in letters] == ["unknown-channel"] * 2
    # the body as sent, for replay (the two letters' keys differ: any partition, any order)
    assert body in [orjson.loads(x.value) for x in letters]
    assert f"{prefix}.whatsapp" not in _topics(broker.bootstrap_servers, prefix)

    # with kafka.unknown_channel_topic set, such events are published there, normalized
    prefix = unique("names")
    config = gateway_config(
        broker.bootstrap_servers, prefix, kafka={"unknown_channel_topic": f"{prefix}.other"}
    )
    with running_gateway(config) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        r = post(client, ES, body)
        assert (r.status_code, r.json()["topic"]) == (200, f"{prefix}.other"), r.text
    (record,) = read_topic(broker.bootstrap_servers, f"{prefix}.other", expect=1)
    assert header(record.headers, "ce_type") == "com.onesignal.message.whatsapp.sent"


def test_replay_takes_the_same_topic_decision() -> None:
    body = orjson.dumps({"event": {"kind": "message.whatsapp.sent", "id": "e-1"}})
    letter = build_dead_letter(
        topic="onesignal.dead-letter",
        reason="unknown-channel",
        detail="",
        body=body,
        source_name="event-stream",
        received=Received(source="event-stream", at=samples_time(), client_ip=EU_WEST4),
        content_type="application/json",
    )
    data: dict[str, Any] = {
        "sources": [
            {"name": "event-stream", "path": "/e", "format": "event-stream", "secrets_env": "S"}
        ]
    }
    with pytest.raises(ReplayError) as refused:
        renormalize(parse_config(data, env={"S": SECRET}), letter.headers, body, place="d/0/1")
    assert refused.value.reason == "unknown-channel"
    data["kafka"] = {"unknown_channel_topic": "onesignal.other"}
    record = renormalize(parse_config(data, env={"S": SECRET}), letter.headers, body, place="d/0/1")
    assert record.topic == "onesignal.other"


def samples_time() -> Any:
    from datetime import UTC, datetime

    return datetime(2026, 1, 1, tzinfo=UTC)


def test_unknown_channel_topic_is_a_plain_topic_name() -> None:
    from gateway.config import ConfigError

    for bad in ("onesignal.{channel}", "bad topic", "x" * 250):
        with pytest.raises(ConfigError, match="unknown_channel_topic"):
            parse_config({"kafka": {"unknown_channel_topic": bad}}, env={})


# ---------------------------------------------------------------------------------------------
# metric labels come from bounded, known sets


def _series(text: str) -> set[str]:
    """The metric lines' names and labels (the values left out)."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_random_kinds_add_no_metric_series(broker: EmbeddedBroker) -> None:
    prefix = unique("names")
    config = _no_client_rate(broker.bootstrap_servers, prefix)
    n = 200

    def kind_event(kind: str) -> dict[str, Any]:
        body = samples.event_stream_payload(
            "message.push.sent", event_id=str(uuid.uuid4()), layout="plain-nested"
        )
        body["event"]["kind"] = kind
        return body

    with (
        running_gateway(config) as (url, _),
        outsider(url) as client,
        httpx.Client(base_url=url, timeout=30) as sender,
    ):
        # one of each outcome first, so every series that will exist exists
        assert client.post(WEB, content=_web_push("notification.clicked"), headers=WEB_HEADERS)
        client.post(WEB, content=_web_push("message.zz.clicked"), headers=WEB_HEADERS)
        assert post(sender, ES, kind_event("message.push.first-random")).status_code == 200
        assert post(sender, ES, kind_event("message.zz.clicked")).status_code == 200
        first = scrape(config)
        rss_before = _rss_mb()
        # an authenticated sender's undocumented kinds of a known channel are published
        # (kafka.unknown_kinds = "publish"); an outsider's random names are refused
        statuses = [
            post(sender, ES, kind_event(f"message.push.k{uuid.uuid4().hex}")).status_code
            for _ in range(n // 2)
        ]
        refused = [
            client.post(
                WEB, content=_web_push(f"message.push.k{uuid.uuid4().hex}"), headers=WEB_HEADERS
            ).status_code
            for _ in range(n // 2)
        ]
        assert statuses == [200] * (n // 2)
        assert refused == [400] * (n // 2)
        last = scrape(config)
        rss_after = _rss_mb()
    assert _series(last) == _series(first), sorted(_series(last) ^ _series(first))[:10]
    assert 'gateway_events_total{kind="other"}' in last
    assert len(last) - len(first) < 200, "only the counts' digits may grow"
    print(
        f"\n  {n} random kinds: /metrics {len(first)} -> {len(last)} bytes,"
        f" {len(_series(first))} -> {len(_series(last))} series,"
        f" RSS {rss_before:.1f} -> {rss_after:.1f} MB"
        " (before the fix, 300 random kinds: 1274 -> 1876 series, 98.6 -> 153.0 KB)"
    )


def test_label_values_outside_their_sets_count_as_other() -> None:
    m = IngressMetrics(process=False)
    m.bound(sources=["es"], topics=["t.push"])
    m.events.labels("message.push.clicked").inc()
    m.events.labels("message.push.whatever").inc()
    m.published.labels("t.push").inc()
    m.published.labels("t.attacker").inc()
    m.dead_letters.labels("es", "unknown-channel").inc()
    m.dead_letters.labels("nope", "made-up").inc()
    m.publish_failures.labels("weird").inc()
    assert set(m.events._children) == {("message.push.clicked",), ("other",)}
    assert set(m.published._children) == {("t.push",), ("other",)}
    assert set(m.dead_letters._children) == {("es", "unknown-channel"), ("other", "other")}
    assert set(m.publish_failures._children) == {("other",)}


_REASON_CALL = re.compile(
    r"(?:NormalizationError|BadRequest|\.dead|_fail|Refuse|publish_failures\.labels)"
    r"\(\s*(?:\d+,\s*)?\"([a-z_-]+)\""
)


def test_every_reason_the_code_names_is_in_its_label_set() -> None:
    root = Path(gateway.__file__).parent
    named: dict[str, set[str]] = {}
    for path in [*root.glob("core/**/*.py"), *root.glob("kafka/*.py")]:
        for reason in _REASON_CALL.findall(path.read_text()):
            named.setdefault(reason, set()).add(path.name)
    assert named, "the pattern finds the reasons"
    failures = {r for r, files in named.items() if files & {"sink.py", "thread.py", "process.py"}}
    assert failures <= PUBLISH_FAILURE_REASONS, failures - PUBLISH_FAILURE_REASONS
    others = set(named) - failures
    assert others <= DEAD_LETTER_REASONS, others - DEAD_LETTER_REASONS


# ---------------------------------------------------------------------------------------------
# the operator surface has its own port


def _connects(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect((host, port))
        except OSError:
            return False
        return True


def test_metrics_and_openapi_are_not_on_the_public_port(broker: EmbeddedBroker) -> None:
    config = gateway_config(broker.bootstrap_servers, unique("names"))
    with running_gateway(config) as (url, _), outsider(url) as client:
        for path in ("/metrics", "/openapi.json", "/metrics/", "/metrics?x=1"):
            r = client.get(path)
            assert r.status_code == 404, (path, r.status_code)
            assert "gateway_" not in r.text
        assert client.get("/healthz").status_code == 200  # the probes stay
        # the metrics port answers on loopback, where it is bound, and nowhere else
        assert "gateway_requests_total" in scrape(config)
        doc = httpx.get(f"{operator_url(config)}/openapi.json").json()
        assert set(doc["paths"]) == {ES, JOURNEY, WEB}
        assert httpx.get(f"{operator_url(config)}/other").status_code == 404
        assert config.server.metrics_host == "127.0.0.1"
        assert not _connects(OUTSIDER, config.server.metrics_port)


def test_the_metrics_port_is_never_the_webhook_port() -> None:
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match=r"server\.metrics_port"):
        parse_config({"server": {"port": 9101, "metrics_port": 9101}}, env={})
    assert parse_config({"server": {"port": 9101, "metrics_port": 0}}, env={}).server.port == 9101


def test_workers_share_the_metrics_port() -> None:
    # what server.workers > 1 does: each worker process starts its own server on one port
    port = free_port()
    servers = [OperatorServer("127.0.0.1", port, IngressMetrics(process=False).registry, {})]
    servers.append(OperatorServer("127.0.0.1", port, IngressMetrics(process=False).registry, {}))
    try:
        assert [s.start() for s in servers] == [True, True]
        assert "gateway_events_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        for s in servers:
            s.stop()
    # a port another program holds is logged, and the gateway runs on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = OperatorServer("127.0.0.1", taken.getsockname()[1], IngressMetrics().registry, {})
        assert busy.start() is False
    assert OperatorServer("127.0.0.1", 0, IngressMetrics().registry, {}).start() is False


def test_two_workers_both_serve_the_metrics_port(broker: EmbeddedBroker, tmp_path: Path) -> None:
    import subprocess
    import sys

    port, metrics_port = free_port(), free_port()
    config = tmp_path / "gw.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
metrics_port = {metrics_port}
workers = 2
[allowlist]
refresh_interval_s = 0
[kafka]
bootstrap_servers = "{broker.bootstrap_servers}"
api_version = "{API_VERSION}"
topic = "{unique("names")}.{{channel}}"
[[sources]]
name = "web-push"
path = "/wp"
format = "web-push"
app_id = "11111111-2222-3333-4444-555555555555"
cors_origins = ["{ORIGIN}"]
"""
    )
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("Application startup complete") < 2:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        # every worker bound the one metrics port, none failed
        assert log.read_text().count('"metrics served"') == 2, log.read_text()[-2000:]
        assert "metrics port not served" not in log.read_text()
        # SO_REUSEPORT spreads new connections over the workers; each answers for itself
        for _ in range(10):
            r = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert r.status_code == 200 and "gateway_requests_total" in r.text
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 404
    finally:
        proc.terminate()
        proc.wait(30)


def test_tag_sync_metrics_bind_the_configured_host() -> None:
    assert parse_config({}, env={}).tag_sync.metrics_host == "127.0.0.1"
    port = free_port()
    stop = tagsync_metrics.serve_metrics(port, "127.0.0.1")
    assert stop is not None
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
        assert not _connects(OUTSIDER, port)  # 0.0.0.0 before: every address answered
    finally:
        stop()


# ---------------------------------------------------------------------------------------------
# the hash strings: linear, bounded cost


def _adversarial(n: int) -> dict[str, str]:
    """Hash-looking texts of about ``n`` characters that cost the old reader the most."""
    return {
        "tuple-then-ruby": "{'a': (" + "1," * ((n - 20) // 2) + "), 'b'=>1}",
        "ruby-int-members": "{" + ",".join(f'"{i}"=>{i}' for i in range(n // 11)) + "}",
        "tiny-members": "{" + ",".join("'':0" for _ in range(n // 5)) + "}",
        "sum": "{'a': " + "1+" * ((n - 10) // 2) + "1}",
        "nesting": "{'a':" + "[" * ((n - 8) // 2) + "]" * ((n - 8) // 2) + "}",
        "escapes": "{'en': '" + "\\'" * ((n - 12) // 2) + "'}",
        "unterminated": "{'en': '" + "x" * (n - 10) + "}",
        "quotes": "{" + "'" * (n - 2) + "}",
    }


def _ns_per_char(read: Any, text: str, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter_ns()
        read(text)
        best = min(best, time.perf_counter_ns() - started)
    return best / len(text)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::SyntaxWarning")
def test_hash_reader_cost_is_linear_and_bounded() -> None:
    rows = []
    for name, big in _adversarial(8000).items():
        small = _adversarial(1000)[name]
        new_small, new_big = _ns_per_char(_read_hash, small), _ns_per_char(_read_hash, big)
        old_big = _ns_per_char(_literal_oracle, big, rounds=1)
        rows.append((name, old_big, new_small, new_big))
    print("\n  ns per char of hash text (8 KB; new at 1 KB in brackets): old ast -> bounded reader")
    for name, old, small, big in rows:
        print(f"  {name:18} {old:8.0f} -> {big:6.0f}  [{small:6.0f}]  ({old / max(big, 1):.0f}x)")
    worst_old = max(r[1] for r in rows)
    worst_new = max(r[3] for r in rows)
    print(f"  worst: {worst_old:.0f} -> {worst_new:.0f} ns per char")
    # generous bounds (a shared, noisy machine): linear, and well under the old worst case
    assert worst_new < 3000
    assert worst_new < worst_old
    for name, _, small, big in rows:
        assert big < 4 * max(small, 50), f"{name}: per-char cost grows with length"


def test_hash_bodies_from_an_outsider_cost_the_event_loop_little(broker: EmbeddedBroker) -> None:
    config = _no_client_rate(broker.bootstrap_servers, unique("names"))
    shapes = _adversarial(8000)
    plain = _web_push("notification.clicked", heading="Sale", content="50% off")
    with running_gateway(config) as (url, _), outsider(url) as client:

        def p50(body: bytes, n: int = 5) -> float:
            times = []
            for _ in range(n):
                started = time.perf_counter()
                r = client.post(WEB, content=body, headers=WEB_HEADERS)
                times.append((time.perf_counter() - started) * 1000)
                assert r.status_code == 200, r.text
            return statistics.median(times)

        base = p50(plain)
        figures = {}
        for name, text in shapes.items():
            body = _web_push("notification.clicked", heading=text, content=text.replace("a", "c"))
            figures[name] = (len(body), p50(body))
    print(f"\n  outsider web-push, p50 ms per request (plain body: {base:.2f} ms):")
    for name, (size, ms) in figures.items():
        print(
            f"  {name:18} {size:6} B  {ms:6.2f} ms"
            f"  ({(ms - base) * 1e6 / size:5.0f} ns/B over plain)"
        )
    print("  (before the fix: 17.6 ms per 16 KB body of the tuple-then-ruby shape, in process)")
    worst = max(ms for _, ms in figures.values())
    assert worst < base + 50, figures  # generous: the old worst was 17.6 ms of CPU alone


def test_hash_bodies_cost_the_event_loop_little_per_byte() -> None:
    # the route's own work, in process (a MemorySink acknowledges at once), so the figure is
    # the event loop's time per body without the network's; the old code took 17.6 ms for
    # the tuple-then-ruby body here
    import asyncio

    from gateway.ingress.app import create_app
    from gateway.kafka.memory import MemorySink

    config = gateway_config("127.0.0.1:9", unique("names"))
    metrics = IngressMetrics(process=False)
    app = create_app(config, metrics=metrics, sink=MemorySink(config.kafka, metrics))
    headers = {"authorization": f"Bearer {SECRET}", "x-forwarded-for": EU_WEST4}

    async def run() -> dict[str, tuple[int, float]]:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        out = {}
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            for name, text in _adversarial(8000).items():
                body = orjson.dumps(
                    {
                        "event": {"kind": "message.push.clicked"},
                        "message": {"title": text, "contents": text.replace("a", "c", 1)},
                    }
                )
                times = []
                for _ in range(5):
                    started = time.perf_counter()
                    r = await client.post(
                        ES, content=body, headers={**headers, "content-type": "application/json"}
                    )
                    times.append((time.perf_counter() - started) * 1000)
                    assert r.status_code == 200, r.text
                out[name] = (len(body), statistics.median(times))
        return out

    figures = asyncio.run(run())
    print("\n  event-loop ms per body with two 8 KB hash strings (in process; before: 17.6 ms):")
    for name, (size, ms) in figures.items():
        print(f"  {name:18} {size:6} B  {ms:6.2f} ms  ({ms * 1e6 / size:5.0f} ns/B)")
    worst = max(ms for _, ms in figures.values())
    assert worst < 15, figures  # generous on a shared machine; the parse alone is ~1.5 ms


# ---------------------------------------------------------------------------------------------
# lone surrogates: no body gives a 5xx


_SURROGATES = st.sampled_from(
    [
        "{'en': '\\ud800'}",
        "{'\\udc00': 'x'}",
        '{"en"=>"\\udfff", "fr"=>nil}',
        "{'en': '\\ud83d\\ude00'}",  # a pair written as two escapes: two lone halves in Python
        "\\ud800",
        "{'en': 'a\\x00\\ud800'}",
    ]
)


def _positions(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _positions(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _positions(v, (*path, i))
    else:
        yield path


def _with(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _with(value[path[0]], path[1:], new)
    return copy


BODIES = {
    ES: lambda: samples.event_stream_payload(
        "message.push.clicked", event_id=str(uuid.uuid4()), layout="plain-nested"
    ),
    JOURNEY: samples.journey_payload,
    WEB: lambda: samples.web_push_v16_payload("clicked", subscription_id=str(uuid.uuid4())),
}


@pytest.fixture(scope="module")
def surrogate_gateway(broker: EmbeddedBroker) -> Iterator[tuple[httpx.Client, httpx.Client, str]]:
    prefix = unique("names")
    config = gateway_config(broker.bootstrap_servers, prefix)
    with (
        running_gateway(config) as (url, _),
        httpx.Client(base_url=url, timeout=30) as trusted,
        outsider(url) as anyone,
    ):
        yield trusted, anyone, prefix


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_surrogates_in_any_string_give_no_5xx(
    surrogate_gateway: tuple[httpx.Client, httpx.Client, str], data: st.DataObject
) -> None:
    trusted, anyone, _ = surrogate_gateway
    path = data.draw(st.sampled_from(sorted(BODIES)))
    body = BODIES[path]()
    where = data.draw(st.sampled_from(list(_positions(body))))
    text = data.draw(_SURROGATES)
    payload = _with(body, where, text)
    if path == WEB:
        r = anyone.post(path, content=orjson.dumps(payload), headers=WEB_HEADERS)
        assert r.status_code in (200, 400), (where, r.status_code, r.text)
    else:
        r = post(trusted, path, payload)
        assert r.status_code == 200, (where, r.status_code, r.text)
        # stored, or kept as a dead letter for a reason of the input, never a gateway failure
        assert r.json().get("reason") != "internal-error", (where, r.text)


def test_surrogate_hashes_are_kept_as_text(
    surrogate_gateway: tuple[httpx.Client, httpx.Client, str], broker: EmbeddedBroker
) -> None:
    trusted, anyone, prefix = surrogate_gateway
    title = "{'en': '\\ud800'}"
    body = samples.event_stream_payload(
        "message.push.sent", event_id=str(uuid.uuid4()), layout="plain-nested"
    )
    body["message"] = {**body["message"], "title": title}
    r = post(trusted, ES, body)
    assert (r.status_code, r.json()["status"]) == (200, "accepted"), r.text
    web = anyone.post(
        WEB, content=_web_push("notification.clicked", heading=title), headers=WEB_HEADERS
    )
    assert (web.status_code, web.json()["status"]) == (200, "accepted"), web.text
    records = read_topic(broker.bootstrap_servers, f"{prefix}.push")
    mine = [x for x in records if header(x.headers, "ce_id") == body["event"]["id"]]
    assert mine and orjson.loads(mine[0].value)["message"]["title"] == title

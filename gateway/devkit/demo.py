"""``gateway demo``: the whole ingress on an embedded Kafka-protocol broker, end to end.

It starts librdkafka's mock cluster, runs ``gateway serve`` as a child process on loopback,
posts OneSignal sample events of every kind and layout to it (as if through a load balancer
from europe-west4), shows what a hostile or broken sender gets, measures a burst, and reads the
normalized CloudEvents records back from the topics.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.core.kinds import KNOWN_KINDS
from gateway.devkit import samples
from gateway.devkit.embedded_broker import API_VERSION, EmbeddedBroker
from gateway.devkit.loadgen import LoadResult, run_load
from gateway.ingress.server import free_port

__all__ = ["run_demo"]

SECRET = "demo-" + uuid.uuid4().hex  # a fresh secret each run; never printed
EU_WEST4_SENDER = "34.90.12.34"  # inside OneSignal's published europe-west4 ranges
LB_HEADERS = {"x-forwarded-for": EU_WEST4_SENDER}

CONFIG = """
[server]
host = "127.0.0.1"
port = {port}
trusted_proxies = ["127.0.0.1/32"]
log_level = "error"
metrics_port = {metrics_port}  # /metrics and /openapi.json: their own port, on loopback

[allowlist]
refresh_interval_s = 0  # the demo stays on loopback: the bundled snapshot is enough

[kafka]
bootstrap_servers = "{bootstrap}"
api_version = "{api_version}"

[[sources]]
name = "event-stream"
path = "/v1/onesignal/events"
format = "event-stream"
secrets_env = "DEMO_SECRETS"

[[sources]]
name = "journey"
path = "/v1/onesignal/journey"
format = "journey"
secrets_env = "DEMO_SECRETS"

[[sources]]
name = "web-push"
path = "/v1/onesignal/web-push"
format = "web-push"
app_id = "{app_id}"
cors_origins = ["https://shop.example"]
"""


def _h(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)))


async def _wait_ready(
    client: httpx.AsyncClient, proc: subprocess.Popen[bytes], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway serve exited with {proc.returncode}")
        try:
            r = await client.get("/readyz")
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("gateway did not become ready")


def _line(label: str, r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        body = {}
    where = ""
    if "topic" in body:
        where = f"{body['topic']}[{body['partition']}]@{body['offset']}"
    detail = body.get("status") or body.get("error", "")
    if body.get("message") and r.status_code >= 400:
        detail += f": {body['message']}"
    return f"  {label:<52} {r.status_code}  {detail:<14} {where}".rstrip()


async def _post(client: httpx.AsyncClient, path: str, payload: Any, **kw: Any) -> httpx.Response:
    headers = {
        "authorization": f"Bearer {SECRET}",
        "content-type": "application/json",
        **LB_HEADERS,
    }
    headers.update(kw.pop("headers", {}))
    content = kw.pop("content", None)
    if content is None:
        content = orjson.dumps(payload)
    return await client.post(path, content=content, headers=headers, **kw)


def _json_or_bytes(value: bytes | None) -> Any:
    """A record's value as JSON where it is JSON; a dead letter keeps the bytes it was sent."""
    if not value:
        return value
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value


async def _declare_oversize(client: httpx.AsyncClient, path: str, size: int) -> httpx.Response:
    """Headers that declare ``size`` bytes, then wait for the answer before sending any.

    The gateway refuses a declared length over its limit before reading the body and closes
    the connection; a client still writing a megabyte then sees a reset, not the 413.
    """
    url = httpx.URL(str(client.base_url))
    reader, writer = await asyncio.open_connection(url.host, url.port)
    head = [f"POST {path} HTTP/1.1", f"host: {url.host}", f"content-length: {size}"]
    head += ["content-type: application/json", f"authorization: Bearer {SECRET}"]
    head += [f"{k}: {v}" for k, v in LB_HEADERS.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    await writer.drain()
    status_line = await reader.readline()
    headers: list[tuple[str, str]] = []
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
    body = await reader.readexactly(length)
    writer.close()
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


async def _burst(port: int, n: int, connections: int = 64) -> LoadResult:
    """``n`` Event Stream posts with fresh event ids over keep-alive connections."""
    bodies = [
        orjson.dumps(samples.event_stream_payload("message.push.sent", event_id=str(uuid.uuid4())))
        for _ in range(n)
    ]
    headers = {
        "content-type": "application/json",
        "authorization": f"Bearer {SECRET}",
        **LB_HEADERS,
    }
    return await run_load(
        "127.0.0.1", port, "/v1/onesignal/events", bodies, headers, connections=connections
    )


def _read_back(bootstrap: str, topics: list[str]) -> list[Any]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        api_version=tuple(int(p) for p in API_VERSION.split(".")),
        enable_auto_commit=False,
    )
    try:
        tps = []
        for t in topics:
            for p in consumer.partitions_for_topic(t) or ():
                tps.append(TopicPartition(t, p))
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(consumer.position(tp) < end[tp] for tp in tps):
            for recs in consumer.poll(timeout_ms=300).values():
                records.extend(recs)
        return records
    finally:
        consumer.close()


async def run_demo(events: int = 2000, show: int = 3) -> int:
    _h("OneSignal -> Kafka gateway demo")
    print("Starting an embedded Kafka-protocol broker (librdkafka mock cluster, 3 brokers)...")
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        print(f"  bootstrap: {broker.bootstrap_servers}")
        port = free_port()
        metrics_port = free_port()
        cfg_path = Path(tmp) / "gateway.toml"
        cfg_path.write_text(
            CONFIG.format(
                port=port,
                metrics_port=metrics_port,
                bootstrap=broker.bootstrap_servers,
                api_version=API_VERSION,
                app_id=samples.DEMO_APP_ID,
            )
        )
        env = dict(os.environ, DEMO_SECRETS=SECRET)
        print(f"Starting `gateway serve --config {cfg_path}` on 127.0.0.1:{port}...")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cfg_path)], env=env
        )
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                timeout=30,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            ) as client:
                await _wait_ready(client, proc, 60)
                print("  ready (/readyz: Kafka reachable, allowlist loaded)")
                await _demo_events(client)
                _h(f"Throughput: {events} Event Stream posts, 64 connections, unique event ids")
                stats = await _burst(port, events)
                ok = stats.statuses.get(200, 0)
                print(
                    f"  {stats.rps:.0f} requests/s, p50 {stats.percentile(0.5) * 1000:.1f} ms, "
                    f"p99 {stats.percentile(0.99) * 1000:.1f} ms, {ok} acknowledged, "
                    f"{stats.requests - ok} errors"
                )
                print("  (the load generator shares this machine's cores; `make bench` uses wrk)")
                # the webhook port does not serve /metrics; the metrics port does
                metrics = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        _h("Reading the topics back")
        topics = [
            f"onesignal.{c}" for c in ("push", "email", "sms", "iam", "live_activity", "journey")
        ]
        topics += ["onesignal.unauthenticated", "onesignal.dead-letter"]
        records = _read_back(broker.bootstrap_servers, topics)
        counts: dict[str, int] = {}
        for rec in records:
            counts[rec.topic] = counts.get(rec.topic, 0) + 1
        for topic in topics:
            print(f"  {topic:<28} {counts.get(topic, 0):>6} records")
        shown = 0
        for rec in records:
            if shown >= show:
                break
            if rec.topic == "onesignal.push" and shown:
                continue
            shown += 1
            print(
                f"\n  -- {rec.topic} partition {rec.partition} offset {rec.offset}, "
                f"key {rec.key.decode() if rec.key else None}"
            )
            for k, v in rec.headers:
                print(f"     {k}: {v.decode(errors='replace')}")
            value = _json_or_bytes(rec.value)
            text = (
                orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
                if isinstance(value, dict)
                else repr(value)
            )
            print("\n".join("     " + line for line in text.splitlines()[:60]))
        _h("A few of the ingress metrics")
        for line in metrics.splitlines():
            if line.startswith(("gateway_requests_total", "gateway_dead_letters_total")) and not (
                line.endswith(" 0.0")
            ):
                print("  " + line)
        _demo_tag_sync(broker.bootstrap_servers, len(records))
    print("\nDone. Nothing in this demo left the machine.")
    return 0


TAG_RULES = {
    "rules": [
        {
            "kinds": ["message.*.clicked"],
            "tags": {"last_clicked_at": "{occurred_unix}", "last_clicked_channel": "{channel}"},
        },
        {"kinds": ["message.email.bounced"], "tags": {"email_bounced": "1"}},
        {"kinds": ["message.email.unsubscribed"], "tags": {"email_subscribed": "0"}},
        {"kinds": ["message.push.sent"], "tags": {"last_push_sent_at": "{occurred_unix}"}},
    ],
}


def _demo_tag_sync(bootstrap: str, events: int) -> None:
    """Run the tag-sync worker over the demo topics against a loopback OneSignal stand-in."""
    import threading

    from gateway.config import parse_config
    from gateway.devkit.fake_onesignal import FakeOneSignal
    from gateway.tagsync.worker import run_tag_sync

    _h("Tag sync: derived tags PATCHed to a loopback server that plays OneSignal")
    key = "demo-key-" + uuid.uuid4().hex
    with FakeOneSignal(api_key=key) as fake:
        config = parse_config(
            {
                "server": {"log_level": "error"},
                "kafka": {"bootstrap_servers": bootstrap, "api_version": API_VERSION},
                "onesignal": {
                    "api_url": fake.url,
                    "apps": [{"app_id": samples.DEMO_APP_ID, "api_key_env": "DEMO_OS_KEY"}],
                },
                "tag_sync": {
                    **TAG_RULES,
                    "group_id": "demo-tag-sync",
                    "metrics_port": 0,
                    "flush_interval_s": 0.5,
                },
            },
            env={"DEMO_OS_KEY": key},
        )
        for rule in TAG_RULES["rules"]:
            print(f"  rule: {rule['kinds']} -> {rule['tags']}")
        stop = threading.Event()
        worker = threading.Thread(target=run_tag_sync, args=(config,), kwargs={"stop": stop})
        worker.start()
        wanted = {"email_bounced", "last_clicked_at", "email_subscribed", "last_push_sent_at"}
        ok = fake.wait_for(
            lambda f: wanted <= set(f.tags(samples.DEMO_APP_ID, "external_id", "user-42")),
            timeout_s=90,
        )
        time.sleep(1.5)  # let the last merged updates go out
        stop.set()
        worker.join(30)
        for req in fake.requests:
            print(f"  {req.method} {req.path} -> {req.status}  {orjson.dumps(req.body).decode()}")
        tags = fake.tags(samples.DEMO_APP_ID, "external_id", "user-42")
        print(f"  user-42's tags now: {tags}")
        print(
            f"  {len(fake.requests)} request(s) for {events} events, nearly all of one user: "
            "merged per user, at most 1 request/s per user"
            if ok
            else "  (the worker did not finish in time)"
        )


async def _demo_events(client: httpx.AsyncClient) -> None:
    _h("Event Streams: every documented kind, rotating through the body layouts")
    message_kinds = sorted(
        k
        for k in KNOWN_KINDS
        if k.startswith("message.")
        and k not in ("message.push.displayed", "message.push.dismissed")
    )
    first_payload: dict[str, Any] | None = None
    for i, kind in enumerate(message_kinds):
        layout = samples.LAYOUTS[i % len(samples.LAYOUTS)]
        payload = samples.event_stream_payload(kind, layout=layout, event_id=str(uuid.uuid4()))
        first_payload = first_payload or payload
        r = await _post(client, "/v1/onesignal/events", payload)
        print(_line(f"{kind} ({layout})", r))
    for legacy in ("message.email.hardbounced", "message.iam.displayed"):
        payload = samples.event_stream_payload(
            legacy, layout="flat-dotted", event_id=str(uuid.uuid4())
        )
        r = await _post(client, "/v1/onesignal/events", payload)
        print(_line(f"{legacy} (legacy spelling)", r))

    _h("Web-push SDK webhooks from browsers (no IP check, text/plain, CORS)")
    for event in ("notification.willDisplay", "notification.clicked", "notification.dismissed"):
        r = await client.post(
            "/v1/onesignal/web-push",
            content=orjson.dumps(samples.web_push_v16_payload(event)),
            headers={"content-type": "text/plain;charset=UTF-8", "origin": "https://shop.example"},
        )
        print(_line(f"v16 {event}", r))
    for event in ("notification.displayed", "notification.clicked"):
        r = await client.post(
            "/v1/onesignal/web-push",
            content=orjson.dumps(samples.web_push_v15_payload(event)),
            headers={"content-type": "text/plain;charset=UTF-8", "origin": "https://shop.example"},
        )
        print(_line(f"v15 {event}", r))

    _h("Journey webhook")
    r = await _post(client, "/v1/onesignal/journey", samples.journey_payload())
    print(_line("journey step reached", r))

    _h("Duplicates, hostile senders and bad input")
    assert first_payload is not None
    r = await _post(client, "/v1/onesignal/events", first_payload)
    print(_line("same event.id again (OneSignal retry)", r))
    r = await _post(
        client,
        "/v1/onesignal/events",
        first_payload,
        headers={"x-forwarded-for": f"{EU_WEST4_SENDER}, 203.0.113.66"},
    )
    print(_line("spoofed XFF: europe-west4 IP left of a real one", r))
    r = await _post(
        client, "/v1/onesignal/events", first_payload, headers={"authorization": "Bearer wrong"}
    )
    print(_line("wrong shared secret", r))
    r = await _post(client, "/v1/onesignal/events", None, content=b'{"event.kind": ')
    print(_line("invalid JSON", r))
    r = await _post(client, "/v1/onesignal/events", None, content=b"[" * 100 + b"]" * 100)
    print(_line("JSON nested 100 deep", r))
    r = await _declare_oversize(client, "/v1/onesignal/events", 1_100_000)
    print(_line("1.1 MB body (over the Kafka record limit)", r))
    r = await _post(client, "/v1/onesignal/events", {"hello": "world"})
    print(_line("valid JSON but no event kind", r))

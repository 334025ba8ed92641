"""The spool against real Kafka: a whole-cluster outage under load, answered 2xx throughout.

One outage (``GATEWAY_TEST_SPOOL_OUTAGE_S``, 60 s by default: all nodes stopped, then started
again; the embedded mock is frozen instead, as its data dies with a kill) is played to three
gateways at once, each with a spool of its own:

- ``steady``: in this process; every answer is 2xx through the outage.
- ``killed``: ``gateway serve`` in a child process, killed with -9 in the middle of the outage
  and started again on the same spool directory while Kafka is still away.
- ``small``: a spool of 64 KiB, which fills: then 503 with Retry-After, never a lost 2xx.

After Kafka is back and every spool has drained: every acknowledged id is in Kafka, each
user's events are in the order they were answered, and duplicates are counted (at-least-once:
the killed gateway redelivers what it had spooled and delivered before the kill).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from kafka import KafkaConsumer, TopicPartition

from gateway.core.records import header
from gateway.devkit import samples

from .conftest import APACHE, KAFKA_API_VERSION, Broker, unique
from .faults import GatewayProcess, gateway_toml
from .ingress_helpers import EU_WEST4, SECRET, gateway_config, running_gateway, scrape

ES = "/v1/onesignal/events"
KIND = "message.push.clicked"
OUTAGE_S = float(os.environ.get("GATEWAY_TEST_SPOOL_OUTAGE_S", "60"))
KAFKA = {
    "ack_timeout_s": 2.0,
    "retry_after_s": 3,
    "request_timeout_ms": 3000,
    "delivery_timeout_ms": 6000,
}


@dataclass
class Sent:
    event_id: str
    user: str
    seq: int  # per user, in the order answered
    status: int | None
    retry_after: str | None
    spooled: bool
    at: float


class KeyedLoad:
    """``workers`` threads, each posting the events of its own ``users`` in turn, one request
    at a time: a user's events are sent (and answered) in a known order."""

    def __init__(self, name: str, url: str, *, workers: int = 3, users: int = 4) -> None:
        self.name = name
        self.url = url
        self.workers = workers
        self.users = users
        self.sent: list[Sent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, w: int) -> None:
        headers = {
            "content-type": "application/json",
            "authorization": f"Bearer {SECRET}",
            "x-forwarded-for": EU_WEST4,
        }
        seq: Counter[str] = Counter()
        n = 0
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                user = f"{self.name}-{w}-{n % self.users}"
                n += 1
                event_id = str(uuid.uuid4())
                body = orjson.dumps(
                    samples.event_stream_payload(KIND, event_id=event_id, onesignal_id=user)
                )
                try:
                    r = client.post(ES, content=body, headers=headers)
                    status, retry = r.status_code, r.headers.get("retry-after")
                    spooled = bool(r.status_code == 200 and r.json().get("spooled"))
                except httpx.TransportError:
                    status, retry, spooled = None, None, False
                ok = status is not None and 200 <= status < 300
                with self._lock:
                    self.sent.append(
                        Sent(event_id, user, seq[user], status, retry, spooled, time.monotonic())
                    )
                if ok:
                    seq[user] += 1
                self._stop.wait(0.05 if status is not None else 0.1)

    def start(self) -> KeyedLoad:
        for w in range(self.workers):
            t = threading.Thread(target=self._run, args=(w,), name=f"{self.name}-{w}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> list[Sent]:
        self._stop.set()
        for t in self._threads:
            t.join(20)
        assert not any(t.is_alive() for t in self._threads), "a load thread did not stop"
        with self._lock:
            return list(self.sent)

    def count(self, pred: Any) -> int:
        with self._lock:
            return sum(1 for s in self.sent if pred(s))


def read_all(bootstrap: str, topic: str, expect: set[str], timeout_s: float = 60) -> list[Any]:
    """Every record of ``topic``, read on until every id of ``expect`` is seen or the bound."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        api_version=KAFKA_API_VERSION,
        enable_auto_commit=False,
    )
    try:
        deadline = time.monotonic() + timeout_s
        parts = None
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        missing = set(expect)
        while missing and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                for rec in recs:
                    out.append(rec)
                    missing.discard(header(rec.headers, "ce_id") or "")
        end = consumer.end_offsets(tps)
        while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                out.extend(recs)
        return out
    finally:
        consumer.close(autocommit=False)


def spool_status(url: str) -> dict[str, Any] | None:
    try:
        body: dict[str, Any] = httpx.get(f"{url}/readyz", timeout=3).json()
    except (httpx.TransportError, ValueError):
        return None
    return body.get("spool")


def wait_drained(urls: list[str], timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        states = [spool_status(u) for u in urls]
        if all(s is not None and s["records"] == 0 for s in states):
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"spools not drained in {timeout_s}s: {states}")


def verify(name: str, sent: list[Sent], records: list[Any]) -> dict[str, int]:
    """Every acknowledged id is in Kafka, each user's in the order answered; the figures."""
    acked = [s for s in sent if s.status is not None and 200 <= s.status < 300]
    first: dict[str, tuple[int, int]] = {}  # id -> (partition, offset) of its first copy
    copies: Counter[str] = Counter()
    for rec in records:
        event_id = header(rec.headers, "ce_id") or ""
        copies[event_id] += 1
        first.setdefault(event_id, (rec.partition, rec.offset))
    lost = [s.event_id for s in acked if s.event_id not in first]
    assert not lost, f"{name}: {len(lost)} acknowledged ids not in Kafka: {lost[:5]}"
    by_user: dict[str, list[Sent]] = defaultdict(list)
    for s in acked:
        by_user[s.user].append(s)
    for user, events in by_user.items():
        places = [first[s.event_id] for s in sorted(events, key=lambda s: s.seq)]
        assert len({p for p, _ in places}) == 1, f"{name}: {user} spread over partitions"
        offsets = [o for _, o in places]
        assert offsets == sorted(offsets), f"{name}: {user}'s events out of order: {offsets}"
    ours = {s.event_id for s in sent}
    return {
        "acked": len(acked),
        "spooled": sum(s.spooled for s in acked),
        "duplicates": sum(n - 1 for i, n in copies.items() if i in ours and n > 1),
        "users": len(by_user),
    }


def test_a_cluster_outage_is_ridden_out_by_the_spool(fresh_broker: Broker, tmp_path: Path) -> None:
    prefix = unique("spool")
    topic = f"{prefix}.push"
    bootstrap = fresh_broker.bootstrap_servers
    steady_cfg = gateway_config(
        bootstrap, prefix, kafka=KAFKA, spool={"enabled": True, "dir": str(tmp_path / "a")}
    )
    small_cfg = gateway_config(
        bootstrap,
        prefix,
        kafka=KAFKA,
        spool={
            "enabled": True,
            "dir": str(tmp_path / "c"),
            "max_bytes": 65536,
            "segment_bytes": 16384,
        },
    )
    killed = GatewayProcess(
        gateway_toml(
            bootstrap,
            prefix,
            kafka={**KAFKA, "producer": "process"},
            spool={"enabled": True, "dir": str(tmp_path / "b"), "drain_retry_s": 0.5},
        ),
        tmp_path,
    )
    with (
        running_gateway(steady_cfg) as (steady_url, _),
        running_gateway(small_cfg) as (small_url, _),
        killed.running(),
    ):
        loads = {
            "steady": KeyedLoad("steady", steady_url).start(),
            "killed": KeyedLoad("killed", killed.url).start(),
            "small": KeyedLoad("small", small_url, workers=2).start(),
        }
        try:
            time.sleep(2)  # healthy: straight to Kafka
            assert loads["steady"].count(lambda s: s.status == 200 and not s.spooled) > 0
            down_at = time.monotonic()
            if APACHE:
                fresh_broker.kill()
            else:
                fresh_broker.pause()
            # the killed gateway: kill -9 once it has spooled, restart on the same directory
            deadline = time.monotonic() + OUTAGE_S / 2

            def spooled_in_outage(s: Sent) -> bool:
                return s.spooled and s.at > down_at + KAFKA["ack_timeout_s"] + 0.5

            while time.monotonic() < deadline and not loads["killed"].count(spooled_in_outage):
                time.sleep(0.1)
            time.sleep(max(0.0, down_at + OUTAGE_S / 3 - time.monotonic()))
            spooled_before_kill = loads["killed"].count(spooled_in_outage)
            assert spooled_before_kill > 0, "the killed gateway spooled nothing before its kill"
            assert killed.process is not None
            killed.process.send_signal(signal.SIGKILL)
            killed.process.wait(10)
            killed_at = time.monotonic()
            killed.start()  # ready while Kafka is still away: it spools
            restarted_at = time.monotonic()
            status = spool_status(killed.url)
            assert status is not None and status["records"] >= spooled_before_kill, status
            time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))
            during = loads["steady"].count(lambda s: s.at > down_at)
            # ready while spooling, the spool's state in the body; the full one is not ready
            ready = httpx.get(f"{steady_url}/readyz", timeout=5)
            assert ready.status_code == 200, ready.text
            assert ready.json()["kafka"].startswith("spooling"), ready.text
            assert ready.json()["spool"]["records"] > 0, ready.text
            full_ready = httpx.get(f"{small_url}/readyz", timeout=5)
            assert full_ready.status_code == 503 and "spool full" in full_ready.json()["kafka"]
            if APACHE:
                fresh_broker.restart()
            else:
                fresh_broker.resume()
            up_at = time.monotonic()
            # Kafka is back: once the drain caught up, answers come straight from Kafka again
            # (a producer stuck since the outage is replaced after kafka.stall_timeout_s)
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline and not loads["steady"].count(
                lambda s: s.at > up_at and s.status == 200 and not s.spooled
            ):
                time.sleep(0.2)
            direct_at = time.monotonic()
            time.sleep(1)
        finally:
            sent = {name: load.stop() for name, load in loads.items()}
        drained_in = wait_drained([steady_url, small_url, killed.url], 120)
        metrics_text = scrape(steady_cfg)

    expect = {s.event_id for ss in sent.values() for s in ss if s.status == 200}
    records = read_all(bootstrap, topic, expect)
    figures = {name: verify(name, ss, records) for name, ss in sent.items()}

    # steady: 2xx through the whole outage, most of it from the spool
    bad = [s for s in sent["steady"] if s.status != 200]
    assert not bad, f"steady: {len(bad)} answers not 2xx, e.g. {bad[:3]}"
    assert figures["steady"]["spooled"] > 0 and during > 0
    assert any(s.at > up_at and s.status == 200 and not s.spooled for s in sent["steady"]), (
        "no answer came straight from Kafka after the outage"
    )
    # killed: 2xx, except requests in flight at the kill or sent before the restart was up
    bad = [
        s
        for s in sent["killed"]
        if s.status != 200 and not (killed_at - 10.5 < s.at < restarted_at + 0.5)
    ]
    assert not bad, f"killed: {len(bad)} answers not 2xx outside the kill, e.g. {bad[:3]}"
    assert all(s.status in (200, None) for s in sent["killed"]), Counter(
        s.status for s in sent["killed"]
    )
    # small: full, so 503 with Retry-After (never another error, never a lost 2xx)
    full = [s for s in sent["small"] if s.status == 503]
    assert full, "the small spool never filled"
    assert all(s.retry_after == "3" for s in full)
    assert all(s.status in (200, 503) for s in sent["small"])
    assert "gateway_spool_drained_records_total" in metrics_text
    print(
        f"\nspool outage ({'Apache Kafka node killed' if APACHE else 'mock frozen'},"
        f" {up_at - down_at:.0f}s): {figures}; small spool 503s: {len(full)};"
        f" direct answers again {direct_at - up_at:.1f}s after Kafka was back,"
        f" drained {drained_in:.1f}s after the load stopped"
    )

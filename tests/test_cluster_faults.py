"""Faults on a real three-node Apache Kafka cluster, under load: what replication keeps.

Each scenario starts a KRaft cluster of its own (``cluster3``: three combined nodes, the
gateway's topics made by ``gateway topics create`` with replication factor 3 and
``min.insync.replicas`` 2), runs the gateway as a real child process in front of it, drives
it with 16 concurrent clients posting events with unique ids (retrying a 503 or a missing
answer with the same id, as OneSignal does), injects a fault, and then reads every topic back
from offset 0, on until every acknowledged id is found or a bound passes. The promise: an event
answered 2xx is in Kafka (lost = 0), and no id is stored more often than it was posted.

1. kill -9 the leader of the busiest partition;
2. kill -9 the active controller (the KRaft quorum leader);
3. kill -9 two nodes: below min.insync.replicas, so nothing new may be acknowledged; restart
   them and find every 2xx;
4. a rolling restart (SIGTERM, start, ISR full again, next node);
5. tag sync draining a backlog while the group coordinator is killed -9: every final tag
   delivered, and no offset committed before its update was delivered.

kill -9 keeps the page cache: this tests replication and failover, not power loss. Figures go
to ``$FAULT_REPORT`` (see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaAdminClient, KafkaProducer

from gateway.config import parse_config
from gateway.devkit.fake_onesignal import FakeOneSignal, LoggedRequest
from gateway.devkit.kafka_cluster import KafkaCluster

from .conftest import unique
from .faults import (
    CHANNELS,
    Figures,
    GatewayProcess,
    LoadGenerator,
    Outcome,
    Report,
    check,
    create_topics,
    emit_row,
    gateway_toml,
    load_label,
    read_ids,
    timeline,
)
from .test_tagsync_worker import API_KEY, APP, committed, config_data, ev, produce, running

pytestmark = pytest.mark.slow

WORKERS = 16
ACK_TIMEOUT_S = 2.0
RETRY_AFTER_S = 3
SLACK_S = 2.0
# a killed node is fenced after broker.session.timeout.ms (3 s in KafkaCluster); then leaders
# move and the in-sync sets shrink. Requests started later than this after a one-node fault
# must all be answered 2xx.
FAILOVER_BOUND_S = 8.0
# kafka-python 3.0.12: an expired batch that had been sent resets the idempotent producer's id;
# when the InitProducerId that follows is sent into the outage it never completes, and the
# sender waits on it for good (not even a batch expires; a plain KafkaProducer does the same).
# Seen after a two-node outage every time, after a one-node kill in some runs. The gateway's
# stall watchdog replaces such a producer once nothing settled for kafka.stall_timeout_s.
STALL_TIMEOUT_S = 7.0
STUCK = "kafka producer stuck: replacing it"
INPUTS = "Event Streams bodies (message.push.clicked), a fresh event.id per event"
KAFKA = {
    "ack_timeout_s": ACK_TIMEOUT_S,
    "retry_after_s": RETRY_AFTER_S,
    "request_timeout_ms": 3000,
    "delivery_timeout_ms": 6000,
    "max_block_ms": 2000,
    "stall_timeout_s": STALL_TIMEOUT_S,
}
TOPICS = {"partitions": 4, "replication_factor": 3, "min_insync_replicas": 2}


def _topics(prefix: str) -> list[str]:
    """What `gateway topics create` makes: the channels' topics (journey too) and the DLT."""
    return [f"{prefix}.{c}" for c in (*CHANNELS, "journey")] + [f"{prefix}.dlt"]


@contextmanager
def _gateway(cluster: KafkaCluster, tmp_path: Path, prefix: str) -> Iterator[GatewayProcess]:
    """The gateway's topics created as an operator would (RF 3, min ISR 2), then the gateway."""
    gw = GatewayProcess(
        gateway_toml(cluster.bootstrap_servers, prefix, kafka=KAFKA, topics=TOPICS), tmp_path
    )
    out = create_topics(gw.config_path)
    created = "created (4 partitions, replication factor 3, min.insync.replicas 2)"
    assert out.count(created) == len(_topics(prefix)), out
    with gw.running():
        yield gw


def _load(gw: GatewayProcess, duration_s: float) -> LoadGenerator:
    return LoadGenerator(
        gw.url, workers=WORKERS, duration_s=duration_s, retries=3, retry_pause_s=0.2
    )


def _warm_up(load: LoadGenerator) -> None:
    assert load.wait_for(lambda outs: sum(o.ok for o in outs) >= 200, 30), "no steady 2xx load"


def _ok_started_after(t: float) -> Callable[[list[Outcome]], bool]:
    return lambda outs: any(o.ok and o.started > t for o in outs)


def _busiest_partition(outcomes: list[Outcome]) -> tuple[int, int]:
    counts = Counter(o.partition for o in outcomes if o.ok and o.partition is not None)
    (partition, n), *_ = counts.most_common(1)
    return partition, n


def _read_back(cluster: KafkaCluster, prefix: str, outcomes: list[Outcome]) -> Figures:
    acked = {o.event_id for o in outcomes if o.ok}
    stored = read_ids(cluster.bootstrap_servers, _topics(prefix), timeout_s=45, expect=acked)
    return check(outcomes, (s.event_id for s in stored))


def _assert_sound(figures: Figures, outcomes: list[Outcome]) -> None:
    """What every cluster scenario must show, whatever its fault."""
    assert figures.ok >= 200, figures
    # every 2xx is in Kafka: none lost, none left unverifiable (read_ids read on until found)
    assert figures.acked_but_lost == 0, figures.lost_ids
    assert figures.found == figures.ok
    # Kafka dedupes the idempotent producer's own retries: a copy beyond an id's attempts
    # would be a duplicate that only the gateway or the broker could have made
    assert figures.unexplained_duplicates == 0, figures
    assert figures.duplicates <= figures.reposts, figures
    # every answer was 2xx or 503 + Retry-After in bounded time; no request hung
    assert figures.info == 0, figures.statuses
    assert set(figures.statuses) <= {"200", "503"}, figures.statuses
    for o in outcomes:
        if not o.ok:
            assert o.retry_after == str(RETRY_AFTER_S), o
            assert o.latency <= ACK_TIMEOUT_S + SLACK_S, o


def _report(
    scenario: str,
    fault: str,
    load: LoadGenerator,
    outcomes: list[Outcome],
    figures: Figures,
    started: float,
    extra: dict[str, Any],
) -> None:
    Report(
        scenario,
        load_label(load, outcomes),
        fault,
        INPUTS,
        figures,
        time.monotonic() - started,
        extra,
    ).emit()


def _one_node_killed(
    cluster: KafkaCluster, tmp_path: Path, prefix: str, pick: Callable[[list[Outcome]], int]
) -> tuple[LoadGenerator, list[Outcome], float, int, dict[str, Any]]:
    """Load, kill -9 the node ``pick`` names, load on until 2xx are steady again."""
    with _gateway(cluster, tmp_path, prefix) as gw, _load(gw, duration_s=40) as load:
        _warm_up(load)
        with load._lock:
            before = list(load.outcomes)
        node = pick(before)
        killed_at = time.monotonic()
        cluster.kill(node)
        # service continues: 2xx for requests sent well after the fault (a stuck producer is
        # replaced by then), then a few seconds more
        bound = FAILOVER_BOUND_S + STALL_TIMEOUT_S + 3.0
        resumed = load.wait_for(_ok_started_after(killed_at + bound), 30)
        time.sleep(2.0)
        outcomes = load.stop()
        replaced = STUCK in gw.log()
    tl = {**timeline(outcomes, killed_at), "resumed": resumed, "producer_replaced": replaced}
    return load, outcomes, killed_at, node, tl


def _assert_failover(outcomes: list[Outcome], killed_at: float, tl: dict[str, Any]) -> None:
    assert tl["resumed"], tl
    # failover within the bound; where the producer got stuck, within the watchdog's bound too
    bound = FAILOVER_BOUND_S + (STALL_TIMEOUT_S + 3.0 if tl["producer_replaced"] else 0.0)
    late = [o for o in outcomes if not o.ok and o.started > killed_at + bound]
    assert not late, late[:5]
    assert sum(o.ok for o in outcomes if o.started > killed_at + bound) >= WORKERS
    if tl["failed"]:
        assert tl["recovered_s"] is not None and tl["recovered_s"] < bound, tl


def test_leader_of_busiest_partition_killed(cluster3: KafkaCluster, tmp_path: Path) -> None:
    prefix = unique("c-leader")
    started = time.monotonic()
    chosen: dict[str, int] = {}

    def pick(before: list[Outcome]) -> int:
        partition, n = _busiest_partition(before)
        chosen.update(partition=partition, records=n)
        return cluster3.leader_of(f"{prefix}.push", partition)

    load, outcomes, killed_at, node, tl = _one_node_killed(cluster3, tmp_path, prefix, pick)
    figures = _read_back(cluster3, prefix, outcomes)
    _report(
        "cluster: leader of the busiest partition kill -9",
        f"kill -9 node {node}, leader of {prefix}.push[{chosen['partition']}]",
        load,
        outcomes,
        figures,
        started,
        {**tl, "node": node, **chosen},
    )
    _assert_sound(figures, outcomes)
    _assert_failover(outcomes, killed_at, tl)
    assert cluster3.leader_of(f"{prefix}.push", chosen["partition"]) != node


def test_active_controller_killed(cluster3: KafkaCluster, tmp_path: Path) -> None:
    prefix = unique("c-ctrl")
    started = time.monotonic()
    led: dict[str, Any] = {}

    def pick(before: list[Outcome]) -> int:
        node = cluster3.active_controller()
        parts = cluster3.partitions(f"{prefix}.push")
        led["also_led_partitions"] = sorted(
            p["partition_index"] for p in parts if p["leader_id"] == node
        )
        return node

    load, outcomes, killed_at, node, tl = _one_node_killed(cluster3, tmp_path, prefix, pick)
    figures = _read_back(cluster3, prefix, outcomes)
    # the quorum elected another leader among the two live voters
    new_controller = cluster3.active_controller()
    _report(
        "cluster: active controller kill -9",
        f"kill -9 node {node}, the KRaft quorum leader",
        load,
        outcomes,
        figures,
        started,
        {**tl, "node": node, "new_controller": new_controller, **led},
    )
    assert new_controller != node
    _assert_sound(figures, outcomes)
    _assert_failover(outcomes, killed_at, tl)


def test_two_nodes_killed_refuses_then_keeps_every_2xx(
    cluster3: KafkaCluster, tmp_path: Path
) -> None:
    """Below min.insync.replicas nothing may be acknowledged. With two of three combined
    nodes gone the controller quorum is gone too, so the in-sync sets cannot even shrink: the
    live leader waits for a follower that is dead, and every answer turns 503."""
    prefix = unique("c-two")
    started = time.monotonic()
    first, second = [n for n in cluster3.node_ids if n != cluster3.active_controller()]
    with _gateway(cluster3, tmp_path, prefix) as gw, _load(gw, duration_s=60) as load:
        _warm_up(load)
        first_at = time.monotonic()
        cluster3.kill(first)
        assert load.wait_for(_ok_started_after(first_at + FAILOVER_BOUND_S), 30), gw.log()[-3000:]
        second_at = time.monotonic()
        cluster3.kill(second)
        # 503s for every client, for a few seconds: wait on the condition, bounded
        assert load.wait_for(
            lambda outs: sum(not o.ok and o.started > second_at + 1.0 for o in outs) >= 3 * WORKERS,
            30,
        ), "the load did not reach the gateway after the second kill"
        restart_at = time.monotonic()
        for node in (first, second):
            cluster3.restart(node, wait=False)
        cluster3.wait_ready(60)
        healthy_at = time.monotonic()
        # kafka-python's producer does not come back by itself here (see STALL_TIMEOUT_S): the
        # watchdog replaces it within the stall bound of its last settled record
        resumed = load.wait_for(_ok_started_after(healthy_at + 1.0), STALL_TIMEOUT_S + 20)
        replaced = STUCK in gw.log()
        ready_status = httpx.get(f"{gw.url}/readyz", timeout=5).status_code
        outcomes = load.stop()
        # the healed cluster takes writes from a new idempotent producer (so a stall after
        # this is the gateway's producer's own state, not the cluster's)
        fresh = KafkaProducer(
            bootstrap_servers=cluster3.bootstrap_servers.split(","), acks="all", linger_ms=0
        )
        try:
            fresh.send(f"{prefix}.dlt", b"probe").get(timeout=20)
        finally:
            fresh.close(timeout=5)
    figures = _read_back(cluster3, prefix, outcomes)
    while_down = [o for o in outcomes if o.started > second_at and o.ended < restart_at]
    acked_after_kill = [o for o in outcomes if o.ok and second_at <= o.ended < restart_at]
    tl = timeline(outcomes, second_at)
    _report(
        "cluster: two of three nodes kill -9, then restarted",
        f"kill -9 node {first}; after failover kill -9 node {second}; restart both",
        load,
        outcomes,
        figures,
        started,
        {
            **tl,
            "first_kill_failed": timeline(outcomes, first_at, second_at)["failed"],
            "down_s": round(restart_at - second_at, 2),
            "restart_to_ready_s": round(healthy_at - restart_at, 2),
            "requests_while_down": len(while_down),
            "acked_while_down": sum(o.ok for o in while_down),
            "acked_after_second_kill_started_before": len(acked_after_kill),
            "resumed_after_heal": resumed,
            "producer_replaced": replaced,
            "readyz_after_heal": ready_status,
        },
    )
    # never a 2xx for a record sent while only one node lived: it cannot have been replicated
    assert len(while_down) >= 3 * WORKERS
    assert not any(o.ok for o in while_down), [o for o in while_down if o.ok][:5]
    # and the 2xx answered after the second kill (sent before it) are all found: lost == 0
    _assert_sound(figures, outcomes)
    assert resumed, "no 2xx after the cluster healed"


def _wait_until(cond: Callable[[], bool], timeout_s: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # a metadata read against a node that is just going raises: try again
        with contextlib.suppress(Exception):
            if cond():
                return True
        time.sleep(every)
    return False


def _isr_full(cluster: KafkaCluster, topics: list[str]) -> bool:
    for topic in topics:
        for p in cluster.partitions(topic):
            if len(p["isr_nodes"]) < 3 or p["leader_id"] < 0:
                return False
    return True


def test_rolling_restart(cluster3: KafkaCluster, tmp_path: Path) -> None:
    prefix = unique("c-roll")
    started = time.monotonic()
    controller = cluster3.active_controller()
    order = [n for n in cluster3.node_ids if n != controller] + [controller]
    steps: list[dict[str, Any]] = []
    with _gateway(cluster3, tmp_path, prefix) as gw, _load(gw, duration_s=90) as load:
        _warm_up(load)
        began = time.monotonic()
        for node in order:
            at = time.monotonic()
            cluster3.restart(node)  # SIGTERM (controlled shutdown), start, registered again
            up = time.monotonic()
            assert _wait_until(lambda: _isr_full(cluster3, _topics(prefix)), 60), node
            steps.append(
                {
                    "node": node,
                    "restart_s": round(up - at, 2),
                    "isr_full_s": round(time.monotonic() - at, 2),
                }
            )
        done_at = time.monotonic()
        assert load.wait_for(_ok_started_after(done_at + 0.5), 20), gw.log()[-3000:]
        time.sleep(1.0)
        outcomes = load.stop()
    figures = _read_back(cluster3, prefix, outcomes)
    tl = timeline(outcomes, began)
    _report(
        "cluster: rolling restart of all three nodes",
        "each node in turn: SIGTERM, start, wait for full ISR (controller last)",
        load,
        outcomes,
        figures,
        started,
        {**tl, "steps": steps, "roll_s": round(done_at - began, 2)},
    )
    _assert_sound(figures, outcomes)
    # graceful: leaders move before a node stops, so service never stops for long
    assert sum(o.ok for o in outcomes if o.started > began) >= 200
    assert tl["failed"] == 0 or tl["recovered_s"] is not None, tl


# ---------------------------------------------------------------------------------------------
# tag sync


def _coordinator_partition(group: str, partitions: int = 8) -> int:
    """The __consumer_offsets partition of ``group``: abs(Java hashCode) % partitions."""
    h = 0
    for ch in group:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return (h & 0x7FFFFFFF) % partitions  # KafkaCluster: offsets.topic.num.partitions = 8


class CommitWatch:
    """Samples the group's committed offsets on a thread and holds each against what the loopback
    OneSignal had accepted by then: a committed offset c in a partition says every record below
    c is done, so each of those records' users must have been sent that record's tags or newer.

    The order of the reads makes the check sound: the offsets are read first, the fake's
    request log after, so anything delivered before a commit is in the log that is compared.
    """

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topic: str,
        fake: FakeOneSignal,
        records: dict[tuple[int, int], tuple[str, int]],  # (partition, offset) -> (user, seq)
    ) -> None:
        self.bootstrap, self.group, self.topic, self.fake = bootstrap, group, topic, fake
        self.records = records
        self.samples = 0
        self.failed_reads = 0
        self.last_error = ""
        self.highest: dict[int, int] = {}
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-watch", daemon=True)

    def _delivered(self, log: list[LoggedRequest]) -> dict[str, int]:
        best: dict[str, int] = {}
        for r in log:
            if r.status == 202:
                seq = int(r.body["properties"]["tags"].get("seq", -1))
                best[r.alias_id] = max(best.get(r.alias_id, -1), seq)
        return best

    def check_once(self, admin: Any) -> None:
        offsets = admin.list_group_offsets(self.group).get(self.group, {})
        delivered = self._delivered(self.fake.requests)  # after the offsets: see the docstring
        self.samples += 1
        for tp, om in offsets.items():
            if tp.topic != self.topic or om.offset < 0:
                continue
            self.highest[tp.partition] = max(self.highest.get(tp.partition, 0), om.offset)
            for off in range(om.offset):
                user, seq = self.records[(tp.partition, off)]
                if delivered.get(user, -1) < seq:
                    self.violations.append(
                        f"{tp.partition}@{om.offset} committed; {user} seq {seq} not delivered"
                    )

    def _admin(self) -> Any:
        return KafkaAdminClient(
            bootstrap_servers=self.bootstrap.split(","),
            request_timeout_ms=2000,
            client_id="commit-watch",
        )

    def _run(self) -> None:
        admin = self._admin()
        try:
            while not self._stop.is_set():
                try:
                    self.check_once(admin)
                except Exception as exc:  # the coordinator just died: that sample is skipped
                    self.failed_reads += 1
                    self.last_error = repr(exc)
                    # kafka-python's admin client keeps asking a dead coordinator: start afresh
                    admin.close()
                    admin = self._admin()
                self._stop.wait(0.1)
        finally:
            admin.close()

    def __enter__(self) -> CommitWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_tag_sync_drains_a_backlog_through_a_coordinator_kill(
    cluster3: KafkaCluster, tmp_path: Path
) -> None:
    """kill -9 the group coordinator (also a partition leader) mid-drain; more events after it."""
    started = time.monotonic()
    topic, group = unique("c-ts"), unique("g")
    cluster3.create_topic(topic, 4, 3, **{"min.insync.replicas": "2"})
    cluster3.create_topic(f"{topic}.dlt", 1, 3, **{"min.insync.replicas": "2"})
    users = [f"u{i}" for i in range(120)]
    records: dict[tuple[int, int], tuple[str, int]] = {}

    def wave(seq: int) -> None:
        events = [
            ev({"external_id": u}, "message.push.sent", t=seq * 10, data={"seq": str(seq)})
            for u in users
        ]
        for u, placed in zip(users, produce(cluster3, topic, events), strict=True):
            records[placed] = (u, seq)

    wave(1)  # the backlog
    with FakeOneSignal(api_key=API_KEY, app_rate_limit=40) as fake:
        data = config_data(cluster3, fake, topic, group, app_rate_limit=40, flush_interval_s=0.2)
        data["kafka"].update(request_timeout_ms=3000, delivery_timeout_ms=6000)
        cfg = parse_config(data, env={"OS_KEY": API_KEY})
        final = {u: 2 for u in users}

        def all_final(f: FakeOneSignal) -> bool:
            return all(f.tags(APP, "external_id", u).get("seq") == str(s) for u, s in final.items())

        with (
            running(cfg),
            CommitWatch(cluster3.bootstrap_servers, group, topic, fake, records) as watch,
        ):
            assert fake.wait_for(lambda f: len(f.requests) >= len(users) // 3, timeout_s=60)
            assert _wait_until(lambda: watch.highest != {}, 20), watch.last_error
            coordinator = cluster3.leader_of("__consumer_offsets", _coordinator_partition(group))
            delivered_at_kill = len(fake.requests)
            killed_at = time.monotonic()
            cluster3.kill(coordinator)
            wave(2)  # produced with one node down: RF 3, min ISR 2 takes it
            assert fake.wait_for(all_final, timeout_s=60), fake.requests[-3:]
            drained_at = time.monotonic()
            ends: dict[int, int] = {}
            for p, off in records:
                ends[p] = max(ends.get(p, 0), off + 1)
            # every offset committed in the end: nothing left to replay, nothing skipped
            assert _wait_until(lambda: watch.highest == ends, 30), (
                watch.highest,
                ends,
                watch.failed_reads,
                watch.last_error,
                committed(cluster3, group, topic),
            )
        reqs = fake.requests
        final_users = sum(
            fake.tags(APP, "external_id", u).get("seq") == str(s) for u, s in final.items()
        )
    emit_row(
        {
            "scenario": "cluster: tag sync drains a backlog, group coordinator kill -9",
            "load": f"tag sync, {len(users)} users x 2 waves, app limit 40/s",
            "faults": f"kill -9 node {coordinator} (group coordinator) after {delivered_at_kill}"
            " updates; the second wave produced after the kill",
            "duration_s": round(time.monotonic() - started, 2),
            "records": len(records),
            "users": len(users),
            "final_tags_delivered": final_users,
            "final_tags_missing": len(users) - final_users,
            "updates_sent": len(reqs),
            "non_202": sum(r.status != 202 for r in reqs),
            "drained_s_after_kill": round(drained_at - killed_at, 2),
            "commit_samples": watch.samples,
            "commit_reads_failed": watch.failed_reads,
            "commits_ahead_of_delivery": len(watch.violations),
        }
    )
    assert watch.violations == [], watch.violations[:5]
    assert watch.samples >= 20
    assert final_users == len(users)
    assert all(r.status == 202 for r in reqs)
    # at most one update per user per wave: coalescing may merge waves, nothing is replayed
    assert len(reqs) <= 2 * len(users)

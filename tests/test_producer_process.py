"""The producer process (``kafka.producer = "process"``): records, lifetimes and failures.

Against the real embedded broker; the child is the real ``python -m gateway.kafka.process``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.config import KafkaConfig
from gateway.core.records import KafkaRecord
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.kafka import Unavailable, create_sink, wire
from gateway.kafka.process import ProcessSink
from gateway.kafka.thread import KafkaSink
from gateway.metrics import IngressMetrics

from .conftest import API_VERSION, read_topic, unique
from .faults import GatewayProcess, gateway_toml


def kafka_config(bootstrap: str, **overrides: object) -> KafkaConfig:
    options: dict[str, object] = {"api_version": API_VERSION, **overrides}
    return dataclasses.replace(
        KafkaConfig(),
        bootstrap_servers=bootstrap,
        **options,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def started(sink: ProcessSink, ready_within_s: float = 30.0) -> AsyncIterator[ProcessSink]:
    await sink.start()
    try:
        await until(lambda: sink.ready()[0], ready_within_s, lambda: sink.ready()[1])
        yield sink
    finally:
        await sink.close(timeout_s=5.0)


async def until(
    predicate: Callable[[], bool], timeout_s: float, why: Callable[[], str] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {why()}")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(p) for p in text]
    return out


def test_create_sink_follows_the_config() -> None:
    metrics = IngressMetrics(process=False)
    assert isinstance(create_sink(KafkaConfig(), metrics), ProcessSink)
    thread = dataclasses.replace(KafkaConfig(), producer="thread")
    assert isinstance(create_sink(thread, metrics), KafkaSink)


def test_records_cross_the_process_boundary_exactly(broker: EmbeddedBroker) -> None:
    topic = unique("pp")
    records = [
        KafkaRecord(topic, None, b"no key", []),
        KafkaRecord(topic, b"user\x00\xff", b"\x00binary\xff" * 50, [("ce_id", b"1")]),
        KafkaRecord(
            topic,
            b"k",
            b"{}",
            [("ce_type", "com.onesignal.é".encode()), ("empty", b""), ("ü", b"x")],
        ),
    ] + [
        KafkaRecord(topic, b"same-user", f"v{i}".encode(), [("n", str(i).encode())])
        for i in range(200)
    ]

    async def run() -> list[tuple[int, int]]:
        sink = ProcessSink(
            kafka_config(broker.bootstrap_servers), IngressMetrics(process=False), (topic,)
        )
        async with started(sink):
            results = await asyncio.gather(*(sink.publish(r) for r in records))
            assert sink.in_flight == 0
        assert all(r.topic == topic for r in results)
        return [(r.partition, r.offset) for r in results]

    placed = asyncio.run(run())
    assert len(set(placed)) == len(records)  # every record has its own (partition, offset)
    stored = {(r.partition, r.offset): r for r in read_topic(broker.bootstrap_servers, topic)}
    for (partition, offset), sent in zip(placed, records, strict=True):
        got = stored[(partition, offset)]
        assert got.key == sent.key
        assert got.value == sent.value
        assert [(k, v) for k, v in got.headers] == sent.headers
    same_user = [p for p, r in zip(placed, records, strict=True) if r.key == b"same-user"]
    assert len({p for p, _ in same_user}) == 1  # one key, one partition ...
    assert [o for _, o in same_user] == sorted(o for _, o in same_user)  # ... in send order


def test_acks_come_back_gathered_per_round_of_the_sender(broker: EmbeddedBroker) -> None:
    """The child writes the results its sender thread settled in one round as one frame (a
    frame and a system call per ack cost about as much as kafka-python's own send); an
    immediate failure still comes at once. Needs kafka-python's Sender.run_once."""
    topic = unique("pp-gather")
    records = [KafkaRecord(topic, f"u{i % 7}".encode(), b"v" * 2000, []) for i in range(600)]

    async def run() -> list[int]:
        sink = ProcessSink(
            kafka_config(broker.bootstrap_servers), IngressMetrics(process=False), (topic,)
        )
        sizes: list[int] = []
        on_frame = sink._on_frame

        def counting(kind: int, payload: bytes) -> None:
            if kind == wire.RESULTS:
                sizes.append(len(wire.loads(payload)))
            on_frame(kind, payload)

        sink._on_frame = counting  # type: ignore[method-assign]
        async with started(sink):
            results = await asyncio.gather(*(sink.publish(r) for r in records))
        assert len({(r.partition, r.offset) for r in results}) == len(records)
        return sizes

    sizes = asyncio.run(run())
    assert sum(sizes) == len(records)  # every ack came back, once
    assert len(sizes) <= len(records) // 10, f"{len(sizes)} frames for {len(records)} acks"
    assert max(sizes) > 1


def test_no_broker_fails_within_max_block_ms() -> None:
    # pinned whatever the backend: with a pin the producer is made without a broker, so this
    # is the metadata wait (negotiating, kafka-python waits request_timeout_ms to bootstrap)
    cfg = kafka_config("127.0.0.1:9", ack_timeout_s=10.0, max_block_ms=500, api_version="2.3")

    async def run() -> None:
        sink = ProcessSink(cfg, IngressMetrics(process=False), ("t",))
        await sink.start()
        try:
            # with api_version set, the producer is made without a broker; metadata is not
            await until(lambda: sink.last_error is not None, 10, lambda: "no error reported")
            assert "metadata for t" in (sink.last_error or "")
            ok, why = sink.ready()
            assert not ok and "no topic metadata" in why
            started_at = time.monotonic()
            with pytest.raises(Unavailable) as err:
                await sink.publish(KafkaRecord("t", None, b"x", []))
            # the send waited max_block_ms for metadata, not ack_timeout_s
            assert err.value.reason == "error"
            assert "KafkaTimeoutError" in str(err.value)
            assert time.monotonic() - started_at < 3.0
            assert sink.in_flight == 0
        finally:
            closing = time.monotonic()
            await sink.close(timeout_s=2.0)
            assert time.monotonic() - closing < 8.0
        assert sink.child_pid is None

    asyncio.run(run())


def test_a_killed_child_fails_its_waiters_at_once_and_is_replaced(
    fresh_broker: EmbeddedBroker,
) -> None:
    topic = unique("pp-kill")
    cfg = kafka_config(fresh_broker.bootstrap_servers, ack_timeout_s=20.0)

    async def run() -> None:
        sink = ProcessSink(cfg, IngressMetrics(process=False), (topic,))
        async with started(sink):
            first = await sink.publish(KafkaRecord(topic, b"k", b"before", []))
            assert first.offset >= 0
            pid = sink.child_pid
            assert pid is not None
            fresh_broker.pause()  # no acks: the next records wait in the child
            try:
                waiting = [
                    asyncio.ensure_future(sink.publish(KafkaRecord(topic, b"k", b"w", [])))
                    for _ in range(5)
                ]
                await until(lambda: sink.in_flight == 5, 5, lambda: f"{sink.in_flight}")
                await asyncio.sleep(0.3)  # sent to the child, awaiting the broker
                killed_at = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                outcomes = await asyncio.gather(*waiting, return_exceptions=True)
                waited = time.monotonic() - killed_at
            finally:
                fresh_broker.resume()
            # every waiter answered 503-worthy at once, not after ack_timeout_s (20 s)
            assert all(isinstance(o, Unavailable) and o.reason == "error" for o in outcomes)
            assert "producer process exited" in str(outcomes[0])
            assert waited < 2.0
            assert sink.in_flight == 0
            # a new child comes up and the sink is usable again
            await until(lambda: sink.ready()[0], 30, lambda: sink.ready()[1])
            assert sink.restarts == 1
            restarts = sink.metrics.registry.get_sample_value(
                "gateway_producer_process_restarts_total"
            )
            assert restarts == 1
            assert sink.child_pid not in (None, pid)
            after = await sink.publish(KafkaRecord(topic, b"k", b"after", []))
            assert after.offset > first.offset

    asyncio.run(run())


def test_the_child_ignores_sigint_and_leaves_on_close(broker: EmbeddedBroker) -> None:
    topic = unique("pp-int")

    async def run() -> int:
        sink = ProcessSink(
            kafka_config(broker.bootstrap_servers), IngressMetrics(process=False), (topic,)
        )
        async with started(sink):
            pid = sink.child_pid
            assert pid is not None
            # Ctrl-C reaches the whole process group; the server decides when the child stops
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert alive(pid)
            result = await sink.publish(KafkaRecord(topic, b"k", b"still here", []))
            assert result.offset >= 0
        return pid

    pid = asyncio.run(run())
    assert not alive(pid)


def test_the_child_leaves_when_the_gateway_is_killed(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    gw = GatewayProcess(gateway_toml(broker.bootstrap_servers, unique("pp-gw")), tmp_path)
    with gw.running():
        assert gw.process is not None
        children = child_pids(gw.process.pid)
        assert len(children) == 1, children
        (child,) = children
        assert b"gateway.kafka.process" in Path(f"/proc/{child}/cmdline").read_bytes()
        gw.signal(signal.SIGKILL)
        gw.wait(10)
        deadline = time.monotonic() + 15
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the producer process outlived its gateway"

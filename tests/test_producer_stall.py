"""The stall watchdog: a producer that settles nothing past its own bound is replaced.

kafka-python settles every record within ``delivery_timeout_ms``; its idempotent producer can
still get stuck for good after a quorum loss (see ``SinkBase.stalled``, and the two-node
scenario in test_cluster_faults.py, which is where it was found). Here the stuck producer is
made on purpose: the broker is frozen while the records' own delivery timeout is a minute,
so nothing settles, and the watchdog's bound (2.5 s) comes first. Both sinks, either backend.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.core.records import KafkaRecord
from gateway.kafka import SinkBase, Unavailable, create_sink
from gateway.metrics import IngressMetrics

from .conftest import Broker, unique
from .test_producer_process import kafka_config, until

STALL_S = 2.5


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_a_producer_that_settles_nothing_is_replaced(fresh_broker: Broker, mode: str) -> None:
    topic = unique("stall")
    cfg = kafka_config(
        fresh_broker.bootstrap_servers,
        producer=mode,
        ack_timeout_s=1.0,
        request_timeout_ms=30000,
        delivery_timeout_ms=60000,
        stall_timeout_s=STALL_S,  # below delivery_timeout_ms: parse_config refuses this
    )
    metrics = IngressMetrics(process=False)

    async def run() -> None:
        sink = create_sink(cfg, metrics, (topic,))
        await sink.start()
        try:
            await until(lambda: sink.ready()[0], 30, lambda: sink.ready()[1])
            first = await sink.publish(KafkaRecord(topic, b"k", b"before", []))
            assert first.offset >= 0
            fresh_broker.pause()
            try:
                frozen_at = time.monotonic()
                outcomes = await asyncio.gather(
                    *(sink.publish(KafkaRecord(topic, b"k", b"held", [])) for _ in range(4)),
                    return_exceptions=True,
                )
                # each answered at its own deadline, while the producer still holds them
                assert all(isinstance(o, Unavailable) and o.reason == "timeout" for o in outcomes)
                assert sink.in_flight == 4 and sink.stalls == 0
                await until(lambda: sink.stalls == 1, 10, lambda: f"{sink.in_flight} held")
                replaced_after = time.monotonic() - frozen_at
                # what the old producer held is let go, so admission is not eaten away
                await until(lambda: sink.in_flight == 0, 5, lambda: f"{sink.in_flight}")
            finally:
                fresh_broker.resume()
            assert STALL_S <= replaced_after < STALL_S + 3.0, replaced_after
            assert metrics.registry.get_sample_value("gateway_producer_stalls_total") == 1
            if mode == "thread":  # in a process sink the supervisor then says the child exited
                assert "settled no record" in (sink.last_error or "")
            # the new producer writes once the broker answers again
            deadline = time.monotonic() + 30
            while True:
                try:
                    after = await sink.publish(KafkaRecord(topic, b"k", b"after", []))
                    break
                except Unavailable:
                    assert time.monotonic() < deadline, sink.last_error
                    await asyncio.sleep(0.2)
            assert after.offset > first.offset
            if mode == "process":
                assert sink.restarts == 1  # type: ignore[attr-defined]
            assert sink.stalls == 1, "replaced more than once"
        finally:
            await sink.close(timeout_s=3.0)

    asyncio.run(run())


def test_an_idle_producer_is_not_stalled() -> None:
    sink = SinkBase(
        kafka_config("127.0.0.1:9", stall_timeout_s=40.0), IngressMetrics(process=False)
    )
    now = time.monotonic()
    sink._progress_at = now - 1000  # nothing settled for long: but nothing is outstanding
    assert not sink.stalled(now)
    sink._in_flight = 1
    assert sink.stalled(now)
    sink._progress_at = now - 39
    assert not sink.stalled(now)
    # the default bound: delivery_timeout_ms + request_timeout_ms + 5 s
    default = SinkBase(kafka_config("127.0.0.1:9"), IngressMetrics(process=False))
    assert default.cfg.stall_after_s == (30000 + 10000) / 1000 + 5.0

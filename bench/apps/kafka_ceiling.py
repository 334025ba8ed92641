"""Ceiling 2: kafka-python alone, producing our record as fast as it will take it.

``python -m bench.apps.kafka_ceiling --config FILE --duration S --warmup S --window N``
prints one JSON line: acked records/s, ack latency percentiles, peak RSS.

The record is the one our gateway writes for the benchmark body (same value, key and
CloudEvents headers), with the gateway's producer options. kafka-python 3 has no buffer
limit, so at most ``window`` records are outstanding: enough to keep the sender's batches full,
bounded so memory is too. Ack latency here is queueing under that window, not a request's.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from kafka import KafkaProducer

from gateway.config import load_config
from gateway.core.event import Received
from gateway.core.normalize import normalize
from gateway.core.records import KafkaRecord, build_record
from gateway.devkit import samples
from gateway.kafka.producer import producer_options

TOPIC = "bench.ceiling.push"


def bench_record() -> KafkaRecord:
    """The record the gateway builds for the benchmark body, on the ceiling's own topic."""
    payload = samples.event_stream_payload(
        "message.push.clicked", event_id="00000000-0000-4000-8000-000000000000"
    )
    event = normalize(payload, fmt="event-stream")
    received = Received(source="event-stream", at=datetime.now(UTC), client_ip="34.90.12.34")
    record = build_record(
        event, received, topic_template="bench.ceiling.{channel}", source_name="event-stream"
    )
    return dataclasses.replace(record, topic=TOPIC)


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--window", type=int, default=1000)
    args = parser.parse_args()

    config = load_config(args.config)
    record = bench_record()
    producer = KafkaProducer(**producer_options(config.kafka))
    producer.partitions_for(TOPIC)

    slots = threading.BoundedSemaphore(args.window)
    lock = threading.Lock()
    acked = 0
    failed = 0
    latencies: list[float] = []
    measuring = False

    def on_ack(sent_at: float, _meta: Any) -> None:
        nonlocal acked
        slots.release()
        with lock:
            acked += 1
            if measuring:
                latencies.append(time.perf_counter() - sent_at)

    def on_error(_exc: Any) -> None:
        nonlocal failed
        slots.release()
        with lock:
            failed += 1

    start = time.perf_counter()
    measure_from = start + args.warmup
    measure_to = measure_from + args.duration
    acked_at_start = 0
    while True:
        now = time.perf_counter()
        if not measuring and now >= measure_from:
            with lock:
                acked_at_start = acked
                measuring = True
        if now >= measure_to:
            break
        slots.acquire()
        sent_at = time.perf_counter()
        fut = producer.send(TOPIC, value=record.value, key=record.key, headers=record.headers)
        fut.add_callback(lambda meta, t=sent_at: on_ack(t, meta))
        fut.add_errback(on_error)
    with lock:
        acked_in_window = acked - acked_at_start
        window_latencies = sorted(latencies)
    elapsed = time.perf_counter() - measure_from
    producer.flush(timeout=30)
    producer.close(timeout=10)

    def pct(p: float) -> float:
        if not window_latencies:
            return float("nan")
        return window_latencies[min(len(window_latencies) - 1, int(p * len(window_latencies)))]

    print(
        orjson.dumps(
            {
                "records_per_s": acked_in_window / elapsed,
                "acked": acked_in_window,
                "failed": failed,
                "p50_ms": pct(0.50) * 1000,
                "p99_ms": pct(0.99) * 1000,
                "value_bytes": len(record.value),
                "peak_rss_kb": _vm_hwm_kb(),
            }
        ).decode(),
        flush=True,
    )


if __name__ == "__main__":
    main()

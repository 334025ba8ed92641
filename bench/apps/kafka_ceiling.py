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
import resource
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


def vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


@dataclasses.dataclass
class Sent:
    """What :func:`send_windowed` measured over its measured pass (the warm-up left out)."""

    acked: int
    failed: int  # over the whole run, the warm-up included: a failure is never left out
    seconds: float
    cpu_s: float  # this process, every thread
    latencies: list[float]  # seconds from send to ack, sorted

    @classmethod
    def since(
        cls, began: float, cpu_at_start: float, acked: int, failed: int, latencies: list[float]
    ) -> Sent:
        """The pass that began at ``began`` (perf_counter) and ``cpu_at_start``, ending now."""
        return cls(
            acked=acked,
            failed=failed,
            seconds=time.perf_counter() - began,
            cpu_s=process_cpu_s() - cpu_at_start,
            latencies=sorted(latencies),
        )

    def pct(self, p: float) -> float:
        """The ``p`` quantile of the ack latencies, in milliseconds."""
        if not self.latencies:
            return float("nan")
        return self.latencies[min(len(self.latencies) - 1, int(p * len(self.latencies)))] * 1000


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def send_windowed(
    producer: Any, topic: str, record: KafkaRecord, window: int, warmup: float, duration: float
) -> Sent:
    """Sends ``record`` from this thread whenever fewer than ``window`` are unacknowledged
    (the sender thread's callbacks free the slots), for ``warmup`` then ``duration`` seconds."""
    slots = threading.BoundedSemaphore(window)
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
    measure_from = start + warmup
    measure_to = measure_from + duration
    acked_at_start = 0
    cpu_at_start = 0.0
    while True:
        now = time.perf_counter()
        if not measuring and now >= measure_from:
            with lock:
                acked_at_start = acked
                cpu_at_start = process_cpu_s()
                measuring = True
        if now >= measure_to:
            break
        slots.acquire()
        sent_at = time.perf_counter()
        fut = producer.send(topic, value=record.value, key=record.key, headers=record.headers)
        fut.add_callback(lambda meta, t=sent_at: on_ack(t, meta))
        fut.add_errback(on_error)
    with lock:
        sent = Sent.since(measure_from, cpu_at_start, acked - acked_at_start, failed, latencies)
        measuring = False
    producer.flush(timeout=30)
    return sent


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
    sent = send_windowed(producer, TOPIC, record, args.window, args.warmup, args.duration)
    producer.close(timeout=10)

    print(
        orjson.dumps(
            {
                "records_per_s": sent.acked / sent.seconds,
                "acked": sent.acked,
                "failed": sent.failed,
                "p50_ms": sent.pct(0.50),
                "p99_ms": sent.pct(0.99),
                "value_bytes": len(record.value),
                "peak_rss_kb": vm_hwm_kb(),
            }
        ).decode(),
        flush=True,
    )


if __name__ == "__main__":
    main()

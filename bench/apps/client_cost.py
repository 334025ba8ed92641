"""Row 2c: what one acknowledged record costs each Kafka client, as a gateway drives it.

``python -m bench.apps.client_cost --client kafka-python|aiokafka --config FILE --duration S
--warmup S --in-flight N`` prints one JSON line: acked records/s, CPU microseconds per acked
record (this process, every thread), ack latency percentiles, peak RSS.

The record is the one our gateway writes for the benchmark body (value, key, CloudEvents
headers). At most ``N`` records are outstanding, a new one sent as soon as one is acknowledged, as
each of wrk's ``N`` connections waits for its answer before the next request: the batches are
as small as a gateway's, unlike row 2's pipelined window of 1,000. kafka-python runs with the
gateway's producer options, aiokafka with the same ones as far as it has them (acks=all,
idempotent, ``kafka.linger_ms``, ``kafka.batch_size`` batches). Nothing else runs in this
process, so its records/s is the most that client gets out of the broker at ``N`` in flight with
one process, and its CPU per record is the client's share of a request's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson

from bench.apps.kafka_ceiling import Sent, bench_record, process_cpu_s, send_windowed, vm_hwm_kb
from gateway.config import KafkaConfig, load_config
from gateway.core.records import KafkaRecord

TOPIC = "bench.clients.push"


def kafka_python(kafka: KafkaConfig, record: KafkaRecord, args: argparse.Namespace) -> Sent:
    """One thread sends, as the gateway's producer process does, each time one of the
    ``in_flight`` slots is free; the sender thread's callbacks free them."""
    from kafka import KafkaProducer

    from gateway.kafka.producer import producer_options

    producer = KafkaProducer(**producer_options(kafka))
    producer.partitions_for(TOPIC)
    sent = send_windowed(producer, TOPIC, record, args.in_flight, args.warmup, args.duration)
    producer.close(timeout=10)
    return sent


async def aiokafka(kafka: KafkaConfig, record: KafkaRecord, args: argparse.Namespace) -> Sent:
    """``in_flight`` tasks, each awaiting ``send_and_wait`` before its next send, as the
    rival's requests do."""
    from aiokafka import AIOKafkaProducer

    # the gateway's settings, as far as aiokafka has them: with its default 16 KiB batches our
    # 2.5 KB records fill a batch every few sends, and its rate falls about 3x
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=kafka.linger_ms,
        max_batch_size=kafka.batch_size,
        max_request_size=kafka.max_request_size,
        request_timeout_ms=kafka.request_timeout_ms,
    )
    await producer.start()
    await producer.partitions_for(TOPIC)
    acked = failed = 0
    latencies: list[float] = []
    measuring = False
    done = False

    async def sender() -> None:
        nonlocal acked, failed
        while not done:
            sent_at = time.perf_counter()
            try:
                await producer.send_and_wait(
                    TOPIC, value=record.value, key=record.key, headers=record.headers
                )
            except Exception:  # counted: a failed send is not an acked record
                failed += 1
                continue
            acked += 1
            if measuring:
                latencies.append(time.perf_counter() - sent_at)

    tasks = [asyncio.create_task(sender()) for _ in range(args.in_flight)]
    await asyncio.sleep(args.warmup)
    measuring = True
    began, cpu_at_start, acked_at_start = time.perf_counter(), process_cpu_s(), acked
    await asyncio.sleep(args.duration)
    sent = Sent.since(began, cpu_at_start, acked - acked_at_start, failed, latencies)
    done = True
    await asyncio.gather(*tasks, return_exceptions=True)
    await producer.stop()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", choices=("kafka-python", "aiokafka"), required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()

    kafka = load_config(args.config).kafka
    record = bench_record()
    if args.client == "kafka-python":
        sent = kafka_python(kafka, record, args)
    else:
        sent = asyncio.run(aiokafka(kafka, record, args))
    print(
        orjson.dumps(
            {
                "client": args.client,
                "records_per_s": sent.acked / sent.seconds,
                "acked": sent.acked,
                "failed": sent.failed,
                "cpu_us_per_record": 1e6 * sent.cpu_s / max(1, sent.acked),
                "cores": sent.cpu_s / sent.seconds,
                "p50_ms": sent.pct(0.50),
                "p99_ms": sent.pct(0.99),
                "peak_rss_kb": vm_hwm_kb(),
            }
        ).decode(),
        flush=True,
    )


if __name__ == "__main__":
    main()

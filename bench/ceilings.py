"""Rows 2, 2b and 2c: how fast a Kafka client alone can publish our record, and at what cost.

Row 2 is kafka-python with the gateway's producer options (``bench/apps/kafka_ceiling.py``);
row 2b (``--kafka apache`` only) is Kafka's own ProducerPerformance, the Java client, with the
same record size and settings: a ceiling for the client library, not a rival to the gateway.
Row 2c (``bench/apps/client_cost.py``) is kafka-python and aiokafka each with at most
``--connections`` records in flight, as many as the gateway can have waiting: the records/s one
client process gets that way, and the CPU it spends per acknowledged record.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
from pathlib import Path

import orjson

from bench.common import LoadResult, RssSampler, child_env, python, stop_process
from gateway.devkit.kafka_cluster import KafkaCluster, libs_dir

JAVA_TOPIC = "bench.ceiling.java"
JAVA_CALIBRATION_RECORDS = 100_000
JAVA_MAX_RECORDS = 3_000_000  # ~7 GB at most on the node's disk, deleted with it


def _run_app(app: str, flags: list[str], args: argparse.Namespace) -> LoadResult:
    """Runs ``python -m bench.apps.<app>`` for ``--duration`` after ``--warmup``; its last line
    of JSON as a row (records/s, ack latency, failures, peak RSS)."""
    cmd = [python(), "-m", f"bench.apps.{app}", *flags]
    cmd += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=args.duration + args.warmup + 120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{app} {' '.join(flags)} failed: {out.stderr[-2000:]}")
    r = orjson.loads(out.stdout.strip().splitlines()[-1])
    row = LoadResult(
        name=app,
        rps=r["records_per_s"],
        p50_ms=r["p50_ms"],
        p99_ms=r["p99_ms"],
        requests=r["acked"],
        non_2xx=r["failed"],
        socket_errors=0,
        peak_rss_mb=r["peak_rss_kb"] / 1024,
        notes={k: v for k, v in r.items() if k in ("value_bytes", "cpu_us_per_record", "cores")},
    )
    return row


def kafka_ceiling(config: Path, args: argparse.Namespace) -> LoadResult:
    flags = ["--config", str(config), "--window", str(args.kafka_window)]
    row = _run_app("kafka_ceiling", flags, args)
    row.name = "kafka"
    row.notes["window"] = args.kafka_window
    return row


CLIENTS = ("kafka-python", "aiokafka")


def client_costs(config: Path, args: argparse.Namespace) -> dict[str, LoadResult]:
    """Row 2c, one process per client, by the name it has in the report's table."""
    out: dict[str, LoadResult] = {}
    for client in CLIENTS:
        flags = ["--client", client, "--config", str(config), "--in-flight", str(args.connections)]
        row = _run_app("client_cost", flags, args)
        row.name = "client_" + client.replace("-", "_")
        cpu = row.notes.pop("cpu_us_per_record")
        row.notes.update(cpu_us={"total": round(cpu, 1)}, in_flight=args.connections)
        out[row.name] = row
    return out


_PERF_SUMMARY = re.compile(
    r"(?P<records>\d+) records sent, (?P<rps>[\d.]+) records/sec \((?P<mb_s>[\d.]+) MB/sec\), "
    r"(?P<avg>[\d.]+) ms avg latency, (?P<max>[\d.]+) ms max latency, (?P<p50>\d+) ms 50th, "
    r"(?P<p95>\d+) ms 95th, (?P<p99>\d+) ms 99th, (?P<p999>\d+) ms 99.9th"
)


# a failed send is not counted in the summary; its callback prints the exception's trace
_PERF_FAILED_SEND = re.compile(r"^[\w.$]+(?:Exception|Error)(?::|$)", re.M)


def parse_producer_performance(out: str) -> dict[str, float]:
    """The final summary line of ProducerPerformance (the progress lines lack percentiles),
    and ``failed``: how many exception traces it printed (each a send that was not acked)."""
    found = list(_PERF_SUMMARY.finditer(out))
    if not found:
        raise RuntimeError(f"ProducerPerformance printed no summary line:\n{out[-2000:]}")
    m = found[-1]
    figures = {k: float(v) for k, v in m.groupdict().items()}
    figures["failed"] = float(len(_PERF_FAILED_SEND.findall(out)))
    return figures


def gateway_record_bytes() -> int:
    """Value, key and header bytes of the record the gateway writes for the benchmark body."""
    from bench.apps.kafka_ceiling import bench_record

    r = bench_record()
    return len(r.value) + len(r.key or b"") + sum(len(k) + len(v) for k, v in r.headers)


def java_producer_props(bootstrap: str, config: Path, record_bytes: int, window: int) -> list[str]:
    """The kafka-python ceiling's producer settings (gateway.kafka.sink.producer_options), in Java.

    kafka-python's ceiling keeps at most ``window`` records outstanding; the Java producer's
    bound is bytes, so ``buffer.memory`` is that window in bytes (never below one batch).
    """
    from gateway.config import load_config

    k = load_config(config, env=child_env()).kafka
    return [
        f"bootstrap.servers={bootstrap}",
        "acks=all",
        "enable.idempotence=true",
        "max.in.flight.requests.per.connection=5",
        f"linger.ms={k.linger_ms}",
        f"batch.size={k.batch_size}",
        f"compression.type={k.compression_type or 'none'}",
        f"request.timeout.ms={k.request_timeout_ms}",
        f"delivery.timeout.ms={k.delivery_timeout_ms}",
        f"buffer.memory={max(k.batch_size, window * record_bytes)}",
        "client.id=bench-java-ceiling",
    ]


def java_ceiling(
    cluster: KafkaCluster, config: Path, workdir: Path, args: argparse.Namespace
) -> LoadResult:
    """Kafka's own ProducerPerformance: what the Java client gets out of this node.

    It counts records, not seconds: a calibration pass (which also warms the node) gives the
    rate, then the measured pass sends about ``--duration`` seconds' worth, sized again from
    its own rate (at most twice) if it ran under 80% of that. Each pass is a JVM of its own,
    so the measured one includes the client's JIT warm-up.
    """
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("no java on PATH")
    size = gateway_record_bytes()
    props = java_producer_props(cluster.bootstrap_servers, config, size, args.kafka_window)
    log4j = workdir / "perf-log4j2.properties"
    log4j.write_text("rootLogger.level = error\n")
    base = [java, "-Xmx512m", f"-Dlog4j2.configurationFile={log4j}"]
    base += ["-cp", str(libs_dir(cluster.version) / "*")]
    base.append("org.apache.kafka.tools.ProducerPerformance")

    def run(records: int) -> tuple[dict[str, float], float]:
        cmd = [*base, "--topic", JAVA_TOPIC, "--num-records", str(records)]
        cmd += ["--record-size", str(size), "--throughput", "-1", "--producer-props", *props]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            with RssSampler(proc.pid) as rss:
                out, _ = proc.communicate(timeout=args.duration * 3 + 120)
        finally:
            stop_process(proc)
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"ProducerPerformance exited {proc.returncode}: {text[-2000:]}")
        return parse_producer_performance(text), rss.peak_kb / 1024

    cal, _ = run(JAVA_CALIBRATION_RECORDS)
    rate, passes = cal["rps"], 0
    while True:
        n = int(min(JAVA_MAX_RECORDS, max(JAVA_CALIBRATION_RECORDS, rate * args.duration)))
        r, peak_mb = run(n)
        passes += 1
        # the cold calibration JVM underestimates the rate: once more if the pass was short
        if passes >= 3 or n >= JAVA_MAX_RECORDS or r["records"] / r["rps"] >= 0.8 * args.duration:
            break
        rate = r["rps"] * 1.25  # a longer pass runs faster still (the client's JIT warms up)
    return LoadResult(
        name="java",
        rps=r["rps"],
        p50_ms=r["p50"],
        p99_ms=r["p99"],
        requests=int(r["records"]),
        non_2xx=int(r["failed"]),  # sends not acked (the summary counts the acked ones)
        socket_errors=0,
        peak_rss_mb=peak_mb,
        notes={
            "record_bytes": size,
            "records": int(r["records"]),
            "seconds": r["records"] / r["rps"] if r["rps"] else math.nan,
            "avg_ms": r["avg"],
            "calibration_rps": cal["rps"],
            "passes": passes,
            "producer_props": props[1:],
        },
    )

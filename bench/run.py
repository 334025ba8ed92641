"""The ingress benchmark: our gateway against the ceilings it runs between, in one run.

``python -m bench.run [--kafka mock|apache] [--duration 10] [--connections 64] [--soak 0]
[--only ...] [--json F]``

One broker (the embedded mock by default; ``--kafka apache``: one real Apache Kafka node), then
for each target a server in its own process, loaded with wrk and the same OneSignal body (a new
``event.id`` per request) on loopback:

- ``bare``: the HTTP stack alone (Starlette answering 204), the ceiling of the HTTP side;
- ``kafka``: kafka-python producing our record as fast as it can, the ceiling of the Kafka side;
- ``java`` (``--kafka apache`` only): Kafka's own ProducerPerformance, the Java client's
  ceiling with the same record size and producer settings (pipelined sends: a ceiling, not a
  rival that acknowledges each request);
- ``clients``: kafka-python and aiokafka each with at most ``--connections`` records in flight
  (as many as the gateway can have waiting): the records/s one client process gets, and its CPU
  per acknowledged record;
- ``naive``: the handler a user would write first (``send(...).get()`` in a thread pool);
- ``aiokafka``: the rival a competent user writes (Starlette + aiokafka, ``send_and_wait``
  with acks=all, idempotence, ``linger_ms`` 0; no verification);
- ``ours``: ``gateway serve`` with the whole path on (trusted proxy, allowlist, secret,
  normalize, dedupe, ack);
- ``traced``: ``ours`` with ``[tracing]`` on, every request sampled and its spans exported over
  OTLP/HTTP to a loopback sink: the cost of tracing (``ours`` is tracing off, the default).

Absolute figures on a shared 2-core machine are noise; the ratios between targets measured
side by side in one run are what to read. Also: ``soak`` (RSS over time at half our maximum
rate), ``tagsync`` (the worker's events/s against a loopback OneSignal) and ``allowlist``
(lookup cost with 17 vs 1,000+ ranges). ``--profile`` records a py-spy profile of our gateway
under load and prints where its time goes.

This module parses the flags and runs the rows. Each measurement lives in its own module:
``ingress`` (bare, naive, ours), ``ceilings`` (kafka, java, clients), ``soak``, ``tagsync``,
``allowlist`` and ``profiling``; ``common`` holds the child processes, RSS polling and wrk, and
``report`` prints the table and judges the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.allowlist import allowlist
from bench.ceilings import client_costs, java_ceiling, kafka_ceiling
from bench.common import Load, load_average
from bench.ingress import load_server, load_traced, write_config
from bench.report import Check, report
from bench.soak import soak
from bench.spool import spool_rows
from bench.tagsync import tagsync
from gateway.config import KafkaConfig
from gateway.devkit.embedded_broker import API_VERSION, EmbeddedBroker
from gateway.devkit.kafka_cluster import DEFAULT_VERSION, KafkaCluster

TARGETS = (
    "bare",
    "kafka",
    "java",
    "clients",
    "naive",
    "aiokafka",
    "ours",
    "traced",
    "spool",
    "soak",
    "tagsync",
    "allowlist",
)
# measured alternately, round after round, with --rounds N (ratios of one round's neighbours)
ROUNDS = ("ours", "aiokafka", "naive")
APACHE_ONLY = {"java"}
NEEDS_BROKER = set(TARGETS) - {"allowlist"}  # every row but the allowlist lookups
# one real node, full JIT (the tests' C1-only start is quicker, not faster), a larger heap
APACHE_HEAP_MB = 1024


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "--kafka",
        choices=("mock", "apache"),
        default="mock",
        help="the broker every row runs against: the embedded mock (Python only), or one real "
        "Apache Kafka node (Java 17+ and Maven; adds the Java client's ceiling)",
    )
    p.add_argument(
        "--kafka-version",
        default=DEFAULT_VERSION,
        help="Apache Kafka release for --kafka apache",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per target")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn worker processes for every HTTP target (bare, naive, ours) alike",
    )
    p.add_argument(
        "--soak",
        type=float,
        default=0.0,
        help="seconds of our gateway at half its maximum rate (300 for the target)",
    )
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run ours, aiokafka and naive alternately this many times; each ratio is then "
        "the median of the rounds' ratios, with its range",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy our gateway under load; raw stacks to bench-results/",
    )
    p.add_argument(
        "--kafka-window",
        type=int,
        default=1000,
        help="records outstanding at most in the Kafka ceiling",
    )
    p.add_argument("--tagsync-events", type=int, default=30_000)
    p.add_argument("--tagsync-users", type=int, default=5_000)
    p.add_argument(
        "--tagsync-app-rate",
        type=float,
        default=1000.0,
        help="requests/s per app, worker and fake (OneSignal allows 1,000)",
    )
    p.add_argument("--tagsync-timeout", type=float, default=180.0)
    p.add_argument("--tagsync-order", choices=("interleaved", "grouped"), default="interleaved")
    p.add_argument(
        "--tagsync-batch-size",
        type=int,
        default=KafkaConfig().batch_size,
        help="producer batch size of the backlog (default: the gateway's kafka.batch_size; "
        "16384 is kafka-python's default)",
    )
    p.add_argument("--spool-records", type=int, default=20_000, help="spool: records to drain")
    p.add_argument("--spool-keys", type=int, default=1000, help="spool: users among them")
    p.add_argument("--allowlist-lookups", type=int, default=50_000)
    p.add_argument("--allowlist-rounds", type=int, default=11)
    return p


def _select_targets(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The rows to run, in TARGETS' order: ``--only``'s, or all but the soak unless asked."""
    only = {t.strip() for t in args.only.split(",") if t.strip()}
    unknown = only - set(TARGETS)
    if unknown:
        p.error(f"--only: unknown target(s) {', '.join(sorted(unknown))}; one of {TARGETS}")
    if args.kafka == "mock" and only & APACHE_ONLY:
        p.error(f"--only {','.join(sorted(only & APACHE_ONLY))} needs --kafka apache")
    skipped = set() if args.kafka == "apache" else APACHE_ONLY
    targets = [
        t
        for t in TARGETS
        if t not in skipped and (t in only if only else t != "soak" or args.soak > 0)
    ]
    if "soak" in targets:
        args.soak = args.soak if args.soak > 0 else 300.0
        if "ours" not in targets:  # the soak's rate is half of ours' measured maximum
            targets.insert(targets.index("soak"), "ours")
    if shutil.which("wrk") is None and set(targets) & {"bare", "naive", "ours", "spool", "soak"}:
        p.error("wrk is not installed (Debian: apt-get install wrk)")
    return targets


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    args.targets = _select_targets(p, args)
    # kafka-python negotiates with Apache Kafka; the mock cannot decode newer ApiVersions
    args.api_version = "" if args.kafka == "apache" else API_VERSION
    return args


def start_broker(
    args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack
) -> tuple[str, KafkaCluster | None]:
    """The run's broker, stopped with ``stack``: its bootstrap servers, and the Apache node."""
    if not set(args.targets) & NEEDS_BROKER:
        return "", None
    if args.kafka == "mock":
        return stack.enter_context(EmbeddedBroker()).bootstrap_servers, None
    print(f"-- starting Apache Kafka {args.kafka_version} (1 node, full JIT)", flush=True)
    cluster = stack.enter_context(
        KafkaCluster(
            nodes=1,
            version=args.kafka_version,
            quick_jit=False,
            heap_mb=APACHE_HEAP_MB,
            base_dir=workdir / "kafka",
        )
    )
    return cluster.bootstrap_servers, cluster


@dataclass
class Run:
    """What every row needs: the flags, the work folder, the broker and the gateway's config."""

    args: argparse.Namespace
    workdir: Path
    load: Load
    config: Path
    bootstrap: str
    cluster: KafkaCluster | None


def run_target(target: str, run: Run, results: dict[str, Any]) -> None:
    """Measures one row into ``results``."""
    args, config, workdir = run.args, run.config, run.workdir
    if target in ("bare", "naive", "aiokafka", "ours"):
        r = load_server(target, config, workdir, run.load, args)
        results["loads"][target] = r
        results.setdefault("rounds", {}).setdefault(target, []).append(r)
        print(f"   {r.rps:.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms", flush=True)
    elif target == "traced":
        r = load_traced(run.bootstrap, workdir, run.load, args, args.api_version)
        results["loads"][target] = r
        print(
            f"   {r.rps:.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, "
            f"{r.notes['otlp_exports']} OTLP exports ({r.notes['otlp_bytes']} B)",
            flush=True,
        )
    elif target in ("kafka", "java"):
        if target == "kafka":
            r = kafka_ceiling(config, args)
        else:
            assert run.cluster is not None
            r = java_ceiling(run.cluster, config, workdir, args)
        results["loads"][target] = r
        print(f"   {r.rps:.0f} records/s", flush=True)
    elif target == "clients":
        for name, r in client_costs(config, args).items():
            results["loads"][name] = r
            print(
                f"   {name}: {r.rps:.0f} records/s, {r.notes['cpu_us']['total']:.1f} us CPU "
                "per record",
                flush=True,
            )
    elif target == "soak":
        ours = results["loads"].get("ours")
        if ours is None:
            raise RuntimeError("soak needs the 'ours' run for its maximum rate")
        results["soak"] = soak(config, workdir, run.load, args, ours.rps)
    elif target == "spool":
        results["spool"] = spool_rows(config, workdir, run.load, args)
    elif target == "tagsync":
        results["tagsync"] = tagsync(run.bootstrap, workdir, args)
    elif target == "allowlist":
        results["allowlist"] = allowlist(args)


def schedule(targets: Sequence[str], rounds: int) -> list[tuple[str, int]]:
    """(target, round) in run order: the ROUNDS rows alternate, A B A B, where the first of
    them stands; round 0 means a single run."""
    rivals = [t for t in targets if t in ROUNDS]
    out: list[tuple[str, int]] = []
    for t in targets:
        if t in rivals and rounds > 1:
            if t == rivals[0]:
                out += [(r, n) for n in range(1, rounds + 1) for r in rivals]
        else:
            out.append((t, 0))
    return out


def pick_medians(results: dict[str, Any]) -> None:
    """Each alternated row's table figure is its median round by requests/s."""
    for target, runs in results.get("rounds", {}).items():
        if len(runs) > 1:
            ordered = sorted(runs, key=lambda r: r.rps)
            results["loads"][target] = ordered[len(ordered) // 2]


def write_json(path: Path, results: dict[str, Any], checks: list[Check]) -> None:
    out = dict(
        results,
        loads={k: asdict(v) for k, v in results["loads"].items()},
        rounds={k: [asdict(r) for r in v] for k, v in results.get("rounds", {}).items()},
        checks=[{"check": c, "pass": ok} for c, ok in checks],
    )
    path.write_bytes(
        orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY, default=str)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {"loads": {}, "started": datetime.now(UTC).isoformat()}
    results["load"] = load_average()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp, contextlib.ExitStack() as st:
        workdir = Path(tmp)
        load = Load(workdir)
        results["body_bytes"] = load.body_bytes
        results["kafka"] = (
            "embedded mock" if args.kafka == "mock" else f"Apache Kafka {args.kafka_version}"
        )
        bootstrap, cluster = start_broker(args, workdir, st)
        config = write_config(workdir, bootstrap or "127.0.0.1:9", args.workers, args.api_version)
        run = Run(args, workdir, load, config, bootstrap, cluster)
        for target, round_no in schedule(args.targets, args.rounds):
            print(f"-- {target}" + (f" (round {round_no})" if round_no else ""), flush=True)
            try:
                run_target(target, run, results)
            except Exception as exc:  # one broken target must not lose the others' figures
                print(f"   {target} failed: {exc}", flush=True)
                results.setdefault("errors", {})[target] = str(exc)
        pick_medians(results)
        checks = report(results, args)
    if args.json:
        write_json(args.json, results, checks)
    failed = any(ok is False for _, ok in checks) or "errors" in results
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""``--soak``: our gateway at half its measured maximum for a while; is its RSS flat?"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from bench.common import Load, RssSampler, read_status_kb
from bench.ingress import gateway_outcomes, server


def soak(
    config: Path, workdir: Path, load: Load, args: argparse.Namespace, max_rps: float
) -> dict[str, Any]:
    """Our gateway at half its measured maximum for ``--soak`` seconds; is RSS flat?

    wrk2 is not available, so the rate is set by a per-connection delay (a closed loop:
    rate = connections / (delay + latency)), calibrated once on a short run.
    """
    target = max_rps / 2
    conns = max(2, min(64, round(target * 0.02)))  # ~20 ms per request cycle and connection
    delay = max(1, round(conns * 1000 / target - 1.5))
    with server("ours", config, workdir) as srv:
        cal = load.run(srv.url, 3, conns, delay_ms=delay)
        latency_ms = max(0.0, conns * 1000 / max(cal["rps"], 1.0) - delay)
        delay = max(1, round(conns * 1000 / target - latency_ms))
        warm = min(30.0, max(5.0, args.soak / 10))
        load.run(srv.url, warm, conns, delay_ms=delay)
        after_warmup_kb = read_status_kb(srv.proc.pid, "VmRSS")
        with RssSampler(srv.proc.pid, interval_s=1.0) as rss:
            w = load.run(srv.url, args.soak, conns, delay_ms=delay)
        end_kb = read_status_kb(srv.proc.pid, "VmRSS")
        outcomes = gateway_outcomes(config)
    peak_kb = rss.peak_kb
    series = [round(kb / 1024, 1) for _, kb in rss.samples]
    return {
        "target_rps": round(target),
        "rps": w["rps"],
        "connections": conns,
        "delay_ms": delay,
        "p50_ms": w["p50_ms"],
        "p99_ms": w["p99_ms"],
        "non_2xx": w["non_2xx"],
        "socket_errors": w["socket_errors"],
        "rss_after_warmup_mb": after_warmup_kb / 1024,
        "rss_peak_mb": peak_kb / 1024,
        "rss_end_mb": end_kb / 1024,
        "growth": peak_kb / after_warmup_kb - 1 if after_warmup_kb else math.nan,
        "rss_series_mb": series[:: max(1, len(series) // 30)],
        "outcomes": outcomes,
    }

"""``--profile``: py-spy on our loaded gateway, and where its time goes."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, Load, cpu_seconds, stop_process

# The stages of one request, in its order. A sampled stack belongs to the stage of the frame
# nearest its leaf that names one (a json call inside normalize is normalize's time).
STAGES = (
    "HTTP parse",
    "checks",
    "normalize",
    "record build",
    "route glue",
    "hand-over",
    "Kafka client",
    "response",
    "event loop",
    "other",
)
_STAGE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("record build", re.compile(r"gateway/core/records\.py")),
    ("normalize", re.compile(r"gateway/core/(normalize/|body\.py|kinds\.py|event\.py)")),
    (
        "checks",
        re.compile(r"gateway/(core/(trust|dedupe)\.py|ingress/(checks|allowlist)\.py)|\(netaddr/"),
    ),
    ("hand-over", re.compile(r"gateway/kafka/(process|wire|sink|thread)\.py")),
    ("Kafka client", re.compile(r"\(kafka/")),
    (
        "response",
        re.compile(r"^(\w+\.)?(send|write|_send|flush) \(uvicorn/protocols/http/"),
    ),
    ("HTTP parse", re.compile(r"uvicorn/protocols/http/|httptools|h11/")),
    ("route glue", re.compile(r"gateway/ingress/(route|app|replies|state)\.py|\(starlette/")),
    ("event loop", re.compile(r"asyncio/|uvloop|selectors\.py|threading\.py|queue\.py")),
)


def stage_of(frames: list[str], producer_process: bool) -> str:
    """The stage a stack's time counts for (frames root first, as py-spy writes them)."""
    for frame in reversed(frames):
        for stage, rule in _STAGE_RULES:
            if rule.search(frame):
                if producer_process and stage in ("event loop", "other"):
                    return "Kafka client"
                return stage
    return "Kafka client" if producer_process else "other"


def profile(pid: int, url: str, load: Load, args: argparse.Namespace) -> dict[str, Any]:
    """py-spy on the loaded gateway (its own pass: sampling must not skew the measured one)."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy is not installed: .venv/bin/pip install py-spy"}
    RESULTS.mkdir(exist_ok=True)
    raw = RESULTS / "ours-profile.txt"
    duration = max(2, round(args.duration))
    cmd = [spy, "record", "-p", str(pid), "-r", "200", "-d", str(duration)]
    # --subprocesses: the producer process (kafka.producer = "process") is sampled too
    cmd += ["-f", "raw", "--threads", "--subprocesses", "--nonblocking", "-o", str(raw)]
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        cpu_before = cpu_seconds(pid)
        w = load.run(url, duration + 1, args.connections)
        cpu = cpu_seconds(pid) - cpu_before
        spy_proc.wait(30)
    finally:
        stop_process(spy_proc)
    if not raw.exists():
        out = spy_proc.stdout.read().decode() if spy_proc.stdout else ""
        return {"error": f"py-spy wrote nothing: {out[-500:]}"}
    summary = summarize(raw)
    # CPU per request by stage: the process tree's measured CPU time over the pass, shared
    # out by the stages' shares of the samples (py-spy samples running threads only)
    per_request_us = 1e6 * cpu / max(1, w["requests"])
    summary["cpu_us_per_request"] = round(per_request_us, 1)
    summary["stages_us"] = [
        (stage, share, round(per_request_us * share / 100.0, 1))
        for stage, share in summary["stages"]
    ]
    return {"file": str(raw.relative_to(ROOT)), "rps_while_sampled": w["rps"], **summary}


_LINE_NO = re.compile(r":\d+\)$")


def summarize(raw: Path, top: int = 20) -> dict[str, Any]:
    """Own (leaf) and inclusive time per function, and the share of each thread."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        procs = 0
        while procs < len(frames) - 1 and frames[procs].startswith("process "):
            procs += 1  # --subprocesses: a child's stack starts with its parents' labels
        in_producer = procs > 0 and "gateway.kafka.process" in frames[procs - 1]
        if procs:
            owner = "producer process" if in_producer else "gateway"
            frames = [f"{owner}: {frames[procs]}", *frames[procs + 1 :]]
        thread, frames = frames[0], [_LINE_NO.sub(")", f) for f in frames[1:]]
        total += count
        stages[stage_of(frames, in_producer)] += count
        threads[thread] += count
        if frames:
            own[frames[-1]] += count
            for f in set(frames):
                inclusive[f] += count
    share = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "threads": [(t, share(n)) for t, n in threads.most_common(6)],
        "stages": [(stage, share(stages[stage])) for stage in STAGES],
        "own": [(f, share(n)) for f, n in own.most_common(top)],
        "inclusive": [(f, share(n)) for f, n in inclusive.most_common(top)],
    }

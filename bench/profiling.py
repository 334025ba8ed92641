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

from bench.common import RESULTS, ROOT, Load, stop_process


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
        w = load.run(url, duration + 1, args.connections)
        spy_proc.wait(30)
    finally:
        stop_process(spy_proc)
    if not raw.exists():
        out = spy_proc.stdout.read().decode() if spy_proc.stdout else ""
        return {"error": f"py-spy wrote nothing: {out[-500:]}"}
    return {"file": str(raw.relative_to(ROOT)), "rps_while_sampled": w["rps"], **summarize(raw)}


_LINE_NO = re.compile(r":\d+\)$")


def summarize(raw: Path, top: int = 20) -> dict[str, Any]:
    """Own (leaf) and inclusive time per function, and the share of each thread."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
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
        if procs:
            owner = "producer process" if "kafka/process" in frames[procs - 1] else "gateway"
            frames = [f"{owner}: {frames[procs]}", *frames[procs + 1 :]]
        thread, frames = frames[0], [_LINE_NO.sub(")", f) for f in frames[1:]]
        total += count
        threads[thread] += count
        if frames:
            own[frames[-1]] += count
            for f in set(frames):
                inclusive[f] += count
    share = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "threads": [(t, share(n)) for t, n in threads.most_common(6)],
        "own": [(f, share(n)) for f, n in own.most_common(top)],
        "inclusive": [(f, share(n)) for f, n in inclusive.most_common(top)],
    }

"""The README's first command: `gateway demo` must work end to end."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_end_to_end() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--events", "300", "--show", "1"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every documented kind was accepted, and the hostile senders were refused
    assert out.count(" 200  accepted") >= 26 + 2 + 5 + 1
    assert re.search(r"spoofed XFF.* 403 ", out) and re.search(r"wrong shared secret.* 403 ", out)
    assert re.search(r"1.1 MB body.* 413 ", out)
    burst = re.search(r"(\d+) requests/s, .* (\d+) acknowledged, (\d+) errors", out)
    assert burst and int(burst.group(2)) == 300 and int(burst.group(3)) == 0
    # the records were read back, and tag sync wrote the derived tags
    pushes = re.search(r"onesignal\.push\s+(\d+) records", out)
    assert pushes and int(pushes.group(1)) >= 300
    assert "user-42's tags now:" in out and "'email_bounced': '1'" in out
    assert "Done. Nothing in this demo left the machine." in out
    assert "demo-" not in out  # the run's secret is never printed


def test_the_demo_prints_a_dead_lettered_body_as_the_bytes_it_was() -> None:
    from gateway.devkit.demo import _json_or_bytes

    # invalid JSON is dead-lettered byte for byte now; printing it must not fail
    assert _json_or_bytes(b'{"event.kind": ') == b'{"event.kind": '
    assert _json_or_bytes(b'{"a": 1}') == {"a": 1}
    assert _json_or_bytes(b"") == b"" and _json_or_bytes(None) is None

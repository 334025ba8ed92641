"""One start-up path: every entry point registers the config's secrets before it logs.

Each case runs in a fresh interpreter, so no secret registered by another test can make it
pass: the entry point itself must register them (gateway/startup.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

KEY = "os_v2_app_7c1e55d2key0123456789abcdef"
STREAM = "stream-secret-4b1d0e9f11"

# the worker is replaced by one that logs what a failing update used to log: the key
_PROBE = """
import logging, sys
import gateway.tagsync.worker as worker
def fake_run(cfg, dry_run=False):
    logging.getLogger("gateway.tagsync.worker").error("update failed: Key %s", sys.argv[1])
    logging.getLogger("gateway.tagsync.worker").error("stream secret %s", sys.argv[2])
    return 0
worker.run_tag_sync = fake_run
entry = sys.argv[3]
if entry == "python -m gateway.tagsync":
    import gateway.tagsync.__main__ as m
    m.run_tag_sync = fake_run
    sys.exit(m.main(["--config", sys.argv[4]]))
from gateway import cli
sys.exit(cli.main(["tag-sync", "--config", sys.argv[4]]))
"""


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(
        """
[[sources]]
name = "event-stream"
path = "/v1/onesignal/events"
format = "event-stream"
secrets_env = "T_STREAM_SECRETS"

[[onesignal.apps]]
app_id = "5eb5a37e-b458-11e3-ac11-000c2940e62c"
api_key_env = "T_APP_KEY"

[[tag_sync.rules]]
kinds = ["message.push.clicked"]
tags = { last_push_click = "{occurred_unix}" }
"""
    )
    return path


@pytest.mark.parametrize("entry", ["python -m gateway.tagsync", "gateway tag-sync"])
def test_every_entry_point_scrubs_the_configs_secrets(tmp_path: Path, entry: str) -> None:
    env = {"T_APP_KEY": KEY, "T_STREAM_SECRETS": STREAM, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, KEY, STREAM, entry, str(_config(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines]  # the gateway's own JSON lines
    assert "update failed: Key ***" in messages, done.stderr
    assert "stream secret ***" in messages, done.stderr
    assert KEY not in done.stderr and STREAM not in done.stderr

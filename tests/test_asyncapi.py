"""The AsyncAPI document: generated from the config and the schemas, current, and valid.

Validity is decided by the AsyncAPI project's own parser (npm ``@asyncapi/parser``, the one its
CLI uses), installed by ``.ci/run`` into ``.ci/asyncapi``. CI sets ``GATEWAY_ASYNCAPI_PARSER``,
so there the parser must be present; on a machine without Node.js the parser tests skip with a
reason, and ``make asyncapi`` installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.kafka.topics import gateway_topics
from gateway.ops.asyncapi import asyncapi_document

ROOT = Path(__file__).resolve().parent.parent
PARSER = Path(os.environ.get("GATEWAY_ASYNCAPI_PARSER") or ROOT / ".ci" / "asyncapi")


def _generated() -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "schema",
            "asyncapi",
            "-c",
            "config/gateway.example.toml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
    )
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_docs_asyncapi_is_what_the_command_generates() -> None:
    committed = json.loads((ROOT / "docs" / "asyncapi.json").read_text())
    generated = _generated()
    # the version line names the package version, which changes on its own
    for doc in (committed, generated):
        doc["info"].pop("description")
    assert committed == generated, (
        "regenerate: gateway schema asyncapi -c config/gateway.example.toml > docs/asyncapi.json"
    )


@pytest.mark.parametrize("web_push", [False, True])
@pytest.mark.parametrize("unknown_channel_topic", ["", "os.other"])
def test_every_topic_the_ingress_writes_has_a_channel(
    unknown_channel_topic: str, web_push: bool
) -> None:
    kafka = {
        "topic": "os.{channel}.v1",
        "dead_letter_topic": "os.dlq",
        "unknown_channel_topic": unknown_channel_topic,
        "unauthenticated_topic": "os.open",
    }
    source = {"name": "wp", "path": "/wp", "format": "web-push", "cors_origins": ["*"]}
    cfg = parse_config({"kafka": kafka, "sources": [source] if web_push else []})
    doc = asyncapi_document(cfg)
    addresses = {c["address"] for c in doc["channels"].values()}
    # the one list of the ingress's topics, which topics create and /readyz use too
    assert addresses == set(gateway_topics(cfg, tag_sync=False))
    channels = ("push", "email", "sms", "iam", "live_activity", "journey")
    assert {f"os.{c}.v1" for c in channels} | {"os.dlq"} <= addresses
    assert ("os.open" in addresses) is web_push
    for cid, op in doc["operations"].items():
        assert op["action"] == "send"
        target = op["channel"]["$ref"].removeprefix("#/channels/")
        assert target in doc["channels"], cid


def _node() -> str:
    node = shutil.which("node")
    installed = (PARSER / "node_modules" / "@asyncapi" / "parser").is_dir()
    if node and installed:
        return node
    if os.environ.get("GATEWAY_ASYNCAPI_PARSER"):
        pytest.fail(f"GATEWAY_ASYNCAPI_PARSER={PARSER}, but node or the parser is missing there")
    pytest.skip("needs Node.js and the AsyncAPI parser: make asyncapi (CI installs it)")


def _validate(doc: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "asyncapi.json"
    path.write_text(json.dumps(doc))
    return subprocess.run(
        [_node(), str(PARSER / "validate.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_asyncapi_parser_accepts_the_document(tmp_path: Path) -> None:
    result = _validate(_generated(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid AsyncAPI 3.0.0: 8 channels, 8 operations" in result.stdout


def test_the_asyncapi_parser_refuses_a_broken_document(tmp_path: Path) -> None:
    doc = _generated()
    doc["operations"]["writePush"]["channel"] = {"$ref": "#/channels/nowhere"}
    result = _validate(doc, tmp_path)
    assert result.returncode == 1, result.stdout

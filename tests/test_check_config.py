"""``gateway check-config`` refuses the tag rules the worker refuses, with the same words.

Loading a config file does not compile its tag rules; the worker does, at start-up. So
check-config compiles them too, through the same function, and a rule the worker would
exit on (a reserved key, an unknown template field) makes check-config fail before any
network check, exit 2 like any other invalid config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import cli
from gateway.config import load_config
from gateway.ingress.server import free_port
from gateway.tagsync.worker import run_tag_sync

APP_ID = "5eb5a37e-b458-11e3-ac11-000c2940e62c"

BAD_RULES = {
    "reserved key": (
        'tags = { user = "{channel}" }',
        "tag_sync.rules[0].tags.user: 'user' is a key OneSignal reserves",
    ),
    "reserved key in any case": (
        'tags = { last = "1" }\ndelete = ["Message"]',
        "tag_sync.rules[0].delete[0]: 'Message' is a key OneSignal reserves",
    ),
    "unknown template field": (
        'tags = { last_clicked = "{nope}" }',
        "tag_sync.rules[0].tags.last_clicked: unknown field {nope}",
    ),
}


def _config_file(path: Path, rule: str) -> Path:
    # a bootstrap nobody listens on: the rules must be refused before Kafka is asked
    path.write_text(
        f"""
[kafka]
bootstrap_servers = "127.0.0.1:{free_port()}"

[onesignal]
api_url = "http://127.0.0.1:9"

[[onesignal.apps]]
app_id = "{APP_ID}"
api_key_env = "T_CHECK_CONFIG_KEY"

[tag_sync]

[[tag_sync.rules]]
kinds = ["message.push.clicked"]
{rule}
"""
    )
    return path


@pytest.mark.parametrize("case", sorted(BAD_RULES))
def test_check_config_refuses_the_rules_the_worker_refuses(
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("T_CHECK_CONFIG_KEY", "check-config-key-1")
    rule, problem = BAD_RULES[case]
    path = _config_file(tmp_path / "gw.toml", rule)
    capsys.readouterr()

    assert cli.main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "is valid" not in out, out
    assert problem in err, err

    # the worker, given the same file, exits on the same problem
    assert run_tag_sync(load_config(str(path))) == 2
    _, err = capsys.readouterr()
    assert problem in err, err


def test_check_config_accepts_valid_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("T_CHECK_CONFIG_KEY", "check-config-key-1")
    path = _config_file(tmp_path / "gw.toml", 'tags = { last_clicked = "{occurred_unix}" }')
    capsys.readouterr()
    assert cli.main(["check-config", "--config", str(path)]) == 1  # Kafka is not there
    out, err = capsys.readouterr()
    assert f"config: {path} is valid" in out, out
    assert "tag_sync.rules" not in out + err

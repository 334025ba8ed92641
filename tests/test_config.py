"""Config: every error names its key; the example file and the docs table show every key."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    AllowlistConfig,
    ConfigError,
    DedupeConfig,
    KafkaConfig,
    OneSignalConfig,
    Secret,
    ServerConfig,
    TagSyncConfig,
    TopicsConfig,
    load_config,
    parse_config,
    read_api_key,
)
from gateway.config._reference import declared_tables, reference_markdown
from gateway.config._schema import Table, declared_keys

EXAMPLE = Path(__file__).parent.parent / "config" / "gateway.example.toml"
REFERENCE = Path(__file__).parent.parent / "docs" / "configuration.md"
ENV = {
    "GATEWAY_EVENT_STREAM_SECRETS": "one-secret-value, two-secret-value",
    "GATEWAY_JOURNEY_SECRETS": "journey-secret-value",
    "ONESIGNAL_APP_API_KEY": "os_v2_app_key_value",
}


def test_example_config_loads_and_matches_the_defaults() -> None:
    cfg = load_config(EXAMPLE, env=ENV)
    assert cfg.server == ServerConfig()
    assert cfg.allowlist == AllowlistConfig()
    assert cfg.kafka == KafkaConfig()
    assert cfg.dedupe == DedupeConfig()
    assert cfg.topics == TopicsConfig()
    assert [s.name for s in cfg.sources] == ["event-stream", "journey", "web-push"]
    assert cfg.sources[0].secrets == (Secret("one-secret-value"), Secret("two-secret-value"))
    assert cfg.sources[2].require_secret is False and cfg.sources[2].require_allowlisted_ip is False
    assert cfg.onesignal.apps[0].api_key == Secret("os_v2_app_key_value")
    assert dataclasses.replace(cfg.tag_sync, rules=()) == TagSyncConfig()
    assert len(cfg.tag_sync.rules) == 2


def _example_tables(example: dict[str, Any], dotted: str) -> list[dict[str, Any]]:
    """The tables of the example at a dotted path, every entry of an array of tables."""
    found: list[Any] = [example]
    for part in dotted.split("."):
        found = [t[part] for t in found if part in t]
        found = [x for t in found for x in (t if isinstance(t, list) else [t])]
    return found


def _commented_keys(text: str, header: str) -> set[str]:
    """Keys shown as ``# key = ...`` in the blocks under a table header."""
    keys: set[str] = set()
    inside = False
    for line in text.splitlines():
        if line.startswith("["):
            inside = line.split("#")[0].strip() == header
        elif inside and (m := re.match(r"#\s*(\w+) = ", line)):
            keys.add(m.group(1))
    return keys


def _as_declared(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# Keys the example can only show commented out: setting them would change what it configures.
COMMENTED_ONLY = {  # the other of two keys that exclude each other is set
    "onesignal.apps": {"api_key_file"},
    "sources": {"secrets_file"},
}


def test_the_example_sets_every_declared_key_to_its_default() -> None:
    text = EXAMPLE.read_text()
    example = tomllib.loads(text)
    tables = list(declared_tables())
    for name, cls, repeated in tables:
        declared = {k.name: k for k in declared_keys(cls)}
        children = {n.rpartition(".")[2] for n, _, _ in tables if n.rpartition(".")[0] == name}
        found = _example_tables(example, name)
        written = {k for t in found for k in t if k not in children}
        assert written <= set(declared), f"[{name}] undeclared: {written - set(declared)}"
        if repeated:
            # instances: their values are examples, not defaults
            commented = COMMENTED_ONLY.get(name, set())
            assert commented <= _commented_keys(text, f"[[{name}]]"), name
            assert set(declared) - written == commented, f"[[{name}]] lacks some keys"
            continue
        (table,) = found
        assert written == set(declared), f"[{name}] lacks {set(declared) - written}"
        for key_name, k in declared.items():
            value = _as_declared(table[key_name])
            assert (type(value), value) == (type(k.default), k.default), f"{name}.{key_name}"


def test_the_docs_table_is_generated_from_the_declarations() -> None:
    # regenerate with: python -m gateway.config > docs/configuration.md
    assert REFERENCE.read_text() == reference_markdown()


def test_every_declared_default_is_a_value_its_key_accepts() -> None:
    for name, cls, _ in declared_tables():
        for k in declared_keys(cls):
            if not k.required:
                assert Table({}, name).read(k, k.default) == k.default, f"{name}.{k.name}"


@pytest.mark.parametrize(
    ("data", "env", "key"),
    [
        ({"server": {"port": "80"}}, {}, "server.port"),
        ({"server": {"trusted_proxies": ["10.0.0.0/33"]}}, {}, "server.trusted_proxies[0]"),
        ({"server": {"trusted_proxies": ["127.1"]}}, {}, "server.trusted_proxies[0]"),
        ({"server": {"proxy_header": "x-real-ip"}}, {}, "server.proxy_header"),
        ({"server": {"colour": "blue"}}, {}, "server.colour"),
        ({"kafka": {"topic": "onesignal.{kind}"}}, {}, "kafka.topic"),
        ({"kafka": {"topic": "bad topic/{channel}"}}, {}, "kafka.topic"),
        ({"kafka": {"api_version": "two"}}, {}, "kafka.api_version"),
        ({"kafka": {"delivery_timeout_ms": 1000}}, {}, "kafka.delivery_timeout_ms"),
        ({"kafka": {"content_mode": "batched"}}, {}, "kafka.content_mode"),
        ({"allowlist": {"extra_cidrs": ["nope"]}}, {}, "allowlist.extra_cidrs[0]"),
        ({"allowlist": {"refresh_url": ""}}, {}, "allowlist.refresh_url"),
        ({"allowlist": {"refresh_url": "gstatic.com/cloud.json"}}, {}, "allowlist.refresh_url"),
        ({"allowlist": {"refresh_interval_s": 30}}, {}, "allowlist.refresh_interval_s"),
        ({"allowlist": {"refresh_retry_s": 0}}, {}, "allowlist.refresh_retry_s"),
        ({"allowlist": {"refresh_timeout_s": 0}}, {}, "allowlist.refresh_timeout_s"),
        ({"sources": [{"name": "a", "path": "/a", "format": "sns"}]}, {}, "sources[0].format"),
        (
            {"sources": [{"name": "a", "path": "/a", "secrets_env": "X"}]},
            {},
            "sources[0].secrets_env",
        ),
        ({"sources": [{"name": "a", "path": "/a"}]}, {}, "sources[0].secrets_env"),
        (
            {"sources": [{"name": "a", "path": "/metrics", "secrets_env": "X"}]},
            {"X": "s"},
            "sources[0].path",
        ),
        (
            {
                "sources": [
                    {
                        "name": "a",
                        "path": "/a",
                        "secrets_env": "X",
                        "mapping": {"kind": "event.kind"},
                    }
                ]
            },
            {"X": "s"},
            "sources[0].mapping.kind",
        ),
        (
            {
                "sources": [
                    {"name": "a", "path": "/a", "secrets_env": "X", "mapping": {"colour": "/c"}}
                ]
            },
            {"X": "s"},
            "sources[0].mapping.colour",
        ),
        ({"tag_sync": {"rules": [{"kinds": []}]}}, {}, "tag_sync.rules[0].kinds"),
        ({"tag_sync": {"max_keys_per_request": 150}}, {}, "tag_sync.max_keys_per_request"),
        ({"onesignal": {"api_url": "api.onesignal.com"}}, {}, "onesignal.api_url"),
        (
            {"onesignal": {"apps": [{"app_id": "a", "api_key_env": "K", "api_key_file": "/k"}]}},
            {"K": "key-value"},
            "onesignal.apps[0].api_key_file",
        ),
        (
            {"onesignal": {"apps": [{"app_id": "a", "api_key_file": "/nonexistent/key"}]}},
            {},
            "onesignal.apps[0].api_key_file",
        ),
        ({"tag_sync": {"auth_retry_s": 0}}, {}, "tag_sync.auth_retry_s"),
        (
            {"tag_sync": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2001}},
            {},
            "tag_sync.heartbeat_interval_ms",
        ),
        (
            {"tag_sync": {"session_timeout_ms": 30000, "max_poll_interval_ms": 29999}},
            {},
            "tag_sync.max_poll_interval_ms",
        ),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


def test_secrets_never_print() -> None:
    cfg = parse_config(
        {"sources": [{"name": "a", "path": "/a", "secrets_env": "X"}]},
        env={"X": "hunter2-hunter2-hunter2"},
    )
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg.sources[0])
    assert cfg.sources[0].secrets[0].reveal() == "hunter2-hunter2-hunter2"


def _source(**keys: str) -> dict[str, object]:
    return {"sources": [{"name": "a", "path": "/a", **keys}]}


def test_a_secret_shorter_than_16_characters_is_refused_naming_the_variable() -> None:
    long_one = "x" * 16
    for value, position in ((f"{long_one},short-secret", 2), ("fifteen-chars-x", 1)):
        with pytest.raises(ConfigError) as raised:
            parse_config(_source(secrets_env="ES_SECRETS"), env={"ES_SECRETS": value})
        message = str(raised.value)
        assert "sources[0].secrets_env" in message and "$ES_SECRETS" in message, message
        assert f"comma-separated value {position} is shorter than 16" in message, message
        assert "short-secret" not in message and "fifteen" not in message
    cfg = parse_config(_source(secrets_env="S"), env={"S": f" {long_one} , {long_one}y ,"})
    assert [s.reveal() for s in cfg.sources[0].secrets] == [long_one, long_one + "y"]


def test_secrets_file_one_per_line_keeps_commas_and_excludes_secrets_env(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text("first,secret-with-a-comma\n\n  second-secret-value-0  \n")
    cfg = parse_config(_source(secrets_file=str(path)), env={})
    assert [s.reveal() for s in cfg.sources[0].secrets] == [
        "first,secret-with-a-comma",
        "second-secret-value-0",
    ]
    with pytest.raises(ConfigError, match="not both"):
        parse_config(_source(secrets_file=str(path), secrets_env="S"), env={"S": "y" * 20})
    path.write_text("long-enough-secret-1\ntoo-short\n")
    with pytest.raises(ConfigError, match=r"secrets_file: .*secrets: secret at line 2 is shorter"):
        parse_config(_source(secrets_file=str(path)), env={})
    path.write_text("\n")
    with pytest.raises(ConfigError, match="holds no secret"):
        parse_config(_source(secrets_file=str(path)), env={})
    with pytest.raises(ConfigError, match="cannot read"):
        parse_config(_source(secrets_file=str(tmp_path / "absent")), env={})


def test_load_config_reports_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_an_empty_file_gives_the_dataclass_defaults() -> None:
    # an absent key reads as its field's default, converted as a written one would be
    cfg = parse_config({}, env={})
    assert cfg.server == ServerConfig()
    assert cfg.allowlist == AllowlistConfig()
    assert cfg.kafka == KafkaConfig()
    assert cfg.dedupe == DedupeConfig()
    assert cfg.topics == TopicsConfig()
    assert cfg.onesignal == OneSignalConfig()
    assert cfg.tag_sync == TagSyncConfig()


def test_allowlist_refresh_is_on_by_default_and_one_key_turns_it_off() -> None:
    on = parse_config({}, env={}).allowlist
    assert on.refresh_url == "https://www.gstatic.com/ipranges/cloud.json"
    assert on.refresh_interval_s == 86400.0 and on.refresh_retry_s <= on.refresh_interval_s
    off = parse_config({"allowlist": {"refresh_interval_s": 0}}, env={}).allowlist
    assert off.refresh_interval_s == 0
    # off, the URL may be empty too
    empty = parse_config({"allowlist": {"refresh_interval_s": 0, "refresh_url": ""}}, env={})
    assert empty.allowlist.refresh_url == ""


def test_an_api_key_file_is_read_at_start_and_again_when_asked(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("first-key-value\n")
    cfg = parse_config(
        {"onesignal": {"apps": [{"app_id": "a", "api_key_file": str(key_file)}]}}, env={}
    )
    app = cfg.onesignal.apps[0]
    assert app.api_key == Secret("first-key-value")  # stripped of the newline
    assert app.api_key_source == f"file {key_file}" and "first" not in repr(app)
    key_file.write_text("rotated-key-value")
    assert read_api_key(app) == Secret("rotated-key-value")
    key_file.write_text("  \n")
    assert read_api_key(app) is None  # empty: the caller keeps the key it has
    key_file.unlink()
    with pytest.raises(OSError):
        read_api_key(app)
    env_app = dataclasses.replace(app, api_key_file="", api_key_env="K")
    assert read_api_key(env_app, {"K": " env-key-value "}) == Secret("env-key-value")
    assert read_api_key(env_app, {}) is None

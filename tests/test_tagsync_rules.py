"""The tag rules language: compile-time validation and per-event derivation (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import ConfigError, TagRule, parse_config
from gateway.core.event import NormalizedEvent, Received
from gateway.tagsync.rules import (
    RESERVED_TAG_KEYS,
    compile_rules,
    derive,
    event_order,
    resolve_alias,
)


def event(**over: Any) -> dict[str, Any]:
    ev = NormalizedEvent(
        id="ev-1",
        kind=over.pop("kind", "message.push.clicked"),
        channel=over.pop("channel", "push"),
        action=over.pop("action", "clicked"),
        app_id=over.pop("app_id", "app-1"),
        occurred_at=over.pop("occurred_at", datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)),
        user=over.pop("user", {"onesignal_id": "os-1", "external_id": "ext-1"}),
        subscription=over.pop("subscription", {"id": "sub-1", "device_type": "iOSPush"}),
        message=over.pop("message", {"id": "msg-1", "title": "Hello"}),
        data=over.pop("data", {}),
    )
    received = Received("es", datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC), "10.0.0.1")
    value = ev.to_value(received)
    value.update(over)
    return value


def rules(*specs: dict[str, Any]) -> Any:
    return compile_rules([TagRule(**spec) for spec in specs])


def test_templates_reach_event_fields() -> None:
    compiled = rules(
        {
            "kinds": ("message.push.clicked",),
            "tags": {
                "at": "{occurred_unix}",
                "ch": "{channel}",
                "what": "{kind}/{action}",
                "msg": "{message.id}:{message.title}",
                "who": "{user.external_id}",
                "dev": "{subscription.device_type}",
                "rcv": "{received_unix}",
                "iso": "{occurred_at}",
                "lit": "x{{y}}",
            },
        }
    )
    d = derive(compiled, event())
    occurred = int(datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp())
    assert d.tags == {
        "at": str(occurred),
        "ch": "push",
        "what": "message.push.clicked/clicked",
        "msg": "msg-1:Hello",
        "who": "ext-1",
        "dev": "iOSPush",
        "rcv": str(occurred + 5),
        "iso": "2024-05-01T12:00:00Z",
        "lit": "x{y}",
    }
    assert d.skipped == ()


def test_occurred_unix_falls_back_to_received_at() -> None:
    compiled = rules({"kinds": ("*",), "tags": {"at": "{occurred_unix}"}})
    d = derive(compiled, event(occurred_at=None))
    assert d.tags["at"] == str(int(datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC).timestamp()))


def test_missing_field_skips_only_that_tag_and_reports_it() -> None:
    compiled = rules(
        {"kinds": ("message.*",), "tags": {"reason": "{data.failure_reason}", "ch": "{channel}"}}
    )
    d = derive(compiled, event())
    assert d.tags == {"ch": "push"}
    assert [(s.rule_key, s.field) for s in d.skipped] == [
        ("tag_sync.rules[0].tags.reason", "data.failure_reason")
    ]
    d2 = derive(compiled, event(data={"failure_reason": "bounced"}))
    assert d2.tags == {"ch": "push", "reason": "bounced"}


def test_values_are_strings_and_objects_are_missing() -> None:
    compiled = rules({"kinds": ("*",), "tags": {"n": "{data.n}", "b": "{data.b}", "o": "{data.o}"}})
    d = derive(compiled, event(data={"n": 3.0, "b": True, "o": {"x": 1}}))
    assert d.tags == {"n": "3", "b": "true"}
    assert all(isinstance(v, str) for v in d.tags.values())


def test_globs_filters_deletes_and_later_rule_wins() -> None:
    compiled = rules(
        {"kinds": ("message.*.clicked",), "tags": {"k": "first", "gone": "set"}},
        {"kinds": ("message.push.*",), "channels": ("push",), "delete": ("gone",)},
        {"kinds": ("message.push.clicked",), "apps": ("other-app",), "tags": {"k": "never"}},
    )
    assert derive(compiled, event()).tags == {"k": "first", "gone": None}
    email = event(kind="message.email.clicked", channel="email")
    assert derive(compiled, email).tags == {"k": "first", "gone": "set"}
    assert derive(compiled, event(kind="message.push.sent", action="sent")).tags == {"gone": None}
    nothing = derive(compiled, event(kind="message.sms.failed"))
    assert nothing.tags == {} and nothing.matched == 0


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"kinds": ("*",), "tags": {"user": "x"}}, "tag_sync.rules[0].tags.user"),
        ({"kinds": ("*",), "tags": {"Journey": "x"}}, "tag_sync.rules[0].tags.Journey"),
        ({"kinds": ("*",), "tags": {"x": "{nope}"}}, "tag_sync.rules[0].tags.x"),
        ({"kinds": ("*",), "tags": {"x": "{message}"}}, "tag_sync.rules[0].tags.x"),
        ({"kinds": ("*",), "tags": {"x": "{channel!r}"}}, "tag_sync.rules[0].tags.x"),
        ({"kinds": ("*",), "tags": {"x": "{channel:>5}"}}, "tag_sync.rules[0].tags.x"),
        ({"kinds": ("*",), "tags": {"x": "{unclosed"}}, "tag_sync.rules[0].tags.x"),
        ({"kinds": ("*",), "tags": {"x": "{a..b}"}}, "tag_sync.rules[0].tags.x"),
        ({"kinds": ("*",), "delete": ("template",)}, "tag_sync.rules[0].delete[0]"),
        ({"kinds": ("*",), "tags": {"x": "1"}, "delete": ("x",)}, "tag_sync.rules[0].delete[0]"),
        ({"kinds": ("",), "tags": {"x": "1"}}, "tag_sync.rules[0].kinds[0]"),
    ],
)
def test_invalid_rules_name_the_key(spec: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_rules([TagRule(kinds=("message.*",), tags={"ok": "1"}), TagRule(**spec)])
    assert info.value.key == key.replace("rules[0]", "rules[1]")


def test_rules_from_toml_config() -> None:
    cfg = parse_config(
        {
            "tag_sync": {
                "rules": [
                    {
                        "kinds": ["message.push.clicked", "message.email.clicked"],
                        "tags": {"last_clicked_at": "{occurred_unix}", "ch": "{channel}"},
                    },
                    {"kinds": ["message.email.bounced"], "tags": {"email_bounced": "1"}},
                ]
            }
        },
        env={},
    )
    compiled = compile_rules(cfg.tag_sync.rules)
    bounced = event(kind="message.email.bounced", channel="email", action="bounced")
    assert derive(compiled, bounced).tags == {"email_bounced": "1"}


def test_alias_prefers_configured_label_and_falls_back() -> None:
    ev = event()
    a = resolve_alias(ev, "external_id")
    assert a is not None and (a.app_id, a.label, a.id) == ("app-1", "external_id", "ext-1")
    b = resolve_alias(ev, "onesignal_id")
    assert b is not None and (b.label, b.id) == ("onesignal_id", "os-1")
    only_os = resolve_alias(event(user={"onesignal_id": "os-9"}), "external_id")
    assert only_os is not None and (only_os.label, only_os.id) == ("onesignal_id", "os-9")
    only_ext = resolve_alias(event(user={"external_id": "e-9"}), "onesignal_id")
    assert only_ext is not None and (only_ext.label, only_ext.id) == ("external_id", "e-9")
    assert resolve_alias(event(user={}), "external_id") is None
    assert resolve_alias(event(user={"external_id": ""}), "external_id") is None
    assert resolve_alias(event(app_id=None), "external_id") is None


def test_event_order_uses_occurred_then_received() -> None:
    assert event_order(event()) < event_order(
        event(occurred_at=datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC))
    )
    assert (
        event_order(event(occurred_at=None))
        == datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC).timestamp()
    )


_keys = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)


@given(
    data=st.dictionaries(_keys, st.one_of(_scalars, st.lists(st.integers(), max_size=2))),
    template_keys=st.lists(_keys, min_size=1, max_size=4),
)
def test_derived_values_are_strings_or_skipped(
    data: dict[str, Any], template_keys: list[str]
) -> None:
    """Whatever the event holds, a tag is a string, or skipped with the missing field named."""
    tags = {f"t{i}": f"<{{data.{k}}}>" for i, k in enumerate(template_keys)}
    compiled = rules({"kinds": ("*",), "tags": tags})
    d = derive(compiled, event(data=data))
    for i, k in enumerate(template_keys):
        name = f"t{i}"
        value = data.get(k)
        if value is None or isinstance(value, list):
            assert name not in d.tags
            assert any(s.rule_key.endswith(f".{name}") for s in d.skipped)
        else:
            assert isinstance(d.tags[name], str)
            assert d.tags[name].startswith("<") and d.tags[name].endswith(">")


@given(st.sampled_from(sorted(RESERVED_TAG_KEYS)), st.booleans())
def test_reserved_keys_always_rejected(key: str, upper: bool) -> None:
    with pytest.raises(ConfigError):
        compile_rules([TagRule(kinds=("*",), tags={key.upper() if upper else key: "1"})])


def test_unauthenticated_events_are_ignored_unless_a_rule_accepts_them() -> None:
    compiled = rules(
        {"kinds": ("message.push.*",), "tags": {"strict": "1"}},
        {"kinds": ("message.push.clicked",), "tags": {"open": "1"}, "accept_unauthenticated": True},
    )
    verified = derive(compiled, event())
    assert verified.tags == {"strict": "1", "open": "1"} and verified.unauthenticated == 0
    anyone = derive(compiled, event(), authenticated=False)
    assert anyone.tags == {"open": "1"}
    assert (anyone.matched, anyone.unauthenticated) == (1, 1)
    only_strict = derive(compiled[:1], event(), authenticated=False)
    assert only_strict.tags == {} and (only_strict.matched, only_strict.unauthenticated) == (0, 1)


def test_the_unauthenticated_topic_is_consumed_only_when_a_rule_accepts_its_events() -> None:
    def topics(accept: bool, **kafka: Any) -> tuple[str, ...]:
        cfg = parse_config(
            {
                "kafka": {"topic": "os.{channel}", **kafka},
                "tag_sync": {
                    "rules": [
                        {"kinds": ["*"], "tags": {"a": "1"}, "accept_unauthenticated": accept}
                    ]
                },
            },
            env={},
        )
        return cfg.tag_sync.resolved_topics(cfg.kafka.topic, cfg.kafka.unauthenticated_topic)

    assert "onesignal.unauthenticated" not in topics(False)
    assert topics(True)[-1] == "onesignal.unauthenticated"
    assert "os.push" in topics(True)
    assert "" not in topics(True, unauthenticated_topic="")


def test_the_journey_topic_is_consumed_only_when_a_rule_asks_for_journey_events() -> None:
    def topics(rule: dict[str, Any]) -> tuple[str, ...]:
        cfg = parse_config(
            {"kafka": {"topic": "os.{channel}"}, "tag_sync": {"rules": [rule]}}, env={}
        )
        return cfg.tag_sync.resolved_topics(cfg.kafka.topic, cfg.kafka.unauthenticated_topic)

    catch_all = topics({"kinds": ["*"], "tags": {"a": "1"}})
    assert "os.journey" not in catch_all and "os.push" in catch_all  # message events only
    assert "os.journey" in topics({"kinds": ["journey.webhook*"], "tags": {"step": "1"}})
    by_channel = topics({"kinds": ["*"], "channels": ["journey"], "tags": {"a": "1"}})
    assert by_channel.count("os.journey") == 1 and "os.email" in by_channel

"""Replay's pure steps: a dead letter renormalized, and requeued with what the ingress kept."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from gateway.config import parse_config
from gateway.core.event import Received
from gateway.core.ingest import DeadLetter, ingest
from gateway.core.records import header
from gateway.ingress.sources import ingest_source
from gateway.ops.replay import ReplayError, _requeued, renormalize

from .ingress_helpers import EU_WEST4, SECRET


def _config(**kafka: Any) -> Any:
    data: dict[str, Any] = {
        "sources": [
            {
                "name": "event-stream",
                "path": "/e",
                "format": "event-stream",
                "secrets_env": "S",
                "id_header": "X-Event-Id",
            }
        ],
        "kafka": kafka,
    }
    return parse_config(data, env={"S": SECRET})


def _dead_letter(cfg: Any, body: bytes, content_type: str, **request: Any) -> DeadLetter:
    """What the ingress decides for ``body`` on the config's first source: a dead letter."""
    source = cfg.sources[0]
    received = Received(source.name, datetime(2026, 1, 1, tzinfo=UTC), EU_WEST4)
    decision = ingest(
        body,
        ingest_source(cfg, source),
        received,
        content_type=content_type,
        fresh_id=lambda: "fresh",
        **request,
    )
    assert isinstance(decision, DeadLetter), decision
    return decision


def test_a_requeued_dead_letter_keeps_the_senders_id_for_the_next_replay() -> None:
    """The id came in a header, which only the dead letter keeps (``dlq_event_id``): a requeue
    that dropped it would give the event a made-up id on the replay after the next fix."""
    cfg = _config()
    body = orjson.dumps({"event": {"kind": "message.whatsapp.sent"}})  # no id in the body
    decision = _dead_letter(cfg, body, "application/json", header_id="sender-id-1")
    assert decision.reason == "unknown-channel"
    letter = decision.record
    assert header(letter.headers, "dlq_event_id") == "sender-id-1"
    # the first replay still fails (no topic for the channel yet): requeued
    with pytest.raises(ReplayError) as failed:
        renormalize(cfg, letter.headers, letter.value, place="dlq/0/7")
    again = _requeued(
        letter.topic, letter.headers, letter.value, letter.key, failed.value, "dlq/0/7"
    )
    assert header(again.headers, "dlq_requeued_from") == "dlq/0/7"
    assert header(again.headers, "dlq_event_id") == "sender-id-1"
    assert header(again.headers, "dlq_received_at") == header(letter.headers, "dlq_received_at")
    # after the fix, the requeued letter replays under the sender's id, not a made-up one
    fixed = _config(unknown_channel_topic="onesignal.other")
    record = renormalize(fixed, again.headers, again.value, place="dlq/0/9")
    assert record.topic == "onesignal.other"
    assert header(record.headers, "ce_id") == "sender-id-1"


def test_a_requeued_dead_letter_without_a_sender_id_gets_none() -> None:
    cfg = _config()
    body = orjson.dumps({"event": {"kind": "message.whatsapp.sent", "id": "e-1"}})
    decision = _dead_letter(cfg, body, "application/json")
    failure = ReplayError("unknown-channel", "still no topic")
    letter = decision.record
    again = _requeued(letter.topic, letter.headers, letter.value, letter.key, failure, "d/0/1")
    assert header(again.headers, "dlq_event_id") is None
    assert header(again.headers, "dlq_reason") == "unknown-channel"


def _journey(max_request_size: int) -> Any:
    data: dict[str, Any] = {
        "sources": [{"name": "journey", "path": "/j", "format": "journey", "secrets_env": "S"}],
        "server": {"max_body_bytes": 4096},
        "kafka": {"max_request_size": max_request_size},
    }
    return parse_config(data, env={"S": SECRET})


def test_a_journey_text_body_keeps_its_url_user_through_a_dead_letter_and_its_replay() -> None:
    """A plain-text Journey body names its user only in the URL or headers, which nothing
    keeps but the dead letter: dead-lettered (too large once normalized), then replayed
    after the limit is raised, the event still belongs to that user."""
    small = _journey(8192)
    user = {"external_id": "user-7", "onesignal_id": "os-7"}
    decision = _dead_letter(small, ("x" * 4000).encode(), "text/plain", user=user)
    assert decision.reason == "record-too-large"
    letter = decision.record
    assert header(letter.headers, "dlq_user_external_id") == "user-7"
    assert header(letter.headers, "dlq_user_onesignal_id") == "os-7"
    failure = ReplayError("record-too-large", "still too large")
    again = _requeued(letter.topic, letter.headers, letter.value, letter.key, failure, "d/0/3")
    assert header(again.headers, "dlq_user_external_id") == "user-7"
    record = renormalize(_journey(1_048_576), again.headers, again.value, place="d/0/4")
    event = orjson.loads(record.value)
    assert event["user"]["external_id"] == "user-7" and event["user"]["onesignal_id"] == "os-7"
    assert event["data"]["text"] == "x" * 4000

"""Secrets never reach logs, metrics or error bodies."""

from __future__ import annotations

import io
import logging
import uuid

import httpx
import pytest

import gateway.logs
from gateway.devkit import samples
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.logs import JsonFormatter, register_secrets

from .conftest import unique
from .ingress_helpers import (
    ROTATED,
    SECRET,
    gateway_config,
    operator_url,
    post,
    running_gateway,
    scrape,
)


def test_formatter_scrubs_registered_secrets_everywhere() -> None:
    register_secrets(["a-very-secret-value"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.scrub")
    log.addHandler(handler)
    try:
        log.warning(
            "value=%s", "a-very-secret-value", extra={"nested": {"k": ["a-very-secret-value"]}}
        )
        try:
            raise RuntimeError("boom a-very-secret-value")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert "a-very-secret-value" not in out
    assert out.count("***") >= 4


def test_secrets_of_every_length_are_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    # shared secrets are at least 16 characters (the config refuses shorter ones), but an API
    # key or a SASL password may be short: it was ignored below 4 characters
    monkeypatch.setattr(gateway.logs, "_secrets", gateway.logs._secrets)  # restored after
    register_secrets(["Q~z", "~"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.scrub.short")
    log.addHandler(handler)
    try:
        log.warning("key=Q~z and a tilde ~", extra={"k": "Q~z"})
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert "Q~z" not in out and "~" not in out, out
    assert out.count("***") == 3, out


def test_secrets_absent_from_server_logs_metrics_and_errors(broker: EmbeddedBroker) -> None:
    register_secrets([SECRET, ROTATED])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        config = gateway_config(broker.bootstrap_servers, unique("logs"))
        with running_gateway(config) as (url, _), httpx.Client(base_url=url) as client:
            texts = []
            payload = samples.event_stream_payload("message.push.sent", event_id=str(uuid.uuid4()))
            for value in (SECRET[:-1], SECRET + "0", f"Bearer {ROTATED[:-2]}"):
                r = post(
                    client,
                    "/v1/onesignal/events",
                    payload,
                    secret=None,
                    headers=[("authorization", value)],
                )
                assert r.status_code == 403
                texts.append(r.text)
            r = post(client, "/v1/onesignal/events", payload)
            assert r.status_code == 200
            texts.append(scrape(config))
            texts.append(httpx.get(f"{operator_url(config)}/openapi.json").text)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    texts.append(stream.getvalue())
    assert "refused" in stream.getvalue()  # the refusals were logged...
    for text in texts:
        assert SECRET not in text and ROTATED not in text  # ...without the secrets
        assert SECRET[:-1] not in text  # nor a near-miss someone sent


def test_kafka_pythons_missing_topic_retries_are_not_logged_ten_times_a_second(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info")
        cluster = logging.getLogger("kafka.cluster")
        for _ in range(20):
            cluster.error("Topic %s not found in cluster metadata", "onesignal.push")
        cluster.error("Topic %s is unauthorized", "onesignal.push")  # other errors still show
        out = capsys.readouterr().err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "not found in cluster metadata" not in out
    assert "onesignal.push is unauthorized" in out

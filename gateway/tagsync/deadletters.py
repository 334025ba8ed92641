"""Tag sync's dead letters: what could not be sent (or acted on), written to Kafka.

A dead letter completes its event like a sent update does, so its offset may be committed
only once Kafka acknowledged it: :func:`write_until_acknowledged` retries until it did.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Protocol

import orjson
from kafka import KafkaProducer

import gateway.tagsync.metrics as m
from gateway.core.records import KafkaRecord
from gateway.tagsync.client import Response, update_body, update_url
from gateway.tagsync.coalesce import SourceRef
from gateway.tagsync.ratelimit import backoff_delay
from gateway.tagsync.rules import Alias, TagValue

__all__ = [
    "MAX_DLT_BODY",
    "DeadLetterWriter",
    "KafkaDeadLetterWriter",
    "LogDeadLetterWriter",
    "record_dead_letter",
    "update_dead_letter",
    "write_until_acknowledged",
]

log = logging.getLogger("gateway.tagsync.worker")

MAX_DLT_BODY = 1000


class DeadLetterWriter(Protocol):
    """Blocking write of one dead-letter record; raises when it was not acknowledged."""

    def write(self, record: KafkaRecord) -> None: ...


class KafkaDeadLetterWriter:
    def __init__(self, producer: KafkaProducer, timeout_s: float = 10.0) -> None:
        self.producer = producer
        self.timeout_s = timeout_s

    def write(self, record: KafkaRecord) -> None:
        future = self.producer.send(
            record.topic, key=record.key, value=record.value, headers=record.headers
        )
        future.get(timeout=self.timeout_s)


class LogDeadLetterWriter:
    """Dry run: say what would be dead-lettered, write nothing."""

    def write(self, record: KafkaRecord) -> None:
        log.warning(
            "dry run: would dead-letter",
            extra={"topic": record.topic, "headers": {k: v.decode() for k, v in record.headers}},
        )


async def write_until_acknowledged(
    writer: DeadLetterWriter, record: KafkaRecord, reason: str, rng: random.Random
) -> None:
    """Until Kafka takes it: the offset is committed only after it did."""
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        try:
            await loop.run_in_executor(None, writer.write, record)
        except Exception as exc:
            delay = backoff_delay(attempt, 0.5, 30.0, rng)
            attempt += 1
            log.error(
                "dead-letter write failed; retrying",
                extra={"reason": reason, "error": repr(exc)[:300], "delay_s": delay},
            )
            await asyncio.sleep(delay)
            continue
        m.DEAD_LETTERED.labels(reason).inc()
        return


def _source_headers(sources: Sequence[SourceRef]) -> list[tuple[str, bytes]]:
    """dlq_source_topic / _partition / _offsets, once per source partition."""
    by_tp: dict[tuple[str, int], list[int]] = {}
    for s in sources:
        by_tp.setdefault((s.topic, s.partition), []).append(s.offset)
    headers: list[tuple[str, bytes]] = []
    for (topic, partition), offsets in sorted(by_tp.items()):
        headers.append(("dlq_source_topic", topic.encode()))
        headers.append(("dlq_source_partition", str(partition).encode()))
        headers.append(("dlq_source_offsets", ",".join(map(str, sorted(offsets))).encode()))
    return headers


def update_dead_letter(
    topic: str,
    api_url: str,
    alias: Alias,
    tags: Mapping[str, TagValue],
    *,
    reason: str,
    response: Response,
    attempts: int,
    sources: Sequence[SourceRef],
    delete_value: str,
) -> KafkaRecord:
    """A failed update: the request it was (never the key) as the value, the why in headers."""
    value = {
        "reason": reason,
        "method": "PATCH",
        "url": update_url(api_url, alias),
        "app_id": alias.app_id,
        "alias_label": alias.label,
        "alias_id": alias.id,
        "body": update_body(tags, delete_value),
        "status": response.status,
        "response": response.body[:MAX_DLT_BODY],
        "error": response.error,
        "attempts": attempts,
    }
    headers = [
        ("dlq_reason", reason.encode()),
        ("dlq_status", str(response.status or "").encode()),
        ("dlq_response", response.body[:MAX_DLT_BODY].encode()),
        ("dlq_error", response.error.encode()),
        ("dlq_attempts", str(attempts).encode()),
        ("dlq_app_id", alias.app_id.encode()),
        ("dlq_alias_label", alias.label.encode()),
        *_source_headers(sources),
        ("content-type", b"application/json"),
    ]
    return KafkaRecord(
        topic=topic, key=alias.id.encode(), value=orjson.dumps(value), headers=headers
    )


def record_dead_letter(
    topic: str,
    *,
    reason: str,
    detail: str,
    source: SourceRef,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
) -> KafkaRecord:
    """An event we cannot act on: the original record, with the why and where in headers."""
    out = [
        ("dlq_reason", reason.encode()),
        ("dlq_detail", detail[:MAX_DLT_BODY].encode()),
        *_source_headers([source]),
    ]
    out.extend((k, v or b"") for k, v in headers if not k.startswith("dlq_"))
    return KafkaRecord(topic=topic, key=key, value=value or b"", headers=out)

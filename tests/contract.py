"""Every record the suite makes is held to the published contract (gateway.core.schema).

:func:`check_record` validates one Kafka record: a CloudEvent in either content mode against
the strict schemas (so a field the code adds without describing it fails), a dead letter's
headers against theirs. :class:`TopicAudit` reads every topic of a broker and checks every
record, and conftest runs it on each broker the suite starts, before stopping it: records
produced inside a test or by a gateway subprocess are all checked, and the audit cannot be
skipped by a test.

Records that are not the ingress's (tag sync's own dead letters, raw test input that a test
writes to see it refused) are recognised by their headers and left out; :data:`NOT_OURS` is
the header a test sets on a record it forges on purpose.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import orjson
from kafka import KafkaConsumer, TopicPartition

from gateway.core.schema import (
    binary_headers_schema,
    dead_letter_headers_schema,
    event_schema,
    structured_schema,
)

__all__ = ["NOT_OURS", "RecordProblem", "TopicAudit", "check_record"]

# A test that writes a malformed CloudEvent on purpose (to see tag sync refuse it) marks it so.
NOT_OURS = ("test_forged", b"1")

_FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER
assert "date-time" in _FORMATS.checkers, "install rfc3339-validator: date-times go unchecked"


def _validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=_FORMATS)


_EVENT = _validator(event_schema(strict=True))
_BINARY = _validator(binary_headers_schema(strict=True))
_STRUCTURED = _validator(structured_schema(strict=True))
_DEAD_LETTER = _validator(dead_letter_headers_schema(strict=True))


@dataclass
class RecordProblem:
    topic: str
    partition: int
    offset: int
    errors: list[str]

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}: " + "; ".join(self.errors)


def _errors(validator: jsonschema.protocols.Validator, instance: Any, what: str) -> list[str]:
    return [
        f"{what} {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:200]}"
        for e in validator.iter_errors(instance)
    ]


def check_record(
    headers: Sequence[tuple[str, bytes | None]], value: bytes | None
) -> list[str] | None:
    """What is wrong with one record (``[]``: nothing), or None when it is not the ingress's."""
    names = {k for k, _ in headers}
    if NOT_OURS in headers:
        return None
    text = {k: (v or b"").decode("utf-8", "replace") for k, v in headers}
    if "ce_specversion" in names:
        # tag sync dead-letters a record as it was, with its own dlq_* headers added
        ce = {k: v for k, v in text.items() if not k.startswith("dlq_")}
        problems = _errors(_BINARY, ce, "header")
        try:
            data = orjson.loads(value or b"")
        except orjson.JSONDecodeError as exc:
            return [*problems, f"value is not JSON: {exc}"]
        return problems + _errors(_EVENT, data, "value")
    if "dlq_reason" in names and "dlq_source" in names:
        # the request's body as it came: its content-type is the request's, whatever it says
        return _errors(_DEAD_LETTER, text, "header")
    if text.get("content-type", "").startswith("application/cloudevents+json"):
        try:
            body = orjson.loads(value or b"")
        except orjson.JSONDecodeError as exc:
            return [f"structured value is not JSON: {exc}"]
        return _errors(_STRUCTURED, body, "value")
    return None  # tag sync's dead letters, and what tests write by hand


@dataclass
class TopicAudit:
    """Reads every record of every topic on a broker and checks the ingress's ones."""

    bootstrap: str
    api_version: tuple[int, ...] | None = None
    checked: int = 0
    problems: list[RecordProblem] = field(default_factory=list)

    def run(self, timeout_s: float = 60.0) -> TopicAudit:
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap.split(","),
            api_version=self.api_version,
            enable_auto_commit=False,
            consumer_timeout_ms=1000,
            request_timeout_ms=10000,
        )
        try:
            topics = sorted(t for t in consumer.topics() if not t.startswith("__"))
            parts = [
                TopicPartition(t, p)
                for t in topics
                for p in sorted(consumer.partitions_for_topic(t) or ())
            ]
            if not parts:
                return self
            consumer.assign(parts)
            consumer.seek_to_beginning()
            ends = consumer.end_offsets(parts)
            todo = {tp for tp, end in ends.items() if end > 0}
            deadline = time.monotonic() + timeout_s
            while todo and time.monotonic() < deadline:
                for tp, records in consumer.poll(timeout_ms=500, max_records=5000).items():
                    for r in records:
                        self._check(r)
                    if records and records[-1].offset + 1 >= ends[tp]:
                        todo.discard(tp)
            if todo:
                left = ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in todo)[:5])
                raise AssertionError(f"audit: could not read every record in {timeout_s} s: {left}")
        finally:
            consumer.close()
        return self

    def _check(self, r: Any) -> None:
        errors = check_record(list(r.headers or ()), r.value)
        if errors is None:
            return
        self.checked += 1
        if errors:
            self.problems.append(RecordProblem(r.topic, r.partition, r.offset, errors))

    def report(self) -> Iterator[str]:
        for p in self.problems[:20]:
            yield str(p)
        if len(self.problems) > 20:
            yield f"... and {len(self.problems) - 20} more"

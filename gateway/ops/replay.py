"""``gateway replay``: publish the ingress dead-letter topic again, after a config fix.

A payload lands on ``kafka.dead_letter_topic`` when a source with a shared secret received a
body it could not decode (``invalid-json``, ``invalid-utf8``, ``unsupported-media-type``...),
when it parsed but could not be normalized (``no-kind``, ``not-an-object``...), when building
its record failed (``internal-error``, ``record-too-large``), when its kind was unknown and
``kafka.unknown_kinds`` is ``dead-letter``, or when its kind's channel names no topic
(``unknown-channel``; replayable once ``kafka.unknown_channel_topic`` is set: the same
:func:`~gateway.core.ingest.ingest` decides). The record keeps the request body exactly and says
in ``dlq_*`` headers which source received it, when and from where (and ``dlq_event_id``, the
source's ``id_header`` value, which replay uses as the event's id). Once the config is fixed
(a ``mapping`` for a custom template, ``unknown_kinds = "publish"``), replay reads those
records, runs each body through the *current* config's parsing and normalization, and
publishes the normalized record as the ingress would have, with the original ``received``
time, source and client IP.

Offsets of the replay's own consumer group (``<dead_letter_topic>.replay`` by default) are
committed only after Kafka acknowledged every record published for them, so an interrupted run
loses nothing and a re-run continues where the last one stopped. A record that still fails is
counted and listed by partition and offset, and the group moves past it (the record stays on
the topic: ``--from-beginning`` reads it again); ``--requeue`` appends it to the dead-letter
topic again, with today's reason, so that the group meets it after the next fix.

The tag-sync dead-letter topic holds a different shape (failed Update user requests) and is
not handled here.
"""

from __future__ import annotations

import collections
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from gateway.config import Config, SourceConfig
from gateway.core.event import Received
from gateway.core.ingest import DEAD_LETTER_USER_FIELDS, Publish, Refuse, dead_letter_user, ingest
from gateway.core.records import KafkaRecord, build_dead_letter, header
from gateway.ingress.sources import ingest_source
from gateway.ops.check_config import bootstrap_reachable

__all__ = [
    "ProgressBar",
    "ReplayError",
    "ReplayFailure",
    "ReplayReport",
    "exit_code",
    "print_report",
    "renormalize",
    "run_replay",
]

# Ids for events the sender gave no id are derived from the dead letter's place in the topic, so
# replaying the same dead letter twice yields the same CloudEvents id (the ingress gives such
# events a random id because each request is a distinct event).
_REPLAY_ID_NAMESPACE = uuid.UUID("3c5e0f1e-52a4-4f43-9a8e-6f0b3d3c2b71")
_POLL_MS = 500
_STALL_S = 30.0  # no record arriving for this long while the end is not reached: give up
_MAX_LISTED = 200


class ReplayError(Exception):
    """A dead letter that cannot be published yet; ``reason`` is the dead-letter reason."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class ReplayFailure:
    partition: int
    offset: int
    reason: str
    detail: str


@dataclass
class ReplayReport:
    """What one run did; ``failures`` are the records that still fail."""

    topic: str
    group: str | None
    read: int = 0
    replayed: int = 0
    requeued: int = 0
    dry_run: bool = False
    failures: list[ReplayFailure] = field(default_factory=list)
    published_to: collections.Counter[str] = field(default_factory=collections.Counter)
    aborted: str = ""

    def failing_by_reason(self) -> collections.Counter[str]:
        return collections.Counter(f.reason for f in self.failures)


def _received(headers: Sequence[tuple[str, bytes | None]], source: str) -> Received:
    at_text = header(headers, "dlq_received_at")
    if not at_text:
        raise ReplayError("not-an-ingress-dead-letter", "no dlq_received_at header")
    try:
        at = datetime.fromisoformat(at_text)
    except ValueError:
        raise ReplayError(
            "not-an-ingress-dead-letter", f"dlq_received_at is not a time: {at_text!r:.60}"
        ) from None
    if at.tzinfo is None:
        raise ReplayError("not-an-ingress-dead-letter", "dlq_received_at has no time zone")
    return Received(source=source, at=at, client_ip=header(headers, "dlq_client_ip") or "")


def _source(cfg: Config, name: str) -> SourceConfig:
    for src in cfg.sources:
        if src.name == name:
            return src
    raise ReplayError(
        "unknown-source",
        f"source {name!r} is not in the config ({', '.join(s.name for s in cfg.sources)})",
    )


def renormalize(
    cfg: Config,
    headers: Sequence[tuple[str, bytes | None]],
    value: bytes | None,
    *,
    place: str,
) -> KafkaRecord:
    """The record the ingress would publish today for one dead letter.

    ``place`` (``topic/partition/offset``) seeds the id of events that have none of their own.
    Raises :class:`ReplayError` with the reason it would be dead-lettered for again.
    """
    source_name = header(headers, "dlq_source")
    if not source_name or header(headers, "dlq_reason") is None:
        raise ReplayError("not-an-ingress-dead-letter", "no dlq_source or dlq_reason header")
    source = _source(cfg, source_name)
    decision = ingest(
        value or b"",
        ingest_source(cfg, source),
        _received(headers, source.name),
        content_type=header(headers, "content-type") or "",
        # the dead letter's place names it, so replaying it twice gives the same id
        fresh_id=lambda: str(uuid.uuid5(_REPLAY_ID_NAMESPACE, place)),
        # the source's id_header value, which the ingress kept in the dead letter
        header_id=header(headers, "dlq_event_id"),
        # and the user ids of a Journey webhook's URL or headers
        user=dead_letter_user(headers) or None,
    )
    if isinstance(decision, Publish):
        return decision.record
    if isinstance(decision, Refuse):
        raise ReplayError(decision.code, decision.message)
    raise ReplayError(decision.reason, decision.detail)


def _requeued(
    topic: str,
    headers: Sequence[tuple[str, bytes | None]],
    value: bytes | None,
    key: bytes | None,
    failure: ReplayError,
    place: str,
) -> KafkaRecord:
    """The dead letter again, with today's reason, keeping what the ingress recorded."""
    source = header(headers, "dlq_source") or ""
    try:
        received = _received(headers, source)
    except ReplayError:
        received = Received(source=source, at=datetime.fromtimestamp(0, UTC), client_ip="")
    return build_dead_letter(
        topic=topic,
        reason=failure.reason,
        detail=failure.detail,
        body=value or b"",
        source_name=source,
        received=received,
        content_type=header(headers, "content-type") or "",
        key=key,
        extra_headers=[*_kept(headers), ("dlq_requeued_from", place.encode())],
    )


def _kept(headers: Sequence[tuple[str, bytes | None]]) -> list[tuple[str, bytes]]:
    """What the ingress recorded of the request beyond its body (its headers and URL are not
    kept otherwise): the sender's id from the source's ``id_header``, a Journey user's ids."""
    names = {"dlq_event_id", *(f"dlq_user_{n}" for n in DEAD_LETTER_USER_FIELDS)}
    return [(k, v) for k, v in headers if k in names and v is not None]


class ProgressBar:
    """A one-line bar on stderr, drawn only when stderr is a terminal (never in logs or CI)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.total = total
        self.label = label
        self._last = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = int(width * done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total}")
        self.stream.flush()

    def close(self, done: int) -> None:
        if self.enabled:
            self.update(done, force=True)
            self.stream.write("\n")
            self.stream.flush()


def _partitions(consumer: Any, topic: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if time.monotonic() > deadline:
            return []
        consumer.topics()  # refreshes metadata
        time.sleep(0.2)


def run_replay(
    cfg: Config,
    *,
    topic: str | None = None,
    group: str | None = None,
    from_beginning: bool = False,
    limit: int | None = None,
    dry_run: bool = False,
    requeue: bool = False,
    progress_stream: TextIO | None = None,
    metadata_timeout_s: float = 10.0,
) -> ReplayReport:
    """Replay the dead letters present when the run starts; see the module docstring.

    ``from_beginning`` reads every partition from its first offset and neither reads nor
    commits group offsets (a one-off pass). Otherwise the group's committed offsets are the
    starting point and are committed after each acknowledged batch.
    """
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from gateway.kafka.clients import start_client
    from gateway.kafka.producer import producer_options

    dlt = topic or cfg.kafka.dead_letter_topic
    group_id = None if from_beginning else (group or f"{dlt}.replay")
    report = ReplayReport(topic=dlt, group=group_id, dry_run=dry_run)
    if not bootstrap_reachable(cfg.kafka.bootstrap_servers, metadata_timeout_s):
        report.aborted = f"no Kafka bootstrap server answers at {cfg.kafka.bootstrap_servers}"
        return report
    consumer = start_client(
        KafkaConsumer,
        **cfg.kafka.client_options(),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=cfg.kafka.request_timeout_ms + 5000,
    )
    producer: Any = None
    try:
        parts = _partitions(consumer, dlt, metadata_timeout_s)
        if not parts:
            report.aborted = f"topic {dlt} does not exist or has no partitions"
            return report
        tps = [TopicPartition(dlt, p) for p in parts]
        start, end = _start_and_end(consumer, tps, group_id)
        total = sum(max(0, end[tp] - start[tp]) for tp in tps)
        if limit is not None:
            total = min(total, limit)
        bar = ProgressBar(total, f"replay {dlt}", progress_stream)
        if total and not dry_run:
            producer = KafkaProducer(**producer_options(cfg.kafka))
        run = _Pass(cfg, report, end, total, producer, requeue)
        run.done.update(tp for tp in tps if start[tp] >= end[tp])
        _consume(consumer, run, bar, commit=group_id is not None and not dry_run)
        bar.close(report.read)
        return report
    finally:
        if producer is not None:
            producer.close(timeout=5)
        consumer.close(autocommit=False)


def _start_and_end(
    consumer: Any, tps: list[Any], group_id: str | None
) -> tuple[dict[Any, int], dict[Any, int]]:
    """Seek each partition to the group's committed offset (or its beginning): where it
    starts, and where it ends now (what arrives later is not this run's)."""
    consumer.assign(tps)
    end: dict[Any, int] = consumer.end_offsets(tps)
    for tp in tps:
        committed = None if group_id is None else consumer.committed(tp)
        if committed is None:
            consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)
    return {tp: consumer.position(tp) for tp in tps}, end


def _consume(consumer: Any, run: _Pass, bar: ProgressBar, *, commit: bool) -> None:
    """Poll until every partition reached its end (or the limit); commit each settled batch."""
    last_record_at = time.monotonic()
    while len(run.done) < len(run.end) and run.report.read < run.total:
        batch = consumer.poll(timeout_ms=_POLL_MS, max_records=500)
        if not batch:
            if time.monotonic() - last_record_at > _STALL_S:
                run.report.aborted = f"no records arrived for {_STALL_S:.0f}s before the end"
                return
            continue
        last_record_at = time.monotonic()
        futures, offsets = run.take(batch)
        if run.producer is not None and futures and not run.settle(futures):
            return
        if commit and offsets:
            consumer.commit(offsets)
        bar.update(run.report.read)


@dataclass
class _Pass:
    """One run over the topic: where each partition ends, which are done, what was sent."""

    cfg: Config
    report: ReplayReport
    end: dict[Any, int]
    total: int
    producer: Any  # None in a dry run
    requeue: bool
    done: set[Any] = field(default_factory=set)

    def take(self, batch: dict[Any, list[Any]]) -> tuple[list[tuple[Any, bool]], dict[Any, Any]]:
        """Renormalize a polled batch: the sends (future, is_requeue) and the offsets to commit."""
        from kafka.structs import OffsetAndMetadata

        futures: list[tuple[Any, bool]] = []
        commit: dict[Any, Any] = {}
        for tp, records in batch.items():
            for rec in records:
                if rec.offset >= self.end[tp] or self.report.read >= self.total:
                    self.done.add(tp)
                    break
                self.report.read += 1
                sent = self._one(tp, rec)
                if sent is not None:
                    futures.append(sent)
                commit[tp] = OffsetAndMetadata(rec.offset + 1, "", -1)
                if rec.offset + 1 >= self.end[tp]:
                    self.done.add(tp)
        return futures, commit

    def _one(self, tp: Any, rec: Any) -> tuple[Any, bool] | None:
        report = self.report
        place = f"{tp.topic}/{tp.partition}/{rec.offset}"
        headers = list(rec.headers or [])
        try:
            out = renormalize(self.cfg, headers, rec.value, place=place)
        except ReplayError as exc:
            report.failures.append(ReplayFailure(tp.partition, rec.offset, exc.reason, exc.detail))
            if self.requeue and self.producer is not None:
                again = _requeued(report.topic, headers, rec.value, rec.key, exc, place)
                return _send(self.producer, again), True
            return None
        report.published_to[out.topic] += 1
        if self.producer is None:
            report.replayed += 1  # dry run: counted as would-be replayed
            return None
        return _send(self.producer, out), False

    def settle(self, futures: list[tuple[Any, bool]]) -> bool:
        """Wait for every acknowledgement of a batch; False when one failed (run aborted)."""
        from kafka.errors import KafkaError

        timeout_s = self.cfg.kafka.delivery_timeout_ms / 1000
        self.producer.flush(timeout=timeout_s)
        try:
            for future, is_requeue in futures:
                future.get(timeout=timeout_s)
                if is_requeue:
                    self.report.requeued += 1
                else:
                    self.report.replayed += 1
        except KafkaError as exc:
            # nothing of this batch is committed: a re-run publishes it again, and the
            # repeated records carry the same ce_id for consumers to drop
            self.report.aborted = f"publish failed, batch not committed: {exc}"
            return False
        return True


def _send(producer: Any, record: KafkaRecord) -> Any:
    return producer.send(record.topic, key=record.key, value=record.value, headers=record.headers)


def print_report(report: ReplayReport, out: TextIO) -> None:
    """The summary an operator reads: counts, reasons, and where each failure is."""
    where = f"group {report.group}" if report.group else "from the beginning, no group"
    verb = "would replay" if report.dry_run else "replayed"
    print(
        f"replay {report.topic} ({where}): {report.read} read, {report.replayed} {verb}, "
        f"{len(report.failures)} still failing",
        file=out,
    )
    for topic, count in sorted(report.published_to.items()):
        print(f"  -> {topic}: {count}", file=out)
    reasons = report.failing_by_reason()
    if reasons:
        listed = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
        print(f"still failing by reason: {listed}", file=out)
        for f in report.failures[:_MAX_LISTED]:
            print(f"  partition {f.partition} offset {f.offset}: {f.reason}: {f.detail}", file=out)
        if len(report.failures) > _MAX_LISTED:
            print(f"  ... and {len(report.failures) - _MAX_LISTED} more", file=out)
    if report.requeued:
        print(f"requeued {report.requeued} to {report.topic}", file=out)
    if report.dry_run:
        print("dry run: nothing published, no offsets committed", file=out)
    if report.aborted:
        print(f"stopped early: {report.aborted}", file=out)


def exit_code(report: ReplayReport) -> int:
    """0 when everything read was published; 1 when something still fails or the run stopped."""
    return 1 if report.failures or report.aborted else 0

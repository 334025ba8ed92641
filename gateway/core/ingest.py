"""One body from one source, decided: publish it, dead-letter it, or refuse it.

The ingress route (after the sender checks) and ``gateway replay`` (for each dead letter) both
call :func:`ingest`, so a body is decoded, normalized and turned into a record the same way
wherever it comes from. What is kept out: the dedupe state and Kafka (the caller publishes the
decided record and answers), and logging (a :class:`DeadLetter` carries the exception of a bug
for the caller to log).

A source whose senders proved themselves with a shared secret (``dead_letter_every_body``)
never has a body refused: OneSignal drops what it cannot deliver, so what cannot be decoded,
normalized or recorded is kept byte for byte as a dead letter. A source anyone can post to (web
push) refuses a body it cannot decode with the 4xx of :class:`~gateway.core.body.BadRequest`,
and one it cannot normalize (an event name the Web SDK does not send, say) with a 400: nothing
an outsider sends reaches a topic, the dead-letter topic included. Only a gateway bug still
dead-letters such a body, so that it can be looked at.

Topics come from the configured vocabulary only (``kafka.topic`` over
:data:`~gateway.core.kinds.TOPIC_CHANNELS`, the dead-letter topic,
``kafka.unknown_channel_topic`` and ``kafka.unauthenticated_topic``): a body never names one.
An event whose kind has another channel (``message.<anything>.sent``, or none) from a source
with a shared secret is dead-lettered (``unknown-channel``), or published to
``kafka.unknown_channel_topic`` when that is set; from a source anyone can post to it is
refused (400 ``unknown-channel``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gateway.core.body import BadRequest, TextBody, decode_body
from gateway.core.event import NormalizationError, NormalizedEvent, Received
from gateway.core.kinds import TOPIC_CHANNELS
from gateway.core.normalize import normalize_for_source
from gateway.core.records import KafkaRecord, build_dead_letter, build_record, record_size

__all__ = [
    "DEAD_LETTER_USER_FIELDS",
    "DeadLetter",
    "Decision",
    "Publish",
    "Refuse",
    "Source",
    "dead_letter_user",
    "ingest",
]

# The user ids a Journey webhook may carry in its URL query or configured headers (``user``):
# a dead letter keeps them as ``dlq_user_<field>`` headers, since it keeps no URL or header.
DEAD_LETTER_USER_FIELDS = ("onesignal_id", "external_id")


def dead_letter_user(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    """The ``user`` a dead letter kept (its ``dlq_user_<field>`` headers), for replay."""
    names = {f"dlq_user_{name}": name for name in DEAD_LETTER_USER_FIELDS}
    return {
        names[key]: value.decode("utf-8", "replace")
        for key, value in headers
        if key in names and value
    }


@dataclass(frozen=True, slots=True)
class Source:
    """What deciding a body needs to know of a configured source and of where records go."""

    name: str
    format: str
    topic_template: str
    dead_letter_topic: str
    max_record_bytes: int  # kafka.max_request_size
    max_json_depth: int = 64
    unknown_kinds: str = "publish"
    # where an event of a channel outside TOPIC_CHANNELS goes; "" = the dead-letter topic
    unknown_channel_topic: str = ""
    content_mode: str = "binary"
    app_id: str = ""
    mapping: Mapping[str, str] = field(default_factory=dict)
    # the senders proved themselves (a shared secret): keep every body they send
    dead_letter_every_body: bool = True
    # where the events of a source without a secret go; empty = the topic template
    unauthenticated_topic: str = ""

    @property
    def authenticated(self) -> bool:
        """A shared secret proves the sender: without one, records are marked unauthenticated."""
        return self.dead_letter_every_body

    @property
    def allows_text(self) -> bool:
        """Journey webhooks may send a plain-text body (an event of its own)."""
        return self.format == "journey"


@dataclass(frozen=True, slots=True)
class Publish:
    """The event and its record: publish, then (for a sender id) remember the id."""

    event: NormalizedEvent
    record: KafkaRecord


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The body as received, on the dead-letter topic; ``error`` is set for a gateway bug."""

    record: KafkaRecord
    reason: str
    detail: str
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """A 4xx for a body from a sender that did not prove itself."""

    status: int
    code: str
    message: str


Decision = Publish | DeadLetter | Refuse


def ingest(
    body: bytes,
    source: Source,
    received: Received,
    *,
    content_type: str,
    fresh_id: Callable[[], str],
    header_id: str | None = None,
    user: Mapping[str, str] | None = None,
) -> Decision:
    """What becomes of ``body``; see the module docstring.

    ``fresh_id`` gives the id of an event its sender gave none (the ingress: a new one per
    request; replay: one derived from the dead letter's place). ``header_id`` is the value of
    the source's ``id_header``, which a dead letter keeps (``dlq_event_id``) for replay.
    ``user`` is what a Journey webhook's URL or headers carried, for a plain-text body.
    """
    letter = _Letter(body, content_type, received, header_id, source, user)
    try:
        payload = decode_body(
            body, content_type, max_depth=source.max_json_depth, allow_text=source.allows_text
        )
    except BadRequest as exc:
        if source.dead_letter_every_body:
            return letter.dead(exc.code, exc.message)
        return Refuse(exc.status, exc.code, exc.message)
    try:
        event = normalize_for_source(
            payload,
            source,
            unknown_kinds=source.unknown_kinds,
            fresh_id=fresh_id,
            header_id=header_id,
            user=user if isinstance(payload, TextBody) else None,
        )
        topic_template = source.topic_template
        if event.channel not in TOPIC_CHANNELS:
            refused = _unknown_channel(event, source)
            if isinstance(refused, Refuse):
                return refused
            if refused is not None:
                return letter.dead("unknown-channel", refused)
            # a topic name has no braces (config checks it), so it formats to itself
            topic_template = source.unknown_channel_topic
        record = build_record(
            event,
            received,
            topic_template=topic_template,
            source_name=source.name,
            content_mode=source.content_mode,
            authenticated=source.authenticated,
            unauthenticated_topic=source.unauthenticated_topic,
        )
    except NormalizationError as exc:
        if not source.dead_letter_every_body:
            # nobody vouches for this sender: a forger's body must not reach any topic, the
            # dead-letter one included
            return Refuse(400, exc.reason, str(exc))
        return letter.dead(exc.reason, str(exc))
    except Exception as exc:  # a bug must not cost the sender its event: keep the bytes
        detail = f"{type(exc).__name__} in the gateway (a bug; see its log): {exc}"
        return letter.dead("internal-error", detail, exc)
    if record_size(record) > source.max_record_bytes:
        if not source.dead_letter_every_body:
            return Refuse(
                413,
                "record-too-large",
                f"the normalized record is over kafka.max_request_size ({source.max_record_bytes})",
            )
        # the body fits (server.max_body_bytes), but normalized it does not: keep the body
        return letter.dead(
            "record-too-large",
            f"the normalized record is over kafka.max_request_size ({source.max_record_bytes})",
        )
    return Publish(event, record)


def _unknown_channel(event: NormalizedEvent, source: Source) -> Refuse | str | None:
    """An event of a channel with no topic: a refusal, a dead-letter detail, or None (publish
    to ``kafka.unknown_channel_topic``)."""
    why = (
        f"event kind {event.kind[:100]!r} has no known channel ({', '.join(TOPIC_CHANNELS)});"
        " a body never names a topic"
    )
    if not source.dead_letter_every_body:
        return Refuse(400, "unknown-channel", why)
    if not source.unknown_channel_topic:
        return why + " (set kafka.unknown_channel_topic to publish such events to one topic)"
    return None


@dataclass(frozen=True, slots=True)
class _Letter:
    """What a dead letter of this body keeps."""

    body: bytes
    content_type: str
    received: Received
    header_id: str | None
    source: Source
    user: Mapping[str, str] | None

    def dead(self, reason: str, detail: str, error: Exception | None = None) -> DeadLetter:
        extra: list[tuple[str, bytes]] = []
        if self.header_id is not None:
            # replay reads the id from here: the request's headers are not kept otherwise
            extra.append(("dlq_event_id", self.header_id.encode("utf-8", "backslashreplace")))
        for name, value in (self.user or {}).items():
            # nor is the URL: a Journey webhook's user ids, for a plain-text body's replay
            if name in DEAD_LETTER_USER_FIELDS and value:
                extra.append((f"dlq_user_{name}", value.encode("utf-8", "backslashreplace")))
        record = build_dead_letter(
            topic=self.source.dead_letter_topic,
            reason=reason,
            detail=detail,
            body=self.body,
            source_name=self.source.name,
            received=self.received,
            content_type=self.content_type,
            extra_headers=extra,
        )
        return DeadLetter(record, reason, detail, error)

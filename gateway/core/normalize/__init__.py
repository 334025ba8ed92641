"""Turn whatever a OneSignal source sent into one :class:`NormalizedEvent`.

Event Streams and Journey bodies are templates the OneSignal admin writes in Liquid, so there
is no schema to parse against: the same fact arrives as ``{"Event Data": {"event.kind": ..}}``,
``{"event.kind": ..}``, ``{"event": {"kind": ..}}`` or ``{"event_kind": ..}``. Rather than
enumerate layouts, every node of the body is indexed by its path (keys split on ``.`` too,
case-insensitive) and each field is looked up by the suffix of its documented name, shortest
path first, then by the snake-case names OneSignal's own samples and exports use. A source can
pin any field with a JSON Pointer (``mapping``) when its template is more inventive than that.

Web-push SDK webhooks have a fixed shape per SDK version and are read directly.

Everything here is pure: no I/O, no clock. The only exception raised is
:class:`NormalizationError`, whatever JSON value comes in.

The package splits by concern: ``values`` reads one rendered value, ``hashes`` the hashes
Liquid renders into text, ``liquid`` finds fields in a templated body, ``web_push`` reads the
SDK's payloads, ``mapping`` applies a source's JSON Pointers, ``ids`` hashes content into an
id, and ``assemble`` puts the event together.
"""

from __future__ import annotations

from gateway.core.normalize.assemble import (
    JOURNEY_TEXT_KIND,
    SourceShape,
    journey_text_event,
    normalize,
    normalize_for_source,
)
from gateway.core.normalize.ids import content_id

__all__ = [
    "JOURNEY_TEXT_KIND",
    "SourceShape",
    "content_id",
    "journey_text_event",
    "normalize",
    "normalize_for_source",
]

"""Request bodies to JSON values, with a clear error for every way a body can be bad.

Pure: bytes and a Content-Type in, a value or a :class:`BadRequest` out. For a source with a
shared secret the ingress keeps such a body on the dead-letter topic, ``code`` as its reason
(OneSignal drops what is refused, so a 4xx to an authenticated sender is a lost event); for
the web-push source, which anyone can post to, it answers ``status`` and writes nothing.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["BadRequest", "TextBody", "decode_body", "json_depth"]

_JSON_TYPES = ("application/json", "text/json")
# Web-push SDK webhooks are sent with `mode: no-cors`, so the browser labels the JSON text/plain;
# Journey webhooks may be plain text. OneSignal documents no Content-Type for Event Streams.
_TEXT_TYPES = ("text/plain", "")


class TextBody(str):
    """A body read as plain text (a Journey webhook's), as opposed to a JSON string value."""

    __slots__ = ()


class BadRequest(Exception):
    """A request the gateway refuses; ``code`` is a stable machine-readable reason."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)


def _media_type(content_type: str) -> tuple[str, str]:
    parts = content_type.split(";")
    media = parts[0].strip().lower()
    charset = ""
    for p in parts[1:]:
        name, _, value = p.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media, charset


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counting no further than ``limit + 1``.

    Iterative, so a hostile document cannot exhaust the stack here.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def decode_body(body: bytes, content_type: str | None, *, max_depth: int, allow_text: bool) -> Any:
    """Parse a request body.

    ``allow_text``: a body sent as text (``text/plain`` or no Content-Type) that is not a JSON
    object is returned as a :class:`TextBody` instead of refused: Journey webhooks may be
    configured with a plain-text body, and its text may happen to parse as a number or string.
    """
    media, charset = _media_type(content_type or "")
    is_json_type = media in _JSON_TYPES or (
        media.startswith("application/") and media.endswith("+json")
    )
    if not is_json_type and media not in _TEXT_TYPES:
        raise BadRequest(
            415,
            "unsupported-media-type",
            f"Content-Type {media!r} is not accepted; send application/json or text/plain",
        )
    if charset and charset not in ("utf-8", "utf8", "us-ascii"):
        raise BadRequest(
            415, "unsupported-charset", f"charset {charset!r} is not accepted; use utf-8"
        )
    if not body.strip():
        raise BadRequest(400, "empty-body", "the request body is empty")
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise BadRequest(
                400, "invalid-utf8", f"the body is not valid UTF-8 (byte {uexc.start})"
            ) from None
        if allow_text and not is_json_type:
            return TextBody(text)  # valid UTF-8, which may quote "\\ud800" or brackets freely
        msg = str(exc)
        if "depth" in msg:
            raise BadRequest(400, "too-deep", f"JSON nesting deeper than {max_depth}") from None
        if "surrogate" in msg.lower():
            # a \\ud800 escape with no low half: JSON that names no Unicode text
            raise BadRequest(
                400, "lone-surrogate", "the body holds an unpaired UTF-16 surrogate escape"
            ) from None
        raise BadRequest(400, "invalid-json", f"the body is not valid JSON: {msg}") from None
    if allow_text and not is_json_type and not isinstance(value, dict):
        return TextBody(body.decode("utf-8"))  # orjson read it, so it is valid UTF-8
    # nesting can be no deeper than the number of opening brackets: most bodies skip the walk
    if body.count(b"[") + body.count(b"{") > max_depth and json_depth(value, max_depth) > max_depth:
        raise BadRequest(400, "too-deep", f"JSON nesting deeper than {max_depth}")
    return value

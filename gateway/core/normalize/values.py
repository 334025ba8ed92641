"""Reading one rendered value: presence, text, localized text, tags, times.

Liquid renders a missing value as ``""``, ids unquoted as numbers, and hashes as text, so
every field is read through these rather than taken as it came.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from gateway.core.normalize.hashes import _parse_hash_string

__all__ = ["_localized", "_present", "_tags", "_text", "_time"]

_MAX_TIME_TEXT_CHARS: Final = 64
_MILLISECONDS_ABOVE: Final = 1e11
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_NUMERIC_TEXT: Final = re.compile(r"[+-]?\d{1,20}(?:\.\d{1,9})?")


def _present(value: Any) -> bool:
    """Liquid renders a missing value as "" (or null): both mean absent."""
    if value is None:
        return False
    return not (isinstance(value, str) and not value.strip())


def _text(value: Any) -> str | None:
    """A scalar as text: ids rendered unquoted arrive as numbers and are kept as strings."""
    if isinstance(value, str):
        stripped = value.strip()
        return stripped or None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # beyond the interpreter's int-to-text digit limit
            return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        return repr(value)
    return None


def _localized(value: Any) -> tuple[str | None, dict[str, str] | None]:
    """(preferred text, text by language) of a push title/contents or an email subject."""
    by_language: dict[str, Any] | None = None
    if isinstance(value, dict):
        by_language = value
    elif isinstance(value, str):
        by_language = _parse_hash_string(value)
        if by_language is None:
            return _text(value), None
    else:
        return _text(value), None
    texts: dict[str, str] = {}
    for lang, text in by_language.items():
        rendered = _text(text)
        if isinstance(lang, str) and rendered is not None:
            texts[lang] = rendered
    if not texts:
        return None, None
    return texts.get("en", next(iter(texts.values()))), texts


def _tags(value: Any) -> dict[str, Any] | None:
    """User tags: an object, or the object rendered into a string; "" values are absent."""
    if isinstance(value, str):
        value = _parse_hash_string(value)
    if not isinstance(value, dict):
        return None
    tags = {k: v for k, v in value.items() if isinstance(k, str) and _present(v)}
    return tags or None


def _time_from_number(seconds: float) -> datetime | None:
    if seconds > _MILLISECONDS_ABOVE:
        seconds /= 1000.0
    try:
        return _UNIX_EPOCH + timedelta(seconds=seconds)
    except (OverflowError, ValueError):
        return None


def _time(value: Any) -> datetime | None:
    """When the event happened: Unix seconds or milliseconds, or ISO 8601; UTC if no zone."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        try:
            return _time_from_number(float(value))
        except OverflowError:  # an int too big for a float
            return None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or len(text) > _MAX_TIME_TEXT_CHARS:
        return None
    if _NUMERIC_TEXT.fullmatch(text):
        return _time_from_number(float(text))
    if text.upper().endswith("UTC"):  # "2024-02-21 23:45:15 UTC", as warehouses print it
        text = text[:-3].strip()
    try:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return None

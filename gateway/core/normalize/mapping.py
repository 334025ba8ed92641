"""A source's ``mapping``: JSON Pointers that pin a field where auto-detection cannot find it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from gateway.core.normalize.liquid import _CANDIDATES
from gateway.core.normalize.values import _present

__all__ = ["_apply_mapping", "_resolve_pointer"]

_ARRAY_INDEX: Final = re.compile(r"0|[1-9][0-9]{0,17}")
_MISSING: Final = object()


def _resolve_pointer(document: Any, pointer: str) -> Any:
    """RFC 6901: ``/Event Data/event.kind``, ``~1`` for '/' and ``~0`` for '~'."""
    if pointer == "":
        return document
    if not pointer.startswith("/"):
        return _MISSING
    current = document
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(current, dict):
            if token not in current:
                return _MISSING
            current = current[token]
        elif isinstance(current, list):
            if not _ARRAY_INDEX.fullmatch(token) or int(token) >= len(current):
                return _MISSING
            current = current[int(token)]
        else:
            return _MISSING
    return current


def _apply_mapping(
    found: dict[str, Any], payload: dict[Any, Any], mapping: Mapping[str, str]
) -> dict[str, Any]:
    """Mapped values win; a pointer that finds nothing leaves the auto-detected value."""
    out = dict(found)
    for name, pointer in mapping.items():
        if not isinstance(pointer, str) or name not in _CANDIDATES:
            continue
        value = _resolve_pointer(payload, pointer)
        if value is not _MISSING and _present(value):
            out[name] = value
    return out

"""The content-hash id of a payload that carries none: same content, same id, any key order."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any, Final

import orjson

__all__ = ["content_id"]

# Fixed forever: changing it changes every content-hash event id, and with it deduplication.
_CONTENT_ID_NAMESPACE: Final = uuid.UUID("f8d415d0-9d35-4fc4-bd67-b4857773b56a")


def _canonical_json(value: Any) -> str:
    """Sorted-key JSON for anything, at any depth, with ints of any size (as hex beyond 64 bits).

    Only used when orjson declines (huge ints, lone surrogates, very deep nesting); it is
    iterative so depth cannot exhaust the stack.
    """
    out: list[str] = []
    stack: list[Any] = [value]
    literal = _Literal
    while stack:
        item = stack.pop()
        if isinstance(item, literal):
            out.append(item.text)
        elif isinstance(item, dict):
            entries = sorted(((_key_text(k), v) for k, v in item.items()), key=lambda e: e[0])
            stack.append(literal("}"))
            for i in range(len(entries) - 1, -1, -1):
                stack.append(entries[i][1])
                sep = "," if i else ""
                stack.append(literal(f"{sep}{json.dumps(entries[i][0])}:"))
            stack.append(literal("{"))
        elif isinstance(item, list | tuple):
            stack.append(literal("]"))
            for i in range(len(item) - 1, -1, -1):
                stack.append(item[i])
                if i:
                    stack.append(literal(","))
            stack.append(literal("["))
        else:
            out.append(_scalar_json(item))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class _Literal:
    text: str


def _int_text(value: int) -> str:
    try:
        return str(value)
    except ValueError:
        return f'"int:{value:x}"'


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or key is None:
        return json.dumps(key)
    if isinstance(key, int):
        return _int_text(key)
    return _scalar_json(key)


def _scalar_json(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int):
        return _int_text(value)
    if isinstance(value, float):
        return json.dumps(value) if math.isfinite(value) else "null"
    return json.dumps(f"{type(value).__name__}")


def content_id(payload: Any) -> str:
    """A stable id for a payload without one: identical content, identical id, any key order."""
    try:
        text = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        text = _canonical_json(payload)
    return str(uuid.uuid5(_CONTENT_ID_NAMESPACE, text))

"""Hashes that Liquid rendered into a string: ``{"en"=>"Hi"}``, ``{'en': 'Hi'}``, JSON.

OneSignal renders a localized title or the user's tags into a template as the text of a Ruby
hash, so a text field may hold a hash. Only literals are ever evaluated (never code), only for
short text that looks like one, and only string keys with JSON-safe scalar values are kept.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from typing import Any, Final

import orjson

__all__ = ["_json_scalar", "_literal_hash", "_parse_hash_string", "_plain_hash"]

_MAX_HASH_STRING_CHARS: Final = 8192
_MAX_CACHED_HASH_CHARS: Final = 1024  # titles are short; bounds what the cache holds
_HASH_CACHE_SIZE: Final = 512
_RUBY_WORDS: Final = re.compile(r"\b(nil|true|false)\b")
_RUBY_TO_PYTHON: Final = {"nil": "None", "true": "True", "false": "False"}
# Inside quotes, what JSON, Python and Ruby-converted literals might not read verbatim.
_UNPLAIN: Final = re.compile(r"[\\\n\r\x00\ud800-\udfff]")
_LITERAL_ERRORS: Final = (ValueError, SyntaxError, RecursionError, MemoryError, TypeError)


def _json_scalar(value: Any) -> bool:
    """What a Kafka record can carry (orjson takes ints up to 64 bits)."""
    if value is None or isinstance(value, str | bool | float):
        return True
    return isinstance(value, int) and -(2**63) <= value < 2**64


def _ruby_unquoted(text: str) -> str:
    return _RUBY_WORDS.sub(lambda m: _RUBY_TO_PYTHON[m.group(1)], text.replace("=>", ":"))


def _ruby_hash_as_python(text: str) -> str:
    """``{"en"=>"Hi", "x"=>nil}`` as a Python literal, touching nothing inside quotes.

    A plain scan, linear in the text (a regex over quoted strings backtracks quadratically
    on crafted input such as many unterminated quotes).
    """
    out: list[str] = []
    start = 0
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                out.append(text[start : i + 1])
                start, quote = i + 1, ""
        elif ch in "'\"":
            out.append(_ruby_unquoted(text[start:i]))
            start, quote = i, ch
        i += 1
    tail = text[start:]
    out.append(tail if quote else _ruby_unquoted(tail))
    return "".join(out)


def _quoted(text: str, start: int, end: int) -> tuple[str, int] | None:
    """(content, index after it) of a plain quoted string at ``start``, closed before ``end``.

    Plain means nothing any of the three syntaxes would read differently: no backslash, no line
    break or NUL, no lone surrogate. Anything else is left to the literal parsers.
    """
    if start >= end or text[start] not in ("'", '"'):
        return None
    quote = text[start]
    close = text.find(quote, start + 1, end)
    if close < 0:
        return None
    content = text[start + 1 : close]
    if _UNPLAIN.search(content):
        return None
    return content, close + 1


def _skip_spaces(text: str, i: int, end: int) -> int:
    while i < end and text[i] == " ":
        i += 1
    return i


def _plain_hash(text: str) -> dict[str, str] | None:
    """``{'en':'Hi', 'fr':'Salut'}`` or ``{"en"=>"Hi"}`` read in one linear pass.

    Only flat maps of plain quoted strings, which is how OneSignal renders localized text;
    None for anything else (nil, numbers, escapes, duplicate keys...), which then goes to
    :func:`_literal_hash`. Where both read a text they agree (a property test checks).
    """
    end = len(text) - 1  # text[0] == "{" and text[end] == "}"
    out: dict[str, str] = {}
    i = _skip_spaces(text, 1, end)
    while True:
        key = _quoted(text, i, end)
        if key is None or key[0] in out:
            return None
        i = _skip_spaces(text, key[1], end)
        if text.startswith(":", i):
            i += 1
        elif text.startswith("=>", i):
            i += 2
        else:
            return None
        value = _quoted(text, _skip_spaces(text, i, end), end)
        if value is None:
            return None
        out[key[0]] = value[0]
        i = _skip_spaces(text, value[1], end)
        if i == end:
            return out
        if text[i] != ",":
            return None
        i = _skip_spaces(text, i + 1, end)


def _literal_hash(text: str) -> dict[Any, Any] | None:
    """Any hash literal: JSON, then Python, then Ruby ``=>`` style (literals only, never code)."""
    parsed: Any = None
    try:
        parsed = orjson.loads(text)
    except ValueError:  # orjson.JSONDecodeError, and lone surrogates
        try:
            parsed = ast.literal_eval(text)
        except _LITERAL_ERRORS:
            try:
                parsed = ast.literal_eval(_ruby_hash_as_python(text))
            except _LITERAL_ERRORS:
                return None
    return parsed if isinstance(parsed, dict) else None


def _hash_items(text: str) -> tuple[tuple[str, Any], ...] | None:
    """The kept members of a stripped, bounded hash text, as an immutable (cacheable) value."""
    parsed = _plain_hash(text)
    if parsed is None:
        parsed = _literal_hash(text)
        if parsed is None:
            return None
    return tuple((k, v) for k, v in parsed.items() if isinstance(k, str) and _json_scalar(v))


# Titles repeat across every event of one message, so most texts were parsed a moment ago.
_cached_hash_items = lru_cache(maxsize=_HASH_CACHE_SIZE)(_hash_items)


def _parse_hash_string(text: str) -> dict[str, Any] | None:
    """A hash rendered into a string by Liquid: JSON, Python-literal or Ruby ``=>`` style.

    Only literals are evaluated (never code), only for short text that looks like a hash, and
    only string keys with JSON-safe scalar values are kept. The caller gets its own dict.
    """
    text = text.strip()
    if not (2 <= len(text) <= _MAX_HASH_STRING_CHARS and text[0] == "{" and text[-1] == "}"):
        return None
    parse = _cached_hash_items if len(text) <= _MAX_CACHED_HASH_CHARS else _hash_items
    items = parse(text)
    return None if items is None else dict(items)

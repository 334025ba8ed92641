"""Hashes that Liquid rendered into a string: ``{"en"=>"Hi"}``, ``{'en': 'Hi'}``, JSON.

OneSignal renders a localized title or the user's tags into a template as the text of a Ruby
hash (or, through some paths, of a Python dict), so a text field may hold a hash. What is read
is exactly the shape OneSignal produces: a flat map of quoted string keys to scalar values
(quoted strings, numbers, ``nil``/``None``, ``true``/``false``), with ``=>`` or ``:`` between
key and value. Anything else (nesting, expressions, prefixes, escapes these syntaxes do not
share) is not a hash and stays text.

The reader is one forward pass of possessive regular expressions (no backtracking), so its
cost is linear in the text, and the text is bounded (:data:`_MAX_HASH_STRING_CHARS`): no
``ast.literal_eval``, whose parse tree cost ~0.6 us per byte of a crafted body. Where the old
literal parsers and this reader both read a text they agree (a property test checks).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Final

import orjson

__all__ = ["_json_scalar", "_parse_hash_string", "_read_hash"]

_MAX_HASH_STRING_CHARS: Final = 8192
_MAX_CACHED_HASH_CHARS: Final = 1024  # titles are short; bounds what the cache holds
_HASH_CACHE_SIZE: Final = 512

# A quoted string: no raw line break or NUL (Python refuses them) nor lone surrogate (no record
# carries one); a backslash takes the next character, which _unescaped then checks.
_SQ: Final = r"'(?:[^'\\\n\r\x00\ud800-\udfff]++|\\[^\n\r\x00\ud800-\udfff])*+'"
_DQ: Final = r'"(?:[^"\\\n\r\x00\ud800-\udfff]++|\\[^\n\r\x00\ud800-\udfff])*+"'
# Bounded digits: int() and float() of them cost nothing, and 20 digits hold any 64-bit int.
_NUMBER: Final = r"-?(?:0|[1-9][0-9]{0,19})(?:\.[0-9]{1,20})?(?:[eE][+-]?[0-9]{1,3})?"
_WORD: Final = r"nil|None|true|True|false|False"
_SPACE: Final = r"[ \t\r\n]*+"
_STRING: Final = rf"{_SQ}|{_DQ}"
_SEPARATOR: Final = rf"{_SPACE}(?::|=>){_SPACE}"
# The whole text at once: possessive throughout, so a text that is not a hash fails in one
# pass; the last member's comma is optional ("{'a': 1,}" is a hash in both languages). No
# capturing groups in it: CPython 3.11's re gets their spans wrong under possessive repeats.
_PLAIN_MEMBER: Final = rf"(?:{_STRING}){_SEPARATOR}(?:{_STRING}|{_NUMBER}|{_WORD})"
_HASH: Final = re.compile(
    rf"\{{{_SPACE}(?:{_PLAIN_MEMBER}{_SPACE},{_SPACE})*+(?:{_PLAIN_MEMBER}{_SPACE})?\}}"
)
# Over a text _HASH matched, each search lands on the next key: between members there are
# only spaces and commas. Groups: key, quoted value, number, word.
_MEMBERS: Final = re.compile(rf"({_STRING}){_SEPARATOR}(?:({_STRING})|({_NUMBER})|({_WORD}))")
_WORDS: Final[dict[str, Any]] = {
    "nil": None,
    "None": None,
    "true": True,
    "True": True,
    "false": False,
    "False": False,
}
# The escapes Python and Ruby's inspect read alike; any other makes the text not a hash.
_ESCAPES_OK: Final = re.compile(r"(?:[^\\]++|\\[\\'\"ntr]|\\u[0-9a-fA-F]{4}|\\x[0-9a-fA-F]{2})*+")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


class _NotAHash(Exception):
    pass


def _json_scalar(value: Any) -> bool:
    """What a Kafka record can carry (orjson takes ints up to 64 bits)."""
    if value is None or isinstance(value, str | bool | float):
        return True
    return isinstance(value, int) and -(2**63) <= value < 2**64


def _unescaped(inner: str) -> str:
    """The text of a quoted string's inside that holds a backslash, or :class:`_NotAHash`."""
    if _ESCAPES_OK.fullmatch(inner) is None:
        raise _NotAHash
    # the allowed escapes read as Python reads them; characters beyond Latin-1 pass through
    # as \\u escapes of their own, which the same codec reads back
    text = inner.encode("latin-1", "backslashreplace").decode("unicode_escape")
    if _SURROGATE.search(text):  # "\\ud800": a lone surrogate no record could carry
        raise _NotAHash
    return text


def _read_hash(text: str) -> dict[str, Any] | None:
    """A flat Ruby- or Python-style hash literal, else None.

    One possessive match checks the whole text, then one scan reads the members: linear in
    the text. Later duplicate keys win, as in both languages.
    """
    if _HASH.fullmatch(text) is None:
        return None
    out: dict[str, Any] = {}
    try:
        for key, quoted, number, word in _MEMBERS.findall(text):
            inner = key[1:-1]
            name = _unescaped(inner) if "\\" in inner else inner
            if quoted:
                inner = quoted[1:-1]
                out[name] = _unescaped(inner) if "\\" in inner else inner
            elif number:
                out[name] = float(number) if "." in number or "e" in number.lower() else int(number)
            else:
                out[name] = _WORDS[word]
    except _NotAHash:
        return None
    return out


def _hash_items(text: str) -> tuple[tuple[str, Any], ...] | None:
    """The kept members of a stripped, bounded hash text, as an immutable (cacheable) value."""
    parsed: Any
    try:
        parsed = orjson.loads(text)
    except ValueError:  # orjson.JSONDecodeError, and lone surrogates
        parsed = _read_hash(text)
    if not isinstance(parsed, dict):
        return None
    return tuple((k, v) for k, v in parsed.items() if isinstance(k, str) and _json_scalar(v))


# Titles repeat across every event of one message, so most texts were parsed a moment ago.
_cached_hash_items = lru_cache(maxsize=_HASH_CACHE_SIZE)(_hash_items)


def _parse_hash_string(text: str) -> dict[str, Any] | None:
    """A hash rendered into a string by Liquid: JSON, Python-literal or Ruby ``=>`` style.

    Only the flat literal shapes :func:`_read_hash` reads (never code), only for short text
    that looks like a hash, and only string keys with JSON-safe scalar values are kept. The
    caller gets its own dict.
    """
    text = text.strip()
    if not (2 <= len(text) <= _MAX_HASH_STRING_CHARS and text[0] == "{" and text[-1] == "}"):
        return None
    parse = _cached_hash_items if len(text) <= _MAX_CACHED_HASH_CHARS else _hash_items
    items = parse(text)
    return None if items is None else dict(items)

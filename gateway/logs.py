"""JSON logs, one object per line, that never carry a secret.

Every secret the config resolved is registered here at start-up; the formatter replaces any
occurrence of one (in the message or in an ``extra`` field) with ``***`` before the line is
written, so even a careless log call cannot leak it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import orjson

__all__ = ["JsonFormatter", "configure_logging", "redact", "register_secrets"]

_secrets: tuple[str, ...] = ()
_lock = threading.Lock()
_STD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


def register_secrets(values: Iterable[str]) -> None:
    """Add secret values to scrub from every log line (values shorter than 4 are ignored)."""
    global _secrets
    with _lock:
        merged = set(_secrets) | {v for v in values if v and len(v) >= 4}
        # longest first, so a secret that contains another is scrubbed whole
        _secrets = tuple(sorted(merged, key=len, reverse=True))


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = _clean(value)
        if record.exc_info:
            out["error"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(out, default=str).decode()


def _missing_topic_chatter(record: logging.LogRecord) -> bool:
    return not (
        record.levelno == logging.ERROR and record.msg == "Topic %s not found in cluster metadata"
    )


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kafka-python is chatty at INFO about every reconnect; its warnings still show.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
    # ... and logs "Topic X not found in cluster metadata" at ERROR every retry_backoff_ms
    # (ten lines a second per topic) while a topic is missing; the gateway says it once, with
    # the fix, from its topic watcher and in /readyz
    logging.getLogger("kafka.cluster").addFilter(_missing_topic_chatter)

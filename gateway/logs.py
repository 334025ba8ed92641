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
from collections.abc import Callable, Iterable
from typing import Any

import orjson

__all__ = [
    "JsonFormatter",
    "SampledLog",
    "configure_logging",
    "drop_query_strings",
    "redact",
    "register_secrets",
    "sample_uvicorn_request_warnings",
]

_secrets: tuple[str, ...] = ()
_lock = threading.Lock()
_STD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


def register_secrets(values: Iterable[str]) -> None:
    """Add secret values to scrub from every log line, whatever their length.

    Shared secrets are at least 16 characters (the config refuses shorter ones); an API key or
    SASL password is scrubbed however short it is, even where it only occurs as a word.
    """
    global _secrets
    with _lock:
        merged = set(_secrets) | {v for v in values if v}
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


def _without_query_string(record: logging.LogRecord) -> bool:
    """uvicorn's access line, with the path only: a query string may carry user ids."""
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
        record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
    return True


class _Window:
    __slots__ = ("lines", "started", "suppressed")

    def __init__(self, started: float) -> None:
        self.started = started
        self.lines = 0
        self.suppressed = 0


class SampledLog:
    """At most ``lines`` log lines per ``interval_s`` for each key; the rest are counted.

    For lines a client can cause at will (a refused request): one outsider must not be able to
    flood the logs. The first line of a key in a new interval is preceded by a summary of what
    the previous one suppressed. The metrics count every event, suppressed or not. Keys must be
    from a bounded set (a source and a fixed reason, never a request's value).
    """

    def __init__(
        self,
        logger: logging.Logger,
        lines: int = 10,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.lines = lines
        self.interval_s = interval_s
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def admit(self, key: str) -> tuple[bool, int]:
        """(write this line, how many the previous interval of ``key`` suppressed)."""
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            suppressed = 0
            if window is None or now - window.started >= self.interval_s:
                suppressed = window.suppressed if window else 0
                window = self._windows[key] = _Window(now)
            allowed = window.lines < self.lines
            if allowed:
                window.lines += 1
            else:
                window.suppressed += 1
        return allowed, suppressed

    def log(self, level: int, key: str, msg: str, *args: Any, extra: dict[str, Any]) -> None:
        allowed, suppressed = self.admit(key)
        if suppressed:
            self.logger.log(
                level,
                "suppressed %d more lines like the next within %.0f s (the metrics count them all)",
                suppressed,
                self.interval_s,
                extra={**extra, "suppressed": suppressed, "suppressed_key": key},
            )
        if allowed:
            self.logger.log(level, msg, *args, extra=extra)


class _SampledMessages(logging.Filter):
    """Samples a logger's lines with these messages (uvicorn's, per bad request) by message."""

    def __init__(self, sampler: SampledLog, messages: frozenset[str]) -> None:
        super().__init__()
        self.sampler = sampler
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self.messages:
            return True
        allowed, suppressed = self.sampler.admit(str(record.msg))
        if suppressed:
            record.suppressed_before = suppressed
        return allowed


# what uvicorn logs at warning for each malformed request or refused upgrade
_UVICORN_PER_REQUEST = frozenset({"Invalid HTTP request received.", "Unsupported upgrade request."})


def sample_uvicorn_request_warnings(lines: int, interval_s: float) -> None:
    """uvicorn's per-request warnings, at most ``lines`` per ``interval_s`` each."""
    logger = logging.getLogger("uvicorn.error")
    for old in [f for f in logger.filters if isinstance(f, _SampledMessages)]:
        logger.removeFilter(old)
    logger.addFilter(_SampledMessages(SampledLog(logger, lines, interval_s), _UVICORN_PER_REQUEST))


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
    drop_query_strings()


def drop_query_strings() -> None:
    """uvicorn's access log writes request paths without their query strings."""
    access = logging.getLogger("uvicorn.access")
    if _without_query_string not in access.filters:
        access.addFilter(_without_query_string)

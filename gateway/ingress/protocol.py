"""uvicorn's httptools protocol with the request-head limits a public listener needs.

uvicorn sets none of these, and httptools builds each header field by concatenating the
fragments of every read (quadratic in the field's size): one 64 MiB header stalled every
other client for about 6 s. This subclass, passed to uvicorn as its ``http`` protocol class,
adds them from outside the parser, in linear time:

- **Head size and field count.** The bytes of a request head are counted as they arrive,
  *before* they reach the parser. Past ``server.max_head_bytes`` bytes or
  ``server.max_header_count`` fields, the answer is 431 and the connection is closed; the
  parser never sees the excess.
- **Head deadline.** A new connection must deliver a complete head within
  ``server.head_timeout_s``; on a kept-alive connection the clock starts at the first byte of
  the next request (the idle time between requests stays ``server.timeout_keep_alive``, above
  the load balancer's). Past it the answer is 408 and the connection is closed.
- **Trailers are dropped.** Fields of a chunked body's trailer section never reach
  ``scope["headers"]``, so the client address, the secret and everything else are decided from
  the request head alone. The trailer section is bounded like a head (the connection is closed
  past ``server.max_head_bytes``).
- **Upgrades are refused.** The gateway speaks HTTP/1.1 only: a request asking to switch
  protocols (``Upgrade: h2c``, websocket, ...) is answered 400 and its connection closed,
  instead of being left open with its body unread.
"""

from __future__ import annotations

import asyncio
import copyreg
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

__all__ = ["HeadCounter", "HeadLimits", "LimitedHttpToolsProtocol", "protocol_class"]

_END_OF_HEAD = b"\r\n\r\n"


class HeadCounter:
    """Bytes and line ends of one request head, fed in the pieces it arrives in.

    Stops counting at the end of the head (an empty line), which may be split across pieces;
    what follows it (the body) is not counted.
    """

    __slots__ = ("done", "lines", "size", "tail")

    def __init__(self) -> None:
        self.size = 0
        self.lines = 0
        self.done = False
        self.tail = b""  # the last 3 bytes fed, for an end of head split across pieces

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        tail = self.tail
        joined = tail + data if tail else data
        end = joined.find(_END_OF_HEAD)
        if end < 0:
            in_head = len(data)
        else:
            in_head = end + len(_END_OF_HEAD) - len(tail)
            self.done = True
        self.size += in_head
        self.lines += data.count(b"\n", 0, in_head)
        self.tail = joined[-3:]


@dataclass(frozen=True)
class HeadLimits:
    max_head_bytes: int = 65536
    max_header_count: int = 100
    head_timeout_s: float = 30.0


# the key under which the app's lifespan state holds its gateway_connection_refusals counter
REFUSALS_STATE_KEY = "gateway.connection_refusals"


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` plus :class:`HeadLimits` (see the module docstring)."""

    limits: ClassVar[HeadLimits] = HeadLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_open = True  # between the end of one message and the end of the next head
        self._head = HeadCounter()
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_trailers = False  # after a chunk header, before its data (or the trailers)
        self._trailer_bytes = 0
        self._refused = False

    # connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_open:
            if self._head_timer is None:
                self._arm_head_timer()  # the first byte of a request on a kept-alive connection
            if not self._scan_head(data):
                self._refuse(431, "Request Header Fields Too Large", "head_too_large")
                return
        elif self._in_trailers:
            self._trailer_bytes += len(data)
            if self._trailer_bytes > self.limits.max_head_bytes:
                self._refuse(431, "Request Header Fields Too Large", "trailers_too_large")
                return
        super().data_received(data)

    def _scan_head(self, data: bytes) -> bool:
        """Counts the head bytes and lines in ``data``; False once past a limit."""
        head = self._head
        head.feed(data)
        # a complete head of n fields has n + 2 line ends (request line, fields, empty line)
        return (
            head.size <= self.limits.max_head_bytes
            and head.lines <= self.limits.max_header_count + 2
        )

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._head_open or self._refused:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined head, behind a response still being made: let that one finish,
            # then close instead of reading on
            self._refused = True
            self.cycle.keep_alive = False
            return
        self._refuse(408, "Request Timeout", "head_timeout")

    def _refuse(self, status: int, message: str, reason: str) -> None:
        """Answers ``status`` (when no response is under way) and closes the connection;
        counted by ``reason`` in the app's metrics, which its lifespan shares with us."""
        self._refused = True
        self._cancel_head_timer()
        counter = self.app_state.get(REFUSALS_STATE_KEY)
        if counter is not None:
            counter.labels(reason).inc()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            body = message.encode("ascii")
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            ]
            self.transport.write(b"".join(head))
        self.transport.close()

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_trailers = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_open:
            return  # a trailer field: never part of the request's headers
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._cancel_head_timer()
        if self.parser.should_upgrade():
            self._refuse(400, "Protocol upgrades are not supported.", "upgrade")
            return
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        self._in_trailers = True
        self._trailer_bytes = 0

    def on_body(self, body: bytes) -> None:
        self._in_trailers = False
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_trailers = False
        self._head_open = True
        self._head = HeadCounter()


class _WithLimits(type):
    """The metaclass of the classes :func:`protocol_class` makes, so that they pickle."""


def protocol_class(limits: HeadLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class for uvicorn's ``http=`` option, with these limits.

    It pickles as ``protocol_class(limits)``: uvicorn sends its config, this class included,
    to each worker process when ``server.workers`` > 1.
    """
    made = _WithLimits("GatewayHttpProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})
    return cast("type[LimitedHttpToolsProtocol]", made)


def _reduce(cls: _WithLimits) -> tuple[Any, tuple[HeadLimits]]:
    return protocol_class, (cast("type[LimitedHttpToolsProtocol]", cls).limits,)


copyreg.pickle(_WithLimits, _reduce)

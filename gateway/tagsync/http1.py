"""A lean HTTP/1.1 keep-alive client for the OneSignal sink (the :class:`UpdateSender` seam).

Why not httpx: the worker is CPU-bound in one interpreter, and httpx + httpcore + anyio cost
about 1-1.5 ms of CPU per request (header models, URL parsing, pool bookkeeping, anyio
checkpoints), which capped the whole worker near 450-700 requests/s on two shared cores, below
OneSignal's 1,000 requests/s per app. This client does only what the sink needs: one request
shape (PATCH with a small JSON body), built as bytes from a per-app header block prepared
once, and responses parsed by httptools (llhttp, the parser uvicorn uses) in an
:class:`asyncio.Protocol`. It costs a tenth of that.

What it handles: http:// and https:// (certificate and hostname checked, SNI, ALPN
``http/1.1``); a bounded pool of keep-alive connections; a connect timeout and an overall
deadline per request; Content-Length, chunked and close-delimited bodies; ``Connection:
close``; a server closing an idle connection under our feet (one retry on a fresh
connection, see :meth:`Http1Client._exchange`). It does not do proxies, redirects, HTTP/2
or compression: the worker uses the httpx client when an environment proxy applies to the
API URL (see :func:`gateway.tagsync.client.make_sender`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

import httptools
import httpx
import orjson

from gateway.config import Secret
from gateway.tagsync.client import MAX_BODY_KEPT, USER_AGENT, Response, update_body
from gateway.tagsync.rules import Alias, TagValue

__all__ = ["Http1Client"]

# Close a connection idle this long rather than race the server's own idle timeout (httpx's
# default keepalive_expiry too).
KEEPALIVE_EXPIRY_S = 5.0
CONNECT_TIMEOUT_S = 3.0


class _Stale(ConnectionError):
    """The connection closed before any byte of the response arrived."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection: one request at a time, the response parsed as it arrives."""

    def __init__(self, loop: asyncio.AbstractEventLoop, body_cap: int) -> None:
        self.loop = loop
        self.body_cap = body_cap
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.body = bytearray()
        self.retry_after: str | None = None
        self.got_bytes = False
        self.headers_done = False
        self.complete = False
        self.framed = False  # Content-Length or chunked: the body does not end at EOF
        self.keep_alive = True

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            # Bytes nobody asked for: the stream is out of step; never reuse it.
            self.keep_alive = False
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.keep_alive = False
            waiter.set_exception(ValueError(f"invalid HTTP response: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.headers_done and not self.framed:
            # A body without Content-Length or chunking ends when the connection does.
            self.keep_alive = False
            waiter.set_result(None)
        elif not self.got_bytes:
            waiter.set_exception(_Stale("connection closed before the response"))
        else:
            waiter.set_exception(ConnectionError("connection closed mid-response"))

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second response to one request
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self.framed = True
        elif name == b"transfer-encoding":
            self.framed = self.framed or b"chunked" in value.lower()
        elif name == b"retry-after":
            self.retry_after = value.decode("latin-1").strip()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        room = self.body_cap - len(self.body)
        if room > 0:
            self.body += body[:room]

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim response; the real one follows
            got = self.got_bytes
            self._reset()
            self.got_bytes = got
            return
        self.complete = True
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- used by the client -----------------------------------------------------------------

    async def exchange(self, request: bytes) -> tuple[int, bytes, str | None]:
        """Send ``request``; the status, the (capped) body and Retry-After."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise _Stale("connection closed before the request")
        self._reset()
        waiter = self.waiter = self.loop.create_future()
        transport.write(request)
        try:
            await waiter
        finally:
            self.waiter = None
        return self.status, bytes(self.body), self.retry_after

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Http1Client:
    """Sends Update user requests with the app's API key over pooled HTTP/1.1 connections."""

    def __init__(
        self,
        api_url: str,
        api_keys: Mapping[str, Secret],
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        max_connections: int = 64,
        delete_value: str = "",
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
    ) -> None:
        parts = urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"onesignal.api_url must be an http:// or https:// URL: {api_url!r}")
        self.api_url = api_url
        self.delete_value = delete_value
        self.deadline_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.keepalive_expiry_s = keepalive_expiry_s
        self.max_connections = max_connections
        self.host = parts.hostname
        tls = parts.scheme == "https"
        self.port = parts.port or (443 if tls else 80)
        self._ssl: ssl.SSLContext | None = None
        if tls:
            # httpx's context: the same CA bundle (certifi, or SSL_CERT_FILE / SSL_CERT_DIR)
            # as the httpx client, so switching clients never changes what is trusted.
            self._ssl = ssl_context or httpx.create_ssl_context()
            self._ssl.set_alpn_protocols(["http/1.1"])
        host = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None and parts.port != (443 if tls else 80):
            host = f"{host}:{parts.port}"
        # already percent-encoded characters stay as they are
        self._prefix = quote(parts.path.rstrip("/"), safe="/%:@!$&'()*+,;=~")
        self._common = (
            f"Host: {host}\r\nUser-Agent: {USER_AGENT}\r\nAccept: application/json\r\n"
            "Content-Type: application/json\r\n"
        )
        # One header block per app, built once (and again when its key is re-read).
        self._heads: dict[str, bytes | None] = {}
        for app_id, key in api_keys.items():
            self.set_api_key(app_id, key)
        self._idle: deque[_Conn] = deque()
        self._all: set[_Conn] = set()
        self._sem: asyncio.Semaphore | None = None
        self._closed = False

    def set_api_key(self, app_id: str, key: Secret) -> None:
        """A key that could not be a header value (a CR/LF would split the request) gives an
        error per request, as httpx did; the error never contains the key."""
        value = key.reveal()
        ok = value.isprintable() and value.isascii()
        self._heads[app_id] = (
            (self._common + f"Authorization: Key {value}\r\n").encode("ascii") if ok else None
        )

    async def update_user(
        self,
        alias: Alias,
        tags: Mapping[str, TagValue],
        *,
        trace: Mapping[str, str] | None = None,
    ) -> Response:
        if alias.app_id not in self._heads:  # the worker dead-letters these first; a guard
            return Response(status=None, error="no API key configured for this app")
        head = self._heads[alias.app_id]
        if head is None:
            return Response(
                status=None, error="the API key of this app has characters a header cannot hold"
            )
        body = orjson.dumps(update_body(tags, self.delete_value))
        path = (
            f"{self._prefix}/apps/{quote(alias.app_id, safe='')}/users/by/"
            f"{quote(alias.label, safe='')}/{quote(alias.id, safe='')}"
        )
        request = b"".join(
            (
                b"PATCH ",
                path.encode("ascii"),
                b" HTTP/1.1\r\n",
                head,
                _trace_lines(trace) if trace else b"",
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            )
        )
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.deadline_s):
                status, raw, retry_after = await self._send(request)
        except (TimeoutError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, TimeoutError):
                error = f"TimeoutError: no complete response within {self.deadline_s:g}s"
            return Response(status=None, error=error[:300], elapsed_s=time.monotonic() - started)
        return Response(
            status=status,
            body=raw.decode("utf-8", "replace"),
            retry_after=retry_after,
            elapsed_s=time.monotonic() - started,
        )

    async def _send(self, request: bytes) -> tuple[int, bytes, str | None]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_connections)
        async with self._sem:
            return await self._exchange(request)

    async def _exchange(self, request: bytes) -> tuple[int, bytes, str | None]:
        conn = self._checkout()
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            result = await conn.exchange(request)
        except _Stale:
            self._drop(conn)
            if not reused:
                raise
            # The server closed the idle connection as we sent (its keep-alive timeout): it
            # answered nothing, and the request is safe to send again, since an Update user
            # PATCH sets absolute tag values: receiving it twice is receiving it once. Once
            # only, on a fresh connection; a fresh connection failing so is an error.
            conn = await self._connect()
            try:
                result = await conn.exchange(request)
            except BaseException:
                self._drop(conn)
                raise
        except BaseException:
            self._drop(conn)  # state unknown (timeout, cancel, bad response): never reuse
            raise
        if conn.keep_alive and not conn.closed and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
            self._all.discard(conn)
        return result

    def _drop(self, conn: _Conn) -> None:
        conn.abort()
        self._all.discard(conn)

    def _checkout(self) -> _Conn | None:
        """The most recently used idle connection still open and fresh, or None."""
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_expiry_s:
                return conn
            conn.close()
            self._all.discard(conn)
        return None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Conn(loop, MAX_BODY_KEPT),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                    ssl_handshake_timeout=self.connect_timeout_s if self._ssl else None,
                )
        except TimeoutError:
            raise ConnectionError(
                f"connect to {self.host}:{self.port} timed out after {self.connect_timeout_s:g}s"
            ) from None
        self._all.add(conn)
        return conn

    @property
    def connections(self) -> int:
        """Connections open (idle or in use)."""
        return sum(1 for c in self._all if not c.closed)

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost


def _trace_lines(trace: Mapping[str, str]) -> bytes:
    """W3C trace-context header lines; a value that could split the request is left out."""
    lines = []
    for name, value in trace.items():
        if value and value.isascii() and value.isprintable():
            lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("ascii")

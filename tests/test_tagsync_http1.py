"""The lean HTTP/1.1 client against real servers on loopback.

The well-behaved server is the fake OneSignal (uvicorn); the rest are small servers started
here with ``asyncio.start_server``, each misbehaving in one way a real server or network can:
chunked and close-delimited bodies, ``Connection: close``, idle connections closed under the
client, garbage, slowness, huge bodies. Every assertion is about what crossed the socket.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from gateway.config import Config, OneSignalApp, OneSignalConfig, Secret, TagSyncConfig
from gateway.devkit.fake_onesignal import FakeOneSignal
from gateway.tagsync.client import MAX_BODY_KEPT, OneSignalClient, Response, UpdateSender
from gateway.tagsync.http1 import Http1Client
from gateway.tagsync.rules import Alias
from gateway.tagsync.worker import TagSyncWorker

KEY = "sekrit-key-do-not-leak-7c1e"
APP = "11111111-2222-3333-4444-555555555555"
ALIAS = Alias(APP, "external_id", "user-1")
TAGS = {"a": "1", "gone": None}


def client(url: str, **kw: Any) -> Http1Client:
    return Http1Client(url, {APP: Secret(KEY)}, **kw)


def assert_no_key(resp: Response) -> None:
    assert KEY not in resp.error and KEY not in resp.body


# -- against the fake OneSignal (uvicorn + httptools) -------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOneSignal]:
    with FakeOneSignal(api_key=KEY, per_user_interval_s=0.0) as f:
        yield f


def test_update_user_against_the_fake(fake: FakeOneSignal) -> None:
    fake.reset()

    async def go() -> tuple[list[Response], int]:
        c = client(fake.url)
        try:
            out = [await c.update_user(Alias(APP, "external_id", f"u{i}"), TAGS) for i in range(5)]
            return out, c.connections
        finally:
            await c.aclose()

    responses, connections = asyncio.run(go())
    assert [r.status for r in responses] == [202] * 5
    assert orjson.loads(responses[0].body) == {"properties": {"tags": {"a": "1", "gone": ""}}}
    assert connections == 1  # one keep-alive connection for five sequential requests
    log = fake.requests
    assert len(log) == 5
    first = log[0]
    assert first.method == "PATCH"
    assert first.path == f"/apps/{APP}/users/by/external_id/u0"
    assert first.headers["authorization"] == f"Key {KEY}"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["accept"] == "application/json"
    assert first.headers["host"] == fake.url.removeprefix("http://")
    assert first.headers["content-length"] == str(len(first.raw))
    assert first.body == {"properties": {"tags": {"a": "1", "gone": ""}}}
    assert fake.tags(APP, "external_id", "u4") == {"a": "1"}


def test_delete_value_null_and_percent_encoded_ids(fake: FakeOneSignal) -> None:
    fake.reset()
    odd = "a/b c?d#e%f+é"

    async def go() -> Response:
        c = client(fake.url, delete_value="null")
        try:
            return await c.update_user(Alias(APP, "external_id", odd), {"x": "1", "y": None})
        finally:
            await c.aclose()

    assert asyncio.run(go()).status == 202
    (req,) = fake.requests
    assert req.path == f"/apps/{APP}/users/by/external_id/a%2Fb%20c%3Fd%23e%25f%2B%C3%A9"
    assert req.alias_id == odd
    assert req.body == {"properties": {"tags": {"x": "1", "y": None}}}


def test_statuses_bodies_and_retry_after_are_kept(fake: FakeOneSignal) -> None:
    fake.reset()
    fake.script(429, count=1, retry_after=7)
    fake.script(503, count=1)

    async def go() -> list[Response]:
        c = client(fake.url)
        wrong = Http1Client(fake.url, {APP: Secret("not-the-key")})
        try:
            return [
                await c.update_user(ALIAS, TAGS),
                await c.update_user(ALIAS, TAGS),
                await wrong.update_user(ALIAS, TAGS),
                await c.update_user(Alias("other-app", "external_id", "u"), TAGS),
            ]
        finally:
            await c.aclose()
            await wrong.aclose()

    limited, unavailable, unauthorized, unknown = asyncio.run(go())
    assert (limited.status, limited.retry_after) == (429, "7")
    assert "rate limit" in limited.body
    assert unavailable.status == 503 and unavailable.retry_after is None
    assert unauthorized.status == 401 and "auth-1" in unauthorized.body
    assert unknown.status is None and "no API key" in unknown.error
    assert len(fake.requests) == 3  # the unknown app sent nothing


def test_concurrent_requests_share_a_bounded_pool(fake: FakeOneSignal) -> None:
    fake.reset()

    async def go() -> tuple[list[Response], int]:
        c = client(fake.url, max_connections=3)
        try:
            out = await asyncio.gather(
                *(c.update_user(Alias(APP, "external_id", f"c{i}"), TAGS) for i in range(30))
            )
            return list(out), c.connections
        finally:
            await c.aclose()

    responses, connections = asyncio.run(go())
    assert all(r.status == 202 for r in responses)
    assert 1 <= connections <= 3
    assert len(fake.requests) == 30


# -- adversarial servers --------------------------------------------------------------------

Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """``asyncio.start_server`` on 127.0.0.1 counting connections and requests."""

    def __init__(self, handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_ctx = ssl_ctx
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(self, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.ssl_ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
        """One request (head, body), or None at a clean EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length)
        self.requests.append((head, body))
        return head, body


def ok(body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def keep_alive_ok(s: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while await s.read_request(r) is not None:
        w.write(ok(b'{"ok":true}'))
        await w.drain()


def updates(handler: Handler, n: int) -> tuple[list[Response], Server]:
    """``n`` Update user calls in a row, on one client, against a server running ``handler``."""

    async def go() -> tuple[list[Response], Server]:
        async with Server(handler) as s:
            c = client(s.url, timeout_s=5)
            try:
                return [await c.update_user(ALIAS, TAGS) for _ in range(n)], s
            finally:
                await c.aclose()

    result: tuple[list[Response], Server] = asyncio.run(go())
    return result


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def test_request_line_headers_and_path_prefix() -> None:
    async def go() -> tuple[Response, Server]:
        async with Server(keep_alive_ok) as s:
            c = client(s.url + "/api/v1/", timeout_s=5)
            try:
                return await c.update_user(Alias(APP, "onesignal_id", "x/y"), {"k": "v"}), s
            finally:
                await c.aclose()

    resp, s = run(go())
    assert resp.status == 200 and resp.body == '{"ok":true}'
    ((head, body),) = s.requests
    lines = head.decode().split("\r\n")
    assert lines[0] == f"PATCH /api/v1/apps/{APP}/users/by/onesignal_id/x%2Fy HTTP/1.1"
    assert f"Host: 127.0.0.1:{s.port}" in lines
    assert f"Authorization: Key {KEY}" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert orjson.loads(body) == {"properties": {"tags": {"k": "v"}}}


def test_chunked_response_and_the_connection_is_reused() -> None:
    async def chunked(s: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await s.read_request(r) is not None:
            w.write(
                b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n"
                b"Retry-After: 3\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            await w.drain()

    responses, s = updates(chunked, 3)
    assert [(r.status, r.body, r.retry_after) for r in responses] == [(202, "hello world", "3")] * 3
    assert (s.connections, len(s.requests)) == (1, 3)


def test_connection_close_and_close_delimited_body() -> None:
    async def closing(s: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await s.read_request(r)
        if len(s.requests) % 2:
            w.write(ok(b"framed", b"Connection: close\r\n"))
        else:  # no length, no chunking: the body ends with the connection
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-eof")
        await w.drain()

    responses, s = updates(closing, 4)
    assert [(r.status, r.body) for r in responses] == [(200, "framed"), (200, "until-eof")] * 2
    assert (s.connections, len(s.requests)) == (4, 4)  # none reused after a close


def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async def one_then_close(s: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await s.read_request(r)
        w.write(ok())  # keep-alive by default, and then closed anyway (an idle timeout)
        await w.drain()

    async def go() -> tuple[list[Response], Server]:
        async with Server(one_then_close) as s:
            c = client(s.url, timeout_s=5)
            try:
                first = await c.update_user(ALIAS, TAGS)
                await asyncio.sleep(0.1)  # the close arrives while the connection is idle
                return [first, await c.update_user(ALIAS, TAGS)], s
            finally:
                await c.aclose()

    responses, s = run(go())
    assert [r.status for r in responses] == [200, 200]
    assert (s.connections, len(s.requests)) == (2, 2)


def test_server_closing_a_reused_connection_unanswered_is_retried_once_fresh() -> None:
    """The race with an idle timeout: the request went out, the server closed, no byte came."""

    async def drop_second(s: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await s.read_request(r) is not None:
            if len(s.requests) == 2:
                return  # read it, answer nothing, close
            w.write(ok())
            await w.drain()

    responses, s = updates(drop_second, 2)
    assert [r.status for r in responses] == [200, 200]
    # the second request reached the server twice: on the stale connection and a fresh one
    assert (s.connections, len(s.requests)) == (2, 3)


def test_unanswered_on_a_fresh_connection_or_twice_is_an_error_not_a_loop() -> None:
    async def never_answer(s: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await s.read_request(r)

    async def answer_first_only(
        s: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while await s.read_request(r) is not None:
            if len(s.requests) > 1:
                return
            w.write(ok())
            await w.drain()

    async def go() -> tuple[Response, Server, list[Response], Server]:
        async with Server(never_answer) as s1, Server(answer_first_only) as s2:
            c1, c2 = client(s1.url, timeout_s=5), client(s2.url, timeout_s=5)
            try:
                fresh = await c1.update_user(ALIAS, TAGS)
                twice = [await c2.update_user(ALIAS, TAGS) for _ in range(2)]
                return fresh, s1, twice, s2
            finally:
                await c1.aclose()
                await c2.aclose()

    fresh, s1, twice, s2 = run(go())
    assert fresh.status is None and "closed" in fresh.error
    assert (s1.connections, len(s1.requests)) == (1, 1)
    assert twice[0].status == 200 and twice[1].status is None
    assert (s2.connections, len(s2.requests)) == (2, 3)  # one retry, not more
    assert_no_key(fresh)
    assert_no_key(twice[1])


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Le",
    ],
    ids=["content-length", "chunked", "headers"],
)
def test_a_response_cut_short_is_an_error_and_not_resent(partial: bytes) -> None:
    async def cut(s: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await s.read_request(r) is not None:
            if len(s.requests) == 1:
                w.write(ok())
                await w.drain()
                continue
            w.write(partial)
            await w.drain()
            return

    responses, s = updates(cut, 2)
    assert responses[0].status == 200
    assert responses[1].status is None and "mid-response" in responses[1].error
    assert len(s.requests) == 2  # some of the answer arrived: the server may have acted on it


def test_garbage_response_is_a_transport_error() -> None:
    async def garbage(s: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await s.read_request(r)
        w.write(b"SMTP ready\r\n\r\n\x00\x01\x02 this is not HTTP\r\n\r\n")
        await w.drain()
        await asyncio.sleep(1)

    (resp,), _ = updates(garbage, 1)
    assert resp.status is None and "invalid HTTP response" in resp.error
    assert_no_key(resp)


def test_slow_server_hits_the_deadline() -> None:
    async def slow(s: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await s.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")  # then trickles nothing
        await w.drain()
        await asyncio.sleep(5)

    async def go() -> tuple[Response, float]:
        async with Server(slow) as s:
            c = client(s.url, timeout_s=0.3)
            try:
                started = time.monotonic()
                resp = await c.update_user(ALIAS, TAGS)
                return resp, time.monotonic() - started
            finally:
                await c.aclose()

    resp, took = run(go())
    assert resp.status is None and "TimeoutError" in resp.error
    assert 0.25 <= took < 2.0
    assert_no_key(resp)


def test_body_over_the_cap_is_truncated_and_the_connection_still_reused() -> None:
    big = b"x" * (MAX_BODY_KEPT * 5)

    async def huge(s: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await s.read_request(r) is not None:
            w.write(ok(big))
            await w.drain()

    responses, s = updates(huge, 2)
    assert [len(r.body) for r in responses] == [MAX_BODY_KEPT] * 2
    assert s.connections == 1


def test_connection_refused_and_a_key_that_cannot_be_a_header() -> None:
    async def go() -> tuple[Response, Response, Server]:
        async with Server(keep_alive_ok) as s:
            port = s.port
            bad = Http1Client(s.url, {APP: Secret("k\r\nX-Injected: 1")})
            try:
                injected = await bad.update_user(ALIAS, TAGS)
            finally:
                await bad.aclose()
        c = client(f"http://127.0.0.1:{port}", timeout_s=2)  # the server is gone now
        try:
            refused = await c.update_user(ALIAS, TAGS)
        finally:
            await c.aclose()
        return injected, refused, s

    injected, refused, s = run(go())
    assert injected.status is None and "header" in injected.error
    assert "X-Injected" not in injected.error
    assert s.connections == 0  # nothing was sent
    assert refused.status is None and "ConnectionRefusedError" in refused.error
    assert_no_key(refused)


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for "localhost" from a throw-away CA (trustme), as PEM files.

    Returns (the CA's certificate, which a client trusts; the server's chain and key).
    """
    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    d = tmp_path_factory.mktemp("tls")
    ca_file, server_file = d / "ca.pem", d / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    issued.private_key_and_cert_chain_pem.write_to_path(str(server_file))
    return ca_file, server_file


def test_https_checks_the_certificate_and_the_hostname(cert: tuple[Path, Path]) -> None:
    crt, chain = cert
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(chain)

    def trusting() -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(crt))

    async def go() -> tuple[list[Response], Response, Response, Server]:
        async with Server(keep_alive_ok, ssl_ctx=server_ctx) as s:
            good = client(f"https://localhost:{s.port}", timeout_s=5, ssl_context=trusting())
            wrong_name = client(f"https://127.0.0.1:{s.port}", timeout_s=5, ssl_context=trusting())
            untrusted = client(f"https://localhost:{s.port}", timeout_s=5)  # default CAs
            try:
                ok_responses = [await good.update_user(ALIAS, TAGS) for _ in range(2)]
                return (
                    ok_responses,
                    await wrong_name.update_user(ALIAS, TAGS),
                    await untrusted.update_user(ALIAS, TAGS),
                    s,
                )
            finally:
                for c in (good, wrong_name, untrusted):
                    await c.aclose()

    ok_responses, wrong_name, untrusted, s = run(go())
    assert [r.status for r in ok_responses] == [200, 200]
    assert len(s.requests) == 2  # only the trusted, matching connection got a request through
    assert wrong_name.status is None and "CERTIFICATE_VERIFY_FAILED" in wrong_name.error
    assert "127.0.0.1" in wrong_name.error  # the hostname check, not the CA, failed
    assert untrusted.status is None and "CERTIFICATE_VERIFY_FAILED" in untrusted.error
    assert_no_key(wrong_name)


# -- which client the worker uses -------------------------------------------------------------


def test_the_worker_uses_httpx_only_behind_an_environment_proxy_or_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    def sender(http_client: str = "auto") -> UpdateSender:
        cfg = Config(
            onesignal=OneSignalConfig(
                api_url="https://api.onesignal.com",
                apps=(OneSignalApp(app_id=APP, api_key_env="K", api_key=Secret(KEY)),),
            ),
            tag_sync=TagSyncConfig(http_client=http_client),
        )
        return TagSyncWorker(cfg)._make_sender()

    async def kinds() -> list[type]:
        out = []
        for make in (
            lambda: sender(),
            lambda: sender("httpx"),
        ):
            s = make()
            out.append(type(s))
            await s.aclose()
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
        s = sender()
        out.append(type(s))
        await s.aclose()
        monkeypatch.setenv("NO_PROXY", "api.onesignal.com")
        s = sender()
        out.append(type(s))
        await s.aclose()
        return out

    assert asyncio.run(kinds()) == [Http1Client, OneSignalClient, OneSignalClient, Http1Client]

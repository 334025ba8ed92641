"""Hostile senders against the request head and the connection, played from an outsider.

Every test talks to a real uvicorn server on loopback in front of the test broker. The outsider
is a client socket bound to 127.0.0.9: neither a trusted proxy (127.0.0.1/32, ::1/128 here) nor
allowlisted. docs/reliability.md ("The request head and connections") lists each attack with
the figures these tests print.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.records import header
from gateway.devkit import samples
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.ingress.protocol import HeadCounter

from .conftest import read_topic, unique
from .ingress_helpers import (
    EU_WEST4,
    SECRET,
    gateway_config,
    post,
    running_gateway,
    scrape,
)

ES = "/v1/onesignal/events"
OUTSIDER = "127.0.0.9"


def _outsider(url: str, timeout_s: float = 10.0) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout_s, source_address=(OUTSIDER, 0)
    )


def _read_all(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    """Everything the server writes until it closes (or resets) the connection."""
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while len(out) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def _read_response(sock: socket.socket) -> bytes:
    """One response (with a Content-Length) from a kept-alive connection."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, raw
        raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, raw
        rest += chunk
    return head + b"\r\n\r\n" + rest


def _status(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw[9:12])


def _head(*lines: str, path: str = ES) -> bytes:
    return ("\r\n".join([f"POST {path} HTTP/1.1", "Host: gateway", *lines]) + "\r\n").encode()


def _body(event_id: str | None = None) -> bytes:
    import orjson

    payload = samples.event_stream_payload(
        "message.push.clicked", event_id=event_id or str(uuid.uuid4())
    )
    return orjson.dumps(payload)


_FIELD = st.from_regex(r"[A-Za-z-]{1,12}: [ -~]{0,40}", fullmatch=True)


@settings(deadline=None)  # the machine is shared
@given(
    fields=st.lists(_FIELD, max_size=30),
    body=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_the_head_counter_counts_the_head_alone_however_it_is_split(
    fields: list[str], body: bytes, cuts: list[int]
) -> None:
    head = ("\r\n".join(["POST /x HTTP/1.1", *fields]) + "\r\n\r\n").encode()
    raw = head + body + b"\r\n\r\n"  # a body may hold an empty line too: not counted
    counter = HeadCounter()
    bounds = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        counter.feed(raw[start:end])
    assert counter.done
    assert counter.size == len(head)
    assert counter.lines == len(fields) + 2


@pytest.fixture
def gateway(broker: EmbeddedBroker) -> Iterator[str]:
    config = gateway_config(
        broker.bootstrap_servers,
        unique("head"),
        server={"max_head_bytes": 16384, "max_header_count": 40, "head_timeout_s": 1.0},
    )
    with running_gateway(config) as (url, _):
        yield url


def test_oversized_head_is_431_and_closed(gateway: str) -> None:
    with _outsider(gateway) as s:
        s.sendall(_head("X-Big: " + "a" * 20000))  # no end of head: the limit alone decides
        raw = _read_all(s)
    assert _status(raw) == 431, raw[:200]
    assert b"connection: close" in raw.lower()


def test_too_many_header_fields_is_431_and_at_the_limit_is_served(gateway: str) -> None:
    # 40 fields in all is the limit: served (403: the outsider is not allowlisted)
    with _outsider(gateway) as s:
        s.sendall(
            _head(*(f"X-F{i}: v" for i in range(37)), "Content-Length: 0", "Connection: close")
            + b"\r\n"
        )
        assert _status(_read_all(s)) == 403
    with _outsider(gateway) as s:
        s.sendall(_head(*(f"X-F{i}: v" for i in range(40))) + b"\r\n")
        raw = _read_all(s)
    assert _status(raw) == 431, raw[:200]


def _latencies(client: httpx.Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        r = post(client, ES, content=_body())
        out.append(time.perf_counter() - started)
        assert r.status_code == 200, r.text
    return out


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# The outsider, in a process of its own (so that its work does not take the test process's
# GIL from the server): each connection tries to send one 64 MiB header, and when the gateway
# cuts it, it connects again, until its stdin closes. It says "cut" once a connection was cut,
# and at the end how much it wrote over how many connections.
_ATTACKER = """
import socket, sys, threading
host, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
piece, sent, connections = b"a" * 65536, 0, 0
while not stop.is_set():
    try:
        with socket.create_connection((host, port), 5, (source, 0)) as s:
            connections += 1
            s.sendall(b"POST /v1/onesignal/events HTTP/1.1\\r\\nHost: gateway\\r\\nX-Big: ")
            for _ in range((64 << 20) // len(piece)):
                if stop.is_set():
                    break
                s.sendall(piece)
                sent += len(piece)
    except OSError:
        if connections == 1:
            print("cut", flush=True)
print(sent, connections, flush=True)
"""


def test_others_latency_stays_flat_while_an_outsider_sends_a_huge_head(gateway: str) -> None:
    """httptools concatenates a header's fragments on every read (quadratic in its size) and
    uvicorn sets no limit: an outsider's 64 MiB header raised everyone's latency. Now its
    connection is cut after max_head_bytes, however much it keeps sending."""
    port = gateway.rsplit(":", 1)[1]
    with httpx.Client(base_url=gateway, timeout=30) as client:
        _latencies(client, 5)  # warm
        before = _latencies(client, 40)
        attacker = subprocess.Popen(
            [sys.executable, "-c", _ATTACKER, "127.0.0.1", port, OUTSIDER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert attacker.stdin is not None and attacker.stdout is not None
        try:
            # under way (one connection cut already); unfixed it is never cut: give up in 10 s
            first: list[str] = []
            ready = threading.Thread(
                target=lambda: first.append(attacker.stdout.readline()),  # type: ignore[union-attr]
                daemon=True,
            )
            ready.start()
            ready.join(10)
            during = _latencies(client, 40)
        finally:
            attacker.stdin.close()
            attacker.wait(30)
            ready.join(10)
            out = "".join(first) + attacker.stdout.read()
            attacker.stdout.close()
    sent, connections = (int(x) for x in out.split()[-2:])
    b50, b99, d50, d99 = _p(before, 50), _p(before, 99), _p(during, 50), _p(during, 99)
    print(
        f"\nother client, ms: before p50 {b50 * 1e3:.1f} p99 {b99 * 1e3:.1f};"
        f" during p50 {d50 * 1e3:.1f} p99 {d99 * 1e3:.1f}"
        f" (p50 ratio {d50 / b50:.1f}x, p99 ratio {d99 / b99:.1f}x); the outsider wrote"
        f" {sent / 2**20:.1f} MiB over {connections} connections"
    )
    assert connections >= 2, "the outsider's connection was never cut"
    # generous (the machine is shared): measured 1.0x at p50 and 1.3x at p99. Without the
    # limit the same attack measured 4.2x at p50 and 12.1x at p99 (49 -> 206 ms, 66 -> 805 ms)
    assert d50 < 2 * b50 + 0.01, (before, during)
    assert d99 < 3 * b99 + 0.05, (before, during)


def test_silent_and_slow_heads_get_408_within_the_deadline(gateway: str) -> None:
    timings = []
    with _outsider(gateway) as silent, _outsider(gateway) as slow:
        started = time.monotonic()
        slow.sendall(b"POST ")
        for _ in range(3):
            time.sleep(0.2)
            slow.sendall(b"a")
        for sock in (silent, slow):
            raw = _read_all(sock)
            timings.append(time.monotonic() - started)
            assert _status(raw) == 408, raw[:200]
    print(
        f"\nhead_timeout_s 1.0: silent closed after {timings[0]:.2f}s, slow after {timings[1]:.2f}s"
    )
    assert all(0.9 <= t < 3.0 for t in timings), timings


def test_a_kept_alive_connection_outlives_the_head_deadline(gateway: str) -> None:
    """The head deadline runs from a reused connection's first byte, not from the previous
    answer: the load balancer's idle pooled connections stay up to timeout_keep_alive."""
    port = int(gateway.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for _ in range(3):  # one connection, idle 1.5 s between requests
            body = _body()
            s.sendall(
                _head(
                    f"Authorization: Bearer {SECRET}",
                    f"X-Forwarded-For: {EU_WEST4}",
                    "Content-Type: application/json",
                    f"Content-Length: {len(body)}",
                )
                + b"\r\n"
                + body
            )
            assert _status(_read_response(s)) == 200
            time.sleep(1.5)  # longer than head_timeout_s, far below timeout_keep_alive


def _chunked(head: bytes, body: bytes, trailers: list[str]) -> bytes:
    trailer = "".join(f"{t}\r\n" for t in trailers).encode()
    return (
        head
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n" % (len(body), body)
        + trailer
        + b"\r\n"
    )


def test_trailers_decide_neither_the_client_address_nor_the_secret(
    broker: EmbeddedBroker,
) -> None:
    """From a trusted proxy (127.0.0.1), a chunked body's trailer used to reach the live header
    list: a trailer X-Forwarded-For turned a 403 into a 200, and a trailer could supply the
    secret. Both are decided from the request head alone."""
    prefix = unique("trailer")
    config = gateway_config(broker.bootstrap_servers, prefix)
    with running_gateway(config) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        refused_ids = []
        cases = [
            # the head names an address outside the allowlist; the trailer an allowlisted one
            (
                [f"Authorization: Bearer {SECRET}", "X-Forwarded-For: 203.0.113.7"],
                [f"X-Forwarded-For: {EU_WEST4}"],
            ),
            # the head has no secret; the trailer brings it
            ([f"X-Forwarded-For: {EU_WEST4}"], [f"Authorization: Bearer {SECRET}"]),
        ]
        for head_lines, trailers in cases:
            event_id = str(uuid.uuid4())
            refused_ids.append(event_id)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                head = _head(*head_lines, "Content-Type: application/json", "Connection: close")
                s.sendall(_chunked(head, _body(event_id), trailers))
                raw = _read_all(s)
            assert _status(raw) == 403, raw[:300]
        # a valid event afterwards: once it is in the topic, the refused ones had their chance
        last = str(uuid.uuid4())
        with httpx.Client(base_url=url, timeout=10) as client:
            assert post(client, ES, content=_body(last)).status_code == 200
    ids = [
        header(r.headers, "ce_id") for r in read_topic(broker.bootstrap_servers, f"{prefix}.push")
    ]
    assert last in ids
    assert not set(refused_ids) & set(ids)


def test_an_oversized_trailer_section_closes_the_connection(gateway: str) -> None:
    with _outsider(gateway) as s:
        head = _head(f"Authorization: Bearer {SECRET}")
        s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: ")
        with contextlib.suppress(OSError):
            for _ in range(64):  # 4 MiB at most; the limit is 16 KiB
                s.sendall(b"a" * 65536)
        raw = _read_all(s)
    # the outsider got its 403 (decided from the head) or nothing; either way the connection
    # is closed, which _read_all returning proves
    assert raw == b"" or _status(raw) == 403, raw[:200]


def test_h2c_upgrade_is_answered_and_closed(gateway: str) -> None:
    with _outsider(gateway) as s:
        body = _body()
        s.sendall(
            _head(
                "Connection: Upgrade, HTTP2-Settings",
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
            )
            + b"\r\n"
            + body
        )
        started = time.monotonic()
        raw = _read_all(s)  # returns only once the server closes
        elapsed = time.monotonic() - started
    print(f"\nh2c upgrade: answered and closed after {elapsed:.3f}s")
    assert _status(raw) == 400, raw[:200]
    assert elapsed < 0.9  # well before the 1 s head deadline could have closed it


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, needle: str) -> list[logging.LogRecord]:
        return [r for r in self.records if needle in r.getMessage()]


@contextlib.contextmanager
def _captured(name: str) -> Iterator[_Lines]:
    logger = logging.getLogger(name)
    lines, level = _Lines(), logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)


def test_an_outsiders_refusals_are_sampled_in_the_log_and_counted_in_full(
    broker: EmbeddedBroker,
) -> None:
    """Every refusal was one log line: an outsider could write the logs at request rate.
    Now at most refusal_log_lines per interval and reason are written, a summary line says
    how many were left out, and the metrics count every refusal."""
    config = gateway_config(
        broker.bootstrap_servers,
        unique("sampled"),
        server={"refusal_log_lines": 5, "refusal_log_interval_s": 2.0},
    )
    flood = 200
    transport = httpx.HTTPTransport(local_address=OUTSIDER)
    with (
        _captured("gateway.ingress") as lines,
        running_gateway(config) as (url, _),
        httpx.Client(base_url=url, transport=transport, timeout=10) as outsider,
    ):

        def refused(_: int) -> int:
            return post(outsider, ES, content=b"", secret=None, xff=None).status_code

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert set(pool.map(refused, range(flood))) == {403}
        elapsed = time.monotonic() - started
        first = len(lines.messages("refused: sender not in allowlist"))
        # one more once the interval is over: the summary of the last one comes first
        time.sleep(max(0.0, 2.05 - (time.monotonic() - started)))
        assert refused(0) == 403
        metrics = scrape(config)
    written = len(lines.messages("refused: sender not in allowlist"))
    summaries = lines.messages("suppressed")
    suppressed = sum(getattr(r, "suppressed", 0) for r in summaries)
    intervals = int(elapsed / 2.0) + 1
    print(
        f"\n{flood + 1} refusals ({flood} in {elapsed:.2f}s, {intervals} interval(s) of 2 s):"
        f" {written} lines written ({first} before the pause), {suppressed} left out and counted"
        f" in {len(summaries)} summary line(s)"
    )
    # every refusal is either written or counted in a summary; at most 5 per interval
    assert written + suppressed == flood + 1, (written, suppressed)
    assert first <= 5 * intervals and written <= first + 5, (first, written)
    assert suppressed >= flood - 5 * intervals
    assert all(getattr(r, "suppressed_key", "") == "event-stream:ip-not-allowed" for r in summaries)
    counted = f'gateway_requests_total{{outcome="forbidden_ip",source="event-stream"}} {flood + 1}'
    assert counted in metrics, [m for m in metrics.splitlines() if "forbidden_ip" in m]


def test_the_access_log_never_writes_query_strings(broker: EmbeddedBroker) -> None:
    config = gateway_config(broker.bootstrap_servers, unique("access"), server={"access_log": True})
    with (
        _captured("uvicorn.access") as lines,
        running_gateway(config) as (url, _),
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        r = client.post(
            "/v1/onesignal/journey?external_id=user-4711&onesignal_id=abc-secret-ish",
            content=b"{}",
            headers={"authorization": f"Bearer {SECRET}", "x-forwarded-for": EU_WEST4},
        )
        assert r.status_code == 200, r.text
    written = [r.getMessage() for r in lines.records]
    assert any("/v1/onesignal/journey" in m for m in written), written
    assert not any("user-4711" in m or "abc-secret-ish" in m or "?" in m for m in written), written


def test_each_refused_connection_is_counted_by_its_reason(broker: EmbeddedBroker) -> None:
    config = gateway_config(
        broker.bootstrap_servers,
        unique("head"),
        server={"max_head_bytes": 16384, "max_header_count": 40, "head_timeout_s": 1.0},
    )

    def counts() -> dict[str, float]:
        text = scrape(config)
        found = re.findall(
            r'^gateway_connection_refusals_total\{reason="([a-z_]+)"\} (\S+)$', text, re.M
        )
        return {reason: float(n) for reason, n in found}

    with running_gateway(config) as (url, _):
        assert set(counts().values()) == {0.0}  # every reason's series exists from the start
        with _outsider(url) as s:
            s.sendall(_head("X-Big: " + "a" * 20000))
            assert _status(_read_all(s)) == 431
        with _outsider(url) as s:
            s.sendall(_head("Connection: Upgrade", "Upgrade: h2c", "Content-Length: 0") + b"\r\n")
            assert _status(_read_all(s)) == 400
        with _outsider(url) as s:  # silent: the head deadline
            assert _status(_read_all(s)) == 408
        got = counts()
    assert got == {
        "head_too_large": 1.0,
        "trailers_too_large": 0.0,
        "head_timeout": 1.0,
        "upgrade": 1.0,
    }, got

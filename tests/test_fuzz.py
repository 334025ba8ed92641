"""Bad input and hostile senders against a real uvicorn server on loopback.

Property: whatever the method, path, headers and body, the answer is one of the documented
statuses, never a 5xx, and a refused request writes nothing to Kafka. A POST that passed a
source's IP and secret checks is never refused, whatever its body: it is stored, or kept on
the dead-letter topic (OneSignal drops what it cannot deliver). "Nothing" is checked
exactly: the sum of the end offsets of every topic the gateway can write must not move for a
refused request, and must move by one for an accepted one (by zero for a duplicate).

Also here, the hostile inputs tests/test_ingress.py does not cover: huge numbers, repeated
Content-Type / Content-Length headers, request smuggling shapes, slow and stalled clients, a
forged RFC 7239 Forwarded header from an untrusted peer. Secrets in logs, metrics and error
bodies: tests/test_logs.py. An allowlist refresh that fails keeps the last good set:
tests/test_ranges.py::test_refresh_failure_keeps_last_good_set.
"""

from __future__ import annotations

import socket
import string
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition
from schemathesis.checks import not_a_server_error, status_code_conformance

from gateway.config import Config
from gateway.core.kinds import KNOWN_KINDS
from gateway.devkit import samples
from gateway.devkit.embedded_broker import EmbeddedBroker
from gateway.ingress.openapi import openapi_document

from .conftest import KAFKA_API_VERSION, unique
from .faults import Figures, Report
from .ingress_helpers import (
    EU_WEST4,
    EU_WEST4_V6,
    ROTATED,
    SECRET,
    gateway_config,
    operator_url,
    post,
    running_gateway,
)

ES = "/v1/onesignal/events"
JOURNEY = "/v1/onesignal/journey"
WEB = "/v1/onesignal/web-push"
TOPIC_SUFFIXES = (
    "push",
    "email",
    "sms",
    "iam",
    "live_activity",
    "journey",
    "dlt",
    "unauthenticated",
)
# every status the OpenAPI document gives for the source routes, plus 204 for the web-push
# CORS preflight; 503 is documented too, but with a healthy broker it would be a failure here
DOCUMENTED = {200, 204, 400, 403, 405, 413, 415, 429}
KEEP_ALIVE_S = 1


class Offsets:
    """Sum of the end offsets of every topic of a prefix: moves by one per record written."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            api_version=KAFKA_API_VERSION,
            enable_auto_commit=False,
        )
        self.tps: list[TopicPartition] = []
        for suffix in TOPIC_SUFFIXES:
            topic = f"{prefix}.{suffix}"
            parts: set[int] = set()
            for _ in range(50):
                parts = self.consumer.partitions_for_topic(topic) or set()
                if parts:
                    break
                self.consumer.topics()
                time.sleep(0.1)
            assert parts, f"topic {topic} does not exist"
            self.tps += [TopicPartition(topic, p) for p in parts]

    def total(self) -> int:
        return sum(self.consumer.end_offsets(self.tps).values())

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class Fuzz:
    def __init__(self, url: str, offsets: Offsets, config: Config) -> None:
        self.url = url
        self.offsets = offsets
        self.config = config
        self.client = httpx.Client(base_url=url, timeout=20)
        self.statuses: Counter[int] = Counter()
        self.accepted = 0  # 2xx that wrote a record
        self.found = 0  # of those, seen as exactly one new record
        self.rejected_writes = 0  # refused requests that moved an offset (must stay 0)

    def send(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> httpx.Response:
        before = self.offsets.total()
        r = self.client.request(method, path, headers=headers, content=body)
        written = self.offsets.total() - before
        self.statuses[r.status_code] += 1
        assert r.status_code < 500, (r.status_code, r.text[:300])
        if 200 <= r.status_code < 300 and r.content and r.json().get("status") != "duplicate":
            self.accepted += 1
            self.found += written == 1
            assert written == 1, f"accepted, but {written} records written"
        else:
            self.rejected_writes += written != 0
            assert written == 0, f"{r.status_code} answered, yet {written} records written"
        return r


@pytest.fixture(scope="module")
def fz(broker: EmbeddedBroker) -> Iterator[Fuzz]:
    prefix = unique("fuzz")
    config = gateway_config(
        broker.bootstrap_servers, prefix, server={"timeout_keep_alive": KEEP_ALIVE_S}
    )
    started = time.monotonic()
    with running_gateway(config) as (url, _), httpx.Client(base_url=url) as client:
        # the journey and dead-letter topics exist once written to
        assert post(client, JOURNEY, samples.journey_payload()).status_code == 200
        assert post(client, JOURNEY, content=b"plain", content_type="text/plain").status_code == 200
        browser = [("origin", "https://shop.example")]
        payload = samples.web_push_v16_payload("notification.clicked")
        assert post(client, WEB, payload, secret=None, headers=browser).status_code == 200
        offsets = Offsets(broker.bootstrap_servers, prefix)
        f = Fuzz(url, offsets, config)
        try:
            yield f
        finally:
            f.client.close()
            offsets.close()
    sent = sum(f.statuses.values())
    Report(
        "hostile input: hypothesis + schemathesis + explicit cases",
        "1 client, sequential",
        "none (healthy broker)",
        "bodies (bytes, JSON, deep, huge numbers, bad UTF-8), content types, methods, secret "
        "and XFF/Forwarded header sets, OpenAPI-generated cases",
        Figures(
            sent=sent,
            ok=f.accepted,
            fail=sum(n for status, n in f.statuses.items() if status >= 400),
            info=0,
            found=f.found,
            acked_but_lost=f.accepted - f.found,
            unacked_but_present=f.rejected_writes,
            duplicates=0,
            statuses={str(k): v for k, v in sorted(f.statuses.items())},
            max_latency_s=0.0,
            max_fail_latency_s=0.0,
            lost_ids=[],
        ),
        time.monotonic() - started,
    ).emit()


# ---------------------------------------------------------------------------------------------
# hypothesis: arbitrary requests


_TOKEN = st.text(alphabet=string.ascii_letters + string.digits + ".:[]_-;= \"'%/", max_size=24)
_HOPS = st.sampled_from(
    [
        EU_WEST4,
        EU_WEST4_V6,
        f"::ffff:{EU_WEST4}",
        f"{EU_WEST4}:443",
        f"[{EU_WEST4_V6}]:443",
        "203.0.113.7",
        "2001:db8::7",
        "::ffff:203.0.113.7",
        "127.0.0.1",
        "::1",
        "unknown",
        "_hidden",
        "999.1.1.1",
        "",
        "fe80::1%eth0",
    ]
)
_XFF_LINE = st.lists(st.one_of(_HOPS, _TOKEN), min_size=1, max_size=4).map(", ".join)
_FORWARDED_LINE = st.lists(
    st.one_of(
        _HOPS.map(lambda h: f'for="{h}"' if ":" in h else f"for={h}"),
        _HOPS.map(lambda h: f'for="[{h}]";proto=https'),
        _TOKEN,
    ),
    min_size=1,
    max_size=3,
).map(", ".join)
_CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "text/plain",
        "application/cloudevents+json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "text/plain;charset=UTF-8",
        "text/json",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
        "garbage/;;;=",
    ]
)


def _json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=16,
    )


def _event(kind: str, layout: str, extra: dict[str, Any]) -> bytes:
    payload = samples.event_stream_payload(kind, layout=layout, event_id=str(uuid.uuid4()))
    payload.update(extra)
    return orjson.dumps(payload)


_BODIES = st.one_of(
    st.binary(max_size=512),
    _json_values().map(orjson.dumps),
    st.builds(
        _event,
        st.sampled_from(sorted(KNOWN_KINDS)),
        st.sampled_from(["nested-default", "flat-dotted"]),
        st.dictionaries(st.text(max_size=8), _json_values(), max_size=3),
    ),
    # huge numbers: past double range (400) and past CPython's int/str limit (5000 digits)
    st.integers(min_value=300, max_value=6000).map(
        lambda n: b'{"event.kind": "message.push.sent", "n": ' + b"9" * n + b"}"
    ),
    st.sampled_from([b"1e400", b"-1e400", b"1e-400", b"-0", b"18446744073709551616"]).map(
        lambda n: b'{"event.kind": "message.sms.sent", "event.id": "x", "n": ' + n + b"}"
    ),
    # deep nesting, arrays and objects
    st.integers(min_value=1, max_value=20_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=5_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    # invalid UTF-8 and lone surrogates inside otherwise fine JSON
    st.binary(min_size=1, max_size=8).map(
        lambda b: b'{"event.kind": "message.push.sent", "x": "' + b + b'"}'
    ),
    st.sampled_from([b'{"x": "\\udc00"}', b"\xef\xbb\xbf{}", b"\x00", b" "]),
    # large bodies (the limit is server.max_body_bytes, about 1 MiB)
    st.integers(min_value=65_000, max_value=200_000).map(lambda n: b'{"a": "' + b"x" * n + b'"}'),
)
_SECRETS = st.sampled_from(
    [
        [("authorization", f"Bearer {SECRET}")],
        [("authorization", SECRET)],
        [("authorization", f"bearer {ROTATED}")],
        [],
        [("authorization", "Bearer wrong")],
        [("authorization", f"Bearer {SECRET}"), ("authorization", f"Bearer {SECRET}")],
        [("authorization", f"Bearer {SECRET}"), ("authorization", "x")],
        [("Authorization", f"Basic {SECRET}")],
    ]
)


@st.composite
def _requests(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]], bytes]:
    method = draw(
        st.sampled_from(["POST"] * 6 + ["PUT", "PATCH", "GET", "HEAD", "DELETE", "OPTIONS"])
    )
    path = draw(st.sampled_from([ES, ES, JOURNEY, WEB]))
    headers: list[tuple[str, str]] = []
    for ct in draw(st.lists(_CONTENT_TYPES, max_size=2)):
        headers.append(("content-type", ct))
    if draw(st.booleans()):  # half the time a trusted sender, so bodies reach the parser
        headers += [("authorization", f"Bearer {SECRET}"), ("x-forwarded-for", EU_WEST4)]
    else:
        headers += draw(_SECRETS)
        for line in draw(st.lists(_XFF_LINE, max_size=2)):
            headers.append(("x-forwarded-for", line))
    for line in draw(st.lists(_FORWARDED_LINE, max_size=1)):
        headers.append(("forwarded", line))
    if draw(st.booleans()):
        headers.append(("origin", draw(st.sampled_from(["https://shop.example", "null", "x"]))))
    if draw(st.integers(0, 9)) == 0:
        headers.append(("content-encoding", "gzip"))  # a lie: the body is not compressed
    # an HTTP client cannot send leading or trailing blanks in a value (h11 refuses them)
    return method, path, [(k, v.strip()) for k, v in headers], draw(_BODIES)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(req=_requests())
def test_any_request_gets_a_documented_status_and_refusals_write_nothing(
    fz: Fuzz, req: tuple[str, str, list[tuple[str, str]], bytes]
) -> None:
    method, path, headers, body = req
    r = fz.send(method, path, headers, body)
    assert r.status_code in DOCUMENTED, (r.status_code, r.text[:300])
    if r.status_code >= 400 and method != "HEAD":
        assert set(r.json()) == {"error", "message"}
        assert SECRET not in r.text and ROTATED not in r.text
    if _authenticated(method, path, headers):
        assert r.status_code == 200, (r.status_code, r.text[:300])


def _authenticated(method: str, path: str, headers: list[tuple[str, str]]) -> bool:
    """A write that passes the event-stream/journey sender checks (one secret, an allowed IP)."""
    if method not in ("POST", "PUT", "PATCH") or path == WEB:
        return False
    secrets = [v for k, v in headers if k.lower() == "authorization"]
    if len(secrets) != 1 or secrets[0].removeprefix("Bearer ").removeprefix("bearer ") not in (
        SECRET,
        ROTATED,
    ):
        return False
    xff = [v for k, v in headers if k == "x-forwarded-for"]
    return xff == [EU_WEST4]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(path=st.sampled_from([ES, JOURNEY]), content_type=_CONTENT_TYPES, body=_BODIES)
def test_no_body_from_an_authenticated_sender_is_refused_or_a_server_error(
    fz: Fuzz, path: str, content_type: str, body: bytes
) -> None:
    headers = [
        ("content-type", content_type),
        ("authorization", f"Bearer {SECRET}"),
        ("x-forwarded-for", EU_WEST4),
    ]
    r = fz.send("POST", path, headers, body)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert r.json()["status"] in ("accepted", "duplicate", "dead-lettered")


# ---------------------------------------------------------------------------------------------
# schemathesis: cases generated from the app's own OpenAPI document


# The document the running server serves is built from its config by gateway.ingress.openapi; it is
# loaded here at import (schemathesis parametrizes at collection, before any server runs) and
# test_served_openapi_is_the_fuzzed_one checks the server serves exactly this document.
# (schemathesis.pytest.from_fixture, the lazy loader, fails under pytest 9: it reads
# request.node._nodeid, which pytest 9 no longer has.)
OPENAPI = openapi_document(gateway_config("127.0.0.1:1", "schema"))
schema = schemathesis.openapi.from_dict(OPENAPI)


def test_served_openapi_is_the_fuzzed_one(fz: Fuzz) -> None:
    assert httpx.get(f"{operator_url(fz.config)}/openapi.json").json() == OPENAPI
    assert fz.client.get("/openapi.json").status_code == 404  # not on the webhook port


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_cases_never_get_a_server_error(fz: Fuzz, case: Any) -> None:
    # a trusted sender, so generated bodies reach parsing, normalization and Kafka
    case.headers = {**(case.headers or {}), "x-forwarded-for": EU_WEST4}
    if case.path != WEB:
        case.headers["authorization"] = f"Bearer {SECRET}"
    before = fz.offsets.total()
    response = case.call(base_url=fz.url)
    written = fz.offsets.total() - before
    fz.statuses[response.status_code] += 1
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
    # schemathesis also probes methods the document does not list (OPTIONS: 204 on web-push)
    if response.status_code == 200 and response.json().get("status") != "duplicate":
        fz.accepted += 1
        fz.found += written == 1
        assert written == 1
    else:
        fz.rejected_writes += written != 0
        assert written == 0, (response.status_code, written)


# ---------------------------------------------------------------------------------------------
# explicit hostile cases


def _with(extra: bytes) -> bytes:
    body = orjson.dumps(
        samples.event_stream_payload("message.push.sent", event_id=str(uuid.uuid4()))
    )
    return body[:-1] + b', "n": ' + extra + b"}"


@pytest.mark.parametrize(
    ("number", "status"),
    [
        (b"9" * 5000, "dead-lettered"),  # past CPython's 4300-digit int/str limit
        (b"-" + b"9" * 5000, "dead-lettered"),
        (b"1e400", "dead-lettered"),  # past double range
        (b"-1e400", "dead-lettered"),
        (b"1" + b"0" * 400, "dead-lettered"),
        (b"18446744073709551616", "accepted"),  # 2**64: read as a float (README, known gaps)
        (b"1e-400", "accepted"),  # underflows to 0.0
    ],
)
def test_huge_numbers(fz: Fuzz, number: bytes, status: str) -> None:
    headers = [
        ("content-type", "application/json"),
        ("authorization", f"Bearer {SECRET}"),
        ("x-forwarded-for", EU_WEST4),
    ]
    r = fz.send("POST", ES, headers, _with(number))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == status
    if status == "dead-lettered":
        assert r.json()["reason"] == "invalid-json"


def _raw(port: int, request: bytes, timeout_s: float = 10.0) -> bytes:
    """Send bytes on a fresh connection; read until the server closes it (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(request)
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def _status(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw[9:12])


def _request(*header_lines: str, body: bytes, path: str = ES) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        "Host: gateway",
        f"Authorization: Bearer {SECRET}",
        f"X-Forwarded-For: {EU_WEST4}",
        "Connection: close",
        *header_lines,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _port(fz: Fuzz) -> int:
    return int(fz.url.rsplit(":", 1)[1])


def _body() -> bytes:
    return orjson.dumps(
        samples.event_stream_payload("message.sms.sent", event_id=str(uuid.uuid4()))
    )


def test_repeated_and_conflicting_framing_headers(fz: Fuzz) -> None:
    port = _port(fz)
    body = _body()
    n = len(body)

    def total_then(raw: bytes) -> tuple[int, int]:
        before = fz.offsets.total()
        status = _status(_raw(port, raw))
        return status, fz.offsets.total() - before

    # two Content-Type lines: the first one is the media type
    assert total_then(
        _request(
            "Content-Type: application/json",
            "Content-Type: text/html",
            f"Content-Length: {n}",
            body=body,
        )
    ) == (200, 1)
    # an authenticated sender's body with a media type it may not send: kept as a dead letter
    assert total_then(
        _request(
            "Content-Type: text/html",
            "Content-Type: application/json",
            f"Content-Length: {n}",
            body=_body(),
        )
    ) == (200, 1)
    # two Content-Length lines, equal or not, and Content-Length with chunked encoding
    # (the request-smuggling shapes): refused by the HTTP parser, nothing written
    for lines in (
        (f"Content-Length: {n}", f"Content-Length: {n}"),
        (f"Content-Length: {n}", f"Content-Length: {n - 1}"),
        (f"Content-Length: {n}", "Transfer-Encoding: chunked"),
        ("Content-Length: -1",),
        ("Content-Length: 1e3",),
    ):
        status, written = total_then(
            _request("Content-Type: application/json", *lines, body=_body())
        )
        assert status == 400 and written == 0, (lines, status, written)


def test_slow_client_is_served_and_does_not_block_others(fz: Fuzz) -> None:
    """uvicorn keeps a connection while bytes keep coming, however slowly: the keep-alive
    timeout (here 1 s) is reset by every byte, and the head deadline (server.head_timeout_s,
    30 s by default; tests/test_hostile_http.py runs it at 1 s) is far off. Other clients are
    served meanwhile. The load balancer is what must cut slow clients off."""
    port = _port(fz)
    body = _body()
    request = _request("Content-Type: application/json", f"Content-Length: {len(body)}", body=body)
    step = len(request) // 30 + 1
    pieces = [request[i : i + step] for i in range(0, len(request), step)]
    answer: list[bytes] = []

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for piece in pieces:  # ~3 s in all, 3x the keep-alive timeout
                s.sendall(piece)
                time.sleep(0.1)
            answer.append(s.recv(65536))

    slow = threading.Thread(target=trickle)
    stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        stalled.sendall(request[:40])  # half a request line, then nothing
        slow.start()
        latencies = []
        for _ in range(10):
            started = time.monotonic()
            r = post(fz.client, ES, content=_body())
            latencies.append(time.monotonic() - started)
            assert r.status_code == 200
            time.sleep(0.2)
        slow.join(15)
        assert not slow.is_alive()
        assert answer and _status(answer[0]) == 200, answer
        assert max(latencies) < 1.0, latencies
        # the stalled connection is still open well past the keep-alive timeout: only the head
        # deadline closes it (docs/reliability.md, "slow clients")
        stalled.settimeout(0.5)
        with pytest.raises(TimeoutError):
            stalled.recv(1)
    finally:
        stalled.close()


def test_forged_forwarded_from_untrusted_peer_is_ignored(broker: EmbeddedBroker) -> None:
    prefix = unique("fwd")
    config = gateway_config(
        broker.bootstrap_servers,
        prefix,
        server={"trusted_proxies": ["10.9.8.7/32"], "proxy_header": "forwarded"},
    )
    with running_gateway(config) as (url, _), httpx.Client(base_url=url) as client:
        for value in (
            f"for={EU_WEST4}",
            f'for="[{EU_WEST4_V6}]:443"',
            f'for="[::ffff:{EU_WEST4}]"',
            f"for=10.9.8.7, for={EU_WEST4}",
        ):
            r = post(client, ES, content=_body(), xff=EU_WEST4, headers=[("forwarded", value)])
            assert r.status_code == 403, (value, r.text)

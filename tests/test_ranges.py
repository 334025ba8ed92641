"""The sender allowlist: cloud.json parsing, the bundled snapshot, and refresh over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import netaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import AllowlistConfig
from gateway.ingress.allowlist import (
    MAX_BYTES,
    ONESIGNAL_PUBLISHED,
    STALE_AFTER_S,
    Allowlist,
    RangeRefresher,
    RangesError,
    RangeSnapshot,
    build_ipset,
    data_time,
    diff,
    fetch_cloud_json,
    load_snapshot,
    log_if_stale,
    parse_cloud_json,
    write_snapshot,
)
from gateway.metrics import IngressMetrics

SYNC = "1700000000000"  # the fixture's syncToken
BUNDLED_SYNC = "0"  # the bundled snapshot's, older than any of Google's


def cloud(prefixes: list[Any], sync: str = SYNC) -> dict[str, Any]:
    return {"syncToken": sync, "creationTime": "2026-11-01T00:00:00.000000", "prefixes": prefixes}


def p4(cidr: str, scope: str) -> dict[str, str]:
    return {"ipv4Prefix": cidr, "service": "Google Cloud", "scope": scope}


def p6(cidr: str, scope: str) -> dict[str, str]:
    return {"ipv6Prefix": cidr, "service": "Google Cloud", "scope": scope}


GOOD = cloud(
    [
        p4("34.1.208.0/20", "africa-south1"),
        p4("34.90.0.0/15", "europe-west4"),
        p4("35.204.0.0/16", "europe-west4"),
        p6("2600:1900:4060::/44", "europe-west4"),
        p4("34.35.0.0/16", "us-central1"),
        p6("2600:1900:4000::/44", "us-central1"),
        {"ipv4Prefix": "8.34.208.0/20", "service": "Google Cloud"},  # no scope: never kept
    ]
)
GOOD_BYTES = json.dumps(GOOD).encode()


# ---------------------------------------------------------------------------------------------
# parse_cloud_json


def test_parse_keeps_only_wanted_scopes_v4_and_v6() -> None:
    snap = parse_cloud_json(GOOD_BYTES, ["europe-west4"])
    assert snap.sync_token == SYNC
    assert snap.creation_time == "2026-11-01T00:00:00.000000"
    assert snap.scopes == ("europe-west4",)
    assert snap.cidrs == ("34.90.0.0/15", "35.204.0.0/16", "2600:1900:4060::/44")


def test_parse_several_scopes_from_str_and_mapping() -> None:
    from_str = parse_cloud_json(GOOD_BYTES.decode(), ("europe-west4", "us-central1"))
    from_map = parse_cloud_json(GOOD, ("europe-west4", "us-central1"))
    assert from_str == from_map
    assert set(from_str.cidrs) == {
        "34.90.0.0/15",
        "35.204.0.0/16",
        "2600:1900:4060::/44",
        "34.35.0.0/16",
        "2600:1900:4000::/44",
    }


def test_parse_normalizes_host_bits_and_dedupes() -> None:
    snap = parse_cloud_json(
        cloud([p4("34.90.1.2/15", "europe-west4"), p4("34.90.0.0/15", "europe-west4")]),
        ["europe-west4"],
    )
    assert snap.cidrs == ("34.90.0.0/15",)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"prefixes"', "must be a JSON object"),
        (json.dumps({"syncToken": "1"}).encode(), "'prefixes' is missing"),
        (json.dumps(cloud([])).encode(), "'prefixes' is missing"),
        (json.dumps({"prefixes": {"a": 1}}).encode(), "'prefixes' is missing"),
        (json.dumps(cloud([p4("34.90.0.0/33", "europe-west4")])).encode(), "not a CIDR"),
        (json.dumps(cloud([p4("127.1/32", "europe-west4")])).encode(), "not a CIDR"),
        (json.dumps(cloud([p4("2600:1900::/44", "europe-west4")])).encode(), "not an IPv4"),
        (json.dumps(cloud([p6("34.90.0.0/15", "europe-west4")])).encode(), "not an IPv6"),
        (json.dumps(cloud([p4("garbage", "us-east1")])).encode(), "prefixes[0].ipv4Prefix"),
        (json.dumps(cloud([{"scope": "europe-west4"}])).encode(), "exactly one of"),
        (json.dumps(cloud(["34.90.0.0/15"])).encode(), "must be an object"),
        (json.dumps(cloud([p4("34.35.0.0/16", "us-central1")])).encode(), "none of its 1"),
        (json.dumps({**GOOD, "syncToken": 5}).encode(), "must be strings"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
    ],
)
def test_parse_rejects_garbage(data: bytes, message: str) -> None:
    with pytest.raises(RangesError) as info:
        parse_cloud_json(data, ["europe-west4"])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_rejects_huge_input() -> None:
    huge = GOOD_BYTES + b" " * (MAX_BYTES + 1 - len(GOOD_BYTES))
    with pytest.raises(RangesError, match="over the"):
        parse_cloud_json(huge, ["europe-west4"])


# ---------------------------------------------------------------------------------------------
# the bundled snapshot, ONESIGNAL_PUBLISHED, build_ipset, diff


def test_bundled_snapshot_is_onesignal_april_2024_list() -> None:
    snap = load_snapshot(None, ["europe-west4"])
    assert len(snap.cidrs) == 17
    assert snap.sync_token == BUNDLED_SYNC
    ipset = netaddr.IPSet(snap.cidrs)
    assert netaddr.IPAddress("34.90.0.1") in ipset
    assert netaddr.IPAddress("2600:1900:4060::1") in ipset
    assert netaddr.IPAddress("8.8.8.8") not in ipset
    assert load_snapshot("", ["europe-west4"]) == snap


def test_onesignal_published_list() -> None:
    assert len(ONESIGNAL_PUBLISHED) == 17
    assert "34.157.220.0/22" in ONESIGNAL_PUBLISHED
    assert "2600:1900:4060::/44" in ONESIGNAL_PUBLISHED
    for cidr in ONESIGNAL_PUBLISHED:
        assert str(netaddr.IPNetwork(cidr).cidr) == cidr


def test_bundled_snapshot_other_scope_says_what_to_do() -> None:
    with pytest.raises(RangesError, match=r"allowlist\.snapshot"):
        load_snapshot(None, ["us-central1"])


def test_load_missing_file() -> None:
    with pytest.raises(RangesError, match="cannot read"):
        load_snapshot("/nonexistent/cloud.json", ["europe-west4"])


def test_build_ipset_sources() -> None:
    snap = parse_cloud_json(GOOD, ["us-central1"])
    only = build_ipset(snap, include_onesignal_published=False, extra_cidrs=())
    assert netaddr.IPAddress("34.35.1.1") in only
    assert netaddr.IPAddress("34.90.0.1") not in only
    full = build_ipset(
        snap, include_onesignal_published=True, extra_cidrs=["192.0.2.0/24", "2001:db8::/32"]
    )
    for ip in ("34.35.1.1", "34.90.0.1", "35.242.17.255", "192.0.2.200", "2001:db8::42"):
        assert netaddr.IPAddress(ip) in full
    assert netaddr.IPAddress("192.0.3.1") not in full
    with pytest.raises(RangesError, match=r"extra_cidrs\[1\]"):
        build_ipset(snap, include_onesignal_published=False, extra_cidrs=["10.0.0.0/8", "x"])


def test_data_time_prefers_the_sync_token_then_creation_time() -> None:
    def snap(token: str, created: str) -> RangeSnapshot:
        return RangeSnapshot(token, created, ("s",), ())

    assert data_time(snap("1700000000000", "2001-01-01T00:00:00")) == 1_700_000_000.0
    assert data_time(snap("0", "2024-04-10T00:00:00.000000")) == 1712707200.0
    assert data_time(snap("", "2024-04-10T02:00:00+02:00")) == 1712707200.0
    for token, created in (("0", ""), ("x", "yesterday"), ("-5", "2024-13-01T00:00:00")):
        assert data_time(snap(token, created)) is None
    assert data_time(snap("١٢٣", "")) is None  # digits, but not ASCII ones
    assert data_time(None) is None
    assert data_time(load_snapshot(None, ["europe-west4"])) == 1712707200.0


@given(st.integers(1, 10**15 - 1))
def test_data_time_reads_any_millisecond_token(ms: int) -> None:
    assert data_time(RangeSnapshot(str(ms), "garbage", ("s",), ())) == ms / 1000


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)))
def test_data_time_reads_google_creation_time_as_utc(when: datetime) -> None:
    text = when.strftime("%Y-%m-%dT%H:%M:%S.%f")  # Google's form: no zone
    expected = (when - datetime(1970, 1, 1)) / timedelta(seconds=1)
    assert data_time(RangeSnapshot("0", text, ("s",), ())) == pytest.approx(expected, abs=1e-6)


def test_diff_added_removed_sorted() -> None:
    old = RangeSnapshot("1", "", ("s",), ("35.0.0.0/8", "2600::/16", "10.0.0.0/8"))
    new = RangeSnapshot("2", "", ("s",), ("10.0.0.0/8", "2001:db8::/32", "9.0.0.0/8", "1.0.0.0/8"))
    added, removed = diff(old, new)
    assert added == ["1.0.0.0/8", "9.0.0.0/8", "2001:db8::/32"]
    assert removed == ["35.0.0.0/8", "2600::/16"]
    assert diff(new, new) == ([], [])


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    snap = parse_cloud_json(GOOD, ["europe-west4", "us-central1"])
    target = tmp_path / "cloud.json"
    write_snapshot(target, snap)
    assert load_snapshot(str(target), ["europe-west4", "us-central1"]) == snap
    # Each prefix kept its own scope, so a subset of the scopes reads back only its prefixes.
    assert load_snapshot(str(target), ["us-central1"]).cidrs == (
        "34.35.0.0/16",
        "2600:1900:4000::/44",
    )
    doc = json.loads(target.read_bytes())
    assert set(doc) == {"syncToken", "creationTime", "prefixes"}
    assert not [p for p in tmp_path.iterdir() if p.name != "cloud.json"]  # no temp file left


def test_write_keeps_existing_file_mode(tmp_path: Path) -> None:
    target = tmp_path / "cloud.json"
    target.write_bytes(b"{}")
    os.chmod(target, 0o640)
    write_snapshot(target, load_snapshot(None, ["europe-west4"]))
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_write_snapshot_without_prefix_scopes_uses_the_single_scope(tmp_path: Path) -> None:
    snap = RangeSnapshot("7", "t", ("europe-west4",), ("34.90.0.0/15",))
    write_snapshot(tmp_path / "c.json", snap)
    assert load_snapshot(str(tmp_path / "c.json"), ["europe-west4"]).cidrs == snap.cidrs


# ---------------------------------------------------------------------------------------------
# Allowlist


def test_allowlist_from_default_config() -> None:
    allow = Allowlist.from_config(AllowlistConfig())
    assert allow.loaded and allow.size == 17 and allow.sync_token == BUNDLED_SYNC
    assert allow.last_refresh_ok is None and allow.last_refresh_error is None
    assert allow.contains("34.90.0.1")
    assert allow.contains("34.91.255.255")
    assert not allow.contains("34.92.0.0")
    assert allow.contains("2600:1900:4060::1")
    assert allow.contains("[2600:1900:406f:ffff::1]:443")
    assert not allow.contains("2600:1900:4070::1")
    assert allow.contains("::ffff:34.90.0.1")
    for garbage in ("", "unknown", "34.90.1", "034.090.0.1", "2600:1900:4060::1%eth0", "x"):
        assert not allow.contains(garbage)


def test_allowlist_from_config_snapshot_and_extras(tmp_path: Path) -> None:
    path = tmp_path / "cloud.json"
    path.write_bytes(GOOD_BYTES)
    cfg = AllowlistConfig(
        scopes=("us-central1",),
        snapshot=str(path),
        include_onesignal_published=False,
        extra_cidrs=("203.0.113.0/24",),
    )
    allow = Allowlist.from_config(cfg)
    assert allow.contains("34.35.0.1") and allow.contains("203.0.113.9")
    assert not allow.contains("34.90.0.1")
    assert allow.size == 3


def test_empty_allowlist_contains_nothing() -> None:
    allow = Allowlist()
    assert not allow.loaded and allow.size == 0 and allow.sync_token == ""
    assert not allow.contains("34.90.0.1")


# ---------------------------------------------------------------------------------------------
# fetch and refresh against a real HTTP server on loopback


@dataclass
class Reply:
    status: int = 200
    body: bytes = GOOD_BYTES
    content_length: bool = True
    hits: list[str] = field(default_factory=list)


@pytest.fixture
def server() -> Iterator[tuple[str, Reply]]:
    reply = Reply()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            reply.hits.append(self.path)
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            if reply.content_length:
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            # The client stops reading an oversize body, as it should.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(reply.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/ipranges/cloud.json", reply
    finally:
        httpd.shutdown()
        httpd.server_close()


def refresher_for(url: str, **cfg: Any) -> tuple[Allowlist, RangeRefresher]:
    config = AllowlistConfig(refresh_url=url, **cfg)
    allow = Allowlist.from_config(config)
    return allow, RangeRefresher(allow, config)


def test_refresh_swaps_and_reports_diff(server: tuple[str, Reply]) -> None:
    url, _ = server
    allow, refresher = refresher_for(url, include_onesignal_published=False)
    assert allow.contains("34.157.80.1")
    added, removed = asyncio.run(refresher.refresh_once())
    assert added == []  # the fixture's europe-west4 prefixes are all in the bundled list
    assert "34.157.80.0/23" in removed and "2600:1900:4060::/44" not in removed
    assert len(removed) == 17 - 3
    assert allow.sync_token == SYNC
    # gone from Google's data, but the start-up snapshot is the floor: still allowed
    assert allow.contains("34.157.80.1")
    assert allow.contains("34.90.0.1") and allow.contains("2600:1900:4060::1")
    assert allow.size == 17
    assert allow.last_refresh_ok is not None and allow.last_refresh_error is None
    assert refresher.successes == 1 and refresher.failures == 0


NEW_SENDER = "34.13.7.9"  # in NEW_RANGE, which neither the bundled nor OneSignal's list has


def new_list(sync: str, *extra: dict[str, str]) -> bytes:
    return json.dumps(cloud([p4("34.13.0.0/16", "europe-west4"), *extra], sync=sync)).encode()


def test_refresh_admits_a_new_range_and_a_later_refresh_drops_it_but_not_the_floor(
    server: tuple[str, Reply], tmp_path: Path
) -> None:
    url, reply = server
    floor = tmp_path / "floor.json"
    floor.write_bytes(json.dumps(cloud([p4("35.204.0.0/16", "europe-west4")], "5")).encode())
    allow, refresher = refresher_for(url, snapshot=str(floor), include_onesignal_published=False)
    assert not allow.contains(NEW_SENDER) and allow.contains("35.204.1.1")
    reply.body = new_list("1700000000000")
    added, removed = asyncio.run(refresher.refresh_once())
    assert added == ["34.13.0.0/16"] and removed == ["35.204.0.0/16"]
    assert allow.contains(NEW_SENDER) and allow.contains("35.204.1.1")  # new, and the floor
    reply.body = json.dumps(cloud([p4("34.90.0.0/15", "europe-west4")], "1700000000001")).encode()
    asyncio.run(refresher.refresh_once())
    assert not allow.contains(NEW_SENDER)  # a refresh's own prefixes do not pile up
    assert allow.contains("34.90.0.1") and allow.contains("35.204.1.1")
    assert sorted(str(c) for c in allow.ipset.iter_cidrs()) == ["34.90.0.0/15", "35.204.0.0/16"]


def test_refresh_refuses_data_older_than_the_set_in_use(server: tuple[str, Reply]) -> None:
    url, reply = server
    allow, refresher = refresher_for(url)
    reply.body = new_list("1700000000000")
    asyncio.run(refresher.refresh_once())
    good = allow.ipset
    reply.body = json.dumps(cloud([p4("34.90.0.0/15", "europe-west4")], "1600000000000")).encode()
    with pytest.raises(RangesError, match="older than the set in use"):
        asyncio.run(refresher.refresh_once())
    assert allow.ipset is good and allow.contains(NEW_SENDER)
    assert allow.sync_token == "1700000000000"


def test_refresh_counts_results_and_tracks_age_and_failing_time(server: tuple[str, Reply]) -> None:
    url, reply = server
    now = [1_799_999_940.0]
    config = AllowlistConfig(refresh_url=url)
    allow = Allowlist.from_config(config)
    metrics = IngressMetrics(process=False)
    refresher = RangeRefresher(allow, config, metrics=metrics, clock=lambda: now[0])

    def count(result: str) -> float:
        value = metrics.registry.get_sample_value(
            "gateway_allowlist_refreshes_total", {"result": result}
        )
        assert value is not None
        return value

    assert count("ok") == count("error") == 0  # both exist before the first refresh
    # the bundled data is OneSignal's list of April 10, 2024
    assert allow.age_s(now[0]) == now[0] - datetime(2024, 4, 10, tzinfo=UTC).timestamp()
    assert allow.refresh_failing_s(now[0]) == 0
    reply.status = 500
    with pytest.raises(RangesError):
        asyncio.run(refresher.refresh_once())
    now[0] += 60
    assert allow.refresh_failing_s(now[0]) == 60  # since the first failure: no success yet
    reply.status, reply.body = 200, new_list("1799999840000")
    asyncio.run(refresher.refresh_once())
    assert allow.age_s(now[0]) == 160.0  # the served data's own syncToken, not our clock
    assert allow.refresh_failing_s(now[0]) == 0 and allow.last_refresh_ok == now[0]
    success_at = now[0]
    reply.status = 502
    now[0] += 3600
    with pytest.raises(RangesError):
        asyncio.run(refresher.refresh_once())
    now[0] += 3600
    with pytest.raises(RangesError):
        asyncio.run(refresher.refresh_once())
    assert allow.refresh_failing_s(now[0]) == now[0] - success_at  # since the last success
    assert count("ok") == 1 and count("error") == 3
    assert allow.age_s(now[0]) == now[0] - 1_799_999_840.0  # the last good data ages on


def test_log_if_stale_warns_about_old_data_only(caplog: pytest.LogCaptureFixture) -> None:
    allow = Allowlist.from_config(AllowlistConfig())  # the bundled data, April 10, 2024
    now = datetime(2024, 4, 10, tzinfo=UTC).timestamp()
    with caplog.at_level(logging.WARNING, logger="gateway.ingress.allowlist"):
        assert not log_if_stale(allow, now + STALE_AFTER_S - 1, "hint")
        assert log_if_stale(allow, now + STALE_AFTER_S + 86400, "run the update")
        assert not log_if_stale(Allowlist(), now, "no data: no time, no warning")
    # by name: caplog also holds what other loggers (a Kafka client's thread) say meanwhile
    [record] = [r for r in caplog.records if r.name == "gateway.ingress.allowlist"]
    assert "31 days old" in record.getMessage() and "run the update" in record.getMessage()


@pytest.mark.parametrize(
    ("status", "body", "content_length", "message"),
    [
        (200, b"<html>captive portal</html>", True, "not valid JSON"),
        (200, json.dumps(cloud([p4("34.35.0.0/16", "us-central1")])).encode(), True, "none of"),
        (500, b"oops", True, "HTTP 500"),
        (404, GOOD_BYTES, True, "HTTP 404"),
        (200, b" " * (MAX_BYTES + 1), True, "over the"),
        (200, b" " * (MAX_BYTES + 1), False, "over the"),
    ],
)
def test_refresh_failure_keeps_last_good_set(
    server: tuple[str, Reply], status: int, body: bytes, content_length: bool, message: str
) -> None:
    url, reply = server
    allow, refresher = refresher_for(url)
    asyncio.run(refresher.refresh_once())  # a good set from the server first
    good_ipset, good_snapshot = allow.ipset, allow.snapshot
    reply.status, reply.body, reply.content_length = status, body, content_length
    with pytest.raises(RangesError, match=message):
        asyncio.run(refresher.refresh_once())
    assert allow.ipset is good_ipset and allow.snapshot is good_snapshot
    assert allow.sync_token == SYNC and allow.contains("34.90.0.1")
    assert allow.last_refresh_error is not None and message in allow.last_refresh_error
    assert refresher.successes == 1 and refresher.failures == 1
    assert allow.refresh_failing_s(allow.last_refresh_ok or 0) == 0.0  # failing since the success


def test_refresh_unreachable_server_is_a_ranges_error() -> None:
    allow, refresher = refresher_for("http://127.0.0.1:9/cloud.json")
    with pytest.raises(RangesError, match="ConnectError"):
        asyncio.run(refresher.refresh_once())
    assert allow.sync_token == BUNDLED_SYNC and allow.contains("34.90.0.1")


def test_fetch_streams_without_content_length(server: tuple[str, Reply]) -> None:
    url, reply = server
    reply.content_length = False

    async def go(max_bytes: int) -> bytes:
        import httpx

        async with httpx.AsyncClient() as client:
            return await fetch_cloud_json(client, url + "?token=secret", max_bytes=max_bytes)

    assert asyncio.run(go(len(GOOD_BYTES))) == GOOD_BYTES
    with pytest.raises(RangesError) as info:
        asyncio.run(go(len(GOOD_BYTES) - 1))
    assert "secret" not in str(info.value)


def test_run_loop_survives_failures_and_stops(
    server: tuple[str, Reply], caplog: pytest.LogCaptureFixture
) -> None:
    url, reply = server
    reply.status = 503
    allow, refresher = refresher_for(url, refresh_interval_s=0.05)

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(refresher.run(stop))
        while refresher.failures < 2:
            await asyncio.sleep(0.01)
        reply.status = 200
        while refresher.successes < 1:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, timeout=2)

    with caplog.at_level(logging.INFO, logger="gateway.ingress.allowlist"):
        asyncio.run(asyncio.wait_for(go(), timeout=10))
    assert allow.sync_token == SYNC
    assert any("HTTP 503" in r.getMessage() for r in caplog.records)
    assert any(r.levelno == logging.INFO for r in caplog.records)


def test_run_retries_a_failure_sooner_than_the_interval(server: tuple[str, Reply]) -> None:
    url, reply = server
    reply.status = 500
    # a day between good refreshes, a moment between failed ones
    allow, refresher = refresher_for(url, refresh_interval_s=86400, refresh_retry_s=0.05)

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(refresher.run(stop))
        while refresher.failures < 2:
            await asyncio.sleep(0.01)
        reply.status, reply.body = 200, new_list("1700000000000")
        while refresher.successes < 1:
            await asyncio.sleep(0.01)
        hits = len(reply.hits)
        stop.set()
        await asyncio.wait_for(task, timeout=2)
        assert len(reply.hits) == hits  # after the success it waited for the interval

    asyncio.run(asyncio.wait_for(go(), timeout=10))
    assert allow.contains(NEW_SENDER)


def test_run_without_interval_returns_at_once() -> None:
    _, refresher = refresher_for("http://127.0.0.1:9/cloud.json", refresh_interval_s=0)
    asyncio.run(asyncio.wait_for(refresher.run(asyncio.Event()), timeout=1))
    assert refresher.successes == refresher.failures == 0


# ---------------------------------------------------------------------------------------------
# the fast lookup must agree with netaddr's own IPSet membership


@st.composite
def networks(draw: st.DrawFn) -> list[str]:
    nets = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.booleans()):
            value, bits = draw(st.integers(0, (1 << 32) - 1)), draw(st.integers(8, 32))
            nets.append(str(netaddr.IPNetwork((value, bits), version=4).cidr))
        else:
            value, bits = draw(st.integers(0, (1 << 128) - 1)), draw(st.integers(16, 128))
            nets.append(str(netaddr.IPNetwork((value, bits), version=6).cidr))
    return nets


@settings(max_examples=150, deadline=None)
@given(nets=networks(), data=st.data())
def test_contains_agrees_with_ipset(nets: list[str], data: st.DataObject) -> None:
    ipset = netaddr.IPSet(nets)
    allow = Allowlist(ipset)
    # Probe the edges of every range, their neighbours, and random addresses.
    probes: list[netaddr.IPAddress] = []
    for net in map(netaddr.IPNetwork, nets):
        top = (1 << 32) - 1 if net.version == 4 else (1 << 128) - 1
        # lookups bisect within top-16-bit blocks: probe the blocks' edges around each range too
        shift = 16 if net.version == 4 else 112
        block_edges = (
            (net.first >> shift) << shift,
            ((net.first >> shift) << shift) - 1,
            ((net.last >> shift) + 1) << shift,
            (((net.last >> shift) + 1) << shift) - 1,
        )
        for value in (net.first - 1, net.first, net.last, net.last + 1, *block_edges):
            if 0 <= value <= top:
                probes.append(netaddr.IPAddress(value, net.version))
    probes += [
        netaddr.IPAddress(data.draw(st.integers(0, (1 << 32) - 1)), 4),
        netaddr.IPAddress(data.draw(st.integers(0, (1 << 128) - 1)), 6),
    ]
    for ip in probes:
        if ip.version == 6 and ip.is_ipv4_mapped():
            continue  # parse_ip reads these as IPv4, by design
        assert allow.contains(str(ip)) == (ip in ipset), str(ip)


def test_cached_answers_belong_to_one_version_of_the_set() -> None:
    allow = Allowlist(netaddr.IPSet(["198.51.100.0/24"]))
    assert allow.contains("198.51.100.7") and not allow.contains("203.0.113.7")
    assert allow.contains("198.51.100.7")  # answered from the cache, same answer
    allow.replace(netaddr.IPSet(["203.0.113.0/24"]), None)
    assert not allow.contains("198.51.100.7") and allow.contains("203.0.113.7")
    assert not allow.contains("not an address") and not allow.contains("not an address")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_contains_agrees_with_ipset_in_dense_blocks(seed: int) -> None:
    """Many ranges starting in one top-16-bit block get a second-level index: probe it."""
    rng = random.Random(seed)
    nets: list[str] = []
    for _ in range(40):  # IPv4: /24-/30s inside 10.20.0.0/16
        nets.append(
            str(
                netaddr.IPNetwork(
                    (0x0A140000 | rng.getrandbits(16), rng.randint(24, 30)), version=4
                ).cidr
            )
        )
    for _ in range(40):  # IPv6: /44-/64s inside 2600:1900::/28, like Google's
        value = (0x2600_1900 << 96) | (rng.getrandbits(100) & ((1 << 100) - 1))
        nets.append(str(netaddr.IPNetwork((value, rng.randint(44, 64)), version=6).cidr))
    ipset = netaddr.IPSet(nets)
    allow = Allowlist(ipset)
    probes: list[netaddr.IPAddress] = []
    for r in ipset.iter_ipranges():
        for value in (r.first - 1, r.first, r.last, r.last + 1):
            probes.append(netaddr.IPAddress(value, r.version))
    probes += [netaddr.IPAddress(0x0A140000 | rng.getrandbits(16), 4) for _ in range(50)]
    probes += [netaddr.IPAddress((0x2600_1900 << 96) | rng.getrandbits(100), 6) for _ in range(50)]
    for ip in probes:
        assert allow.contains(str(ip)) == (ip in ipset), str(ip)

"""The sink's merge timing behind a backlog, against the fake OneSignal on loopback.

The source tells the sink how far each partition is read; a due user whose partition is still
being read waits (up to ``MAX_HOLD_WINDOWS`` windows) so its later events fold into the same
request. What is asserted is what reached the server, and when.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Sequence

import pytest

from gateway.config import Secret
from gateway.fake_onesignal import FakeOneSignal
from gateway.records import KafkaRecord
from gateway.tagsync.coalesce import SourceRef
from gateway.tagsync.http1 import Http1Client
from gateway.tagsync.rules import Alias
from gateway.tagsync.worker import MAX_HOLD_WINDOWS, Sink, SinkSettings

KEY = "sink-test-key"
APP = "11111111-2222-3333-4444-555555555555"
FLUSH_S = 0.2
TP = ("events", 0)


class NoDeadLetters:
    def write(self, record: KafkaRecord) -> None:
        raise AssertionError(f"unexpected dead letter: {record.headers}")


@pytest.fixture
def fake() -> Iterator[FakeOneSignal]:
    with FakeOneSignal(api_key=KEY) as f:
        yield f


@pytest.fixture
def sink(fake: FakeOneSignal) -> Iterator[tuple[Sink, queue.SimpleQueue[Sequence[SourceRef]]]]:
    settings = SinkSettings(
        flush_interval_s=FLUSH_S,
        max_keys=100,
        per_user_interval_s=1.0,
        app_rate_limit=100.0,
        max_concurrency=4,
        max_attempts=3,
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
        max_retry_elapsed_s=10.0,
        dead_letter_topic="dlt",
        delete_value="",
        api_url=fake.url,
    )
    done: queue.SimpleQueue[Sequence[SourceRef]] = queue.SimpleQueue()
    s = Sink(settings, lambda: Http1Client(fake.url, {APP: Secret(KEY)}), NoDeadLetters(), done)
    s.start()
    yield s, done
    s.close(2.0)


def user(n: int) -> Alias:
    return Alias(APP, "external_id", f"user-{n}")


def event(s: Sink, n: int, offset: int, tags: dict[str, str | None]) -> None:
    s.submit(user(n), tags, (float(offset), offset), SourceRef(*TP, offset))


def sent_for(fake: FakeOneSignal, n: int) -> list[dict[str, str]]:
    return [r.body["properties"]["tags"] for r in fake.requests if r.alias_id == f"user-{n}"]


def test_a_user_waits_for_its_partition_to_be_read_then_sends_once(
    fake: FakeOneSignal, sink: tuple[Sink, queue.SimpleQueue[Sequence[SourceRef]]]
) -> None:
    s, done = sink
    s.report_progress({TP: (1, 5000)}, paused=False)  # 4,999 records still unread
    event(s, 1, 0, {"a": "1", "b": "1"})
    time.sleep(FLUSH_S * 3)
    assert fake.requests == []  # its window closed long ago, but more may be coming
    event(s, 1, 4000, {"b": "2"})
    s.report_progress({TP: (5000, 5000)}, paused=False)  # read to the end
    assert fake.wait_for(lambda f: len(f.requests) == 1, timeout_s=2.0)
    time.sleep(FLUSH_S * 2)
    assert sent_for(fake, 1) == [{"a": "1", "b": "2"}]  # one request, both events merged
    assert sorted(r.offset for r in done.get(timeout=2)) == [0, 4000]


def test_caught_up_partitions_send_after_one_window(
    fake: FakeOneSignal, sink: tuple[Sink, queue.SimpleQueue[Sequence[SourceRef]]]
) -> None:
    s, _ = sink
    s.report_progress({TP: (100, 104)}, paused=False)  # a few records behind: live traffic
    started = time.monotonic()
    event(s, 2, 99, {"a": "1"})
    assert fake.wait_for(lambda f: len(f.requests) == 1, timeout_s=2.0)
    assert FLUSH_S * 0.9 <= fake.requests[0].at - started < FLUSH_S + 0.5


def test_a_partition_never_read_to_the_end_holds_at_most_the_maximum(
    fake: FakeOneSignal, sink: tuple[Sink, queue.SimpleQueue[Sequence[SourceRef]]]
) -> None:
    s, _ = sink
    s.report_progress({TP: (1, 10**6)}, paused=False)
    started = time.monotonic()
    event(s, 3, 0, {"a": "1"})
    assert fake.wait_for(lambda f: len(f.requests) == 1, timeout_s=MAX_HOLD_WINDOWS * FLUSH_S + 2)
    took = fake.requests[0].at - started
    assert MAX_HOLD_WINDOWS * FLUSH_S * 0.9 <= took < MAX_HOLD_WINDOWS * FLUSH_S + 0.5


def test_a_paused_source_releases_everyone_held(
    fake: FakeOneSignal, sink: tuple[Sink, queue.SimpleQueue[Sequence[SourceRef]]]
) -> None:
    """Held events count towards the pause; holding them while paused would stall both."""
    s, _ = sink
    s.report_progress({TP: (1, 10**6)}, paused=False)
    event(s, 4, 0, {"a": "1"})
    event(s, 5, 1, {"a": "1"})
    time.sleep(FLUSH_S * 3)
    assert fake.requests == []
    s.report_progress({}, paused=True)
    assert fake.wait_for(lambda f: len(f.requests) == 2, timeout_s=1.0)

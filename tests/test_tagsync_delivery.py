"""The delivery side's merge timing behind a backlog, against the fake OneSignal on loopback.

The source tells the delivery side how far each partition is read; a due user whose
partition is still being read waits (up to ``MAX_HOLD_WINDOWS`` windows) so its later events
fold into the same request. What is asserted is what reached the server, and when.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from gateway.config import Secret
from gateway.core.records import KafkaRecord
from gateway.devkit.fake_onesignal import FakeOneSignal
from gateway.tagsync.coalesce import SourceRef
from gateway.tagsync.deadletters import DeadLetterWriter
from gateway.tagsync.delivery import Delivery
from gateway.tagsync.hold import MAX_HOLD_WINDOWS
from gateway.tagsync.http1 import Http1Client
from gateway.tagsync.rules import Alias
from gateway.tagsync.settings import DeliverySettings

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


def settings_for(fake: FakeOneSignal) -> DeliverySettings:
    return DeliverySettings(
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


def start_delivery(
    fake: FakeOneSignal, dead_letters: DeadLetterWriter
) -> tuple[Delivery, queue.SimpleQueue[Sequence[SourceRef]]]:
    done: queue.SimpleQueue[Sequence[SourceRef]] = queue.SimpleQueue()
    s = Delivery(
        settings_for(fake), lambda: Http1Client(fake.url, {APP: Secret(KEY)}), dead_letters, done
    )
    s.start()
    return s, done


@pytest.fixture
def delivery(
    fake: FakeOneSignal,
) -> Iterator[tuple[Delivery, queue.SimpleQueue[Sequence[SourceRef]]]]:
    s, done = start_delivery(fake, NoDeadLetters())
    yield s, done
    s.close(2.0)


def user(n: int) -> Alias:
    return Alias(APP, "external_id", f"user-{n}")


def event(s: Delivery, n: int, offset: int, tags: dict[str, str | None]) -> None:
    s.submit(user(n), tags, (float(offset), offset), SourceRef(*TP, offset))


def held(s: Delivery, alias: Alias, timeout_s: float = 5.0) -> bool:
    """Wait until the delivery side decided to hold ``alias`` (its window closed, it was not sent).

    Reads the delivery side's own state (the loop thread replaces nothing here, it appends): the
    condition that proves the window passed on its clock, where a sleep would not.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if s.holding(alias):
            return True
        time.sleep(0.01)
    return False


def sent_for(fake: FakeOneSignal, n: int) -> list[dict[str, str]]:
    return [r.body["properties"]["tags"] for r in fake.requests if r.alias_id == f"user-{n}"]


def test_a_user_waits_for_its_partition_to_be_read_then_sends_once(
    fake: FakeOneSignal, delivery: tuple[Delivery, queue.SimpleQueue[Sequence[SourceRef]]]
) -> None:
    s, done = delivery
    s.report_progress({TP: (1, 5000)}, paused=False)  # 4,999 records still unread
    event(s, 1, 0, {"a": "1", "b": "1"})
    assert held(s, user(1))  # its window closed, but more may be coming: held, not sent
    assert fake.requests == []
    event(s, 1, 4000, {"b": "2"})
    s.report_progress({TP: (5000, 5000)}, paused=False)  # read to the end
    # both offsets reported done together: one request carried both events
    assert sorted(r.offset for r in done.get(timeout=2)) == [0, 4000]
    assert sent_for(fake, 1) == [{"a": "1", "b": "2"}]


def test_caught_up_partitions_send_after_one_window(
    fake: FakeOneSignal, delivery: tuple[Delivery, queue.SimpleQueue[Sequence[SourceRef]]]
) -> None:
    s, _ = delivery
    s.report_progress({TP: (100, 104)}, paused=False)  # a few records behind: live traffic
    started = time.monotonic()
    event(s, 2, 99, {"a": "1"})
    assert fake.wait_for(lambda f: len(f.requests) == 1, timeout_s=2.0)
    assert FLUSH_S * 0.9 <= fake.requests[0].at - started < FLUSH_S + 0.5


def test_a_partition_never_read_to_the_end_holds_at_most_the_maximum(
    fake: FakeOneSignal, delivery: tuple[Delivery, queue.SimpleQueue[Sequence[SourceRef]]]
) -> None:
    s, _ = delivery
    s.report_progress({TP: (1, 10**6)}, paused=False)
    started = time.monotonic()
    event(s, 3, 0, {"a": "1"})
    assert fake.wait_for(lambda f: len(f.requests) == 1, timeout_s=MAX_HOLD_WINDOWS * FLUSH_S + 2)
    took = fake.requests[0].at - started
    assert MAX_HOLD_WINDOWS * FLUSH_S * 0.9 <= took < MAX_HOLD_WINDOWS * FLUSH_S + 0.5


def test_a_paused_source_releases_everyone_held(
    fake: FakeOneSignal, delivery: tuple[Delivery, queue.SimpleQueue[Sequence[SourceRef]]]
) -> None:
    """Held events count towards the pause; holding them while paused would stall both."""
    s, _ = delivery
    s.report_progress({TP: (1, 10**6)}, paused=False)
    event(s, 4, 0, {"a": "1"})
    event(s, 5, 1, {"a": "1"})
    assert held(s, user(4)) and held(s, user(5))
    assert fake.requests == []
    s.report_progress({}, paused=True)
    assert fake.wait_for(lambda f: len(f.requests) == 2, timeout_s=1.0)


# -- a dead-lettered update is done only once its dead letter is acknowledged ---------------


class HeldDeadLetters:
    """The first ``failures`` writes fail at once; the next one waits until the test releases
    it, then succeeds.

    ``calls`` counts the writes that began, so a test waits for the write to be under way
    (the condition that the delivery side had its chance to report the offset too early).
    """

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.release = threading.Event()
        self.calls = 0
        self.written: list[KafkaRecord] = []
        self.changed = threading.Condition()

    def write(self, record: KafkaRecord) -> None:
        with self.changed:
            self.calls += 1
            self.changed.notify_all()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the dead-letter topic's leader is away")
        if not self.release.wait(10):
            raise TimeoutError("the test never released the dead-letter write")
        self.written.append(record)

    def wait_calls(self, n: int, timeout_s: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.calls >= n, timeout_s), self.calls


def no_report(done: queue.SimpleQueue[Sequence[SourceRef]]) -> bool:
    return done.empty()


Trigger = Callable[[Delivery], None]


def permanent_failure(fake: FakeOneSignal) -> Trigger:
    fake.script(400, alias_id="user-9")
    return lambda s: event(s, 9, 42, {"a": "1"})


def undeliverable_record(fake: FakeOneSignal) -> Trigger:
    record = KafkaRecord("dlt", b"k", b"{}", [])
    return lambda s: s.submit_dead_letter(record, "unknown-app", SourceRef(*TP, 42))


@pytest.mark.parametrize("trigger", [permanent_failure, undeliverable_record])
def test_a_dead_letter_being_written_keeps_its_offset_undone(
    fake: FakeOneSignal, trigger: Callable[[FakeOneSignal], Trigger]
) -> None:
    writer = HeldDeadLetters()
    s, done = start_delivery(fake, writer)
    try:
        trigger(fake)(s)
        writer.wait_calls(1)  # the dead letter is being written, and is not acknowledged
        assert no_report(done)
        writer.release.set()
        assert [r.offset for r in done.get(timeout=5)] == [42]
        assert len(writer.written) == 1
    finally:
        writer.release.set()
        s.close(2.0)


@pytest.mark.parametrize("trigger", [permanent_failure, undeliverable_record])
def test_a_failed_dead_letter_write_is_retried_and_the_offset_waits_for_it(
    fake: FakeOneSignal, trigger: Callable[[FakeOneSignal], Trigger]
) -> None:
    writer = HeldDeadLetters(failures=2)
    s, done = start_delivery(fake, writer)
    try:
        trigger(fake)(s)
        writer.wait_calls(3)  # two writes failed; the third is under way
        assert no_report(done)
        writer.release.set()
        assert [r.offset for r in done.get(timeout=5)] == [42]
        assert writer.calls == 3 and len(writer.written) == 1
    finally:
        writer.release.set()
        s.close(2.0)

"""Rate limiters, backoff, Retry-After, classification, coalescing and offset tracking (pure)."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tagsync.coalesce import Coalescer, OffsetTracker, SourceRef
from gateway.tagsync.ratelimit import (
    AppLimiter,
    Outcome,
    Slot,
    UserLimiter,
    backoff_delay,
    classify,
    parse_retry_after,
)
from gateway.tagsync.rules import Alias

# -- limiters -------------------------------------------------------------------------------


def run_limiter(
    limiter: AppLimiter, arrivals: list[float], latencies: list[float] | None = None
) -> list[tuple[float, float]]:
    """Callers ask at their arrival times and retry when told; a request takes its latency.

    Returns (sent, answered) per request, simulated event by event.
    """
    latencies = latencies or [0.0]
    waiting = sorted(arrivals)
    in_flight: list[tuple[float, Slot]] = []  # (answered at, slot)
    done: list[tuple[float, float]] = []
    clock = 0.0
    i = 0
    while waiting:
        clock = max(clock, waiting[0])
        for answered, slot in [f for f in in_flight if f[0] <= clock]:
            limiter.release(slot, answered)
        in_flight = [f for f in in_flight if f[0] > clock]
        got = limiter.reserve(clock)
        if isinstance(got, float):
            # Wake at whichever comes first: the wait, or the next response.
            clock = min([clock + got, *(f[0] for f in in_flight)])
            continue
        latency = latencies[i % len(latencies)]
        i += 1
        in_flight.append((clock + latency, got))
        done.append((clock, clock + latency))
        waiting.pop(0)
    return done


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best = 0
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


@settings(max_examples=60, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 20.0, 57.5, 500.0]),
    arrivals=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=300),
    latencies=st.lists(st.floats(0, 0.8, allow_nan=False), min_size=1, max_size=10),
    where=st.lists(st.floats(0, 1), min_size=1, max_size=10),
)
def test_app_limiter_holds_at_the_server_whatever_the_latency(
    rate: float, arrivals: list[float], latencies: list[float], where: list[float]
) -> None:
    """The server sees each request somewhere between send and answer: any such instant."""
    limiter = AppLimiter(rate)
    done = run_limiter(limiter, arrivals, latencies)
    assert len(done) == len(arrivals)
    seen = [s + (a - s) * where[i % len(where)] for i, (s, a) in enumerate(done)]
    allowed = max(1, int(rate)) if rate >= 1 else 1
    window = 1.0 if rate >= 1 else 1.0 / rate
    assert max_in_window(seen, window) <= allowed


def test_app_limiter_is_not_needlessly_slow() -> None:
    limiter = AppLimiter(20)
    sent = [s for s, _ in run_limiter(limiter, [0.0] * 60, [0.01])]
    # 20 now, 20 a window after the first answers, 20 more a window later.
    assert sent[19] == 0.0
    assert sent[-1] < 2.1


def test_throttle_pauses_the_whole_app_and_slows_it_down() -> None:
    limiter = AppLimiter(10)
    slot = limiter.reserve(0.0)
    assert not isinstance(slot, float)
    limiter.release(slot, 0.0)
    limiter.throttle(0.0, 2.0)
    limiter.throttle(0.1, 2.0)  # several failures in one window cut the rate once
    assert limiter.reserve(1.0) == pytest.approx(1.1)  # paused until the later 2.1
    assert limiter.allowance == 5
    sent = [s for s, _ in run_limiter(limiter, [2.0] * 20, [0.01])]
    assert sent[0] >= 2.1
    assert max_in_window(sent, 1.0) <= 5 + 1  # recovers additively while granting
    for _ in range(100):
        limiter.success()
    assert limiter.allowance == 10


def test_user_limiter_spaces_requests_per_user() -> None:
    users = UserLimiter(1.0)
    assert users.wait("a", 0.0) == 0
    users.mark("a", 0.0)
    assert users.wait("a", 0.5) == pytest.approx(0.5)
    assert users.wait("b", 0.5) == 0
    assert users.wait("a", 1.0) == 0
    users.prune(5.0)
    assert len(users) == 0


# -- backoff, Retry-After, classification ---------------------------------------------------


@given(attempt=st.integers(0, 80), base=st.floats(0, 5), cap=st.floats(0, 120), seed=st.integers())
def test_full_jitter_stays_within_bounds(attempt: int, base: float, cap: float, seed: int) -> None:
    delay = backoff_delay(attempt, base, cap, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(attempt, 62)) + 1e-9


def test_full_jitter_spreads_out() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(3, 1.0, 60.0, rng) for _ in range(500)]
    assert max(delays) <= 8.0 and min(delays) >= 0.0
    assert 3.0 < sum(delays) / len(delays) < 5.0  # uniform on [0, 8]


def test_retry_after_seconds_and_http_date() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("2", now) == 2.0
    assert parse_retry_after(" 120 ", now) == 120.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0
    assert parse_retry_after("1.5", now) == 1.5
    for bad in (None, "", "soon", "-", "inf"):
        assert parse_retry_after(bad, now) is None


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.OK),
        (202, Outcome.OK),
        (400, Outcome.PERMANENT),
        (401, Outcome.AUTH),
        (403, Outcome.AUTH),
        (404, Outcome.PERMANENT),
        (409, Outcome.PERMANENT),
        (410, Outcome.PERMANENT),
        (422, Outcome.PERMANENT),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (504, Outcome.RETRY),
    ],
)
def test_classification(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome


# -- coalescing -----------------------------------------------------------------------------

A = Alias("app", "external_id", "u1")
B = Alias("app", "external_id", "u2")


def src(offset: int) -> SourceRef:
    return SourceRef("t", 0, offset)


def test_coalescer_merges_newest_per_key_within_window() -> None:
    c = Coalescer(flush_interval_s=1.0, max_keys=100)
    c.add(A, {"x": "old", "y": "1"}, (10.0, 1), src(1), now=0.0)
    c.add(A, {"x": "new"}, (20.0, 2), src(2), now=0.2)
    res = c.add(A, {"x": "older", "z": None}, (5.0, 3), src(3), now=0.4)
    assert res.attached and res.superseded == 1
    assert list(c.pop_due(0.9)) == []
    assert list(c.pop_due(1.0)) == [A]
    batch = c.take(A)
    assert batch.tags == {"x": "new", "y": "1", "z": None}
    assert [s.offset for s in batch.sources] == [1, 2, 3]


def test_coalescer_one_batch_in_flight_per_user_and_no_regression() -> None:
    c = Coalescer(flush_interval_s=0.5, max_keys=100)
    c.add(A, {"x": "v20"}, (20.0, 1), src(1), now=0.0)
    assert list(c.pop_due(0.5)) == [A]
    c.take(A)
    c.add(A, {"x": "v30"}, (30.0, 2), src(2), now=0.6)
    assert list(c.pop_due(5.0)) == []  # A is in flight
    late = c.add(A, {"x": "v10"}, (10.0, 3), src(3), now=0.7)
    assert late.attached  # rides along with the pending batch, value ignored
    c.finish(A, now=1.0)
    assert list(c.pop_due(1.1)) == [A]
    assert c.take(A).tags == {"x": "v30"}
    c.finish(A, now=1.2)
    stale = c.add(A, {"x": "v15"}, (15.0, 4), src(4), now=1.3)
    assert not stale.attached and stale.superseded == 1


def test_coalescer_splits_large_updates() -> None:
    c = Coalescer(flush_interval_s=0.0, max_keys=3)
    c.add(A, {f"k{i}": str(i) for i in range(7)}, (1.0, 1), src(1), now=0.0)
    batch = c.take(next(iter(c.pop_due(0.0))))
    assert [len(ch) for ch in batch.chunks] == [3, 3, 1]
    assert batch.tags == {f"k{i}": str(i) for i in range(7)}


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([A, B]),
            st.dictionaries(st.sampled_from("abcd"), st.one_of(st.none(), st.text(max_size=3))),
            st.integers(0, 20),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_coalescer_final_state_equals_newest_event_per_key(
    events: list[tuple[Alias, dict[str, str | None], int, bool]],
) -> None:
    """Applying every batch in send order gives, per user and key, the newest event's value."""
    c = Coalescer(flush_interval_s=1.0, max_keys=2)
    state: dict[tuple[Alias, str], str | None] = {}
    model: dict[tuple[Alias, str], tuple[tuple[float, int], str | None]] = {}
    now = 0.0
    for offset, (alias, tags, when, flush) in enumerate(events):
        order = (float(when), offset)
        c.add(alias, tags, order, src(offset), now)
        for k, v in tags.items():
            if (alias, k) not in model or model[(alias, k)][0] < order:
                model[(alias, k)] = (order, v)
        now += 0.3
        if flush:
            for due in list(c.pop_due(now)):
                for chunk in c.take(due).chunks:
                    state.update({(due, k): v for k, v in chunk.items()})
                c.finish(due, now)
    for due in c.drain():
        for chunk in c.take(due).chunks:
            state.update({(due, k): v for k, v in chunk.items()})
        c.finish(due, now)
    assert state == {k: v for k, (_, v) in model.items()}


# -- offsets --------------------------------------------------------------------------------


def test_offsets_commit_only_the_contiguous_done_prefix() -> None:
    t = OffsetTracker()
    for off in (5, 6, 7, 9):  # gaps in offsets happen (compaction, transactions)
        t.add("p0", off)
    t.mark_done("p0", 6)
    t.mark_done("p0", 9)
    assert t.committable("p0") is None
    t.mark_done("p0", 5)
    assert t.committable("p0") == 7
    t.mark_done("p0", 7)
    assert t.committable("p0") == 10
    assert t.outstanding("p0") == 0
    t.drop("p0")
    t.mark_done("p0", 11)  # late completion for a revoked partition: ignored
    assert t.committable("p0") is None


@given(st.permutations(list(range(30))), st.integers(0, 30))
def test_committed_offset_never_passes_an_unfinished_event(order: list[int], k: int) -> None:
    t = OffsetTracker()
    for off in range(30):
        t.add("p", off, done=False)
    finished = set(order[:k])
    best: int | None = None
    for off in order[:k]:
        t.mark_done("p", off)
        got = t.committable("p")
        if got is not None:
            best = got
    expected = 0
    while expected in finished:
        expected += 1
    assert (best or 0) == expected
    assert all(o in finished for o in range(best or 0))


class _ReferenceAppLimiter:
    """The earlier AppLimiter window (a list of slots, filtered and sorted on every call)."""

    def __init__(self, rate: float) -> None:
        self.n = max(1, math.floor(rate))
        self.window = self.n / rate
        self.slots: list[list[float]] = []

    def reserve(self, now: float) -> list[float] | float:
        self.slots = [s for s in self.slots if s[0] > now - self.window]
        if len(self.slots) < self.n:
            slot = [math.inf]
            self.slots.append(slot)
            return slot
        times = sorted(s[0] for s in self.slots)
        free_at = times[len(times) - self.n] + self.window
        return max(1e-3, min(free_at - now, 0.05) if math.isinf(free_at) else free_at - now)


@settings(max_examples=80, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 20.0, 57.5]),
    steps=st.lists(
        st.tuples(st.floats(0, 0.3, allow_nan=False), st.booleans(), st.integers(0, 50)),
        min_size=1,
        max_size=200,
    ),
)
def test_app_limiter_answers_as_the_reference_window(
    rate: float, steps: list[tuple[float, bool, int]]
) -> None:
    """Same grants and waits as the straightforward window, answers in any order."""
    fast, ref = AppLimiter(rate), _ReferenceAppLimiter(rate)
    now = 0.0
    out: list[tuple[Slot, list[float]]] = []
    for dt, answer, which in steps:
        now += dt
        if answer and out:
            a, b = out.pop(which % len(out))
            fast.release(a, now)
            b[0] = now
            continue
        got, want = fast.reserve(now), ref.reserve(now)
        if isinstance(want, float):
            assert isinstance(got, float) and got == pytest.approx(want)
        else:
            assert not isinstance(got, float)
            out.append((got, want))


# -- coalescing and offset tracking: rules a mutation run found unheld (docs/testing.md) -----


def test_coalescer_needs_at_least_one_key_per_request() -> None:
    with pytest.raises(ValueError) as raised:
        Coalescer(flush_interval_s=1.0, max_keys=0)
    assert str(raised.value) == "max_keys must be at least 1"
    one = Coalescer(flush_interval_s=0.0, max_keys=1)
    one.add(A, {"a": "1", "b": "2"}, (1.0, 1), src(1), now=0.0)
    assert one.take(A).chunks == ({"a": "1"}, {"b": "2"})


def test_coalescer_counts_every_superseded_value() -> None:
    c = Coalescer(flush_interval_s=1.0, max_keys=100)
    c.add(A, {"x": "1", "y": "1", "z": "1"}, (10.0, 1), src(1), now=0.0)
    res = c.add(A, {"x": "2", "y": "2"}, (11.0, 2), src(2), now=0.1)  # two pending ones lose
    assert res.attached and res.superseded == 2
    c.take(A)
    late = c.add(A, {"x": "0", "y": "0", "w": "2"}, (9.0, 0), src(3), now=0.2)
    assert late.superseded == 2  # x and y: older than what was sent; w is new
    c.finish(A, now=0.3)
    assert c.take(A).tags == {"w": "2"}


def test_a_redelivered_record_is_sent_again_not_dropped_as_older() -> None:
    """After a crash before its commit, a record comes again with the same (time, offset):
    it is not older than what was sent, so it is sent again (the first send may have failed)."""
    c = Coalescer(flush_interval_s=0.0, max_keys=100)
    c.add(A, {"x": "v"}, (10.0, 7), src(7), now=0.0)
    c.take(A)
    c.finish(A, now=0.0)
    again = c.add(A, {"x": "v"}, (10.0, 7), src(7), now=1.0)
    assert again.attached and again.superseded == 0
    assert c.take(A).tags == {"x": "v"}


def test_coalescer_accessors_for_users_with_and_without_pending_updates() -> None:
    c = Coalescer(flush_interval_s=2.0, max_keys=100)
    assert c.first_at(A) is None and c.last_source(A) is None and c.sources(A) == ()
    assert c.users() == [] and c.next_due() is None
    c.add(A, {"x": "1"}, (1.0, 1), src(1), now=5.0)
    c.add(B, {"x": "1"}, (1.0, 2), src(2), now=6.0)
    c.add(A, {"y": "1"}, (2.0, 3), src(3), now=7.0)
    assert c.users() == [A, B]
    assert c.first_at(A) == 5.0
    assert c.last_source(A) == src(3)
    assert c.sources(A) == (src(1), src(3))
    assert c.next_due() == 7.0  # A's window: first event at 5.0 plus 2.0
    c.take(A)
    assert c.users() == [B] and c.sources(A) == () and c.first_at(A) is None


def test_a_user_taken_and_finished_is_not_due_again_from_an_old_heap_entry() -> None:
    c = Coalescer(flush_interval_s=1.0, max_keys=100)
    c.add(A, {"x": "1"}, (1.0, 1), src(1), now=0.0)
    c.defer(A, until=1.5)  # a second heap entry for A
    assert list(c.pop_due(1.0)) == [A]
    c.take(A)
    c.finish(A, now=1.1)
    assert list(c.pop_due(2.0)) == []  # the deferred entry finds nothing pending
    assert len(c) == 0 and c.in_flight == 0


def test_what_arrives_during_a_request_waits_its_own_window_after_it() -> None:
    c = Coalescer(flush_interval_s=10.0, max_keys=100)
    c.add(A, {"x": "1"}, (1.0, 1), src(1), now=0.0)
    assert list(c.pop_due(10.0)) == [A]
    c.take(A)
    c.add(A, {"x": "2"}, (2.0, 2), src(2), now=12.0)  # while A's request is in flight
    assert list(c.pop_due(100.0)) == []  # in flight: not due, whatever the time
    c.finish(A, now=13.0)
    assert c.next_due() == 22.0  # 12.0 + 10.0, not at once
    assert list(c.pop_due(21.9)) == []
    assert list(c.pop_due(22.0)) == [A]


def test_sent_values_are_remembered_oldest_forgotten_first() -> None:
    c = Coalescer(flush_interval_s=0.0, max_keys=100, memory=2)
    for i, key in enumerate(("a", "b")):
        c.add(A, {key: "new"}, (10.0, i), src(i), now=0.0)
        c.take(A)
        c.finish(A, now=0.0)
    # memory=2 holds both: older values for either are superseded
    assert c.add(A, {"a": "old"}, (1.0, 0), src(9), now=0.0).superseded == 1
    assert c.add(A, {"b": "old"}, (1.0, 0), src(9), now=0.0).superseded == 1
    c.add(A, {"c": "new"}, (10.0, 5), src(5), now=0.0)
    c.take(A)
    c.finish(A, now=0.0)
    # "c" pushed out the oldest, "a"; "b" and "c" are still held
    assert c.add(A, {"a": "old"}, (1.0, 0), src(9), now=0.0).superseded == 0
    assert c.add(A, {"b": "old"}, (1.0, 0), src(9), now=0.0).superseded == 1
    assert c.add(A, {"c": "old"}, (1.0, 0), src(9), now=0.0).superseded == 1


def test_the_default_memory_holds_a_hundred_thousand_sent_values() -> None:
    c = Coalescer(flush_interval_s=0.0, max_keys=100_001)
    keys = [f"k{i:06d}" for i in range(100_001)]
    c.add(A, dict.fromkeys(keys, "v"), (10.0, 1), src(1), now=0.0)
    c.take(A)  # remembered in key order: k000000 first, so forgotten first
    c.finish(A, now=0.0)
    assert c.add(A, {keys[0]: "old"}, (1.0, 0), src(2), now=0.0).superseded == 0
    assert c.add(A, {keys[1]: "old"}, (1.0, 0), src(2), now=0.0).superseded == 1


def test_offsets_read_again_from_an_earlier_point_start_over() -> None:
    t = OffsetTracker()
    for off in (5, 6, 7):
        t.add("p", off, done=off == 5)
    t.add("p", 6)  # the consumer went back (a seek, a re-assignment)
    assert t.outstanding("p") == 1 and t.committable("p") is None  # 5's done-ness is gone
    t.add("p", 7, done=True)
    t.add("p", 7)  # the same offset again is going back too
    assert t.outstanding("p") == 1 and t.committable("p") is None
    t.mark_done("p", 7)
    assert t.committable("p") == 8


def test_offsets_polled_done_and_counted_per_partition_and_overall() -> None:
    t = OffsetTracker()
    t.add("p", 1)
    assert t.committable("p") is None  # nothing done yet
    t.add("p", 2, done=True)
    t.add("q", 1, done=True)
    assert t.outstanding("p") == 2 and t.outstanding("q") == 1 and t.outstanding() == 3
    assert t.committable("q") == 2 and t.outstanding() == 2
    assert sorted(t.partitions()) == ["p", "q"]
    t.mark_done("p", 1)
    assert t.committable("p") == 3
    t.drop("q")
    t.drop("never-seen")  # dropping an unknown partition is harmless
    assert t.partitions() == ["p"] and t.outstanding("q") == 0
    t.add("q", 0)  # re-assigned: tracked afresh (0 is not "going back" from before)
    t.mark_done("q", 0)
    assert t.committable("q") == 1


# -- limiter, backoff and classification edges a mutation run found unheld -------------------


def test_classify_2xx_ends_at_299() -> None:
    assert classify(299) is Outcome.OK
    assert classify(300) is Outcome.PERMANENT


def test_retry_after_fractions_negatives_and_zoneless_dates() -> None:
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("0.5", now) == 0.5
    assert parse_retry_after("-1.5", now) == 0.0
    # "-0000" means "no zone information" (RFC 5322): read as UTC
    assert parse_retry_after("Tue, 01 Dec 2026 12:00:10 -0000", now) == 10.0
    # without ``now``, against the real clock, in UTC
    assert parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT") > 86400
    assert parse_retry_after("Thu, 01 Jan 2015 00:00:00 -0000") == 0.0


def test_app_limiter_rate_must_be_positive() -> None:
    for rate in (0, -1.0):
        with pytest.raises(ValueError) as raised:
            AppLimiter(rate)
        assert str(raised.value) == "rate must be positive"
    assert AppLimiter(2.5).rate == 2.5


def test_releasing_a_slot_twice_counts_it_once() -> None:
    lim = AppLimiter(1.0)  # one request per 1 s window
    slot = lim.reserve(0.0)
    assert isinstance(slot, list)
    lim.release(slot, 0.5)
    lim.release(slot, 0.7)  # a second release of the same slot: no effect
    assert lim.reserve(1.49) == pytest.approx(0.01)  # one answer, at 0.5
    assert isinstance(lim.reserve(1.5), list)


def test_throttling_cuts_the_rate_once_per_window_and_recovers_by_steps() -> None:
    lim = AppLimiter(10.0)  # n = 10, window = 1 s
    lim.throttle(0.0, pause_s=0.1)
    lim.throttle(0.5, pause_s=0.1)  # same window: no second cut
    assert lim.factor == 0.5
    lim.throttle(1.0, pause_s=0.1)  # exactly one window later: a new cut
    assert lim.factor == 0.25 and lim.allowance == 2
    lim.success()
    assert lim.factor == pytest.approx(0.35)  # + 1/n per success
    for _ in range(20):
        lim.success()
    assert lim.factor == 1.0 and lim.allowance == 10  # never above the configured rate


def test_user_limiter_forgets_idle_users_every_4096_marks() -> None:
    lim = UserLimiter(1.0)
    for i in range(2047):
        lim.mark(i, 0.0)
    lim.mark("mid", 10.0)  # the 2048th: the others' interval has passed, but no pruning yet
    assert len(lim) == 2048
    for i in range(2048, 4095):
        lim.mark(i, 0.0)
    assert len(lim) == 4095  # no pruning before the 4096th mark
    lim.mark("recent", 10.0)  # the 4096th: prunes everyone whose interval has passed
    assert len(lim) == 2 and lim.wait("recent", 10.5) == 0.5
    for i in range(4095):
        lim.mark(i, 10.0)
    assert len(lim) == 4097
    lim.mark("last", 10.5)  # the 8192nd: nobody's interval has passed yet
    assert len(lim) == 4098


def test_user_limiter_prune_forgets_exactly_at_the_interval() -> None:
    lim = UserLimiter(1.0)
    lim.mark("a", 0.0)
    lim.mark("b", 0.5)
    lim.prune(1.0)  # "a" may send again at 1.0: nothing left to remember
    assert len(lim) == 1 and lim.wait("b", 1.0) == 0.5 and lim.wait("a", 1.0) == 0.0


def test_a_dropped_partition_forgets_what_was_done_in_it() -> None:
    t = OffsetTracker()
    for off in (4, 5):
        t.add("p", off)
    t.mark_done("p", 5)  # 4 is not done: 5 stays uncommitted
    t.drop("p")  # revoked
    for off in (4, 5):  # assigned again, read again from the committed offset
        t.add("p", off)
    t.mark_done("p", 4)
    assert t.committable("p") == 5  # 5 is not done in this assignment

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

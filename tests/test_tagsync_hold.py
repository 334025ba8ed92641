"""The hold/release policy on an injected clock: which due user is sent now, which waits.

Pure: every decision takes ``now``, so the windows are asserted to the exact instant, where
tests/test_tagsync_delivery.py can only bound them against the real clock.
"""

from __future__ import annotations

import pytest

from gateway.tagsync.coalesce import SourceRef
from gateway.tagsync.hold import CAUGHT_UP_SLACK, MAX_HOLD_WINDOWS, HoldPolicy
from gateway.tagsync.rules import Alias

FLUSH_S = 0.5
MAX_HOLD_S = MAX_HOLD_WINDOWS * FLUSH_S
TP = ("events", 0)
OTHER = ("events", 1)


def user(n: int) -> Alias:
    return Alias("app", "external_id", f"user-{n}")


def at(offset: int, tp: tuple[str, int] = TP) -> SourceRef:
    return SourceRef(*tp, offset)


def behind(now: float = 0.0) -> HoldPolicy:
    """A policy whose partition is read to offset 10 of 5,000."""
    policy = HoldPolicy(FLUSH_S)
    assert policy.report({TP: (10, 5000)}, paused=False, now=now) == []
    return policy


def test_a_user_behind_a_backlog_waits_until_its_partition_is_read_to_the_target() -> None:
    policy = behind()
    assert policy.hold(user(1), at(9), first_at=0.0, now=FLUSH_S)
    assert policy and policy.holding(user(1))
    assert policy.report({TP: (4999, 5000)}, paused=False, now=1.0) == []  # one short
    assert policy.report({TP: (5000, 5000)}, paused=False, now=1.1) == [user(1)]
    assert not policy and not policy.holding(user(1))


def test_the_target_is_where_the_partition_ended_when_the_user_was_held() -> None:
    policy = behind()
    assert policy.hold(user(1), at(9), first_at=0.0, now=FLUSH_S)
    # more arrived meanwhile: the user does not chase the new end
    assert policy.report({TP: (5000, 9000)}, paused=False, now=1.0) == [user(1)]


def test_a_held_user_is_released_at_the_maximum_hold_counted_from_its_first_event() -> None:
    policy = behind()
    assert policy.hold(user(1), at(9), first_at=1.0, now=1.0 + FLUSH_S)
    assert policy.next_expiry() == 1.0 + MAX_HOLD_S
    assert policy.release(1.0 + MAX_HOLD_S - 0.001) == []
    assert policy.release(1.0 + MAX_HOLD_S) == [user(1)]
    assert policy.next_expiry() is None


def test_a_user_whose_window_already_reached_the_maximum_is_not_held() -> None:
    policy = behind()
    assert not policy.hold(user(1), at(9), first_at=0.0, now=MAX_HOLD_S)
    assert policy.hold(user(2), at(9), first_at=0.0, now=MAX_HOLD_S - 0.001)


def test_a_user_is_held_once_per_pending_update() -> None:
    policy = behind()
    assert policy.hold(user(1), at(9), first_at=0.0, now=FLUSH_S)
    assert policy.release(MAX_HOLD_S) == [user(1)]
    # due again before it was sent: a steady stream cannot keep it back
    assert not policy.hold(user(1), at(20), first_at=0.0, now=MAX_HOLD_S)
    policy.sent(user(1))
    assert policy.hold(user(1), at(30), first_at=MAX_HOLD_S, now=MAX_HOLD_S + FLUSH_S)


@pytest.mark.parametrize(
    ("progress", "why"),
    [
        ({TP: (5000 - CAUGHT_UP_SLACK, 5000)}, "within the slack of its end: live traffic"),
        ({TP: (10, None)}, "high watermark not known yet"),
        ({OTHER: (10, 5000)}, "its partition never reported"),
    ],
)
def test_a_user_is_not_held_without_a_backlog_on_its_partition(
    progress: dict[tuple[str, int], tuple[int, int | None]], why: str
) -> None:
    policy = HoldPolicy(FLUSH_S)
    policy.report(progress, paused=False, now=0.0)
    assert not policy.hold(user(1), at(9), first_at=0.0, now=FLUSH_S), why


def test_one_offset_beyond_the_slack_is_a_backlog() -> None:
    policy = HoldPolicy(FLUSH_S)
    policy.report({TP: (5000 - CAUGHT_UP_SLACK - 1, 5000)}, paused=False, now=0.0)
    assert policy.hold(user(1), at(9), first_at=0.0, now=FLUSH_S)


def test_without_a_source_or_a_first_event_nobody_is_held() -> None:
    policy = behind()
    assert not policy.hold(user(1), None, first_at=0.0, now=FLUSH_S)
    assert not policy.hold(user(2), at(9), first_at=None, now=FLUSH_S)


def test_a_paused_source_releases_everyone_and_holds_nobody_until_it_resumes() -> None:
    """Held events count towards the pause; holding them while paused would stall both."""
    policy = behind()
    assert policy.hold(user(1), at(9), first_at=0.0, now=FLUSH_S)
    assert policy.hold(user(2), at(9), first_at=0.0, now=FLUSH_S)
    assert policy.report({}, paused=True, now=1.0) == [user(1), user(2)]
    assert not policy.hold(user(3), at(9), first_at=1.0, now=1.5)
    assert policy.report({}, paused=False, now=2.0) == []
    assert policy.hold(user(3), at(9), first_at=1.0, now=2.0)


def test_forgetting_a_partition_releases_only_its_users() -> None:
    policy = HoldPolicy(FLUSH_S)
    policy.report({TP: (10, 5000), OTHER: (10, 5000)}, paused=False, now=0.0)
    assert policy.hold(user(1), at(9), first_at=0.0, now=FLUSH_S)
    assert policy.hold(user(2), at(9, OTHER), first_at=0.0, now=FLUSH_S)
    assert policy.forget([OTHER], now=1.0) == [user(2)]
    assert policy.holding(user(1)) and not policy.holding(user(2))
    # revoked: reported no more, so nobody is held for it
    assert not policy.hold(user(3), at(11, OTHER), first_at=1.0, now=1.5)


def test_draining_releases_everyone_and_holds_nobody_after() -> None:
    policy = behind()
    assert policy.hold(user(1), at(9), first_at=0.0, now=FLUSH_S)
    assert policy.drain(now=1.0) == [user(1)]
    assert not policy.hold(user(2), at(9), first_at=1.0, now=1.5)


def test_users_are_released_in_the_order_they_were_held() -> None:
    policy = behind()
    for n, now in enumerate((0.5, 0.6, 0.7)):
        assert policy.hold(user(n), at(9), first_at=now - FLUSH_S, now=now)
    assert policy.next_expiry() == 0.0 + MAX_HOLD_S
    # each waits the maximum from its own first event, the oldest first
    assert policy.release(MAX_HOLD_S) == [user(0)]
    assert policy.release(MAX_HOLD_S + 0.3) == [user(1), user(2)]

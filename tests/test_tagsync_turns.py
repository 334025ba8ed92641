"""Reading turns behind a backlog (gateway/tagsync/turns.py): a pure state machine."""

from __future__ import annotations

from collections.abc import Hashable

from gateway.tagsync.turns import ReadTurns

PARTS = ["a", "b", "c", "d"]


def plan(turns: ReadTurns, read: dict[Hashable, int], high: dict[Hashable, int]) -> set[Hashable]:
    return turns.plan(PARTS, read, high.get)


def test_behind_partitions_are_read_a_few_at_a_time_in_order() -> None:
    turns = ReadTurns(2, behind_by=10, slack=2)
    high: dict[Hashable, int] = dict.fromkeys(PARTS, 1000)
    read: dict[Hashable, int] = dict.fromkeys(PARTS, 5)
    assert plan(turns, read, high) == {"c", "d"}
    assert turns.reading == {"a", "b"}
    read["a"] = 500  # half way: still its turn
    assert plan(turns, read, high) == {"c", "d"}
    read["a"] = 998  # within slack of where its turn ends: c's turn
    assert plan(turns, read, high) == {"d"}
    assert turns.reading == {"b", "c"}
    read["b"] = read["c"] = 1000
    assert plan(turns, read, high) == set()
    assert turns.reading == {"d"}


def test_a_turn_ends_where_the_partition_ended_when_it_began() -> None:
    turns = ReadTurns(1, behind_by=10, slack=0)
    high: dict[Hashable, int] = {"a": 100, "b": 100, "c": 0, "d": 0}
    read: dict[Hashable, int] = {"a": 0, "b": 0}
    assert plan(turns, read, high) == {"b"}
    high["a"] = 200  # more arrives while a is read: b is not made to wait for it
    read["a"] = 100
    assert plan(turns, read, high) == {"a"}  # a is still behind: back of the queue
    assert turns.reading == {"b"}
    read["b"] = 100
    assert plan(turns, read, high) == set()
    assert turns.reading == {"a"}


def test_caught_up_unknown_and_revoked_partitions_are_never_held_back() -> None:
    turns = ReadTurns(1, behind_by=10, slack=2)
    # a, b far behind; c within behind_by of its end; d never read (position unknown)
    high: dict[Hashable, int] = {"a": 1000, "b": 1000, "c": 1000, "d": 1000}
    read: dict[Hashable, int] = {"a": 0, "b": 0, "c": 995}
    assert plan(turns, read, high) == {"b"}
    # a is revoked: b's turn comes at once
    assert turns.plan(["b", "c", "d"], read, high.get) == set()
    assert turns.reading == {"b"}


def test_limit_zero_reads_everything() -> None:
    turns = ReadTurns(0, behind_by=10, slack=2)
    assert plan(turns, dict.fromkeys(PARTS, 0), dict.fromkeys(PARTS, 10**6)) == set()

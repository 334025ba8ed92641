from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.dedupe import SeenWindow


def test_an_id_is_seen_within_the_window_only() -> None:
    w = SeenWindow(window_s=10, max_entries=100)
    assert not w.seen("a", now=0)
    w.add("a", now=0)
    assert w.seen("a", now=9.9)
    assert not w.seen("a", now=10.0)
    assert len(w) == 0


def test_the_oldest_ids_go_first_when_full() -> None:
    w = SeenWindow(window_s=100, max_entries=3)
    for i, eid in enumerate("abcd"):
        w.add(eid, now=i)
    assert [w.seen(e, now=5) for e in "abcd"] == [False, True, True, True]


def test_a_zero_window_remembers_nothing() -> None:
    w = SeenWindow(window_s=0, max_entries=10)
    w.add("a", now=0)
    assert not w.seen("a", now=0)


@given(
    st.lists(st.tuples(st.sampled_from("abcdefgh"), st.floats(0, 5)), max_size=60),
    st.integers(1, 5),
)
def test_never_more_than_max_entries_and_never_a_false_positive(
    ops: list[tuple[str, float]], cap: int
) -> None:
    w = SeenWindow(window_s=3, max_entries=cap)
    now = 0.0
    added: dict[str, float] = {}
    for eid, step in ops:
        now += step
        w.add(eid, now)
        added[eid] = now
        assert len(w) <= cap
        for other in "abcdefgh":
            if w.seen(other, now):
                assert other in added and added[other] + 3 > now

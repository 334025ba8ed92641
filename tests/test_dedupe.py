from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.dedupe import CONFLICT, DUPLICATE, NEW, SeenWindow


def test_an_id_is_seen_within_the_window_only() -> None:
    w = SeenWindow(window_s=10, max_entries=100)
    assert not w.seen("a", now=0)
    w.add("a", now=0)
    assert w.seen("a", now=9.9)
    assert not w.seen("a", now=10.0)
    w.add("a", now=10.0)  # seen again after expiry: a fresh window
    assert w.seen("a", now=19.9)


def test_the_oldest_ids_go_first_when_full() -> None:
    w = SeenWindow(window_s=100, max_entries=3)
    for i, eid in enumerate("abcd"):
        w.add(eid, now=i)
    assert [w.seen(e, now=5) for e in "abcd"] == [False, True, True, True]
    assert len(w) == 3


def test_a_zero_window_remembers_nothing() -> None:
    w = SeenWindow(window_s=0, max_entries=10)
    w.add("a", now=0)
    assert not w.seen("a", now=0)
    assert len(w) == 0


def test_the_same_id_with_another_kind_is_a_conflict_not_a_duplicate() -> None:
    w = SeenWindow(window_s=10, max_entries=100)
    assert w.check("a", "message.push.clicked", now=0) == NEW
    w.add("a", now=0, kind="message.push.clicked")
    assert w.check("a", "message.push.clicked", now=1) == DUPLICATE
    assert w.check("a", "message.push.sent", now=1) == CONFLICT
    # the conflicting record was published too: the window now holds its kind
    w.add("a", now=2, kind="message.push.sent")
    assert w.check("a", "message.push.sent", now=3) == DUPLICATE
    assert w.check("a", "message.push.clicked", now=3) == CONFLICT
    assert w.check("a", "message.push.sent", now=12) == NEW  # expired
    assert len(w) == 1


def test_memory_is_allocated_once() -> None:
    w = SeenWindow(window_s=3600, max_entries=1000)
    sizes = (len(w._table), len(w._ring), len(w._kind))
    for i in range(10_000):
        w.add(f"id-{i}", now=i, kind=f"kind-{i}")
    assert (len(w._table), len(w._ring), len(w._kind)) == sizes and len(w) == 1000
    assert all(w.seen(f"id-{i}", now=10_000) for i in range(9000, 10_000))
    assert not any(w.seen(f"id-{i}", now=10_000) for i in range(0, 9000))


def test_a_window_shorter_than_a_second_still_remembers() -> None:
    w = SeenWindow(window_s=0.5, max_entries=10)
    w.add("a", now=0)
    assert w.seen("a", now=0.4) and w.check("a", "", now=0.4) == DUPLICATE
    # expiry is exactly now + window_s, and an entry is gone at that instant
    assert not w.seen("a", now=0.5) and w.check("a", "", now=0.5) == NEW


def test_an_add_without_a_kind_holds_the_empty_kind() -> None:
    w = SeenWindow(window_s=10, max_entries=10)
    w.add("a", now=0)
    assert w.check("a", "", now=1) == DUPLICATE
    assert w.check("a", "message.push.sent", now=1) == CONFLICT
    w.add("", now=0)  # hash("") is 0, the empty-slot marker: it must still be a key
    assert w.seen("", now=1) and len(w) == 2


def test_memory_is_sized_from_max_entries() -> None:
    # the ring holds exactly max_entries; the table is the smallest power of two that keeps
    # the load factor at or under 0.5
    for n in range(1, 40):
        w = SeenWindow(window_s=10, max_entries=n)
        assert len(w._ring) == len(w._expiry) == len(w._kind) == n
        size = 1
        while size < 2 * n:
            size *= 2
        assert len(w._table) == len(w._where) == size, n
    w = SeenWindow(window_s=0, max_entries=1000)  # remembers nothing, so holds one slot
    assert len(w._ring) == 1 and len(w._table) == 2


def test_backward_shift_deletion_across_the_end_of_the_table() -> None:
    # max_entries 3 gives a table of 8 slots (mask 7); the injected hashes pick the home slots
    hashes = {"a": 7, "b": 15, "c": 8, "d": 16, "e": 23, "f": 1}
    w = SeenWindow(window_s=100, max_entries=3, hash_fn=hashes.__getitem__)
    assert len(w._table) == 8
    w.add("a", now=0, kind="k")  # slot 7
    w.add("b", now=1, kind="k")  # home 7, wraps to slot 0
    w.add("c", now=2, kind="k")  # home 0, pushed to slot 1
    # the ring is full: "d" evicts "a", and "b" and "c" shift back over the end of the table
    w.add("d", now=3, kind="k")  # home 0
    assert [w.seen(e, now=4) for e in "abcd"] == [False, True, True, True]
    assert [w.check(e, "k", now=4) for e in "bcd"] == [DUPLICATE] * 3
    assert sorted(x for x in w._table if x) == [8, 15, 16]
    w.add("e", now=4, kind="j")  # home 7: evicts "b"
    w.add("f", now=5, kind="k")  # home 1: evicts "c"
    assert [w.seen(e, now=6) for e in "abcdef"] == [False, False, False, True, True, True]
    assert w.check("e", "k", now=6) == CONFLICT and w.check("e", "j", now=6) == DUPLICATE
    assert sorted(x for x in w._table if x) == [1, 16, 23] and len(w) == 3
    # the expiry of each entry followed it through the shifts
    assert [w.seen(e, now=104.5) for e in "def"] == [False, False, True]


class Model:
    """The plain statement: the last `cap` distinct hashes added, each with its expiry."""

    def __init__(self, window: float, cap: int, hash_fn: object) -> None:
        self.window, self.cap, self.hash = window, cap, hash_fn
        self.held: OrderedDict[int, float] = OrderedDict()

    def seen(self, eid: str, now: float) -> bool:
        h = self.hash(eid)  # type: ignore[operator]
        return h in self.held and self.held[h] > now

    def add(self, eid: str, now: float) -> None:
        h = self.hash(eid)  # type: ignore[operator]
        if h in self.held:
            self.held[h] = now + self.window  # restarts, keeps its place in line
            return
        if len(self.held) == self.cap:
            self.held.popitem(last=False)
        self.held[h] = now + self.window


def tiny_hash(eid: str) -> int:
    # a deliberately small hash space: collisions, long probe runs, wraparound, backward shifts
    return (sum(map(ord, eid)) * 2654435761) % 13 + 1


@settings(max_examples=400)
@given(
    st.lists(
        st.tuples(
            st.booleans(), st.text(alphabet="abcdefghij", min_size=1, max_size=3), st.floats(0, 3)
        ),
        max_size=120,
    ),
    st.integers(1, 9),
    st.sampled_from([tiny_hash, hash]),
)
def test_agrees_with_the_model(
    ops: list[tuple[bool, str, float]], cap: int, hash_fn: object
) -> None:
    fn = hash_fn if hash_fn is tiny_hash else (lambda s: (hash(s) & ((1 << 64) - 1)) or 1)
    w = SeenWindow(window_s=4, max_entries=cap, hash_fn=fn)  # type: ignore[arg-type]
    model = Model(4, cap, fn)
    now = 0.0
    for is_add, eid, step in ops:
        now += step
        if is_add:
            w.add(eid, now)
            model.add(eid, now)
        assert w.seen(eid, now) == model.seen(eid, now)
        assert len(w) == len(model.held)
    for eid in {e for _, e, _ in ops}:
        assert w.seen(eid, now) == model.seen(eid, now)


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.text(alphabet="abcdef", min_size=1, max_size=2),
            st.sampled_from(["k1", "k2", "k3"]),
            st.floats(0, 3),
        ),
        max_size=100,
    ),
    st.integers(1, 6),
)
def test_check_agrees_with_a_model_that_keeps_the_latest_kind(
    ops: list[tuple[bool, str, str, float]], cap: int
) -> None:
    w = SeenWindow(window_s=4, max_entries=cap, hash_fn=tiny_hash)
    held: OrderedDict[int, tuple[float, str]] = OrderedDict()  # hash -> (expiry, kind)
    now = 0.0
    for is_add, eid, kind, step in ops:
        now += step
        h = tiny_hash(eid)
        if is_add:
            w.add(eid, now, kind)
            if h not in held and len(held) == cap:
                held.popitem(last=False)
            held[h] = (now + 4, kind)  # a held id restarts and keeps its place in line
        entry = held.get(h)
        if entry is None or entry[0] <= now:
            expected = NEW
        else:
            expected = DUPLICATE if entry[1] == kind else CONFLICT
        assert w.check(eid, kind, now) == expected

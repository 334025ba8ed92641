"""The producer-process frames: whatever way the bytes are cut, the same frames come out."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.kafka import wire

KINDS = st.sampled_from([wire.INIT, wire.RECORDS, wire.CLOSE, wire.RESULTS, wire.STATUS])


@given(st.lists(st.tuples(KINDS, st.binary(max_size=300)), max_size=8), st.data())
def test_frames_survive_any_split_of_the_stream(
    frames: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(wire.frame(kind, payload) for kind, payload in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    buffer = wire.FrameBuffer()
    out: list[tuple[int, bytes]] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out.extend(buffer.feed(stream[start:cut]))
        start = cut
    assert out == frames
    assert not buffer.buf  # nothing left over


def test_records_round_trip() -> None:
    records = [(1, "t.push", b"k", b"v", [("ce_id", b"x")]), (2, "t.sms", None, b"", [])]
    assert wire.loads(wire.dumps(records)) == records

"""The spool's segment format: round trips, torn tails at every byte, bit flips, sizes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.records import KafkaRecord
from gateway.kafka.spool import format as fmt

SEQ = 7

records = st.builds(
    KafkaRecord,
    topic=st.text(min_size=1, max_size=40),
    key=st.none() | st.binary(max_size=64),
    value=st.binary(max_size=2000),
    headers=st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=64)), max_size=6),
)


def segment(recs: list[KafkaRecord], seq: int = SEQ) -> tuple[bytes, list[int]]:
    """A segment's bytes and the end offset of each frame."""
    out = bytearray(fmt.FILE_MAGIC)
    ends = []
    for i, rec in enumerate(recs):
        out += fmt.frame(seq, len(out), fmt.encode_payload(rec, 1_700_000_000_000 + i))
        ends.append(len(out))
    return bytes(out), ends


@given(records, st.integers(min_value=0, max_value=2**63))
def test_payload_round_trips(rec: KafkaRecord, at: int) -> None:
    assert fmt.decode_payload(fmt.encode_payload(rec, at)) == (rec, at)


@given(st.lists(records, max_size=8))
def test_a_whole_segment_scans_clean(recs: list[KafkaRecord]) -> None:
    data, ends = segment(recs)
    sc = fmt.scan(data, SEQ)
    assert [e.record for e in sc.entries] == recs
    assert [e.end for e in sc.entries] == ends
    assert sc.torn_at is None and not sc.damaged
    assert sc.valid_end == len(data)


def test_truncation_at_every_byte_offset_is_a_torn_tail() -> None:
    recs = [
        KafkaRecord("t.push", b"user-1", b'{"a":1}', [("ce_id", b"1")]),
        KafkaRecord("t.dlt", None, b"", []),
        KafkaRecord("t.push", b"user-2", b"x" * 300, [("h", b"v"), ("ce_id", b"3")]),
    ]
    data, ends = segment(recs)
    boundaries = [len(fmt.FILE_MAGIC), *ends]
    for cut in range(len(data) + 1):
        sc = fmt.scan(data[:cut], SEQ)
        whole = [e for e in ends if e <= cut]
        assert [e.record for e in sc.entries] == recs[: len(whole)], cut
        assert not sc.damaged, cut
        if cut in boundaries:
            assert sc.torn_at is None, cut
        else:  # the partial frame (or file magic) is cut off where the last whole one ends
            assert sc.torn_at == (whole[-1] if whole else 0 if cut < 8 else 8), cut
        assert sc.valid_end <= max(cut, len(fmt.FILE_MAGIC))


def test_every_bit_flip_is_found_and_costs_only_its_own_record() -> None:
    recs = [
        KafkaRecord("t.push", f"u{i}".encode(), b"v" * (20 + i), [("ce_id", b"%d" % i)])
        for i in range(3)
    ]
    data, ends = segment(recs)
    starts = [len(fmt.FILE_MAGIC), *ends[:-1]]
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        sc = fmt.scan(bytes(flipped), SEQ)
        byte = bit // 8
        spans = enumerate(zip(starts, ends, strict=True))
        hit = next((i for i, (s, e) in spans if s <= byte < e), None)
        got = [e.record for e in sc.entries]
        if hit is None:  # the file magic: the frames after it are all still found
            assert got == recs and sc.damaged == [(0, starts[0])], bit
            continue
        assert got == [r for i, r in enumerate(recs) if i != hit], bit
        if hit == len(recs) - 1:  # the last frame: indistinguishable from a torn write
            assert sc.torn_at == starts[hit] and not sc.damaged, bit
        else:  # in the middle: reported with its offset
            assert sc.damaged == [(starts[hit], starts[hit + 1])] and sc.torn_at is None, bit


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=fmt.MAX_PAYLOAD - 64))
def test_records_of_every_size_up_to_the_limit(size: int) -> None:
    rec = KafkaRecord("t", b"k", b"\x00" * size, [])
    payload = fmt.encode_payload(rec, 1)
    data, _ = segment([rec])
    assert [e.record for e in fmt.scan(data, SEQ).entries] == [rec]
    assert len(payload) <= fmt.MAX_PAYLOAD


def test_the_size_limit_is_exact() -> None:
    fmt.frame(SEQ, 8, b"\x00" * fmt.MAX_PAYLOAD)  # at the limit: fine
    with pytest.raises(fmt.FormatError):
        fmt.frame(SEQ, 8, b"\x00" * (fmt.MAX_PAYLOAD + 1))


def test_a_frame_is_bound_to_its_segment_and_offset() -> None:
    """A frame copied elsewhere (or a frame-shaped run inside an event's body) does not pass."""
    rec = KafkaRecord("t.push", b"k", b"v", [])
    inner = fmt.frame(SEQ, 8, fmt.encode_payload(rec, 1))
    assert fmt.scan(fmt.FILE_MAGIC + inner, SEQ + 1).entries == []  # another segment
    # an event whose value is a well-formed frame: it is one record, never two
    outer = KafkaRecord("t.push", b"k", inner, [])
    data, _ = segment([outer, rec])
    assert [e.record for e in fmt.scan(data, SEQ).entries] == [outer, rec]


def test_segment_names() -> None:
    assert fmt.segment_seq(fmt.segment_name(42)) == 42
    assert fmt.segment_seq("LOCK") is None
    assert fmt.segment_seq("000000000001.seg.torn") is None


def test_a_payload_that_does_not_decode_is_a_format_error_and_scans_as_damage() -> None:
    good = fmt.encode_payload(KafkaRecord("t.push", b"k", b"v", [("h", b"x")]), 1)
    for cut in range(len(good)):  # every field cut short
        with pytest.raises(fmt.FormatError):
            fmt.decode_payload(good[:cut])
    bad = [
        good + b"\x00",  # bytes after the record
        good[:8] + b"\x00\x01\xff" + good[11:],  # a topic that is not UTF-8
        good[:16] + b"\xff\xff\xff\xfe" + good[20:],  # a key length of -2
    ]
    for payload in bad:
        with pytest.raises(fmt.FormatError):
            fmt.decode_payload(payload)
    # with a checksum that passes (a writer bug), scan still reports it, never raises
    rec = KafkaRecord("t.push", b"k", b"v", [])
    data = bytearray(fmt.FILE_MAGIC)
    for payload in (fmt.encode_payload(rec, 1), bad[0], fmt.encode_payload(rec, 2)):
        data += fmt.frame(SEQ, len(data), payload)
    sc = fmt.scan(bytes(data), SEQ)
    assert [e.spooled_at_ms for e in sc.entries] == [1, 2] and len(sc.damaged) == 1


def test_a_record_of_exactly_the_size_limit_is_read_back() -> None:
    rec = KafkaRecord("t", b"k", b"\x00" * (fmt.MAX_PAYLOAD - 22), [])
    payload = fmt.encode_payload(rec, 5)
    assert len(payload) == fmt.MAX_PAYLOAD
    data = fmt.FILE_MAGIC + fmt.frame(SEQ, 8, payload)
    sc = fmt.scan(data, SEQ)
    assert [(e.record, e.spooled_at_ms) for e in sc.entries] == [(rec, 5)]
    assert sc.torn_at is None and not sc.damaged


def test_damage_before_frame_shaped_bytes_resynchronizes_on_the_next_real_frame() -> None:
    """An event's body holding the frame magic (and a whole frame) is passed over."""
    decoy = fmt.frame(SEQ, 8, fmt.encode_payload(KafkaRecord("t", None, b"d", []), 1))
    recs = [
        KafkaRecord("t.push", b"a", b"0", []),
        KafkaRecord("t.push", b"b", b"x" + fmt.MAGIC + b"yy" + decoy + fmt.MAGIC + b"z", []),
        KafkaRecord("t.push", b"c", b"2", []),
        KafkaRecord("t.push", b"d", b"3", []),
        KafkaRecord("t.push", b"e", b"4", []),
    ]
    data, ends = segment(recs)
    damaged = bytearray(data)
    damaged[ends[0]] ^= 0xFF  # the second frame's magic
    sc = fmt.scan(bytes(damaged), SEQ)
    assert [e.record for e in sc.entries] == [recs[0], *recs[2:]]
    assert sc.damaged == [(ends[0], ends[1])] and sc.torn_at is None

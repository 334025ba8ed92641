"""The spool's segment format, pure: encode a record, frame it, scan a segment back.

A segment is a file of frames after an 8-byte file magic::

    segment := FILE_MAGIC frame*
    frame   := MAGIC(4) length(u32) crc(u32) payload(length)
    crc     := crc32(segment id (u64), frame offset (u64), length (u32), payload)

The checksum covers where the frame sits (its segment and offset), so a frame-shaped run of
bytes inside an event's own body can never pass for a frame when a scan resynchronizes after
damage, and a stale frame left in a reused region is not taken for a new one.

:func:`scan` never raises on damage; it says what it found:

- ``entries``: every frame that checks, in file order;
- ``torn_at``: the offset of a bad frame with no good frame after it (a write torn by a crash:
  the caller truncates the file there; nothing after it was ever acknowledged);
- ``damaged``: ``(offset, next good frame)`` for each bad region followed by a good frame
  (corruption in the middle: the caller refuses to start unless told to skip it).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from gateway.core.records import KafkaRecord

__all__ = [
    "FILE_MAGIC",
    "FRAME_OVERHEAD",
    "MAGIC",
    "MAX_PAYLOAD",
    "Entry",
    "FormatError",
    "Scan",
    "decode_payload",
    "encode_payload",
    "frame",
    "ordering_key",
    "scan",
    "segment_name",
    "segment_seq",
]

FILE_MAGIC = b"GWSPOOL\x01"
MAGIC = b"\xa5GWF"
_HEAD = struct.Struct(">4sII")
_CRC_PREFIX = struct.Struct(">QQI")
FRAME_OVERHEAD = _HEAD.size
# a record is at most kafka.max_request_size (at most 100 MiB is accepted by Kafka anyway)
MAX_PAYLOAD = 128 * 1024 * 1024

_U8 = struct.Struct(">Q")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")


class FormatError(ValueError):
    """A payload that does not decode (only possible for a frame whose checksum passed by
    chance, or a writer bug)."""


def ordering_key(record: KafkaRecord) -> tuple[str, bytes | None]:
    """What per-key order is kept for: the topic and the key (keyless records of a topic,
    dead letters among them, form one group)."""
    return record.topic, record.key


def encode_payload(record: KafkaRecord, spooled_at_ms: int) -> bytes:
    """The record's bytes in a frame: when it was spooled, topic, key, value, headers."""
    topic = record.topic.encode()
    parts = [_U8.pack(spooled_at_ms), _U16.pack(len(topic)), topic]
    if record.key is None:
        parts.append(_I32.pack(-1))
    else:
        parts += [_I32.pack(len(record.key)), record.key]
    parts += [_U32.pack(len(record.value)), record.value, _U16.pack(len(record.headers))]
    for name, value in record.headers:
        raw = name.encode()
        parts += [_U16.pack(len(raw)), raw, _U32.pack(len(value)), value]
    return b"".join(parts)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise FormatError(f"payload ends early at {self.pos} (needs {n} bytes)")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def unpack(self, s: struct.Struct) -> int:
        value: int = s.unpack(self.take(s.size))[0]
        return value


def decode_payload(payload: bytes) -> tuple[KafkaRecord, int]:
    """(record, spooled_at_ms) from :func:`encode_payload`'s bytes."""
    r = _Reader(payload)
    try:
        at = r.unpack(_U8)
        topic = r.take(r.unpack(_U16)).decode()
        key_len = r.unpack(_I32)
        key = None if key_len == -1 else r.take(key_len)
        value = r.take(r.unpack(_U32))
        headers = []
        for _ in range(r.unpack(_U16)):
            name = r.take(r.unpack(_U16)).decode()
            headers.append((name, r.take(r.unpack(_U32))))
    except UnicodeDecodeError as exc:
        raise FormatError(f"payload text is not UTF-8: {exc}") from None
    if r.pos != len(payload):
        raise FormatError(f"{len(payload) - r.pos} bytes after the record")
    return KafkaRecord(topic=topic, key=key, value=value, headers=headers), at


def _crc(segment: int, offset: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_PREFIX.pack(segment, offset, len(payload))))


def frame(segment: int, offset: int, payload: bytes) -> bytes:
    """The frame of ``payload`` at ``offset`` of segment ``segment``."""
    if len(payload) > MAX_PAYLOAD:
        raise FormatError(f"a spooled record is at most {MAX_PAYLOAD} bytes")
    return _HEAD.pack(MAGIC, len(payload), _crc(segment, offset, payload)) + payload


@dataclass(frozen=True, slots=True)
class Entry:
    offset: int
    end: int
    record: KafkaRecord
    spooled_at_ms: int


@dataclass(slots=True)
class Scan:
    entries: list[Entry] = field(default_factory=list)
    torn_at: int | None = None
    damaged: list[tuple[int, int]] = field(default_factory=list)

    @property
    def valid_end(self) -> int:
        """Where the file should end: before a torn tail, else at the last good frame."""
        if self.torn_at is not None:
            return self.torn_at
        return self.entries[-1].end if self.entries else len(FILE_MAGIC)


def _frame_at(data: bytes, segment: int, pos: int) -> Entry | None:
    end = pos + FRAME_OVERHEAD
    if end > len(data):
        return None
    magic, length, crc = _HEAD.unpack_from(data, pos)
    if magic != MAGIC or length > MAX_PAYLOAD or end + length > len(data):
        return None
    payload = data[end : end + length]
    if _crc(segment, pos, payload) != crc:
        return None
    try:
        record, at = decode_payload(payload)
    except FormatError:
        return None
    return Entry(pos, end + length, record, at)


def _next_good(data: bytes, segment: int, start: int) -> Entry | None:
    pos = data.find(MAGIC, start)
    while pos != -1:
        entry = _frame_at(data, segment, pos)
        if entry is not None:
            return entry
        pos = data.find(MAGIC, pos + 1)
    return None


def scan(data: bytes, segment: int) -> Scan:
    """What segment ``segment``'s bytes hold; see the module docstring."""
    out = Scan()
    head = len(FILE_MAGIC)
    if data[:head] != FILE_MAGIC:
        nxt = _next_good(data, segment, 1)
        if nxt is None:
            out.torn_at = 0
            return out
        out.damaged.append((0, nxt.offset))
        pos = nxt.offset
    else:
        pos = head
    while pos < len(data):
        entry = _frame_at(data, segment, pos)
        if entry is None:
            nxt = _next_good(data, segment, pos + 1)
            if nxt is None:
                out.torn_at = pos
                break
            out.damaged.append((pos, nxt.offset))
            entry = nxt
        out.entries.append(entry)
        pos = entry.end
    return out


def segment_name(seq: int) -> str:
    return f"{seq:012d}.seg"


def segment_seq(name: str) -> int | None:
    """The sequence number of a segment file's name, None for any other file."""
    stem, dot, ext = name.partition(".")
    if dot and ext == "seg" and len(stem) == 12 and stem.isdigit():
        return int(stem)
    return None

"""The frames between the server and its producer process, one definition for both ends.

A frame is a 5-byte head (payload length, kind) and the payload. Records and results are
``marshal``-ed (plain tuples of str, bytes and int; ``marshal`` is C-fast and runs no code on
load); only the first frame, the child's configuration, is pickled. Frames only ever come
from the other end of the gateway's own socketpair.
"""

from __future__ import annotations

import marshal
import struct
from typing import Any

__all__ = [
    "CLOSE",
    "CLOSED",
    "INIT",
    "RECORDS",
    "RESULTS",
    "STATUS",
    "FrameBuffer",
    "dumps",
    "frame",
    "loads",
]

_HEAD = struct.Struct("!IB")  # payload length, kind
# server -> child
INIT = ord("I")  # pickle: {"kafka": KafkaConfig, "warm_topics": [...], "log_level", "secrets"}
RECORDS = ord("R")  # marshal: [(id, topic, key, value, headers), ...]
CLOSE = ord("C")  # marshal: seconds to wait for Kafka before giving up on records
# child -> server
RESULTS = ord("A")  # marshal: [(id, partition, offset, None | "error text"), ...]
STATUS = ord("S")  # marshal: {"producer": bool, "topics": [...], "error": str | None}
CLOSED = ord("X")  # marshal: records the producer never completed


def frame(kind: int, payload: bytes) -> bytes:
    return _HEAD.pack(len(payload), kind) + payload


def dumps(value: Any) -> bytes:
    return marshal.dumps(value)


def loads(payload: bytes) -> Any:
    # frames only ever come from the other end of our own socketpair: parent or child
    return marshal.loads(payload)  # noqa: S302


class FrameBuffer:
    """Bytes as they arrive in, whole frames out; a partial frame waits for the rest."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf
        buf += data
        frames: list[tuple[int, bytes]] = []
        pos = 0
        size = len(buf)
        head = _HEAD.size
        while size - pos >= head:
            length, kind = _HEAD.unpack_from(buf, pos)
            end = pos + head + length
            if end > size:
                break
            frames.append((kind, bytes(buf[pos + head : end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames

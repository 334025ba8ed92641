"""A small closed-loop HTTP/1.1 load generator on asyncio streams, for the demo.

httpx's connection pool spends more time on itself than the gateway spends on a request once
64 requests share it, so a demo measured with it shows the client's limits, not the server's.
This client keeps one persistent connection per worker and does nothing else. Loopback only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["LoadResult", "run_load"]


@dataclass
class LoadResult:
    requests: int = 0
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def run_load(
    host: str,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    headers: dict[str, str],
    *,
    connections: int = 64,
    on_done: Callable[[int], None] | None = None,
) -> LoadResult:
    """POST every body once over ``connections`` keep-alive connections; closed loop."""
    result = LoadResult()
    fixed = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    prefix = f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\n{fixed}".encode()
    todo = iter(bodies)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for body in todo:
                started = time.perf_counter()
                writer.write(prefix + b"content-length: %d\r\n\r\n" % len(body) + body)
                status = await _read_response(reader)
                result.latencies.append(time.perf_counter() - started)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                result.requests += 1
                if on_done is not None:
                    on_done(status)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    result.seconds = time.perf_counter() - started
    return result

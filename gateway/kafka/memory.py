"""A sink without Kafka: the ingress in process, for tests of what the routes answer.

Each publish is recorded and settled by the next scripted outcome (acknowledged by default).
It bypasses :class:`SinkBase`'s admission and ack deadline on purpose: a test chooses the
outcome, including one that never comes (a hung sink), to hold the route's own promises.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable

from gateway.config import KafkaConfig
from gateway.core.records import KafkaRecord
from gateway.kafka.sink import PublishResult, SinkBase, Unavailable
from gateway.metrics import IngressMetrics

__all__ = ["MemorySink", "Outcome", "ack", "held", "refuse"]

Outcome = Callable[[KafkaRecord], Awaitable[PublishResult]]


async def ack(record: KafkaRecord) -> PublishResult:
    """Acknowledged (partition 0, offset 0)."""
    return PublishResult(record.topic, 0, 0)


async def refuse(record: KafkaRecord) -> PublishResult:
    """Not acknowledged in time: the route answers 503."""
    raise Unavailable("timeout", "no acknowledgement from Kafka within 3.0s")


def held(release: asyncio.Event, then: Outcome) -> Outcome:
    """``then``, once the test sets ``release``."""

    async def outcome(record: KafkaRecord) -> PublishResult:
        await release.wait()
        return await then(record)

    return outcome


class MemorySink(SinkBase):
    """Records what it is given; each publish's outcome is the next scripted one.

    An outcome is a coroutine function: it may return a result (acknowledged), raise
    :class:`Unavailable` (the 503 path), or wait on an event the test sets. Without a
    scripted outcome a record is acknowledged at the next offset of its topic.
    """

    def __init__(self, cfg: KafkaConfig, metrics: IngressMetrics | None = None) -> None:
        super().__init__(cfg, metrics or IngressMetrics(process=False))
        self.records: list[KafkaRecord] = []
        self.outcomes: list[Outcome] = []
        self.entered = asyncio.Event()
        self._offsets: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self, timeout_s: float = 15.0) -> None:
        self._closed = True

    def _producer_state(self) -> tuple[bool, bool]:
        return True, True

    async def publish(
        self, record: KafkaRecord, outcome: asyncio.Future[bool] | None = None
    ) -> PublishResult:
        ok = False
        try:
            self.records.append(record)
            self.entered.set()
            if self.outcomes:
                result = await self.outcomes.pop(0)(record)
            else:
                offset = self._offsets[record.topic]
                self._offsets[record.topic] += 1
                result = PublishResult(record.topic, 0, offset)
            ok = True
            return result
        finally:
            if outcome is not None and not outcome.done():
                outcome.set_result(ok)

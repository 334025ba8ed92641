"""The sink's spool decision: direct to Kafka, or behind the spool (unit level).

The producer is scripted (``_submit`` acknowledges or fails each record at once), the spool is
real (a directory under tmp_path, fsynced appends), and so is the drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka.errors import KafkaTimeoutError

from gateway.config import KafkaConfig, SpoolConfig
from gateway.core.records import KafkaRecord
from gateway.kafka.sink import PublishResult, SinkBase, Unavailable
from gateway.kafka.spool import FileOps, Spool, SpoolLocked
from gateway.kafka.spool import format as fmt
from gateway.kafka.spool.drain import Drainer
from gateway.metrics import IngressMetrics


class ScriptedSink(SinkBase):
    """Acknowledges every record, except while ``down`` (then fails it at once)."""

    def __init__(self) -> None:
        super().__init__(KafkaConfig(ack_timeout_s=1.0), IngressMetrics(process=False))
        self.down = False
        self.sent: list[KafkaRecord] = []
        self.state = (True, True)  # (a producer exists, it has topic metadata)

    def _producer_state(self) -> tuple[bool, bool]:
        return self.state

    async def _submit(self, record: KafkaRecord, fut: asyncio.Future[PublishResult]) -> None:
        if self.down:
            fut.set_exception(KafkaTimeoutError("down"))
        else:
            self.sent.append(record)
            fut.set_result(PublishResult(record.topic, 0, len(self.sent) - 1))
        self._release()


def rec(n: int, key: bytes | None, topic: str = "t.push") -> KafkaRecord:
    return KafkaRecord(topic, key, b"%d" % n, [])


def test_spool_decisions_keep_each_key_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        sink = ScriptedSink()
        sink._loop = asyncio.get_running_loop()
        spool = Spool(SpoolConfig(enabled=True, dir=str(tmp_path)), sink.metrics)
        await sink.open_spool(spool)
        await sink.stop_drain()  # the test drains by hand, to look in between
        out = sink.metrics.spool_appended

        assert not (await sink.publish(rec(1, b"a"))).spooled  # healthy: straight to Kafka
        sink.down = True
        assert (await sink.publish(rec(2, b"a"))).spooled  # not acknowledged: spooled
        assert (await sink.publish(rec(3, None, "t.dlt"))).spooled  # a dead letter, Kafka down
        sink.down = False
        # Kafka is known to be down until an acknowledgement: b goes to the spool too
        assert (await sink.publish(rec(4, b"b"))).spooled
        assert out.labels("not_acknowledged").value == 1 and out.labels("kafka_down").value == 2
        assert spool.holds(rec(0, b"a")) and spool.holds(rec(0, None, "t.dlt"))
        # the drain delivers them, oldest first; meanwhile a's new record queues behind
        spool.request_rotate()
        drain = asyncio.create_task(Drainer(spool, sink.publish_now, sink.kafka_down).run())
        for _ in range(200):
            if not spool.records:
                break
            await asyncio.sleep(0.01)
        drain.cancel()
        assert [r.value for r in sink.sent] == [b"1", b"2", b"3", b"4"]
        assert not spool.waiting
        # all delivered: every key goes straight to Kafka again, dead letters too
        assert not (await sink.publish(rec(5, b"a"))).spooled
        assert not (await sink.publish(rec(6, None, "t.dlt"))).spooled
        # a key with records waiting queues behind them even with Kafka healthy
        sink.down = True
        assert (await sink.publish(rec(7, b"c"))).spooled
        sink.down = False
        assert (await sink.publish(rec(8, b"d"))).spooled  # no ack since the failure yet
        await sink.publish_now(rec(9, b"e"))  # an acknowledgement (the drain's probe, say)
        assert not (await sink.publish(rec(10, b"f"))).spooled  # Kafka is up again
        assert (await sink.publish(rec(11, b"c"))).spooled  # but c waits behind 7
        assert out.labels("key_waiting").value == 1  # 11; 8 was kafka_down
        await sink.close_spool()

    asyncio.run(main())


def test_a_full_spool_stays_unready_while_kafka_is_away(tmp_path: Path) -> None:
    """Kafka down and the spool full: every request is refused without touching Kafka, so the
    last publish failure ages past retry_after_s; readiness must still say not ready."""

    async def main() -> None:
        sink = ScriptedSink()
        sink._loop = asyncio.get_running_loop()
        cfg = SpoolConfig(enabled=True, dir=str(tmp_path), max_bytes=4096, segment_bytes=4096)
        await sink.open_spool(Spool(cfg, sink.metrics))
        await sink.stop_drain()  # no probe: nothing refreshes the failure
        assert sink.ready() == (True, "ok")
        sink.down = True
        refused = 0
        for n in range(200):
            try:
                await sink.publish(KafkaRecord("t.push", b"k", b"x" * 200 + b"%d" % n, []))
            except Unavailable:
                refused += 1
                break
        assert refused, "the 4 KiB spool never filled"
        ready, detail = sink.ready()
        assert not ready and "spool full" in detail, detail
        assert sink.last_failure_at is not None
        sink.last_failure_at -= sink.cfg.retry_after_s + 1  # the failure has aged
        ready, detail = sink.ready()
        assert not ready and "spool full" in detail, detail
        # an acknowledgement (the drain's probe) says Kafka is back: ready again, full or not
        sink.down = False
        await sink.publish_now(rec(1, b"other"))
        assert sink.ready() == (True, "ok")
        await sink.close_spool()

    asyncio.run(main())


def spool_config(tmp_path: Path, **overrides: object) -> SpoolConfig:
    return dataclasses.replace(SpoolConfig(enabled=True, dir=str(tmp_path)), **overrides)  # type: ignore[arg-type]


async def opened(tmp_path: Path, *, drain: bool = False, **overrides: object) -> ScriptedSink:
    sink = ScriptedSink()
    sink._loop = asyncio.get_running_loop()
    await sink.open_spool(Spool(spool_config(tmp_path, **overrides), sink.metrics))
    if not drain:
        await sink.stop_drain()  # the test looks at the spool as its requests left it
    return sink


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.01)


def test_no_producer_means_kafka_down_and_a_spooled_answer_without_a_kafka_failure(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        sink = await opened(tmp_path)
        appended, failed = sink.metrics.spool_appended, sink.metrics.publish_failures
        sink.state = (False, False)  # no producer (not yet, or being replaced)
        assert sink.kafka_down()
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        result = await sink.publish(rec(1, b"a"), outcome)
        # the answer: accepted on the spool, with no place in Kafka yet (topic known only)
        assert (result.topic, result.partition, result.offset, result.spooled) == (
            "t.push",
            -1,
            -1,
            True,
        )
        assert outcome.result() is True  # a retry of this event is a duplicate now
        # spooled as "Kafka is away", without trying Kafka: no failure counted or reported
        assert appended.labels("kafka_down").value == 1
        assert appended.labels("not_acknowledged").value == 0
        assert failed.labels("not_connected").value == 0 and sink.last_error is None
        # a producer without topic metadata yet is not "away": kafka-python fetches it on send
        sink.state = (True, False)
        assert not sink.kafka_down()
        assert not (await sink.publish(rec(2, b"b"))).spooled
        assert [r.value for r in sink.sent] == [b"2"]
        await sink.close_spool()

    asyncio.run(main())


def test_a_full_spool_is_503_spool_and_only_what_it_took_settles_true(tmp_path: Path) -> None:
    async def main() -> None:
        sink = await opened(tmp_path, max_bytes=4096, segment_bytes=4096)
        loop = asyncio.get_running_loop()
        sink.down = True
        taken: list[asyncio.Future[bool]] = []
        refused: Unavailable | None = None
        refused_outcome: asyncio.Future[bool] = loop.create_future()
        for n in range(200):
            outcome: asyncio.Future[bool] = loop.create_future()
            try:
                result = await sink.publish(KafkaRecord("t.push", b"k", b"x" * 200, []), outcome)
            except Unavailable as exc:
                refused, refused_outcome = exc, outcome
                break
            assert result.spooled, n
            taken.append(outcome)
        assert refused is not None, "the 4 KiB spool never filled"
        assert taken and all(o.result() is True for o in taken)
        # the 503: its reason and the spool's own message, counted as a spool failure
        assert refused.reason == "spool"
        assert str(refused).startswith("the spool is full (") and "4096" in str(refused)
        assert sink.metrics.publish_failures.labels("spool").value == 1
        assert refused_outcome.result() is False  # a retry must send it again
        await sink.close_spool()

    asyncio.run(main())


def test_with_a_spool_a_new_replica_gives_kafka_the_ack_deadline_to_connect(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        sink = await opened(tmp_path)
        sink.state = (False, False)  # just started: no producer yet
        assert sink.ready() == (
            False,
            "kafka producer not connected (starting) (spooling if Kafka is not there in 1.0s)",
        )
        sink._spool_opened_at -= sink.cfg.ack_timeout_s  # the deadline passed: spool
        assert sink.ready() == (True, "spooling: kafka producer not connected (starting)")
        await sink.close_spool()

        # a producer that connected once ends the wait at once, even if it goes again
        again = await opened(tmp_path / "again")
        again.state = (True, False)
        assert again.ready() == (True, "spooling: no topic metadata from Kafka yet (starting)")
        again.state = (False, False)
        assert again.ready() == (True, "spooling: kafka producer not connected (starting)")
        await again.close_spool()

    asyncio.run(main())


def test_with_a_spool_readiness_says_spooling_but_missing_topics_stay_unready(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        sink = await opened(tmp_path)
        sink.down = True
        assert (await sink.publish(rec(1, b"a"))).spooled  # Kafka refused it: spooled
        error = sink.last_error
        assert sink.ready() == (True, f"spooling: last publish failed: {error}")
        assert sink.last_failure_at is not None
        sink.last_failure_at -= sink.cfg.retry_after_s + 1  # aged: Kafka is still away
        assert sink.ready() == (True, f"spooling: kafka away since the last failure: {error}")
        # a topic Kafka lacks is a setup error: spooling would only hide it
        sink.missing_topics = frozenset({"t.push"})
        assert sink.ready() == (
            False,
            "topics missing in Kafka: t.push (create them: gateway topics create)",
        )
        await sink.close_spool()

    asyncio.run(main())


def test_the_sinks_own_drain_delivers_the_spool_once_kafka_is_back(tmp_path: Path) -> None:
    async def main() -> None:
        sink = await opened(tmp_path, drain=True, drain_retry_s=0.05)
        assert sink.spool is not None
        sink.down = True
        for n in (1, 2, 3):
            assert (await sink.publish(rec(n, b"a"))).spooled
        sink.down = False  # the drain's next probe is acknowledged, then the rest follows
        await until(lambda: not sink.spool.records and len(sink.sent) == 3, "not drained")
        assert [r.value for r in sink.sent] == [b"1", b"2", b"3"]
        drained = sink.metrics.registry.get_sample_value("gateway_spool_drained_records_total")
        assert drained == 3 and not sink.spool.waiting
        await sink.stop_drain()
        await sink.close_spool()

    asyncio.run(main())


class ReadFailsOnce(FileOps):
    def __init__(self) -> None:
        self.failures = 1

    def read(self, path: Path) -> bytes:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EIO, "Input/output error")
        return super().read(path)


def test_a_drain_that_fails_says_so_and_starts_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        sink = ScriptedSink()
        sink._loop = asyncio.get_running_loop()
        cfg = spool_config(tmp_path, drain_retry_s=0.05)
        spool = Spool(cfg, sink.metrics, files=ReadFailsOnce())
        sink.down = True
        await sink.open_spool(spool)
        assert (await sink.publish(rec(1, b"a"))).spooled
        sink.down = False
        await until(lambda: not spool.records, "the drain did not start again")
        assert [r.value for r in sink.sent] == [b"1"]
        await sink.stop_drain()
        await sink.close_spool()

    with caplog.at_level(logging.ERROR, logger="gateway.kafka.sink"):
        asyncio.run(main())
    [failed] = [r for r in caplog.records if r.name == "gateway.kafka.sink"]
    assert failed.getMessage() == "the spool drain failed; restarting it"
    assert failed.exc_info is not None and isinstance(failed.exc_info[1], OSError)


def test_close_spool_lets_the_next_owner_replay_it_and_without_a_spool_is_a_no_op(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        plain = ScriptedSink()  # spool off: the shutdown steps have nothing to do
        await plain.stop_drain()
        await plain.close_spool()
        sink = await opened(tmp_path)
        sink.down = True
        assert (await sink.publish(rec(1, b"a"))).spooled
        with pytest.raises(SpoolLocked):  # owned while the sink has it
            Spool(spool_config(tmp_path)).open()
        await sink.close_spool()
        after = Spool(spool_config(tmp_path))
        assert after.open().records == 1  # released, and the record is there
        after.release_lock()

    asyncio.run(main())


async def filled(directory: Path, records: list[KafkaRecord], **overrides: object) -> Spool:
    """A started spool holding ``records``, every segment sealed."""
    spool = Spool(spool_config(directory, **overrides), IngressMetrics(process=False))
    spool.open()
    spool.start(asyncio.get_running_loop())
    for r in records:
        await spool.store(r)
    spool.request_rotate()
    await until(lambda: all(s.sealed for s in spool.segments.values()), "not sealed")
    return spool


class Kafka:
    """The drain's publish: answers from ``script`` (True: acknowledged), then acknowledges."""

    def __init__(self, script: list[bool] | None = None) -> None:
        self.script = list(script or [])
        self.sent: list[bytes] = []
        self.in_flight = 0
        self.peak = 0

    async def publish(self, record: KafkaRecord) -> PublishResult:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0)
        self.in_flight -= 1
        if self.script and not self.script.pop(0):
            raise Unavailable("timeout", "not acknowledged")
        self.sent.append(record.value)
        return PublishResult(record.topic, 0, len(self.sent) - 1)


def test_the_drain_hands_a_chunk_over_at_once_but_probes_one_record_while_kafka_is_away(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        for name, down, peak in (("up", False, 3), ("down", True, 1)):
            spool = await filled(tmp_path / name, [rec(n, b"a") for n in range(7)], drain_batch=3)
            kafka = Kafka()
            drainer = Drainer(spool, kafka.publish, lambda down=down: down)  # type: ignore[misc]
            await drainer.run(until_empty=True)  # returns once the spool is empty
            assert kafka.sent == [b"%d" % n for n in range(7)] and kafka.peak == peak, name
            assert drainer.delivered == 7 and spool.status()["records"] == 0
            assert spool.segments == {} and list(spool.dir.glob("*.seg")) == []
            spool.close()

    asyncio.run(main())


def test_the_drain_backs_off_one_retry_interval_more_per_failure_up_to_five(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        if delay:  # the scripted Kafka's own turns of the loop are sleep(0)
            delays.append(round(delay, 6))
        await real_sleep(0)

    async def main() -> None:
        spool = await filled(tmp_path, [rec(n, b"a") for n in range(3)], drain_retry_s=0.01)
        # the probe fails 7 times, then one is acknowledged; 2 failures more, then the rest
        kafka = Kafka([False] * 7 + [True] + [False] * 2)
        monkeypatch.setattr(asyncio, "sleep", sleep)
        await Drainer(spool, kafka.publish, lambda: True).run(until_empty=True)
        monkeypatch.undo()
        assert kafka.sent == [b"0", b"1", b"2"]
        assert delays == [0.01, 0.02, 0.03, 0.04, 0.05, 0.05, 0.05, 0.01, 0.02]
        spool.close()

    asyncio.run(main())


def logged(caplog: pytest.LogCaptureFixture, message: str) -> dict[str, object]:
    """The fields of the one spool log line saying ``message``."""
    [line] = [r for r in caplog.records if r.getMessage() == message]
    return line.__dict__


def test_a_record_acknowledged_after_an_earlier_one_of_its_key_failed_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        caplog.set_level(logging.INFO, logger="gateway.kafka.spool")
        records = [rec(1, b"a"), rec(2, b"a"), rec(3, b"a", "t.other"), rec(4, b"b")]
        spool = await filled(tmp_path, records)
        seg = spool.oldest_sealed()
        assert seg is not None
        seg_path = seg.path
        kafka = Kafka([False, True, True, True])
        drainer = Drainer(spool, kafka.publish, lambda: False)
        await drainer.run(until_empty=True)
        assert kafka.sent == [b"2", b"3", b"4", b"1"]  # 1 is sent again, after 2
        breaks = spool.metrics.registry.get_sample_value("gateway_spool_order_breaks_total")
        assert breaks == 1  # 2 only: 3 is another topic's key, 4 another key
        assert drainer.delivered == 4 and not spool.waiting and spool.records == 0
        spool.close()
        line = logged(
            caplog,
            "spool drain: a record was acknowledged after an earlier one of its key failed;"
            " the earlier one is sent again and lands after it",
        )
        assert line["topic"] == "t.push"
        line = logged(caplog, "spool segment delivered and deleted")
        assert (line["segment"], line["records"]) == (str(seg_path), 4)

    asyncio.run(main())


def test_records_damaged_after_they_were_written_are_not_counted_once_their_segment_goes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        records = [rec(n, b"k%d" % (n % 3)) for n in range(150)]
        spool = await filled(tmp_path, records, segment_bytes=1024, drain_batch=1)
        first = spool.oldest_sealed()
        assert first is not None
        data = bytearray(first.path.read_bytes())
        entries = fmt.scan(bytes(data), first.seq).entries
        data[entries[2].offset + 14] ^= 0x01  # the middle of the first segment
        first.path.write_bytes(bytes(data))
        counts: list[int] = []
        kafka = Kafka()

        async def publish(record: KafkaRecord) -> PublishResult:
            counts.append(spool.records)
            return await kafka.publish(record)

        drainer = Drainer(spool, publish, lambda: False)
        await drainer.run(until_empty=True)
        n = len(entries)
        assert drainer.delivered == 149 and len(kafka.sent) == 149
        assert len(list(spool.dir.glob("*.seg"))) == 0 and len(counts) == 149 > 3 * n
        # one fewer per acknowledgement; the lost one goes with its segment, no more
        assert counts == [150 - j for j in range(n - 1)] + [149 - j for j in range(n - 1, 149)]
        assert spool.status()["records"] == 0
        spool.close()
        line = logged(
            caplog,
            "spool segment damaged since it was written: the damaged bytes are skipped",
        )
        assert (line["segment"], line["offset"], line["next_good"]) == (
            str(first.path),
            entries[2].offset,
            entries[3].offset,
        )

    asyncio.run(main())

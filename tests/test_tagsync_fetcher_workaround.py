"""The kafka-python fetcher workaround touches private attributes: this notices when they go.

It is gated on the kafka-python series known to strand resumed partitions. On that series,
the fetcher of a real consumer must still have the attributes the workaround reads and
writes, with the meaning it relies on; outside it, the test fails so that an upgrade is
checked against the bug (tests/test_tagsync_worker.py reads in turns, which met it) and the
gate is widened or the workaround dropped, rather than the workaround going quiet.
"""

from __future__ import annotations

from typing import Any

import kafka
from kafka import KafkaConsumer

from gateway.tagsync import fetcher_workaround as fw

from .conftest import KAFKA_API_VERSION, Broker


def test_the_installed_kafka_python_is_a_series_the_workaround_was_checked_against() -> None:
    assert fw.APPLIES, (
        f"kafka-python {kafka.__version__} is outside {fw.AFFECTED_SERIES}: check whether its "
        "fetcher still strands a resumed partition, then widen AFFECTED_SERIES in "
        "gateway/tagsync/fetcher_workaround.py or drop the workaround"
    )


def test_the_fetcher_still_has_the_private_attributes_the_workaround_touches(
    broker: Broker,
) -> None:
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers, api_version=KAFKA_API_VERSION
    )
    try:
        fetcher = getattr(consumer, "_fetcher", None)
        assert fetcher is not None, "KafkaConsumer._fetcher is gone"
        missing = [name for name in fw.FETCHER_ATTRIBUTES if not hasattr(fetcher, name)]
        assert not missing, f"kafka-python {kafka.__version__}'s fetcher lacks {missing}"
        # the shapes relied on: a dict of parked records, an in-line slot that starts empty
        assert isinstance(fetcher._paused_partition_records, dict)
        assert fetcher._next_partition_records is None
    finally:
        consumer.close()


class _Drained:
    """A drained ``PartitionRecords``: falsy, as the fetcher's own is once consumed."""

    def __bool__(self) -> bool:
        return False


class _Fetcher:
    def __init__(self, parked: dict[Any, Any], in_line: Any) -> None:
        self._paused_partition_records = parked
        self._next_partition_records = in_line


class _Consumer:
    def __init__(self, fetcher: _Fetcher) -> None:
        self._fetcher = fetcher


def test_a_drained_in_line_slot_is_cleared_only_while_records_are_parked() -> None:
    drained, live = _Drained(), ["a record"]
    parked = _Fetcher({"tp": object()}, drained)
    fw.restore_parked_records(_Consumer(parked))
    assert parked._next_partition_records is None
    nothing_parked = _Fetcher({}, drained)
    fw.restore_parked_records(_Consumer(nothing_parked))
    assert nothing_parked._next_partition_records is drained
    still_reading = _Fetcher({"tp": object()}, live)
    fw.restore_parked_records(_Consumer(still_reading))
    assert still_reading._next_partition_records is live


def test_version_parsing() -> None:
    assert fw.kafka_python_version("3.0.12") == (3, 0, 12)
    assert fw.kafka_python_version("3.1.0.dev0") == (3, 1, 0)
    assert fw.kafka_python_version()[:2] == tuple(int(p) for p in kafka.__version__.split(".")[:2])

"""The kafka-python join workaround touches private attributes: this notices when they go.

Gated on the series whose coordinator abandons a metadata-triggered rebalance once the leader
has computed the assignment (see gateway/tagsync/join_workaround.py). On that series a real
consumer's coordinator must still have what the workaround reads and writes; outside it the
test fails, so that an upgrade is checked against the bug rather than the workaround going
quiet. The rest plays the states on a stand-in coordinator.
"""

from __future__ import annotations

from typing import Any

import kafka
from kafka import KafkaConsumer
from kafka.structs import MemberState

from gateway.tagsync import join_workaround as jw

from .conftest import KAFKA_API_VERSION, Broker


def test_the_installed_kafka_python_is_a_series_the_workaround_was_checked_against() -> None:
    assert jw.APPLIES, (
        f"kafka-python {kafka.__version__} is outside {jw.AFFECTED_SERIES}: check whether its "
        "coordinator still drops a join once need_rejoin() turns False, then widen "
        "AFFECTED_SERIES in gateway/tagsync/join_workaround.py or drop the workaround"
    )


def test_the_coordinator_still_has_what_the_workaround_touches(broker: Broker) -> None:
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers,
        api_version=KAFKA_API_VERSION,
        group_id="join-workaround-probe",
    )
    try:
        coordinator = getattr(consumer, "_coordinator", None)
        assert coordinator is not None, "KafkaConsumer._coordinator is gone"
        missing = [n for n in jw.COORDINATOR_ATTRIBUTES if not hasattr(coordinator, n)]
        assert not missing, f"kafka-python {kafka.__version__}'s coordinator lacks {missing}"
        # the shapes relied on: no join yet, a member state, a flag need_rejoin() reports
        assert coordinator._join_task is None
        assert coordinator.state is MemberState.UNJOINED
        consumer.subscribe(["join-workaround-probe"])
        coordinator.rejoin_needed = True
        assert coordinator.need_rejoin() is True
    finally:
        consumer.close()


class _Coordinator:
    def __init__(self, state: MemberState, join_task: object | None, asks: bool) -> None:
        self.state = state
        self._join_task = join_task
        self.rejoin_needed = asks
        self.asks = asks

    def need_rejoin(self) -> bool:
        return self.asks or self.rejoin_needed


class _Consumer:
    def __init__(self, coordinator: Any) -> None:
        self._coordinator = coordinator


def test_an_abandoned_join_is_asked_for_again() -> None:
    coordinator = _Coordinator(MemberState.REBALANCING, object(), asks=False)
    assert jw.resume_abandoned_join(_Consumer(coordinator)) is True
    assert coordinator.rejoin_needed is True
    assert coordinator.need_rejoin() is True  # the next poll awaits the join again


def test_it_leaves_every_other_state_alone() -> None:
    cases = [
        _Coordinator(MemberState.STABLE, None, asks=False),  # joined
        _Coordinator(MemberState.STABLE, object(), asks=False),  # (a finished task, kept)
        _Coordinator(MemberState.UNJOINED, None, asks=True),  # first join to come
        _Coordinator(MemberState.REBALANCING, None, asks=True),  # joining, no task yet
        _Coordinator(MemberState.REBALANCING, object(), asks=True),  # joining, asked for
    ]
    for coordinator in cases:
        before = coordinator.rejoin_needed
        assert jw.resume_abandoned_join(_Consumer(coordinator)) is False
        assert coordinator.rejoin_needed is before
    assert jw.resume_abandoned_join(_Consumer(None)) is False
    assert jw.resume_abandoned_join(object()) is False

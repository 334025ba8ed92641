"""The bench's CPU-per-stage table: which stage a sampled stack's time counts for."""

from __future__ import annotations

import pytest

from bench.profiling import STAGES, stage_of

ROUTE = "SourceRoute.__call__ (gateway/ingress/route.py)"
LOOP = "Handle._run (asyncio/events.py)"


@pytest.mark.parametrize(
    ("frames", "producer", "stage"),
    [
        (
            [LOOP, "HttpToolsProtocol.data_received (uvicorn/protocols/http/httptools_impl.py)"],
            False,
            "HTTP parse",
        ),
        ([LOOP, ROUTE, "SharedSecret.check (gateway/ingress/checks.py)"], False, "checks"),
        (
            [
                LOOP,
                ROUTE,
                "TrustedProxies.classify (gateway/core/trust.py)",
                "IPAddress.__init__ (netaddr/ip/__init__.py)",
            ],
            False,
            "checks",
        ),
        # a json call inside normalize is normalize's time: the nearest frame that names a stage
        (
            [
                LOOP,
                ROUTE,
                "normalize (gateway/core/normalize/assemble.py)",
                "loads (json/__init__.py)",
            ],
            False,
            "normalize",
        ),
        (
            [
                LOOP,
                ROUTE,
                "build_record (gateway/core/records.py)",
                "_dumps (gateway/core/records.py)",
            ],
            False,
            "record build",
        ),
        ([LOOP, ROUTE, "ProcessSink.publish (gateway/kafka/process.py)"], False, "hand-over"),
        (
            [LOOP, ROUTE, "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py)"],
            False,
            "response",
        ),
        ([LOOP, ROUTE], False, "route glue"),
        ([LOOP], False, "event loop"),
        (
            ["main (gateway/kafka/process.py)", "KafkaProducer.send (kafka/producer/kafka.py)"],
            True,
            "Kafka client",
        ),
        (["_read_frames (gateway/kafka/wire.py)"], True, "hand-over"),
        (["Thread.run (threading.py)", "poll (selectors.py)"], True, "Kafka client"),
        (["<module> (somewhere.py)"], False, "other"),
    ],
)
def test_each_stack_counts_for_its_stage(frames: list[str], producer: bool, stage: str) -> None:
    assert stage in STAGES
    assert stage_of(frames, producer) == stage

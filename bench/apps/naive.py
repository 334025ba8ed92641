"""The naive gateway a user might write first: parse, ``send(...).get()`` in a thread pool.

No verification, no normalization: only the blocking send-and-wait that a first version of
such a service usually has, with the gateway's own producer settings (acks=all, idempotent,
linger), so the comparison is about how the ack is awaited, not about Kafka settings.
The config file (the one the gateway is benchmarked with) comes from ``BENCH_CONFIG``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator

from kafka import KafkaProducer
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config import load_config
from gateway.kafka.producer import producer_options

TOPIC = "bench.naive.push"
_config = load_config(os.environ["BENCH_CONFIG"])
_producer: KafkaProducer | None = None


async def ingest(request: Request) -> Response:
    payload = json.loads(await request.body())
    value = json.dumps(payload).encode()
    assert _producer is not None
    producer = _producer
    metadata = await run_in_threadpool(lambda: producer.send(TOPIC, value).get(timeout=10))
    return JSONResponse({"status": "accepted", "offset": metadata.offset})


async def readyz(request: Request) -> Response:
    return Response(status_code=200 if _producer is not None else 503)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global _producer
    producer = await run_in_threadpool(lambda: KafkaProducer(**producer_options(_config.kafka)))
    await run_in_threadpool(producer.partitions_for, TOPIC)  # metadata before the first send
    _producer = producer
    try:
        yield
    finally:
        _producer = None
        await run_in_threadpool(lambda: producer.close(timeout=10))


app = Starlette(
    routes=[
        Route("/v1/onesignal/events", ingest, methods=["POST"]),
        Route("/readyz", readyz, methods=["GET"]),
    ],
    lifespan=lifespan,
)

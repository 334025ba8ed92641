"""The rival a competent user writes in about 25 lines: Starlette + aiokafka, no verification.

``await producer.send_and_wait(...)`` with acks=all, idempotence and ``linger_ms`` 0: the
request is answered once Kafka acknowledged its record, as the gateway's are, but nothing is
checked (no trusted proxy, allowlist, secret, normalization or dedupe) and the body is stored
as it came after a JSON parse. Served by ``bench.apps.serve`` under the gateway's uvicorn
settings. Same broker address, and the mock's api_version pin where the run uses the mock.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaProducer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config import load_config

TOPIC = "bench.aiokafka.push"
_config = load_config(os.environ["BENCH_CONFIG"])
_producer: AIOKafkaProducer | None = None


async def ingest(request: Request) -> Response:
    payload = json.loads(await request.body())
    assert _producer is not None
    metadata = await _producer.send_and_wait(TOPIC, json.dumps(payload).encode())
    return JSONResponse({"status": "accepted", "offset": metadata.offset})


async def readyz(request: Request) -> Response:
    return Response(status_code=200 if _producer is not None else 503)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global _producer
    kafka = _config.kafka
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
        api_version=kafka.api_version or "auto",
    )
    await producer.start()
    await producer.partitions_for(TOPIC)  # metadata before the first request
    _producer = producer
    try:
        yield
    finally:
        _producer = None
        await producer.stop()


app = Starlette(
    routes=[
        Route("/v1/onesignal/events", ingest, methods=["POST"]),
        Route("/readyz", readyz, methods=["GET"]),
    ],
    lifespan=lifespan,
)

"""Ceiling 1: the HTTP stack alone. A Starlette route that reads the body and answers 204.

Run under the same uvicorn settings as the gateway (see :mod:`bench.apps.serve`), it is what
no gateway on this stack can beat: everything our gateway adds costs requests/s against it.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def ingest(request: Request) -> Response:
    await request.body()  # the gateway reads every body, so the ceiling does too
    return Response(status_code=204)


async def readyz(request: Request) -> Response:
    return Response(status_code=200)


app = Starlette(
    routes=[
        Route("/v1/onesignal/events", ingest, methods=["POST"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
)

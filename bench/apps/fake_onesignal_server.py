"""The loopback OneSignal (:class:`~gateway.devkit.fake_onesignal.FakeOneSignal`), own process.

So the tag-sync worker and the server it calls do not share a GIL, as in production.
``python -m bench.apps.fake_onesignal_server --api-key-env VAR [--app-rate-limit N]`` prints
``URL http://127.0.0.1:PORT`` and serves until SIGTERM. ``GET /_bench/stats`` adds what the
benchmark checks: request counts by status, per-user 429s, the smallest gap between two
accepted requests of one user, first and last arrival (``time.monotonic``, which is
system-wide on Linux, so comparable with the harness's clock) and every user's tags.
``GET /_bench/final?key=K&value=V`` counts the users whose tag K is V.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections import Counter
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.devkit.fake_onesignal import FakeOneSignal


def _stats(fake: FakeOneSignal, full: bool) -> dict[str, Any]:
    log = fake.requests
    out: dict[str, Any] = {
        "requests": len(log),
        "statuses": {str(k): v for k, v in Counter(r.status for r in log).items()},
        "first_at": min((r.at for r in log), default=None),
        "last_at": max((r.at for r in log), default=None),
    }
    if not full:
        return out
    # a 429 counts against the per-user limit when that user had an accepted request less
    # than the interval before it (the log keeps statuses, not bodies, so "User" vs "App ID"
    # 429s are told apart this way)
    last_ok: dict[tuple[str, str, str], float] = {}
    min_gap: float | None = None
    user_limited = 0
    for r in sorted(log, key=lambda r: r.at):
        prev = last_ok.get(r.user)
        if r.status == 202:
            if prev is not None and (min_gap is None or r.at - prev < min_gap):
                min_gap = r.at - prev
            last_ok[r.user] = r.at
        elif r.status == 429 and prev is not None and r.at - prev < fake.per_user_interval_s:
            user_limited += 1
    out.update(
        user_limited=user_limited,
        min_gap_s=min_gap,
        tags={user[2]: tags for user, tags in fake.all_tags().items()},
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api-key-env", required=True)
    parser.add_argument("--app-rate-limit", type=float, default=None)
    args = parser.parse_args()
    fake = FakeOneSignal(api_key=os.environ[args.api_key_env], app_rate_limit=args.app_rate_limit)

    async def stats(request: Request) -> Response:
        return JSONResponse(_stats(fake, full=request.query_params.get("full") == "1"))

    async def final(request: Request) -> Response:
        """How many users hold ``key`` = ``value`` (cheap enough to poll)."""
        key, value = request.query_params["key"], request.query_params["value"]
        users = sum(1 for tags in fake.all_tags().values() if tags.get(key) == value)
        return JSONResponse({"users": users})

    fake.app.add_route("/_bench/stats", stats, methods=["GET"])
    fake.app.add_route("/_bench/final", final, methods=["GET"])
    fake.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"URL {fake.url}", flush=True)
    try:
        stop.wait()
    finally:
        fake.stop()


if __name__ == "__main__":
    main()

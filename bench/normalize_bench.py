"""Microseconds per normalize() call for the documented body layouts.

A plain script, not a test: ``.venv/bin/python bench/normalize_bench.py [calls]``. Each case
normalizes the same parsed body ``calls`` times (a title repeats across the events of one
message, so that is what the gateway sees); the ``unique title`` case gives every call its own
rendered title, so a cache of parsed titles cannot help it. The best of a few rounds is
printed because the machine is shared and the minimum is the least noisy figure.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from gateway.core.normalize import normalize
from gateway.devkit import samples

KINDS = (
    "message.push.clicked",
    "message.email.bounced",
    "message.iam.clicked",
    "message.live_activity.delivered",
)
ROUNDS = 3


def _cases() -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(name, format, bodies) per case; one body, or one per call for the unique case."""
    cases: list[tuple[str, str, list[dict[str, Any]]]] = []
    for layout in samples.LAYOUTS:
        for kind in KINDS:
            body = samples.event_stream_payload(kind, layout=layout, event_id="evt-bench-1")
            cases.append((f"es {layout:<14} {kind}", "event-stream", [body]))
    cases.append(("journey flat-dotted", "journey", [samples.journey_payload()]))
    cases.append(
        ("journey plain-nested", "journey", [samples.journey_payload(layout="plain-nested")])
    )
    cases.append(
        (
            "journey flat-dotted, templated id",
            "journey",
            [samples.journey_payload(event_id="j-1", event_kind="journey.webhook")],
        )
    )
    cases.append(("web-push v15 clicked", "web-push", [samples.web_push_v15_payload("clicked")]))
    cases.append(("web-push v16 clicked", "web-push", [samples.web_push_v16_payload("clicked")]))
    return cases


def _unique_title_bodies(calls: int) -> list[dict[str, Any]]:
    bodies = []
    for i in range(calls):
        body = samples.event_stream_payload("message.push.clicked", event_id=f"evt-{i}")
        body["Message Data"]["message.title"] = f"{{'en':'Flash sale {i}','es':'Oferta {i}'}}"
        bodies.append(body)
    return bodies


def _time_per_call(fmt: str, bodies: list[dict[str, Any]], calls: int) -> float:
    """Best-of-ROUNDS microseconds per call."""
    best = float("inf")
    count = len(bodies)
    for _ in range(ROUNDS):
        start = time.perf_counter()
        if count == 1:
            body = bodies[0]
            for _ in range(calls):
                normalize(body, fmt=fmt)
        else:
            for body in bodies:
                normalize(body, fmt=fmt)
        best = min(best, (time.perf_counter() - start) / (calls if count == 1 else count))
    return best * 1e6


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    cases = _cases()
    unique = _unique_title_bodies(calls)
    cases.append(("es nested-default push.clicked, unique title", "event-stream", unique))
    width = max(len(name) for name, _, _ in cases)
    print(f"{'case':<{width}}  us/call   ({calls} calls, best of {ROUNDS})")
    for name, fmt, bodies in cases:
        normalize(bodies[0], fmt=fmt)  # warm
        print(f"{name:<{width}}  {_time_per_call(fmt, bodies, calls):7.2f}")


if __name__ == "__main__":
    main()

"""What the routes of one ingress share: config, the sink, the allowlist, metrics, dedupe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gateway.config import Config
from gateway.core import trust
from gateway.core.dedupe import SeenWindow
from gateway.core.event import Received
from gateway.ingress.allowlist import Allowlist
from gateway.ingress.subscriptions import SubscriptionVerifier
from gateway.kafka import SinkBase
from gateway.metrics import IngressMetrics
from gateway.tracing import Tracing

__all__ = ["RouteState"]


@dataclass
class RouteState:
    """The shared state of the source routes.

    Each source has its own window (``max_entries`` ids each) and its own in-flight ids, so
    one source's ids never evict or shadow another's.
    """

    config: Config
    sink: SinkBase
    allowlist: Allowlist
    metrics: IngressMetrics
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    # OpenTelemetry spans ([tracing] enabled), else None: one test per request when off
    tracing: Tracing | None = None
    proxies: trust.TrustedProxies = field(init=False)
    seen: dict[str, SeenWindow] = field(init=False)
    # per source, ids whose record is being published right now, with their kind: a concurrent
    # duplicate waits for the outcome
    pending: dict[str, dict[str, tuple[str, asyncio.Future[bool]]]] = field(init=False)
    # the web-push sources' subscription checks (verify_subscriptions), closed at shutdown
    verifiers: list[SubscriptionVerifier] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.proxies = trust.TrustedProxies(self.config.server.trusted_proxies)
        dedupe = self.config.dedupe
        self.seen = {
            s.name: SeenWindow(dedupe.window_s, dedupe.max_entries) for s in self.config.sources
        }
        self.pending = {s.name: {} for s in self.config.sources}

    def received(self, source_name: str, client_ip: str) -> Received:
        return Received(
            source=source_name, at=datetime.fromtimestamp(self.clock(), UTC), client_ip=client_ip
        )

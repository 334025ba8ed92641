"""Web push, optionally: is the posted subscription id one of the app's? Asked of OneSignal.

The web-push route has no secret, so an event from it proves nothing. With
``verify_subscriptions`` on, the subscription id an event names is looked up once through
OneSignal's *View user identity (by subscription)*,
``GET /apps/{app_id}/subscriptions/{subscription_id}/user/identity`` (200: it exists, 404: it
does not; https://documentation.onesignal.com/reference/fetch-identity-by-subscription). The
answer is cached: a subscription found for ``verify_cache_ttl_s``, one not found for
``verify_miss_ttl_s``, at most ``verify_cache_size`` ids (least recently used forgotten). So a
known browser costs one request per TTL, and a forger who repeats an id costs one per miss TTL.
An id that is not a UUID (OneSignal's subscription ids are) is not asked about at all.

OneSignal's view endpoints allow 1 request/s per app (onesignal-reference.md section 5): the
lookups share :class:`~gateway.tagsync.ratelimit.AppLimiter` at ``verify_rate_limit``, pause on
a 429 for its Retry-After, and wait on the event loop (``asyncio.sleep``), never blocking it.
Concurrent events for one id share one lookup. A request waits at most ``verify_timeout_s``;
what then has no answer (OneSignal slow, unreachable, out of lookups, refusing the key) is
``unchecked``: stored marked ``subscriptioncheck=unchecked`` or refused with 503, per
``verify_unreachable``. An unverifiable event is never stored as verified.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Literal
from urllib.parse import quote

import httpx

from gateway.config import Config, Secret, SourceConfig
from gateway.metrics import IngressMetrics
from gateway.tagsync.ratelimit import AppLimiter, parse_retry_after

__all__ = [
    "FOUND",
    "NOT_FOUND",
    "UNCHECKED",
    "SubscriptionCache",
    "SubscriptionVerifier",
    "verifier_for",
]

log = logging.getLogger("gateway.ingress")

Result = Literal["found", "not_found", "unchecked"]
FOUND: Final = "found"
NOT_FOUND: Final = "not_found"
UNCHECKED: Final = "unchecked"
# after a 429 without Retry-After, or a 5xx: how long every lookup waits
_PAUSE_S = 5.0


class SubscriptionCache:
    """Answers per subscription id, each until its own expiry; at most ``size`` (LRU). Pure."""

    __slots__ = ("_entries", "found_ttl_s", "miss_ttl_s", "size")

    def __init__(self, size: int, found_ttl_s: float, miss_ttl_s: float) -> None:
        self.size = size
        self.found_ttl_s = found_ttl_s
        self.miss_ttl_s = miss_ttl_s
        self._entries: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    def get(self, subscription_id: str, now: float) -> bool | None:
        """True (found), False (not found), or None: not known, or expired."""
        entry = self._entries.get(subscription_id)
        if entry is None:
            return None
        found, expires = entry
        if now >= expires:
            del self._entries[subscription_id]
            return None
        self._entries.move_to_end(subscription_id)
        return found

    def put(self, subscription_id: str, found: bool, now: float) -> None:
        ttl = self.found_ttl_s if found else self.miss_ttl_s
        self._entries[subscription_id] = (found, now + ttl)
        self._entries.move_to_end(subscription_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def _is_uuid(text: str) -> bool:
    try:
        return len(text) == 36 and str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


class SubscriptionVerifier:
    """Looks subscription ids up in one OneSignal app, through the cache and the limiter."""

    def __init__(
        self,
        source_name: str,
        *,
        api_url: str,
        app_id: str,
        api_key: Secret,
        cache: SubscriptionCache,
        rate: float,
        timeout_s: float,
        request_timeout_s: float,
        metrics: IngressMetrics,
        monotonic: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.source_name = source_name
        self.base = f"{api_url.rstrip('/')}/apps/{quote(app_id, safe='')}/subscriptions/"
        self.api_key = api_key
        self.cache = cache
        self.limiter = AppLimiter(rate)
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self.monotonic = monotonic
        self.transport = transport
        self._client: httpx.AsyncClient | None = None
        self._pending: dict[str, asyncio.Future[bool | None]] = {}
        # lookups that can be answered within timeout_s at the rate, and some slack
        self.max_pending = max(8, 2 * math.ceil(rate * timeout_s))
        self.checks = {
            (result, via): metrics.subscription_checks.labels(source_name, result, via)
            for result in (FOUND, NOT_FOUND, UNCHECKED)
            for via in ("cache", "lookup", "local")
        }
        self.lookups = {
            answer: metrics.subscription_lookups.labels(source_name, answer)
            for answer in ("found", "not_found", "rate_limited", "refused_key", "error")
        }

    async def check(self, subscription_id: str | None) -> Result:
        """found, not_found (refuse the event) or unchecked (no answer in time)."""
        if not subscription_id or not _is_uuid(subscription_id):
            self.checks[(NOT_FOUND, "local")].inc()  # nothing asked: it cannot be one
            return NOT_FOUND
        key = subscription_id.lower()
        known = self.cache.get(key, self.monotonic())
        if known is not None:
            result: Result = FOUND if known else NOT_FOUND
            self.checks[(result, "cache")].inc()
            return result
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self.max_pending:
                # more new ids than the rate can look up in time: no queue without end
                self.checks[(UNCHECKED, "lookup")].inc()
                return UNCHECKED
            pending = asyncio.ensure_future(self._lookup(key))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        try:
            # shielded: a request that gives up does not cancel the lookup others wait for
            answer = await asyncio.wait_for(asyncio.shield(pending), self.timeout_s)
        except TimeoutError:
            answer = None
        result = UNCHECKED if answer is None else FOUND if answer else NOT_FOUND
        self.checks[(result, "lookup")].inc()
        return result

    async def _lookup(self, key: str) -> bool | None:
        """True/False as OneSignal says (and cached), None without an answer."""
        give_up = self.monotonic() + self.timeout_s
        while True:
            reserved = self.limiter.reserve(self.monotonic())
            if not isinstance(reserved, float):
                slot = reserved
                break
            if self.monotonic() + reserved > give_up:
                return None  # nobody waits that long for this answer
            await asyncio.sleep(reserved)
        status, retry_after = None, None
        try:
            status, retry_after = await self._get(key)
        finally:
            now = self.monotonic()
            self.limiter.release(slot, now)
        if status == 200:
            self.limiter.success()
            self.lookups["found"].inc()
            self.cache.put(key, True, now)
            return True
        if status in (400, 404):  # 400: not an id OneSignal could hold
            self.limiter.success()
            self.lookups["not_found"].inc()
            self.cache.put(key, False, now)
            return False
        if status == 429 or status is None or status >= 500:
            pause = parse_retry_after(retry_after) if status == 429 else None
            self.limiter.throttle(now, pause if pause is not None else _PAUSE_S)
            self.lookups["rate_limited" if status == 429 else "error"].inc()
        elif status in (401, 403):
            self.lookups["refused_key"].inc()
            log.warning(
                "OneSignal refused the app's API key for a subscription lookup; web-push"
                " events are unverified until it is fixed",
                extra={"source": self.source_name, "status": status},
            )
        else:
            self.lookups["error"].inc()
        return None

    async def _get(self, key: str) -> tuple[int | None, str | None]:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.request_timeout_s,
                headers={"Accept": "application/json"},
                transport=self.transport,
            )
        try:
            resp = await self._client.get(
                f"{self.base}{key}/user/identity",
                headers={"Authorization": f"Key {self.api_key.reveal()}"},
            )
            await resp.aread()
        except (httpx.HTTPError, OSError) as exc:
            log.info(
                "subscription lookup failed: %s",
                type(exc).__name__,
                extra={"source": self.source_name},
            )
            return None, None
        return resp.status_code, resp.headers.get("retry-after")

    def __len__(self) -> int:
        return len(self.cache)

    async def aclose(self) -> None:
        for pending in list(self._pending.values()):
            pending.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def verifier_for(
    config: Config,
    source: SourceConfig,
    metrics: IngressMetrics,
    monotonic: Callable[[], float] = time.monotonic,
) -> SubscriptionVerifier | None:
    """The source's verifier when it has ``verify_subscriptions`` (the config made sure that
    its app has a key)."""
    if not source.verify_subscriptions:
        return None
    app = next(a for a in config.onesignal.apps if a.app_id == source.app_id)
    assert app.api_key is not None  # checked when the config was read
    return SubscriptionVerifier(
        source.name,
        api_url=config.onesignal.api_url,
        app_id=source.app_id,
        api_key=app.api_key,
        cache=SubscriptionCache(
            source.verify_cache_size, source.verify_cache_ttl_s, source.verify_miss_ttl_s
        ),
        rate=source.verify_rate_limit,
        timeout_s=source.verify_timeout_s,
        request_timeout_s=min(config.onesignal.timeout_s, source.verify_timeout_s),
        metrics=metrics,
        monotonic=monotonic,
    )

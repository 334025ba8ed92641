"""The OneSignal sink: ``PATCH /apps/{app_id}/users/by/{alias_label}/{alias_id}``.

One narrow interface (:class:`UpdateSender`) with three implementations:
:class:`gateway.tagsync.http1.Http1Client` (a lean HTTP/1.1 client, what the worker uses),
:class:`OneSignalClient` (httpx: through an environment proxy, or by
``tag_sync.http_client = "httpx"``) and :class:`DryRunSender` (prints what it would send).
None retries: classification and backoff belong to the worker, with the rate limits.
Transport errors come back as a :class:`Response` with ``status=None`` so every outcome is
plain data.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TextIO
from urllib.parse import quote, urlsplit
from urllib.request import getproxies, proxy_bypass

import httpx
import orjson

from gateway.config import Secret
from gateway.tagsync.rules import Alias, TagValue

__all__ = [
    "DryRunSender",
    "OneSignalClient",
    "Response",
    "UpdateSender",
    "env_proxy_for",
    "update_body",
    "update_url",
]

USER_AGENT = "onesignal-kafka-gateway-tagsync/0.1"
MAX_BODY_KEPT = 2000
# Connections per httpx pool. httpcore's pool scans all its connections for every request
# it assigns (and counts idle ones once per connection: O(n^2)); with 64 connections in one
# pool that was ~5 ms of CPU per request. Several small pools cost the same sockets.
CONNECTIONS_PER_POOL = 4


@dataclass(frozen=True, slots=True)
class Response:
    """What came back: an HTTP status and body, or ``status=None`` and the transport error."""

    status: int | None
    body: str = ""
    retry_after: str | None = None
    error: str = ""
    elapsed_s: float = 0.0


def update_url(api_url: str, alias: Alias) -> str:
    """The Update user URL; every path segment percent-encoded (a "/" in an id is %2F)."""
    return (
        f"{api_url.rstrip('/')}/apps/{quote(alias.app_id, safe='')}/users/by/"
        f"{quote(alias.label, safe='')}/{quote(alias.id, safe='')}"
    )


def update_body(tags: Mapping[str, TagValue], delete_value: str = "") -> dict[str, Any]:
    """``{"properties": {"tags": ...}}``; a deletion is "" (documented) or null (SDK style)."""
    deleted: str | None = None if delete_value == "null" else ""
    return {"properties": {"tags": {k: (deleted if v is None else v) for k, v in tags.items()}}}


def env_proxy_for(url: str) -> str | None:
    """The proxy the environment sets for ``url`` (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, in
    either case, unless NO_PROXY names the host), or None."""
    parts = urlsplit(url)
    proxies = getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or (parts.hostname and proxy_bypass(parts.hostname)):
        return None
    return proxy


class UpdateSender(Protocol):
    async def update_user(
        self,
        alias: Alias,
        tags: Mapping[str, TagValue],
        *,
        trace: Mapping[str, str] | None = None,
    ) -> Response:
        """One Update user request; ``trace``: W3C trace-context headers to send with it."""
        ...

    def set_api_key(self, app_id: str, key: Secret) -> None:
        """Use ``key`` for the app's requests from now on (a rotated key, re-read)."""
        ...

    async def aclose(self) -> None: ...


class OneSignalClient:
    """Sends Update user requests with the app's API key."""

    def __init__(
        self,
        api_url: str,
        api_keys: Mapping[str, Secret],
        *,
        timeout_s: float = 10.0,
        max_connections: int = 64,
        delete_value: str = "",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api_url = api_url
        self._keys = dict(api_keys)
        self.delete_value = delete_value
        # read/write per chunk; the overall deadline below bounds slow trickles too.
        self.deadline_s = timeout_s + 5.0
        # a given transport (tests) is one pool of its own
        n_pools = 1 if transport else max(1, math.ceil(max_connections / CONNECTIONS_PER_POOL))
        per_pool = math.ceil(max_connections / n_pools)
        # one TLS context (the CA bundle loaded once) for every pool
        verify: Any = True if transport else httpx.create_ssl_context()
        self._pools = [
            httpx.AsyncClient(
                timeout=httpx.Timeout(connect=3.0, read=timeout_s, write=timeout_s, pool=5.0),
                limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool),
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                transport=transport,
                verify=verify,
            )
            for _ in range(n_pools)
        ]
        self._busy = [0] * n_pools

    @property
    def pools(self) -> int:
        return len(self._pools)

    def set_api_key(self, app_id: str, key: Secret) -> None:
        self._keys[app_id] = key

    def _pick(self) -> int:
        """The least busy pool (so none queues while another has a free connection)."""
        busy = self._busy
        return busy.index(min(busy))

    async def update_user(
        self,
        alias: Alias,
        tags: Mapping[str, TagValue],
        *,
        trace: Mapping[str, str] | None = None,
    ) -> Response:
        key = self._keys.get(alias.app_id)
        if key is None:  # the worker dead-letters these before sending; a guard only
            return Response(status=None, error="no API key configured for this app")
        content = orjson.dumps(update_body(tags, self.delete_value))
        headers = {"Authorization": f"Key {key.reveal()}", "Content-Type": "application/json"}
        if trace:
            headers.update(trace)
        started = time.monotonic()
        pool = self._pick()
        self._busy[pool] += 1
        try:
            async with asyncio.timeout(self.deadline_s):
                resp = await self._pools[pool].patch(
                    update_url(self.api_url, alias), content=content, headers=headers
                )
                body = (await resp.aread())[:MAX_BODY_KEPT].decode("utf-8", "replace")
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return Response(
                status=None,
                error=f"{type(exc).__name__}: {exc}"[:300],
                elapsed_s=time.monotonic() - started,
            )
        finally:
            self._busy[pool] -= 1
        return Response(
            status=resp.status_code,
            body=body,
            retry_after=resp.headers.get("retry-after"),
            elapsed_s=time.monotonic() - started,
        )

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class DryRunSender:
    """Prints one JSON line per request it would send (never the API key) and answers 202."""

    def __init__(self, api_url: str, *, delete_value: str = "", out: TextIO | None = None) -> None:
        self.api_url = api_url
        self.delete_value = delete_value
        self.out = out or sys.stdout

    async def update_user(
        self,
        alias: Alias,
        tags: Mapping[str, TagValue],
        *,
        trace: Mapping[str, str] | None = None,
    ) -> Response:
        line: dict[str, object] = {
            "method": "PATCH",
            "url": update_url(self.api_url, alias),
            "body": update_body(tags, self.delete_value),
        }
        if trace:
            line["headers"] = dict(trace)
        self.out.write(orjson.dumps(line).decode() + "\n")
        self.out.flush()
        return Response(status=202, body="dry-run")

    def set_api_key(self, app_id: str, key: Secret) -> None:
        return None

    async def aclose(self) -> None:
        return None

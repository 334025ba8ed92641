"""The checks in front of a source route, one small class each, in the order they run.

Method (405, and the CORS preflight of the browser source), sender address (403), shared
secret (403), the client's rate on a source without a secret (429), the browser source's
``Origin`` (403), body size (413). Each either lets the request on (``None``) or gives the
:class:`~gateway.ingress.replies.Reply` that refuses it, and counts its refusal. They are plain
objects the route calls rather than ASGI middleware: the route is the hot path, and one call
each costs less than one ASGI layer each.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Callable, Mapping
from typing import Protocol

from starlette.types import Receive, Scope

from gateway.core import trust
from gateway.core.clients import ClientLimiter
from gateway.ingress.allowlist import Allowlist
from gateway.ingress.replies import Reply, error
from gateway.logs import SampledLog

__all__ = [
    "BodyReader",
    "ClientGone",
    "ClientRate",
    "Cors",
    "Methods",
    "SenderAddress",
    "SharedSecret",
    "secret_ok",
]

log = logging.getLogger("gateway.ingress")

_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH"})


class Count(Protocol):
    def inc(self, amount: float = 1.0) -> None: ...


class ClientGone(Exception):
    """The client disconnected before its body was read: nothing to answer."""


class Cors:
    """The browser source's origins: who may POST (403 otherwise), the preflight, and the
    headers of every reply.

    CORS headers alone only decide what a page may read, not what the server stores, so the
    ``Origin`` is also checked: a browser always sends it on a POST (``no-cors`` included) and
    a page cannot forge it. A client outside a browser can, so this keeps other sites' pages
    out, not a forger: that is what the rate limit and the subscription check are for.
    """

    def __init__(self, origins: tuple[str, ...], refused: Count | None = None) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.encode("latin-1") for o in origins if o != "*")
        self.refused = refused

    def allows(self, origin: bytes | None) -> bool:
        """``"*"`` allows anything (no Origin and ``null`` too); else only a listed origin."""
        return self.any or (origin is not None and origin in self.origins)

    def check(self, headers: Mapping[bytes, bytes]) -> Reply | None:
        origin = headers.get(b"origin")
        if self.allows(origin):
            return None
        if self.refused is not None:
            self.refused.inc()
        why = "no Origin header" if origin is None else "its Origin is not in cors_origins"
        return error(403, "forbidden", f"origin not allowed (origin-not-allowed): {why}")

    def headers(self, headers: Mapping[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        origin = headers.get(b"origin")
        if origin is None:
            return []
        if self.any:
            return [(b"access-control-allow-origin", b"*")]
        if origin in self.origins:
            return [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        return []

    @staticmethod
    def preflight() -> Reply:
        return Reply(
            204,
            {},
            [
                (b"access-control-allow-methods", b"POST, OPTIONS"),
                (b"access-control-allow-headers", b"content-type, x-onesignal-event"),
                (b"access-control-max-age", b"86400"),
            ],
        )


class ClientRate:
    """A source without a secret: each client address (as the trust check resolved it) gets
    its rate, then 429 with Retry-After."""

    def __init__(
        self, limiter: ClientLimiter, monotonic: Callable[[], float], refused: Count
    ) -> None:
        self.limiter = limiter
        self.monotonic = monotonic
        self.refused = refused

    def check(self, client_ip: str) -> Reply | None:
        wait = self.limiter.take(client_ip, self.monotonic())
        if wait <= 0:
            return None
        self.refused.inc()
        return error(
            429,
            "rate-limited",
            "too many requests from this address; retry after Retry-After",
            retry_after=str(max(1, math.ceil(wait))),
        )


class Methods:
    """Writes go on; a browser source answers its CORS preflight; anything else is a 405."""

    def __init__(self, refused: Count, *, preflight: bool) -> None:
        self.refused = refused
        self.preflight = preflight
        self.allow = "POST, PUT, PATCH" + (", OPTIONS" if preflight else "")

    def check(self, method: str) -> Reply | None:
        if method in _WRITE_METHODS:
            return None
        if method == "OPTIONS" and self.preflight:
            return Cors.preflight()
        self.refused.inc()
        return error(
            405, "method-not-allowed", f"{method} is not accepted here; send POST", allow=self.allow
        )


def secret_ok(
    values: list[bytes], secrets: tuple[bytes, ...], compare: Callable[[bytes, bytes], bool]
) -> bool:
    """Constant-time comparison against every accepted secret (no early exit).

    Every candidate (the header value, and without a ``Bearer`` prefix) is compared with
    every secret, whichever matches, so the time taken says nothing about which secret or
    how much of it was right. ``compare`` is the comparison (the route's is
    ``hmac.compare_digest``); the tests pass one that counts its calls.
    """
    if len(values) != 1:
        return False
    value = values[0].strip()
    candidates = [value]
    if value[:7].lower() == b"bearer ":
        candidates.append(value[7:].strip())
    ok = False
    for candidate in candidates:
        for secret in secrets:
            ok |= compare(candidate, secret)
    return ok


class SharedSecret:
    """The source's secret header, against every accepted secret (several during rotation)."""

    # constant time; an attribute so that a test can count the comparisons the route makes
    compare: Callable[[bytes, bytes], bool] = staticmethod(hmac.compare_digest)

    def __init__(
        self,
        source_name: str,
        header: str,
        secrets: tuple[bytes, ...],
        refused: Count,
        *,
        required: bool,
        refusals: SampledLog | None = None,
    ) -> None:
        self.source_name = source_name
        self.header = header.encode()
        self.secrets = secrets
        self.refused = refused
        self.required = required
        self.refusals = refusals or SampledLog(log)

    def label(self, scope: Scope) -> str:
        """valid, invalid or missing: the secret check of a request refused for its address."""
        values = [v for k, v in scope["headers"] if k == self.header]
        if not values:
            return "missing"
        return "valid" if secret_ok(values, self.secrets, self.compare) else "invalid"

    def check(self, scope: Scope, client_ip: str) -> Reply | None:
        if not self.required:
            return None
        values = [v for k, v in scope["headers"] if k == self.header]
        if secret_ok(values, self.secrets, self.compare):
            return None
        self.refused.inc()
        if not values:
            reason = "secret-missing"
        elif len(values) > 1:
            reason = "secret-repeated"
        else:
            reason = "secret-invalid"
        self.refusals.log(
            logging.INFO,
            f"{self.source_name}:{reason}",
            "refused: %s",
            reason,
            extra={"source": self.source_name, "client_ip": client_ip},
        )
        return error(403, "forbidden", f"shared secret check failed ({reason})")


class SenderAddress:
    """The client address (through trusted proxies), against the sender allowlist."""

    def __init__(
        self,
        source_name: str,
        allowlist: Callable[[], Allowlist],
        proxies: trust.TrustedProxies,
        proxy_header: str,
        secret: SharedSecret,
        refused: Count,
        misses: Mapping[str, Count],
        *,
        required: bool,
        refusals: SampledLog | None = None,
    ) -> None:
        self.source_name = source_name
        self.allowlist = allowlist  # read per request: the app owns the current one
        self.proxies = proxies
        self.proxy_header = proxy_header
        self.secret = secret
        self.refused = refused
        self.misses = misses
        self.required = required
        self.refusals = refusals or SampledLog(log)

    def resolve(self, scope: Scope) -> trust.ClientIP:
        peer = scope.get("client")
        return trust.resolve_client_ip(
            peer[0] if peer else None, scope["headers"], self.proxies, self.proxy_header
        )

    def check(self, scope: Scope, client: trust.ClientIP) -> Reply | None:
        if not self.required:
            return None
        allowlist = self.allowlist()
        if allowlist.contains(client.ip):
            return None
        self.refused.inc()
        # The answer stays 403 whatever the secret says, but a miss that carries a valid
        # secret is most likely OneSignal at an address the allowlist does not know yet, and
        # OneSignal does not retry a 4xx: count it apart and say so loudly.
        secret = self.secret.label(scope)
        self.misses[secret].inc()
        extra = {
            "source": self.source_name,
            "client_ip": client.ip,
            "malformed_chain": client.malformed,
            "secret": secret,
            "allowlist_sync_token": allowlist.sync_token,
        }
        if secret == "valid":  # noqa: S105 - a label, not a secret
            log.warning(
                "refused: sender %s not in allowlist but carries a valid secret; most likely "
                "a OneSignal sender at a new address (the event is lost: no retry of a 4xx)",
                client.ip,
                extra=extra,
            )
        else:  # what any outsider causes at will: sampled
            self.refusals.log(
                logging.INFO,
                f"{self.source_name}:ip-not-allowed",
                "refused: sender not in allowlist",
                extra=extra,
            )
        return error(403, "forbidden", "sender address is not allowed (ip-not-allowed)")


class BodyReader:
    """The whole body, or a 413 as soon as it is over the limit.

    uvicorn has no body limit of its own: a declared length over the limit is refused before
    a byte is read, a chunked body as soon as it passes the limit.
    """

    def __init__(self, max_body: int, refused: Count) -> None:
        self.max_body = max_body
        self.refused = refused

    async def read(self, headers: Mapping[bytes, bytes], receive: Receive) -> bytes | Reply:
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body:
                    return self._too_large()
            except ValueError:
                pass
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self) -> Reply:
        self.refused.inc()
        reply = error(413, "too-large", f"the request body is over the {self.max_body}-byte limit")
        reply.close = True  # the rest of the body is not read
        return reply

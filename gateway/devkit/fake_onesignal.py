"""A loopback stand-in for OneSignal's Update user endpoint, for tests, the demo and benchmarks.

It plays ``PATCH /apps/{app_id}/users/by/{alias_label}/{alias_id}`` as documented (see
onesignal-reference.md sections 4 and 5): ``Authorization: Key <key>`` or 401; a JSON body
``{"properties": {"tags": {...string values...}}}`` or 400; 202 with the properties echoed.
A GET of the same path answers 401 for a bad key, else 404 (or 200 for a user it holds tags
of), which is what ``check-config --online`` probes.
It keeps what a checker needs: a log of every request (arrival time, path, headers, body,
status) and the resulting tag state per user (merged per key; "" or null deletes). It enforces
OneSignal's limits (1 request/s per user, a per-app rate) with 429 and ``Retry-After``, and
plays scripted faults (429, 5xx, 4xx, slow answers) so the worker's reactions can be tested,
It also plays ``GET /apps/{app_id}/subscriptions/{subscription_id}/user/identity`` (View user
identity by subscription, what the web-push route's ``verify_subscriptions`` asks): 200 with the
identity for a subscription added with :meth:`FakeOneSignal.add_subscription`, else 404, 401
for a bad key, 429 over ``view_rate_limit`` requests per second per app (OneSignal's view
endpoints allow 1), scripted faults too; these requests are in :attr:`lookups`.
and rotates an app's key (:meth:`FakeOneSignal.rotate_key`): the old key is then refused with
401 (or 403), the new one accepted.

>>> fake = FakeOneSignal(api_key="k").start()
>>> fake.url   # 'http://127.0.0.1:41877'
>>> fake.script(status=429, count=1, retry_after=2)
>>> fake.stop()
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["FakeOneSignal", "Fault", "LoggedRequest"]

AUTH_ERROR = {
    "errors": [
        {"code": "auth-1", "title": "This operation requires 'Authorization' in the HTTP header"}
    ]
}
RATE_LIMITED = {"errors": ["API rate limit exceeded"], "limit": "App ID"}
USER_RATE_LIMITED = {"errors": ["API rate limit exceeded"], "limit": "User"}
PROPERTY_KEYS = {
    "tags",
    "language",
    "timezone_id",
    "lat",
    "long",
    "country",
    "first_active",
    "last_active",
    "amount_spent",
    "purchases",
    "ip",
}
MAX_PROPERTY_UPDATES = 100


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    """One request as the fake saw it (``at`` is ``time.monotonic()`` on arrival)."""

    at: float
    method: str
    path: str
    app_id: str
    alias_label: str
    alias_id: str
    headers: Mapping[str, str]
    body: Any
    raw: bytes
    status: int

    @property
    def user(self) -> tuple[str, str, str]:
        return (self.app_id, self.alias_label, self.alias_id)


@dataclass(slots=True)
class Fault:
    """Answer the next ``count`` matching requests this way instead of normally.

    ``status`` None means "answer normally, after ``delay_s``" (a slow server).
    """

    count: int
    status: int | None = None
    retry_after: str | None = None
    body: Any = None
    delay_s: float = 0.0
    app_id: str | None = None
    alias_id: str | None = None

    def matches(self, app_id: str, alias_id: str) -> bool:
        return (self.app_id is None or self.app_id == app_id) and (
            self.alias_id is None or self.alias_id == alias_id
        )


_DEFAULT_FAULT_BODIES: dict[int, Any] = {
    400: {"errors": [{"code": "invalid-1", "title": "Scripted bad request"}]},
    401: AUTH_ERROR,
    403: {"errors": [{"code": "auth-2", "title": "Forbidden"}]},
    404: {"errors": [{"code": "user-1", "title": "User not found"}], "meta": {}},
    409: {"errors": [{"code": "user-2", "title": "One or more Aliases claimed by another User"}]},
    429: RATE_LIMITED,
}


def _bad(title: str, code: str = "invalid-body") -> JSONResponse:
    return JSONResponse({"errors": [{"code": code, "title": title}]}, status_code=400)


class FakeOneSignal:
    """OneSignal's Update user endpoint on 127.0.0.1, in a background thread."""

    def __init__(
        self,
        api_key: str | Mapping[str, str] = "test-key",
        *,
        per_user_interval_s: float = 1.0,
        app_rate_limit: float | None = None,
        rate_limit_retry_after: int = 1,
        host: str = "127.0.0.1",
        view_rate_limit: float | None = None,
    ) -> None:
        """``api_key``: one key for every app, or ``{app_id: key}`` (other apps: 401)."""
        self.api_keys = api_key
        self._refuse_status: dict[str, int] = {}  # app -> status for a wrong key (else 401)
        self.per_user_interval_s = per_user_interval_s
        self.app_rate_limit = app_rate_limit
        self.rate_limit_retry_after = rate_limit_retry_after
        self.host = host
        self._lock = threading.Lock()
        self._log: list[LoggedRequest] = []
        self._tags: dict[tuple[str, str, str], dict[str, str]] = {}
        self._last_ok: dict[tuple[str, str, str], float] = {}
        self._app_ok: dict[str, deque[float]] = {}
        self._faults: list[Fault] = []
        self.view_rate_limit = view_rate_limit
        self._subscriptions: dict[tuple[str, str], str] = {}  # (app, subscription) -> user
        self._lookups: list[LoggedRequest] = []
        self._view_ok: dict[str, deque[float]] = {}
        self.disconnects = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self.app = Starlette(
            routes=[
                Route(
                    "/apps/{app_id}/users/by/{alias_label}/{alias_id:path}",
                    self._update_user,
                    methods=["PATCH"],
                ),
                Route(
                    "/apps/{app_id}/users/by/{alias_label}/{alias_id:path}",
                    self._view_user,
                    methods=["GET"],
                ),
                Route(
                    "/apps/{app_id}/subscriptions/{subscription_id}/user/identity",
                    self._identity_by_subscription,
                    methods=["GET"],
                ),
            ]
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> FakeOneSignal:
        # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) on accepted sockets
        # only when the socket says it is TCP. With Nagle on, every response (headers and body
        # written separately) waited ~40 ms for the client's delayed ACK: 25 requests/s per
        # connection, whatever the client did.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, 0))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", loop="asyncio"
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-onesignal", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake OneSignal did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeOneSignal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    # -- inspection and scripting ---------------------------------------------------------

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    @property
    def lookups(self) -> list[LoggedRequest]:
        """The subscription lookups (``alias_label`` "subscription", ``alias_id`` its id)."""
        with self._lock:
            return list(self._lookups)

    def add_subscription(
        self, app_id: str, subscription_id: str, onesignal_id: str | None = None
    ) -> None:
        """A subscription of ``app_id`` that the identity lookup finds."""
        with self._lock:
            self._subscriptions[(app_id, subscription_id)] = onesignal_id or str(uuid.uuid4())

    def tags(self, app_id: str, alias_label: str, alias_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._tags.get((app_id, alias_label, alias_id), {}))

    def all_tags(self) -> dict[tuple[str, str, str], dict[str, str]]:
        with self._lock:
            return {k: dict(v) for k, v in self._tags.items()}

    def script(
        self,
        status: int | None = None,
        *,
        count: int = 1,
        retry_after: float | str | None = None,
        body: Any = None,
        delay_s: float = 0.0,
        app_id: str | None = None,
        alias_id: str | None = None,
    ) -> None:
        """Queue a fault for the next ``count`` requests (optionally only one app or user)."""
        ra = None if retry_after is None else str(retry_after)
        if isinstance(retry_after, float) and retry_after.is_integer():
            ra = str(int(retry_after))
        with self._lock:
            self._faults.append(
                Fault(count, status, ra, body, delay_s, app_id=app_id, alias_id=alias_id)
            )

    def rotate_key(self, app_id: str, new_key: str, *, refuse_status: int = 401) -> None:
        """The app's key is now ``new_key``; any other key (the old one) gets
        ``refuse_status`` (401 as OneSignal does for a revoked key, or 403)."""
        if refuse_status not in (401, 403):
            raise ValueError("refuse_status must be 401 or 403")
        with self._lock:
            keys = self.api_keys
            if isinstance(keys, str):  # one key for every app so far: the others keep it
                self.api_keys = _EveryApp(keys, {app_id: new_key})
            elif isinstance(keys, _EveryApp):
                self.api_keys = _EveryApp(keys.default, {**keys, app_id: new_key})
            else:
                self.api_keys = {**keys, app_id: new_key}
            self._refuse_status[app_id] = refuse_status

    def reset(self) -> None:
        with self._lock:
            self._log.clear()
            self._tags.clear()
            self._last_ok.clear()
            self._app_ok.clear()
            self._faults.clear()
            self._lookups.clear()
            self._view_ok.clear()

    def wait_for(self, predicate: Callable[[FakeOneSignal], bool], timeout_s: float = 20.0) -> bool:
        """Poll ``predicate`` until it holds or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return predicate(self)

    # -- the endpoint -----------------------------------------------------------------------

    def _key_for(self, app_id: str) -> str | None:
        if isinstance(self.api_keys, str):
            return self.api_keys
        return self.api_keys.get(app_id)

    def _refused(self, app_id: str) -> JSONResponse:
        status = self._refuse_status.get(app_id, 401)
        return JSONResponse(_DEFAULT_FAULT_BODIES[status], status_code=status)

    def _take_fault(self, app_id: str, alias_id: str) -> Fault | None:
        for fault in self._faults:
            if fault.count > 0 and fault.matches(app_id, alias_id):
                fault.count -= 1
                if fault.count == 0:
                    self._faults.remove(fault)
                return fault
        return None

    async def _update_user(self, request: Request) -> Response:
        at = time.monotonic()
        # From the raw path: a "/" inside an id must arrive encoded (%2F), as OneSignal needs.
        raw_path = request.scope.get("raw_path", b"").decode("latin-1").split("?")[0]
        segments = [unquote(s) for s in raw_path.split("/")]
        try:
            raw = await request.body()
        except ClientDisconnect:  # the client died mid-request (kill -9): nothing arrived
            self.disconnects += 1
            return Response(status_code=499)
        if len(segments) != 7:
            with self._lock:
                self._log.append(
                    LoggedRequest(
                        time.monotonic(),
                        request.method,
                        raw_path,
                        "",
                        "",
                        "",
                        dict(request.headers),
                        None,
                        raw,
                        404,
                    )
                )
            return JSONResponse({"errors": [{"code": "not-found", "title": "Not Found"}]}, 404)
        app_id, label, alias_id = segments[2], segments[5], segments[6]
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        response = await self._answer(request, app_id, label, alias_id, body, raw, at)
        entry = LoggedRequest(
            at=at,
            method=request.method,
            path=raw_path,
            app_id=app_id,
            alias_label=label,
            alias_id=alias_id,
            headers=dict(request.headers),
            body=body,
            raw=raw,
            status=response.status_code,
        )
        with self._lock:
            self._log.append(entry)
        return response

    async def _view_user(self, request: Request) -> Response:
        """GET a user, as ``check-config --online`` does: 401 for a bad key, else 200 or 404.

        Only users whose tags the fake holds exist; requests here are not logged, so checks
        on the PATCH log are not disturbed.
        """
        app_id = request.path_params["app_id"]
        key = self._key_for(app_id)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if key is None or scheme.lower() != "key" or given != key:
            return JSONResponse(AUTH_ERROR, status_code=401)
        user = (app_id, request.path_params["alias_label"], request.path_params["alias_id"])
        with self._lock:
            tags = self._tags.get(user)
        if tags is None:
            return JSONResponse(_DEFAULT_FAULT_BODIES[404], status_code=404)
        return JSONResponse({"properties": {"tags": dict(tags)}, "identity": {user[1]: user[2]}})

    async def _identity_by_subscription(self, request: Request) -> Response:
        at = time.monotonic()
        app_id = request.path_params["app_id"]
        subscription_id = request.path_params["subscription_id"]
        response = await self._identity(request, app_id, subscription_id, at)
        entry = LoggedRequest(
            at=at,
            method="GET",
            path=request.url.path,
            app_id=app_id,
            alias_label="subscription",
            alias_id=subscription_id,
            headers=dict(request.headers),
            body=None,
            raw=b"",
            status=response.status_code,
        )
        with self._lock:
            self._lookups.append(entry)
        return response

    async def _identity(
        self, request: Request, app_id: str, subscription_id: str, at: float
    ) -> Response:
        key = self._key_for(app_id)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if key is None or scheme.lower() != "key" or given != key:
            return self._refused(app_id)
        with self._lock:
            fault = self._take_fault(app_id, subscription_id)
        if fault is not None:
            if fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            if fault.status is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
                content = fault.body or _DEFAULT_FAULT_BODIES.get(
                    fault.status, {"errors": [{"code": "server", "title": "Scripted error"}]}
                )
                return JSONResponse(content, status_code=fault.status, headers=headers)
        with self._lock:
            if self.view_rate_limit is not None:
                window = self._view_ok.setdefault(app_id, deque())
                while window and window[0] <= at - 1.0:
                    window.popleft()
                if len(window) >= self.view_rate_limit:
                    return JSONResponse(
                        RATE_LIMITED,
                        status_code=429,
                        headers={"Retry-After": str(self.rate_limit_retry_after)},
                    )
                window.append(at)
            user = self._subscriptions.get((app_id, subscription_id))
        if user is None:
            return JSONResponse(
                {"errors": [{"code": "subscription-0", "title": "Subscription not found"}]},
                status_code=404,
            )
        return JSONResponse({"identity": {"onesignal_id": user}})

    async def _answer(
        self,
        request: Request,
        app_id: str,
        label: str,
        alias_id: str,
        body: Any,
        raw: bytes,
        at: float,
    ) -> Response:
        key = self._key_for(app_id)
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if key is None or scheme.lower() != "key" or given != key:
            return self._refused(app_id)
        with self._lock:
            fault = self._take_fault(app_id, alias_id)
        if fault is not None:
            if fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            if fault.status is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
                content = fault.body
                if content is None:
                    content = _DEFAULT_FAULT_BODIES.get(
                        fault.status, {"errors": [{"code": "server", "title": "Scripted error"}]}
                    )
                return JSONResponse(content, status_code=fault.status, headers=headers)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("application/json"):
            return _bad("Content-Type must be application/json")
        problem = _validate(body)
        if problem:
            return _bad(problem)
        user = (app_id, label, alias_id)
        with self._lock:
            last = self._last_ok.get(user)
            if last is not None and at - last < self.per_user_interval_s:
                return JSONResponse(
                    USER_RATE_LIMITED,
                    status_code=429,
                    headers={"Retry-After": str(self.rate_limit_retry_after)},
                )
            if self.app_rate_limit is not None:
                window = self._app_ok.setdefault(app_id, deque())
                while window and window[0] <= at - 1.0:
                    window.popleft()
                if len(window) >= self.app_rate_limit:
                    return JSONResponse(
                        RATE_LIMITED,
                        status_code=429,
                        headers={"Retry-After": str(self.rate_limit_retry_after)},
                    )
                window.append(at)
            self._last_ok[user] = at
            props = body["properties"]
            state = self._tags.setdefault(user, {})
            for k, v in props.get("tags", {}).items():
                if v is None or v == "":
                    state.pop(k, None)
                else:
                    state[k] = v
        return JSONResponse({"properties": props}, status_code=202)


class _EveryApp(dict[str, str]):
    """Keys per app, and ``default`` for the apps not listed (after one app's rotation)."""

    def __init__(self, default: str, keys: Mapping[str, str]) -> None:
        super().__init__(keys)
        self.default = default

    def get(self, app_id: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(app_id, self.default)


def _validate(body: Any) -> str | None:
    """Why ``body`` is not an Update user body OneSignal would take, or None."""
    if not isinstance(body, dict):
        return "Body must be a JSON object"
    unknown = set(body) - {"properties", "deltas", "refresh_device_metadata"}
    if unknown:
        return f"Unknown field(s): {', '.join(sorted(unknown))}"
    props = body.get("properties")
    if not isinstance(props, dict):
        return "properties must be an object"
    unknown = set(props) - PROPERTY_KEYS
    if unknown:
        return f"Unknown property(ies): {', '.join(sorted(unknown))}"
    tags = props.get("tags", {})
    if not isinstance(tags, dict):
        return "properties.tags must be an object"
    if len(tags) > MAX_PROPERTY_UPDATES:
        return f"At most {MAX_PROPERTY_UPDATES} property updates per request"
    for k, v in tags.items():
        if not k:
            return "Tag keys must not be empty"
        if v is not None and not isinstance(v, str):
            return f"Tag {k!r}: values must be strings"
    return None

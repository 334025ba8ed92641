"""The operator surface: ``/metrics`` and ``/openapi.json`` on a port of their own.

The webhook port faces the internet (a load balancer forwards OneSignal to it), so it serves
only what a sender needs: the source routes, ``/healthz`` and ``/readyz``. Metrics say how busy
the gateway is, which sources exist and why events fail; the OpenAPI document lists the routes
and their headers. Neither is a sender's business, so both answer here, on
``server.metrics_host``:``server.metrics_port`` (127.0.0.1:9101 by default), and 404 on the
webhook port.

A thread serves it (the standard library's threading HTTP server): a scrape then never waits
for the event loop, and the loop never pays for rendering one. What a scrape reads is either
read at scrape time through a gauge's function or a counter the loop alone changes, which is
safe to read from this thread.

With ``server.workers`` > 1 every worker process serves its metrics on the same port
(``SO_REUSEPORT``), so none fails to bind, and whichever worker the kernel hands a scrape to
answers it for all of them (:mod:`gateway.ingress.peers`). A port that cannot be bound (taken by
another program) is logged and the gateway runs on without it: events matter more than metrics.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.ingress.peers import MetricsPeers

__all__ = ["OperatorServer"]

log = logging.getLogger("gateway.ingress.operator")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(address, _Handler, bind_and_activate=False)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):  # every worker process binds the same port
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise
        self.registry: CollectorRegistry = CollectorRegistry()
        self.peers: MetricsPeers | None = None
        self.openapi = b"{}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds a connection may sit idle or half-sent

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            peers = self.server.peers  # several workers: every one's metrics, merged
            body = peers.exposition() if peers else generate_latest(self.server.registry)
            self._answer(200, CONTENT_TYPE_LATEST, body)
        elif path == "/openapi.json":
            self._answer(200, "application/json", self.server.openapi)
        else:
            self._answer(404, "application/json", b'{"error":"not-found"}')

    def do_HEAD(self) -> None:
        self.do_GET()

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds: not worth a log line each


class OperatorServer:
    """``/metrics`` of ``registry`` and the OpenAPI document on ``host``:``port`` (0: off)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        openapi: dict[str, Any],
        peers: MetricsPeers | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.peers = peers
        self.openapi = orjson.dumps(openapi)
        self._server: _Server | None = None

    def start(self) -> bool:
        """Bind and serve on a thread; False (logged) when off or the port cannot be bound."""
        if not self.port:
            return False
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            server = _Server((self.host, self.port), family)
        except OSError as exc:
            log.error(
                "metrics port not served: the gateway runs on without /metrics",
                extra={"host": self.host, "port": self.port, "error": str(exc)},
            )
            return False
        server.registry = self.registry
        server.openapi = self.openapi
        if self.peers is not None:
            self.peers.start()
            server.peers = self.peers
        self._server = server
        threading.Thread(target=server.serve_forever, name="operator-http", daemon=True).start()
        log.info("metrics served", extra={"host": self.host, "port": self.port})
        return True

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            with contextlib.suppress(OSError):
                server.server_close()
            if self.peers is not None:
                self.peers.stop()

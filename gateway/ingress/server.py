"""Running the ingress under uvicorn, with the settings a load-balanced webhook target needs.

uvicorn's own proxy-header rewriting is off: the gateway resolves the client address itself
(:mod:`gateway.core.trust`), so there is one implementation of that rule, not two that disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from gateway.config import Config
from gateway.ingress.protocol import HeadLimits, protocol_class
from gateway.logs import drop_query_strings, sample_uvicorn_request_warnings

__all__ = [
    "GatewayServer",
    "ServerThread",
    "bind_socket",
    "free_port",
    "uvicorn_config",
    "uvicorn_options",
    "worker_app",
]


def uvicorn_config(app: Any, config: Config, **overrides: Any) -> uvicorn.Config:
    return uvicorn.Config(app, **uvicorn_options(config, **overrides))


def uvicorn_options(config: Config, **overrides: Any) -> dict[str, Any]:
    """uvicorn's settings for the ingress, from ``[server]``."""
    s = config.server
    if s.access_log:
        drop_query_strings()
    sample_uvicorn_request_warnings(s.refusal_log_lines, s.refusal_log_interval_s)
    options: dict[str, Any] = {
        "host": s.host,
        "port": s.port,
        "proxy_headers": False,
        "server_header": False,
        "date_header": True,
        "timeout_keep_alive": s.timeout_keep_alive,
        "timeout_graceful_shutdown": s.graceful_shutdown_s or None,
        "access_log": s.access_log,
        "log_config": None,
        "lifespan": "on",
        # httptools with the head limits, the head deadline, trailers dropped, upgrades refused
        "http": protocol_class(
            HeadLimits(
                max_head_bytes=s.max_head_bytes,
                max_header_count=s.max_header_count,
                head_timeout_s=s.head_timeout_s,
            )
        ),
        "ws": "none",
    }
    if s.limit_concurrency:
        options["limit_concurrency"] = s.limit_concurrency
    if s.workers > 1:
        options["workers"] = s.workers
    options.update(overrides)
    return options


class GatewayServer(uvicorn.Server):
    """uvicorn's server, except that a clean stop on SIGTERM or SIGINT exits with status 0.

    uvicorn re-raises the signal it caught once its graceful shutdown is done, so the process
    dies by SIGTERM (status 143) whether or not the drain and the producer flush succeeded.
    Here the signal only starts the shutdown, exactly as in uvicorn (a second one forces it),
    and the exit status says how it went.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (for the demo and tests, which start servers)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """A uvicorn server on its own thread and event loop, on a socket bound up front.

    For the demo and the tests: the port is known before the server starts (port 0 picks a
    free one), and ``stop()`` runs uvicorn's graceful shutdown (lifespan included).
    """

    def __init__(self, app: Any, config: Config, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, config, host=host, port=self.port))
        # uvicorn installs no signal handlers off the main thread, which is what we want here
        self.thread = threading.Thread(target=self._run, name="uvicorn", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:
            self.error = exc

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout_s * 50)):
            if self.server.started or self.error or not self.thread.is_alive():
                break
            deadline.wait(0.02)
        if not self.server.started:
            raise RuntimeError(f"server did not start: {self.error!r}")
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        with contextlib.suppress(OSError):
            self.sock.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[ServerThread]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def worker_app() -> Any:
    """The app of one uvicorn worker process (``server.workers`` > 1).

    Each worker reads the config named by ``GATEWAY_CONFIG`` (the parent sets it) and has its
    own producer and dedupe window, exactly like a separate replica.
    """
    import os

    from gateway.ingress.app import create_app
    from gateway.ingress.peers import ENV_DIR
    from gateway.logs import configure_logging
    from gateway.startup import start

    cfg = start(os.environ["GATEWAY_CONFIG"])
    configure_logging(cfg.server.log_level)
    return create_app(cfg, metrics_dir=os.environ.get(ENV_DIR, ""))

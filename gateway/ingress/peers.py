"""One scrape for every worker: with ``server.workers`` > 1 the workers' metrics are merged.

Each uvicorn worker is a process with its own registry (its own producer, dedupe window and
counters, like a replica), and the metrics port, shared with ``SO_REUSEPORT``, is answered by
whichever worker the kernel picks. So ``gateway serve`` gives the workers a private directory
(``GATEWAY_METRICS_DIR``), each worker serves its own exposition on a Unix socket there, and
the worker that answers a scrape asks every other one and merges: every sample gains a
``worker`` label (the worker's process id), so the scrape holds every worker's series and
``sum without (worker)`` gives the gateway's total. Counters and histograms stay per worker,
so a worker that restarts is a counter reset of its own series, which ``rate()`` handles.

prometheus-client's multiprocess mode does the same job through memory-mapped files, but only
for its own metric classes: the ingress's per-request counters are collectors of their own
(:mod:`gateway.metrics`), read at scrape time, so asking the live process is the equivalent
that sees exactly what a single worker's scrape would.

A worker that does not answer within ``PEER_TIMEOUT_S`` is left out of that scrape and
counted (``gateway_metrics_peer_failures_total``); a socket whose process is gone is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["ENV_DIR", "PEER_TIMEOUT_S", "MetricsPeers", "merge_expositions"]

log = logging.getLogger("gateway.ingress.peers")

ENV_DIR = "GATEWAY_METRICS_DIR"
PEER_TIMEOUT_S = 2.0
_MAX_EXPOSITION_BYTES = 64 << 20


def merge_expositions(texts: Iterable[tuple[str, str]]) -> bytes:
    """``(worker, exposition text)`` pairs as one exposition, each sample labelled by worker."""
    families: dict[str, Metric] = {}
    for worker, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples.extend(
                Sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


class _Handler(socketserver.BaseRequestHandler):
    server: _PeerServer

    def handle(self) -> None:
        self.request.sendall(generate_latest(self.server.registry))


class _PeerServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, registry: CollectorRegistry) -> None:
        self.registry = registry
        super().__init__(path, _Handler)


class MetricsPeers:
    """This worker's place among the workers sharing ``directory``."""

    def __init__(self, directory: str | os.PathLike[str], registry: CollectorRegistry) -> None:
        self.directory = Path(directory)
        self.registry = registry
        self.me = str(os.getpid())
        self.path = self.directory / f"{self.me}.sock"
        self._server: _PeerServer | None = None
        self.failures = Counter(
            "gateway_metrics_peer_failures",
            "Workers left out of a merged scrape (no answer in time, or gone)",
            registry=registry,
        )

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a former process with this pid
        server = _PeerServer(str(self.path), self.registry)
        self._server = server
        threading.Thread(target=server.serve_forever, name="metrics-peer", daemon=True).start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def exposition(self) -> bytes:
        """Every live worker's metrics, this one's included, merged."""
        texts = []
        for sock_path in sorted(self.directory.glob("*.sock")):
            worker = sock_path.stem
            if worker == self.me:
                continue
            text = self._ask(sock_path)
            if text is not None:
                texts.append((worker, text))
        # this worker's last, so that this scrape already counts the peers it missed
        texts.append((self.me, generate_latest(self.registry).decode()))
        return merge_expositions(texts)

    def _ask(self, sock_path: Path) -> str | None:
        chunks: list[bytes] = []
        size = 0
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(PEER_TIMEOUT_S)
                s.connect(str(sock_path))
                while chunk := s.recv(1 << 16):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > _MAX_EXPOSITION_BYTES:
                        raise OSError("exposition too large")
        except (ConnectionRefusedError, FileNotFoundError):
            # the worker is gone (killed, or restarted under a new pid): forget its socket
            with contextlib.suppress(FileNotFoundError):
                sock_path.unlink()
            self.failures.inc()
            return None
        except OSError as exc:
            log.warning(
                "a worker did not answer the merged scrape",
                extra={"worker": sock_path.stem, "error": str(exc)[:200]},
            )
            self.failures.inc()
            return None
        return b"".join(chunks).decode("utf-8", "replace")

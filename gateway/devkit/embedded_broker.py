"""An embedded Kafka-protocol broker for the demo and the tests.

It is librdkafka's mock cluster, hosted by the ``confluent-kafka`` wheel (the ``demo`` and
``test`` extras), in a child process: real TCP listeners on 127.0.0.1 that speak the Kafka
wire protocol, so our kafka-python clients talk to it exactly as they would to Apache Kafka.
The cluster lives as long as the child; killing the child is a broker crash, SIGSTOP/SIGCONT
is an outage and recovery at the same addresses. Never a production path.

kafka-python must be pinned to ``api_version=(2, 3)`` against it (see
``kafka.api_version`` in the config): the mock's ApiVersions fallback answer cannot be decoded
by kafka-python's auto-negotiation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from types import TracebackType

__all__ = ["API_VERSION", "EmbeddedBroker"]

API_VERSION = "2.3"

_CHILD = r"""
import signal, sys, time
try:
    from confluent_kafka import Producer
except ImportError:
    print("ERROR confluent-kafka is not installed: pip install 'onesignal-kafka-gateway[demo]'",
          flush=True)
    sys.exit(3)
n = int(sys.argv[1])
host = Producer({"test.mock.num.brokers": n, "log_level": 0})
md = host.list_topics(timeout=10)
print("BOOTSTRAP " + ",".join(f"{b.host}:{b.port}" for b in md.brokers.values()), flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(3600)
"""


class EmbeddedBroker:
    """A mock Kafka cluster in a child process.

    >>> with EmbeddedBroker() as broker:
    ...     broker.bootstrap_servers   # '127.0.0.1:41234,127.0.0.1:38811,127.0.0.1:40123'
    """

    def __init__(self, num_brokers: int = 3, start_timeout_s: float = 30.0) -> None:
        self.num_brokers = num_brokers
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[str] | None = None
        self.bootstrap_servers = ""

    def start(self) -> EmbeddedBroker:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(self.num_brokers)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.startswith("BOOTSTRAP "):
                self.bootstrap_servers = line.split(" ", 1)[1].strip()
                return self
            if line.startswith("ERROR ") or (not line and self.process.poll() is not None):
                self.stop()
                raise RuntimeError(line[6:].strip() or "embedded broker failed to start")
        self.stop()
        raise RuntimeError(f"embedded broker did not start within {self.start_timeout_s}s")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pause(self) -> None:
        """Freeze the cluster: connections stay open but nothing is answered."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Crash the cluster (all data is lost with it: it lives in the child's memory)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process and self.process.stdout:
            self.process.stdout.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

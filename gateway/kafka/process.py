"""kafka-python in a child process: the ingress's default sink (``kafka.producer = "process"``).

Why: kafka-python is pure Python. In the server's process its ``send()`` and its sender thread
took about a third of the interpreter's time under load, and that process is bound by the GIL
(one core) while the machine's other cores sat idle. Here the producer runs in a child
process that talks to its server process over a socketpair, so HTTP and Kafka each get a
core. The asyncio side (admission, the ack deadline, readiness) is :class:`SinkBase`, shared
with the in-process :class:`~gateway.kafka.sink.KafkaSink`; the guarantees are the same: a publish
returns only after Kafka acknowledged the record, or raises and the request is answered 503.

The wire between the two is length-prefixed frames (:mod:`gateway.kafka.wire`). Records of
one event-loop turn travel in one frame; each result comes back as soon as it is known.

Lifetimes:

- The child ignores SIGINT and SIGTERM: a terminal's Ctrl-C or a signal sent to the whole
  group reaches the server, which drains its requests (they wait for acks from the child)
  and then asks the child to flush and exit.
- If the server dies (even ``kill -9``), the child reads end-of-file, flushes what it has
  (those requests were never answered 2xx) and exits.
- If the child dies, every request waiting on it is answered 503 (its records may or may
  not have reached Kafka; OneSignal retries and ``ce_id`` lets readers drop repeats), and
  the server starts a new child with backoff.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError

from gateway.config import KafkaConfig
from gateway.core.records import KafkaRecord
from gateway.kafka import wire
from gateway.kafka.producer import ProducerOpener
from gateway.kafka.sink import PublishResult, SinkBase
from gateway.metrics import IngressMetrics

__all__ = ["ProcessSink", "main"]

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds gateway/


# ---------------------------------------------------------------------------------------------
# the server's side


class _Wire(asyncio.Protocol):
    """Frames from the child, handed to the sink on the loop thread."""

    def __init__(self, sink: ProcessSink) -> None:
        self.sink = sink
        self.frames = wire.FrameBuffer()

    def data_received(self, data: bytes) -> None:
        for kind, payload in self.frames.feed(data):
            self.sink._on_frame(kind, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink._on_lost()


class ProcessSink(SinkBase):
    """Publishes through a kafka-python producer in a child process (started and restarted here)."""

    def __init__(
        self, cfg: KafkaConfig, metrics: IngressMetrics, warm_topics: tuple[str, ...] = ()
    ) -> None:
        super().__init__(cfg, metrics)
        self.warm_topics = warm_topics
        self.restarts = 0
        self._pending: dict[int, tuple[asyncio.Future[PublishResult], str]] = {}
        self._outbox: list[tuple[int, str, bytes | None, bytes, list[tuple[str, bytes]]]] = []
        self._next_id = 0
        self._transport: asyncio.Transport | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lost = asyncio.Event()
        self._child_producer = False
        self._child_topics: set[str] = set()
        self._unacked_at_close: int | None = None
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def child_pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the producer process in the background; until it is up, publishes get 503."""
        self._loop = asyncio.get_running_loop()
        self._supervisor = asyncio.create_task(self._supervise())
        self._start_watchdog()

    async def _replace_producer(self) -> None:
        # the supervisor starts a new child at once; _on_lost fails what the old one held
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    async def _supervise(self) -> None:
        # a child that ran a while is replaced at once; one that keeps dying, with backoff
        delay = 0.0
        while not self._closed:
            started = time.monotonic()
            try:
                await self._spawn()
            except OSError as exc:
                self.last_error = f"producer process not started: {type(exc).__name__}: {exc}"
                log.error("kafka producer process not started", extra={"error": str(exc)})
            else:
                await self._lost.wait()
                code = await self._reap(5.0)
                if self._closed:
                    return
                self.restarts += 1
                self.metrics.producer_restarts.inc()
                self.last_error = f"the Kafka producer process exited (status {code})"
                self.last_failure_at = time.monotonic()
                log.error(
                    "kafka producer process exited; starting a new one", extra={"status": code}
                )
            if time.monotonic() - started > 30.0:
                delay = 0.0
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, 0.5), 10.0)

    async def _spawn(self) -> None:
        loop = self._loop
        assert loop is not None
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self._proc = subprocess.Popen(  # the same interpreter, our own module
                [sys.executable, "-m", "gateway.kafka.process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self._lost = asyncio.Event()
        self._child_producer = False
        self._child_topics = set()
        transport, _ = await loop.connect_accepted_socket(lambda: _Wire(self), ours)
        init = {
            "kafka": self.cfg,
            "warm_topics": list(self.warm_topics),
            "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        }
        transport.write(wire.frame(wire.INIT, pickle.dumps(init)))
        self._transport = transport
        log.info("kafka producer process started", extra={"pid": self._proc.pid})

    async def _reap(self, timeout_s: float) -> int | None:
        proc = self._proc
        if proc is None or self._loop is None:
            return None
        return await self._loop.run_in_executor(None, _wait_or_kill, proc, timeout_s)

    async def close(self, timeout_s: float = 15.0) -> None:
        """Ask the child to flush and exit; bounded, then it is killed."""
        self._closed = True
        await self._stop_watchdog()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if self._outbox:
                self._flush()
            transport.write(wire.frame(wire.CLOSE, wire.dumps(float(timeout_s))))
            try:
                await asyncio.wait_for(self._lost.wait(), timeout_s + 5.0)
            except TimeoutError:
                log.warning("kafka producer process did not stop in time; killing it")
        await self._reap(1.0)
        if self._unacked_at_close:
            self._warn_unacknowledged(self._unacked_at_close)

    # -- records out, results in -------------------------------------------------------------

    def _producer_state(self) -> tuple[bool, bool]:
        return self._transport is not None and self._child_producer, bool(self._child_topics)

    async def _submit(self, record: KafkaRecord, fut: asyncio.Future[PublishResult]) -> None:
        rid = self._next_id
        self._next_id = rid + 1
        self._pending[rid] = (fut, record.topic)
        if not self._outbox:
            # every record submitted in this turn of the loop goes out in one frame
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._outbox.append((rid, record.topic, record.key, record.value, record.headers))

    def _flush(self) -> None:
        batch, self._outbox = self._outbox, []
        transport = self._transport
        if not batch or transport is None or transport.is_closing():
            return  # the child is gone: _on_lost fails every pending record
        payload = wire.dumps(batch)
        transport.write(wire.frame(wire.RECORDS, payload))

    def _on_frame(self, kind: int, payload: bytes) -> None:
        if kind == wire.RESULTS:
            self._on_results(wire.loads(payload))
        elif kind == wire.STATUS:
            status = wire.loads(payload)
            self._child_producer = bool(status["producer"])
            self._child_topics.update(status["topics"])
            if status["error"]:
                self.last_error = status["error"]
        elif kind == wire.CLOSED:
            self._unacked_at_close = int(wire.loads(payload))

    def _on_results(self, results: Sequence[tuple[int, int, int, str | None]]) -> None:
        pending = self._pending
        done = 0
        for rid, partition, offset, error in results:
            entry = pending.pop(rid, None)
            if entry is None:
                continue
            done += 1
            fut, topic = entry
            if fut.done():  # settled already (the sink failed it when its child was lost)
                continue
            if error is None:
                fut.set_result(PublishResult(topic, partition, offset))
            else:
                fut.set_exception(KafkaError(error))
                fut.exception()  # retrieved: nobody may be awaiting it any more
        if done:
            self._release(done)

    def _on_lost(self) -> None:
        self._transport = None
        self._child_producer = False
        self._child_topics = set()
        pending, self._pending = self._pending, {}
        self._outbox = []
        gone = KafkaError("the Kafka producer process exited")
        for fut, _topic in pending.values():
            if not fut.done():
                fut.set_exception(gone)
                fut.exception()
        if pending:
            self._release(len(pending))
        self._lost.set()


def _wait_or_kill(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# ---------------------------------------------------------------------------------------------
# the child's side


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames = wire.FrameBuffer()
        self.ready: collections.deque[tuple[int, bytes]] = collections.deque()

    def read(self) -> tuple[int, bytes] | None:
        """The next frame, or None at end-of-file (the server is gone)."""
        while not self.ready:
            try:
                chunk = self.sock.recv(1 << 18)
            except OSError:
                return None
            if not chunk:
                return None
            self.ready.extend(self.frames.feed(chunk))
        return self.ready.popleft()


class _Child:
    """Reads records, sends them with kafka-python, writes results back in batches."""

    def __init__(self, sock: socket.socket, cfg: KafkaConfig, warm_topics: tuple[str, ...]):
        self.sock = sock
        self.cfg = cfg
        self.producer: Any = None
        self.topics: set[str] = set()
        self.error: str | None = None
        self.sent = 0
        self.completed = 0
        self._send_lock = threading.Lock()
        self._count_lock = threading.Lock()
        # results completed on the producer's sender thread, written once per round of it
        self._results: list[tuple[int, int, int, str | None]] = []
        self._results_lock = threading.Lock()
        self._sender_thread: Any = None
        self._first_sends = concurrent.futures.ThreadPoolExecutor(4, "first-send")
        self.stop = threading.Event()
        self.opener = ProducerOpener(
            cfg,
            warm_topics,
            on_producer=self._on_producer,
            on_topic=self._on_topic,
            on_error=self._on_error,
            stop=self.stop,
        )

    def run(self, reader: _Reader) -> int:
        threading.Thread(target=self.opener.run, name="producer-opener", daemon=True).start()
        close_timeout = 15.0
        while True:
            frame = reader.read()
            if frame is None:
                log.info("the gateway process is gone; flushing and exiting")
                break
            kind, payload = frame
            if kind == wire.RECORDS:
                self._send_all(wire.loads(payload))
            elif kind == wire.CLOSE:
                close_timeout = float(wire.loads(payload))
                break
        self.stop.set()
        self._first_sends.shutdown(wait=True, cancel_futures=False)
        unacked = self._close_producer(close_timeout)
        self._send(wire.CLOSED, wire.dumps(unacked))
        return 0

    # -- producing ---------------------------------------------------------------------------

    def _send_all(self, records: Sequence[tuple[int, str, bytes | None, bytes, Any]]) -> None:
        producer = self.producer
        if producer is None:
            error = "the Kafka producer is not connected yet"
            self._send(wire.RESULTS, wire.dumps([(r[0], -1, -1, error) for r in records]))
            return
        for record in records:
            if record[1] in self.topics:
                self._send_one(producer, record)
            else:
                # the first send to a topic may block on its metadata (up to max_block_ms):
                # not on this thread, which every other record waits for
                self._first_sends.submit(self._send_one, producer, record)

    def _send_one(self, producer: Any, record: tuple[int, str, bytes | None, bytes, Any]) -> None:
        rid, topic, key, value, headers = record
        try:
            fut = producer.send(topic, value=value, key=key, headers=headers)
        except Exception as exc:  # KafkaTimeoutError on metadata, closed producer
            self._send(wire.RESULTS, wire.dumps([(rid, -1, -1, f"send failed: {exc!r}")]))
            return
        with self._count_lock:
            self.sent += 1
        if topic not in self.topics:
            self._on_topic(topic)
        fut.add_callback(self._acked, rid)
        fut.add_errback(self._failed, rid)

    # Results completed on kafka-python's sender thread (every ack, and the errors it settles)
    # are gathered and written in one frame at the end of each round of its loop
    # (Sender.run_once: send what is ready, poll, run the callbacks), not one frame and one
    # system call each; the server then reads them in one go too. A writer thread batching
    # them measured slower: every hand-over waited for the GIL (mean publish latency 12.4 ->
    # 9.5 ms, 3.3k -> 3.7-3.9k req/s on the bench). Results completed on any other thread (an
    # immediate failure, a close) still go at once.

    def _acked(self, rid: int, metadata: Any) -> None:
        self._done(rid, metadata.partition, metadata.offset, None)

    def _failed(self, rid: int, exc: Any) -> None:
        self._done(rid, -1, -1, f"{type(exc).__name__}: {exc}")

    def _done(self, rid: int, partition: int, offset: int, error: str | None) -> None:
        with self._count_lock:
            self.completed += 1
        if threading.current_thread() is self._sender_thread:
            with self._results_lock:
                self._results.append((rid, partition, offset, error))
            return
        self._send(wire.RESULTS, wire.dumps([(rid, partition, offset, error)]))

    def _flush_results(self) -> None:
        with self._results_lock:
            batch, self._results = self._results, []
        if batch:
            self._send(wire.RESULTS, wire.dumps(batch))

    def _gather_results(self, producer: Any) -> None:
        """Flush the sender thread's results at the end of each round of its loop.

        kafka-python's ``Sender.run`` calls ``self.run_once()`` round after round, so the
        instance attribute set here is what it calls from the next round on. Without that
        method (another kafka-python), results go one frame each, as before; the tests check
        that this kafka-python has it.
        """
        sender = getattr(producer, "_sender", None)
        run_once = getattr(sender, "run_once", None)
        if sender is None or not callable(run_once):
            log.warning("kafka-python has no Sender.run_once: results go back one by one")
            return

        def run_once_then_flush() -> None:
            try:
                run_once()
            finally:
                self._flush_results()

        sender.run_once = run_once_then_flush
        self._sender_thread = sender

    def _close_producer(self, timeout_s: float) -> int:
        producer = self.producer
        if producer is None:
            return 0
        try:
            producer.close(timeout=timeout_s)
        except KafkaError as exc:
            log.warning("producer close: %s", f"{type(exc).__name__}: {exc}")
        self._flush_results()  # what the sender thread settled after its last round
        with self._count_lock:
            return self.sent - self.completed

    # -- status ------------------------------------------------------------------------------

    def _on_producer(self, producer: Any) -> None:
        self._gather_results(producer)
        self.producer = producer
        self._status()

    def _on_topic(self, topic: str) -> None:
        self.topics.add(topic)
        self._status()

    def _on_error(self, error: str) -> None:
        self.error = error
        self._status()

    def _status(self) -> None:
        status = {
            "producer": self.producer is not None,
            "topics": sorted(self.topics),
            "error": self.error,
        }
        self._send(wire.STATUS, wire.dumps(status))

    def _send(self, kind: int, payload: bytes) -> None:
        data = wire.frame(kind, payload)
        # if the server is gone, the reader sees end-of-file and this process exits
        with self._send_lock, contextlib.suppress(OSError):
            self.sock.sendall(data)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m gateway.kafka.process FD (started by the gateway)", file=sys.stderr)
        return 2
    # the server process decides when this one stops (see the module docstring)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    reader = _Reader(sock)
    frame = reader.read()
    if frame is None or frame[0] != wire.INIT:
        return 2
    init = pickle.loads(frame[1])  # noqa: S301 - from our own parent over a private socketpair
    from gateway.logs import configure_logging, register_secrets

    configure_logging(init["log_level"])
    cfg: KafkaConfig = init["kafka"]
    if cfg.sasl_password:
        register_secrets([cfg.sasl_password.reveal()])
    return _Child(sock, cfg, tuple(init["warm_topics"])).run(reader)


if __name__ == "__main__":
    sys.exit(main())

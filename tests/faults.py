"""A small Jepsen-style harness for the fault tests: gateway process, load, checker, report.

- :class:`GatewayProcess` runs ``python -m gateway serve`` as a real child process (so SIGTERM and
  SIGKILL mean what they mean in production) and waits for ``/readyz``.
- :class:`LoadGenerator` posts events with unique ids from a fixed number of threads for a
  bounded time and records every outcome: 2xx = ok, 4xx/5xx = fail, no answer = info
  (indeterminate: the event may or may not have been stored). With ``retries`` it posts an id
  again after a 5xx or no answer, as OneSignal does, and records every attempt.
- :func:`read_ids` reads the topics from offset 0, until every expected id is found or a bound
  passes; :func:`check` classifies every id: acknowledged and found, acknowledged but lost
  (must be 0), unacknowledged but present (benign), duplicates, and duplicates that no retry
  explains.
- :class:`Report` prints one line per scenario and appends it as JSON to ``$FAULT_REPORT``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson
from kafka import KafkaConsumer, TopicPartition

from gateway.core.records import header
from gateway.devkit import samples
from gateway.ingress.server import free_port

from .conftest import API_VERSION, KAFKA_API_VERSION
from .ingress_helpers import EU_WEST4, ROTATED, SECRET

ROOT = Path(__file__).resolve().parent.parent
ES = "/v1/onesignal/events"
KIND = "message.push.clicked"
# the topics the gateway warms at start (so they exist), for a topic prefix
CHANNELS = ("push", "email", "sms", "iam", "live_activity")


# ---------------------------------------------------------------------------------------------
# the gateway as a child process


def _toml_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return orjson.dumps(value).decode()  # strings, numbers, booleans, lists: JSON is TOML here


def gateway_toml(bootstrap: str, prefix: str, **sections: Mapping[str, Any]) -> str:
    """The TOML of a one-source gateway (Event Streams) in front of ``bootstrap``."""
    data: dict[str, dict[str, Any]] = {
        "server": {
            "host": "127.0.0.1",
            "trusted_proxies": ["127.0.0.1/32", "::1/128"],
            "graceful_shutdown_s": 10.0,
            "log_level": "info",
            # a free metrics port per gateway: two on the default one would share it
            "metrics_port": free_port(),
        },
        # refresh is on by default and would go to gstatic.com: tests never leave loopback
        "allowlist": {"refresh_interval_s": 0},
        "kafka": {
            "bootstrap_servers": bootstrap,
            "api_version": API_VERSION,
            "topic": f"{prefix}.{{channel}}",
            "dead_letter_topic": f"{prefix}.dlt",
        },
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in data.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    lines += [
        "[[sources]]",
        'name = "event-stream"',
        f'path = "{ES}"',
        'format = "event-stream"',
        'secrets_env = "T_SECRETS"',
    ]
    return "\n".join(lines) + "\n"


class GatewayProcess:
    """``python -m gateway serve --config FILE`` in a child process, stderr to a log file."""

    def __init__(self, config_text: str, workdir: Path) -> None:
        self.config_path = workdir / "gateway.toml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / "gateway.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 30.0) -> GatewayProcess:
        env = dict(os.environ, T_SECRETS=f"{SECRET},{ROTATED}", PYTHONUNBUFFERED="1")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--port",
                    str(self.port),
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + ready_timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited at start: {self.log()[-2000:]}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2)
                if r.status_code == 200:
                    return self
                last = r.text
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"gateway not ready in {ready_timeout_s}s: {last}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        """Always safe: SIGTERM, then SIGKILL if it does not go within 15 s."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    @contextlib.contextmanager
    def running(self) -> Iterator[GatewayProcess]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


# ---------------------------------------------------------------------------------------------
# load


@dataclasses.dataclass
class Outcome:
    event_id: str
    started: float  # time.monotonic()
    ended: float
    status: int | None  # None: no answer (timeout, reset, refused)
    error: str = ""
    retry_after: str | None = None
    partition: int | None = None
    offset: int | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def latency(self) -> float:
        return self.ended - self.started


class LoadGenerator:
    """``workers`` threads, each posting events with fresh ids over one keep-alive client.

    Bounded three ways: ``duration_s``, ``max_requests`` in all, and ``timeout_s`` per request
    (a request that reaches it is recorded as a hang, ``error="timeout"``). A worker whose
    request found no server waits ``pause_on_error_s`` before the next, so a dead gateway is not
    hammered in a tight loop.

    ``retries`` > 0 plays OneSignal's side of a 503: an event answered 5xx or 429, or not
    answered at all, is posted again with the same id and body (after ``retry_pause_s``, up to
    ``retries`` more times). Each attempt is an :class:`Outcome` of its own.
    """

    def __init__(
        self,
        url: str,
        *,
        workers: int = 16,
        duration_s: float = 10.0,
        max_requests: int = 50_000,
        timeout_s: float = 10.0,
        interval_s: float = 0.05,
        pause_on_error_s: float = 0.05,
        retries: int = 0,
        retry_pause_s: float = 0.2,
    ) -> None:
        self.url = url
        self.workers = workers
        self.duration_s = duration_s
        self.max_requests = max_requests
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.pause_on_error_s = pause_on_error_s
        self.retries = retries
        self.retry_pause_s = retry_pause_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._issued = 0
        self.started_at = 0.0
        self.stopped_at = 0.0

    def _next_slot(self) -> bool:
        with self._lock:
            if self._issued >= self.max_requests:
                return False
            self._issued += 1
            return True

    def _worker(self, deadline: float) -> None:
        headers = {
            "content-type": "application/json",
            "authorization": f"Bearer {SECRET}",
            "x-forwarded-for": EU_WEST4,
        }
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            while not self._stop.is_set() and time.monotonic() < deadline and self._next_slot():
                event_id = str(uuid.uuid4())
                # a user per event, so the records spread over every partition
                payload = samples.event_stream_payload(
                    KIND, event_id=event_id, onesignal_id=str(uuid.uuid4())
                )
                body = orjson.dumps(payload)
                for attempt in range(self.retries + 1):
                    out = self._post(client, event_id, body, headers)
                    self._record(out)
                    retry = out.status is None or out.status == 429 or out.status >= 500
                    if not retry or attempt == self.retries or self._stop.is_set():
                        break
                    self._stop.wait(self.retry_pause_s)
                if out.status is None and out.error != "timeout":
                    self._stop.wait(self.pause_on_error_s)
                elif out.status is not None:
                    self._stop.wait(self.interval_s)

    def _post(
        self, client: httpx.Client, event_id: str, body: bytes, headers: dict[str, str]
    ) -> Outcome:
        started = time.monotonic()
        try:
            r = client.post(ES, content=body, headers=headers)
        except httpx.TimeoutException:
            return Outcome(event_id, started, time.monotonic(), None, "timeout")
        except httpx.TransportError as exc:
            return Outcome(event_id, started, time.monotonic(), None, type(exc).__name__)
        out = Outcome(
            event_id, started, time.monotonic(), r.status_code, "", r.headers.get("retry-after")
        )
        if out.ok:
            data = r.json()
            out.partition, out.offset = data.get("partition"), data.get("offset")
        return out

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def start(self) -> LoadGenerator:
        self.started_at = time.monotonic()
        deadline = self.started_at + self.duration_s
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, args=(deadline,), name=f"load-{i}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> list[Outcome]:
        """Stop issuing and wait for the requests in flight (each bounded by ``timeout_s``)."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        assert not any(t.is_alive() for t in self._threads), "a load worker did not stop"
        self.stopped_at = time.monotonic()
        with self._lock:
            return list(self.outcomes)

    def join(self) -> list[Outcome]:
        """Let the run end at its deadline, then collect."""
        for t in self._threads:
            t.join(self.duration_s + self.timeout_s + 5)
        return self.stop()

    def wait_for(self, predicate: Any, timeout_s: float) -> bool:
        """Wait (bounded) until ``predicate(outcomes so far)`` holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                snapshot = list(self.outcomes)
            if predicate(snapshot):
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# reading Kafka back


@dataclasses.dataclass(frozen=True)
class Stored:
    event_id: str
    topic: str
    partition: int
    offset: int


def read_ids(
    bootstrap: str,
    topics: Iterable[str],
    timeout_s: float = 30.0,
    *,
    expect: Iterable[str] = (),
) -> list[Stored]:
    """Every record of ``topics`` from offset 0, up to their end offsets, and on until every id
    of ``expect`` is found or ``timeout_s`` passes.

    Reading on matters on a real cluster: right after a leader change the new leader's high
    watermark can trail the old one's for a moment, so an end offset read too early may sit
    below a record that was acknowledged. An expected id still missing at the bound is lost;
    a log that cannot be read to its end is an error, never "lost".
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        api_version=KAFKA_API_VERSION,
        enable_auto_commit=False,
    )
    try:
        deadline = time.monotonic() + timeout_s
        tps: list[TopicPartition] = []
        for topic in topics:
            parts = consumer.partitions_for_topic(topic) or set()
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        # the mock cluster keeps at most 5 MiB per partition and drops the oldest message sets
        # beyond that: a log that no longer starts at 0 cannot be checked, so say so loudly
        truncated = {str(tp): o for tp, o in consumer.beginning_offsets(tps).items() if o > 0}
        assert not truncated, f"broker retention dropped records (lower the load): {truncated}"
        missing = set(expect)
        out: list[Stored] = []
        refreshed = time.monotonic()
        while time.monotonic() < deadline:
            if all(consumer.position(tp) >= end[tp] for tp in tps):
                if not missing:
                    return out
                if time.monotonic() - refreshed > 0.5:
                    end, refreshed = consumer.end_offsets(tps), time.monotonic()
            for tp, recs in consumer.poll(timeout_ms=300).items():
                for rec in recs:
                    event_id = header(rec.headers, "ce_id") or ""
                    missing.discard(event_id)
                    out.append(Stored(event_id, tp.topic, tp.partition, rec.offset))
                    end[tp] = max(end[tp], rec.offset + 1)
        if all(consumer.position(tp) >= end[tp] for tp in tps):
            return out  # read to the end: what is still missing is lost
        raise AssertionError(f"could not read {len(tps)} partitions to their end in {timeout_s}s")
    finally:
        consumer.close(autocommit=False)


class TailReader:
    """Reads ``topic`` from the beginning on a thread while load runs, recording every record.

    For the broker-kill scenario on the embedded mock, whose data dies with it: what it had
    stored can only be known from what was read before the kill. (A killed Apache Kafka node
    keeps its log on disk, so there the topics are also read back after a restart.)
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.stored: dict[tuple[int, int], str] = {}
        self.high: dict[int, int] = {}  # highest offset read per partition
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tail-reader", daemon=True)

    def _run(self) -> None:
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap.split(","),
            api_version=KAFKA_API_VERSION,
            enable_auto_commit=False,
            request_timeout_ms=3000,
            reconnect_backoff_max_ms=500,
        )
        try:
            parts = consumer.partitions_for_topic(self.topic) or set()
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            self._ready.set()
            while not self._stop.is_set():
                for tp, recs in consumer.poll(timeout_ms=100).items():
                    with self._lock:
                        for rec in recs:
                            self.stored[(tp.partition, rec.offset)] = (
                                header(rec.headers, "ce_id") or ""
                            )
                            self.high[tp.partition] = max(
                                self.high.get(tp.partition, -1), rec.offset
                            )
        finally:
            self._ready.set()
            consumer.close(autocommit=False, timeout_ms=2000)

    def start(self) -> TailReader:
        self._thread.start()
        assert self._ready.wait(20), "tail reader did not start"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def verify(self, acked: Iterable[Outcome]) -> tuple[int, list[str], int]:
        """Jepsen's lost-write rule against what was read: (verified, lost ids, unverifiable).

        An acknowledged record at an offset the reader got past must be there with its id;
        one beyond the highest offset read in its partition cannot be judged (reader lag).
        """
        verified, lost, unverifiable = 0, [], 0
        with self._lock:
            for o in acked:
                assert o.partition is not None and o.offset is not None
                if o.offset > self.high.get(o.partition, -1):
                    unverifiable += 1
                elif self.stored.get((o.partition, o.offset)) == o.event_id:
                    verified += 1
                else:
                    lost.append(o.event_id)
        return verified, lost, unverifiable


# ---------------------------------------------------------------------------------------------
# checker and report


@dataclasses.dataclass
class Figures:
    sent: int
    ok: int  # answered 2xx: acknowledged
    fail: int  # answered 4xx/5xx
    info: int  # no answer: indeterminate
    found: int  # acknowledged and read back
    acked_but_lost: int
    unacked_but_present: int
    duplicates: int  # ids stored more than once (extra copies)
    statuses: dict[str, int]
    max_latency_s: float
    max_fail_latency_s: float
    lost_ids: list[str]
    events: int = 0  # distinct ids posted (sent counts every attempt)
    retried: int = 0  # ids posted more than once (after a 5xx or no answer)
    reposts: int = 0  # attempts beyond each id's first: what can explain a duplicate
    # extra copies beyond what the attempts can explain: an id posted k times may be stored up
    # to k times (each attempt is a send of its own; the producer's own retries are deduped by
    # the broker's idempotence), never more
    unexplained_duplicates: int = 0


def check(outcomes: list[Outcome], stored: Iterable[str]) -> Figures:
    """Classify every id (over all its attempts) against the ids read back from Kafka."""
    counts = Counter(stored)
    attempts = Counter(o.event_id for o in outcomes)
    acked = {o.event_id for o in outcomes if o.ok}
    others = attempts.keys() - acked
    lost = sorted(acked - counts.keys())
    statuses = Counter(str(o.status) if o.status is not None else o.error for o in outcomes)
    fails = [o for o in outcomes if o.status is not None and not o.ok]
    return Figures(
        sent=len(outcomes),
        ok=len(acked),
        fail=len(fails),
        info=sum(1 for o in outcomes if o.status is None),
        found=len(acked) - len(lost),
        acked_but_lost=len(lost),
        unacked_but_present=len(others & counts.keys()),
        duplicates=sum(n - 1 for n in counts.values() if n > 1),
        statuses=dict(sorted(statuses.items())),
        max_latency_s=round(max((o.latency for o in outcomes), default=0.0), 3),
        max_fail_latency_s=round(max((o.latency for o in fails), default=0.0), 3),
        lost_ids=lost[:10],
        events=len(attempts),
        retried=sum(1 for n in attempts.values() if n > 1),
        reposts=sum(n - 1 for n in attempts.values()),
        unexplained_duplicates=sum(
            max(0, n - attempts.get(i, 0)) for i, n in counts.items() if i in attempts
        ),
    )


def resume_after(outcomes: list[Outcome], healed_at: float) -> float | None:
    """Seconds from the heal to the first 2xx of a request sent after it."""
    ends = [o.ended for o in outcomes if o.ok and o.started >= healed_at]
    return round(min(ends) - healed_at, 3) if ends else None


@dataclasses.dataclass
class Report:
    scenario: str
    load: str
    faults: str
    inputs: str
    figures: Figures
    duration_s: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def emit(self) -> None:
        f = self.figures
        row = {
            "scenario": self.scenario,
            "load": self.load,
            "faults": self.faults,
            "inputs": self.inputs,
            "duration_s": round(self.duration_s, 2),
            **dataclasses.asdict(f),
            **self.extra,
        }
        print(
            f"\n[fault] {self.scenario}: sent={f.sent} acked={f.ok} found={f.found} "
            f"lost={f.acked_but_lost} dup={f.duplicates} fail={f.fail} info={f.info} "
            f"unacked_present={f.unacked_but_present} max_latency={f.max_latency_s}s "
            f"statuses={f.statuses} {json.dumps(self.extra)}"
        )
        emit_row(row)


def emit_row(row: Mapping[str, Any]) -> None:
    """Append one scenario's figures as a JSON line to ``$FAULT_REPORT`` (when it is set)."""
    if "figures" not in row and "sent" not in row:
        print(f"\n[fault] {json.dumps(row)}")
    path = os.environ.get("FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")


def load_label(load: LoadGenerator, outcomes: list[Outcome]) -> str:
    """``16 clients, 14.2 s, 180 req/s``: what the load held, for a report's ``load``."""
    span = max(load.stopped_at - load.started_at, 1e-6)
    return f"{load.workers} clients, {span:.1f} s, {len(outcomes) / span:.0f} req/s"


def timeline(
    outcomes: list[Outcome], fault_at: float, until: float | None = None
) -> dict[str, Any]:
    """How the answers went from ``fault_at`` on (to ``until``, if given).

    - ``failed``: requests answered non-2xx or not at all that ended in the window;
    - ``first_fail_s``: seconds from the fault to the first of them (None: there was none);
    - ``recovered_s``: seconds from the fault to the end of the first 2xx of a request started
      after the last failed one started: from then on every request got 2xx (None: there was
      no failure, steady state throughout; or no 2xx followed).
    """
    window = [o for o in outcomes if o.ended >= fault_at and (until is None or o.ended <= until)]
    failed = [o for o in window if not o.ok]
    out: dict[str, Any] = {"failed": len(failed), "first_fail_s": None, "recovered_s": None}
    if not failed:
        return out
    out["first_fail_s"] = round(min(o.ended for o in failed) - fault_at, 3)
    last_start = max(o.started for o in failed)
    after = [o.ended for o in outcomes if o.ok and o.started > last_start]
    if after:
        out["recovered_s"] = round(min(after) - fault_at, 3)
    return out


def create_topics(config_path: Path) -> str:
    """``gateway topics create --config FILE``: the topics as an operator would make them."""
    env = dict(os.environ, T_SECRETS=f"{SECRET},{ROTATED}")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "topics", "create", "--config", str(config_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout

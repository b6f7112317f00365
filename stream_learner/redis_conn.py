"""A redis-py client built from :class:`~stream_learner.config.Settings`.

TLS comes from a ``rediss://`` URL (plus the CA and client-certificate
settings); AUTH from the URL or ``redis_username`` / ``redis_password``.

**Redis Cluster** (``redis_cluster``): every role keeps its keys in one hash
slot (the joiner's prefix carries a hash tag, ``sl:{j}:``; the trainer's
state is one key), because the join is one atomic script over all of them.
So a role needs no cluster-aware client, only a connection to the primary
that owns its slot: :func:`make_redis` returns a plain ``redis.Redis`` whose
connections find that primary (``CLUSTER SLOTS`` on the nodes it knows) and
find it again when the slot moves (a ``MOVED`` reply) or the primary stops
answering (a failover). The error itself is raised, and is transient: the
role's retry sends the step again to the new owner (a join step sent twice
has no second effect). The pipelining, ``WAITAOF`` after each step and the
outbox work as on one node, since they all talk to that one primary.

**Redis Sentinel** (``redis_sentinel_master``): ``redis_url`` names the
Sentinels; the client is redis-py's own ``Sentinel.master_for``, whose
connections ask the Sentinels for the master on connect and again after a
failure or a ``READONLY`` reply (the old master demoted). The error of the
step that met the failover is a connection error, transient, so the role's
retry sends it again to the new master.

**Replicas** (``redis_wait_replicas``): replication is asynchronous, so a
write the old primary acknowledged but had not yet sent on is lost in a
failover (Sentinel or Cluster alike). With ``redis_wait_replicas = n`` every
join step and state save waits (``WAITAOF 1 n``, at most a second) until
``n`` replicas wrote it to their own AOF too; fewer is a transient error,
and the write is sent again.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.connection import parse_url
from redis.crc import key_slot

from .config import Settings


def redis_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis.from_url`` beyond the URL itself.

    >>> redis_options(Settings(redis_url="rediss://h:6380/0", redis_password="pw", redis_ssl_ca_certs="/ca.pem"))
    ... # doctest: +NORMALIZE_WHITESPACE
    {'socket_timeout': 10.0, 'socket_connect_timeout': 5.0, 'health_check_interval': 30,
     'password': 'pw', 'ssl_ca_certs': '/ca.pem'}
    """
    opts: dict[str, Any] = {"socket_timeout": 10.0, "socket_connect_timeout": 5.0, "health_check_interval": 30}
    if settings.redis_username:
        opts["username"] = settings.redis_username
    if settings.redis_password:
        opts["password"] = settings.redis_password
    if settings.redis_url.startswith("rediss://"):
        for key in ("redis_ssl_ca_certs", "redis_ssl_certfile", "redis_ssl_keyfile"):
            if getattr(settings, key):
                opts[key.removeprefix("redis_")] = getattr(settings, key)
    return opts


def make_redis(settings: Settings, key: str | None = None) -> redis.Redis:
    """A client for ``settings.redis_url`` with AUTH and TLS applied.

    With ``redis_cluster`` set, a client of the primary that owns ``key``'s
    slot (see the module docstring); every key it is used for must share
    that slot.
    """
    if settings.redis_sentinel_master:
        return _sentinel_master(settings, settings.redis_sentinel_master)
    if not settings.redis_cluster:
        return redis.Redis.from_url(settings.redis_url, **redis_options(settings))
    if key is None:
        raise ValueError("a Redis Cluster client here serves one slot: name a key of it")
    if urlsplit(settings.redis_url).scheme == "unix":
        raise ValueError("redis_cluster needs a redis:// or rediss:// URL, not unix://")
    kwargs: dict[str, Any] = {**parse_url(settings.redis_url), **redis_options(settings)}  # type: ignore[no-untyped-call]
    kwargs.pop("db", None)  # a cluster has database 0 only
    base: type[redis.Connection] = kwargs.pop("connection_class", redis.Connection)
    seed = (str(kwargs.pop("host", "127.0.0.1")), int(kwargs.pop("port", 6379)))
    node = {k: v for k, v in kwargs.items() if k in _NODE_KEYS}
    if base is redis.SSLConnection:
        node["ssl"] = True
    router = SlotRouter([seed], key_slot(key.encode()), node)
    pool = redis.ConnectionPool(connection_class=_slot_connection_class(base), router=router, **kwargs)
    return redis.Redis(connection_pool=pool)


#: How long a WAITAOF that needs replicas waits for them before the write is retried (ms).
REPLICA_WAIT_MS = 1000


def waitaof(replicas: int) -> tuple[str, int, int, int]:
    """The ``WAITAOF`` after a write: the primary's own AOF, and ``replicas`` replicas' (bounded wait).

    >>> waitaof(0), waitaof(1)
    (('WAITAOF', 1, 0, 0), ('WAITAOF', 1, 1, 1000))
    """
    return ("WAITAOF", 1, replicas, REPLICA_WAIT_MS if replicas else 0)


def check_waitaof(reply: Any, replicas: int) -> None:
    """Raise a transient error (the write is retried) if fewer than ``replicas`` replicas confirmed.

    >>> check_waitaof([1, 0], 1)
    Traceback (most recent call last):
    ...
    redis.exceptions.ConnectionError: WAITAOF: 0 of 1 replicas wrote the step to their AOF within 1000 ms
    """
    if replicas and isinstance(reply, list) and len(reply) == 2 and int(reply[1]) < replicas:
        raise redis.ConnectionError(
            f"WAITAOF: {int(reply[1])} of {replicas} replicas wrote the step to their AOF within {REPLICA_WAIT_MS} ms"
        )


def sentinels_of(url: str) -> list[tuple[str, int]]:
    """The Sentinels a ``redis://`` URL names (several hosts, comma-separated; port 26379 by default).

    >>> sentinels_of("redis://u:p@s1:26379,s2,[::1]:26380/0")
    [('s1', 26379), ('s2', 26379), ('::1', 26380)]
    """
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    out = []
    for node in netloc.split(","):
        host, _, port = node.rpartition(":") if node.rfind(":") > node.rfind("]") else (node, "", "")
        out.append((host.strip("[]"), int(port or 26379)))
    return out


def _sentinel_master(settings: Settings, name: str) -> redis.Redis:
    """A client of the master the Sentinels of ``redis_url`` name ``name`` (the module docstring)."""
    from redis.sentinel import Sentinel

    options = redis_options(settings)
    path = urlsplit(settings.redis_url).path.strip("/")
    timeouts = {k: options[k] for k in ("socket_timeout", "socket_connect_timeout")}
    # The Sentinels get the timeouts only: their own AUTH and TLS, if any, are not the master's.
    sentinel = Sentinel(sentinels_of(settings.redis_url), sentinel_kwargs=timeouts, **options)  # type: ignore[no-untyped-call]
    tls = {"ssl": True} if settings.redis_url.startswith("rediss://") else {}
    client: redis.Redis = sentinel.master_for(name, db=int(path or 0), **tls)  # type: ignore[no-untyped-call]
    return client


#: The options a short-lived client asking a node for the slot map needs.
_NODE_KEYS = frozenset(
    {"username", "password", "socket_timeout", "socket_connect_timeout", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"}
)


class SlotRouter:
    """Which primary of a Redis Cluster owns one slot, as last learnt.

    ``owner`` starts at the first seed and is looked up before the first
    connection; :meth:`moved` takes a ``MOVED`` reply's word for it;
    :meth:`relocate` asks the cluster again (after a connection to the
    owner failed). Permanent errors (wrong credentials, TLS) are raised,
    not retried here.
    """

    def __init__(self, seeds: list[tuple[str, int]], slot: int, node_options: dict[str, Any]) -> None:
        self.seeds = list(seeds)
        self.slot = slot
        self.node_options = node_options
        self.owner = seeds[0]
        self.located = False
        self._lock = threading.Lock()

    def moved(self, host: str, port: int) -> None:
        """The slot is at ``host:port`` now (a ``MOVED`` reply said so)."""
        with self._lock:
            self.owner = (host or self.owner[0], int(port))
            self.located = True

    def relocate(self) -> None:
        """Ask the nodes known for the slot's owner; keep the last one if none answers."""
        from .util.retry import is_transient

        with self._lock:
            known = list(dict.fromkeys([self.owner, *self.seeds]))
        last: BaseException | None = None
        for host, port in known:
            try:
                owner = self._ask(host, port)
            except (redis.RedisError, OSError) as exc:
                if not is_transient(exc):
                    raise
                last = exc
                continue
            with self._lock:
                self.owner, self.located = owner, True
                if owner not in self.seeds:
                    self.seeds.append(owner)  # a node to ask next time, should the seed be gone
            return
        if last is not None and not self.located:
            raise last

    def _ask(self, host: str, port: int) -> tuple[str, int]:
        client = redis.Redis(host=host, port=port, **self.node_options)
        try:
            slots = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        finally:
            client.close()
        for start, end, primary, *_ in slots:
            if int(start) <= self.slot <= int(end):
                owner_host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
                return owner_host or host, int(primary[1])  # an empty host: the node asked
        raise redis.exceptions.ClusterDownError(f"CLUSTERDOWN no node of {host}:{port}'s cluster owns slot {self.slot}")


_SLOT_CLASSES: dict[type[redis.Connection], type[redis.Connection]] = {}


def _slot_connection_class(base: type[redis.Connection]) -> type[redis.Connection]:
    """``base`` (plain or TLS) connecting to its router's owner and following ``MOVED`` replies."""
    if base not in _SLOT_CLASSES:

        class SlotConnection(base):  # type: ignore[valid-type,misc]
            def __init__(self, *, router: SlotRouter, **kwargs: Any) -> None:
                self.router = router
                super().__init__(host=router.owner[0], port=router.owner[1], **kwargs)

            def _connect(self) -> Any:
                if not self.router.located:
                    self.router.relocate()
                self.host, self.port = self.router.owner
                try:
                    return super()._connect()
                except OSError:
                    self.router.relocate()  # failed over, perhaps: the next try goes to the new primary
                    raise

            def read_response(self, *args: Any, **kwargs: Any) -> Any:
                try:
                    return super().read_response(*args, **kwargs)
                except redis.exceptions.MovedError as exc:
                    self.router.moved(exc.host, exc.port)
                    self.disconnect()  # replies still pending here belong to the old owner
                    raise

        _SLOT_CLASSES[base] = SlotConnection
    return _SLOT_CLASSES[base]

"""A redis-py client built from :class:`~stream_learner.config.Settings`.

TLS comes from a ``rediss://`` URL (plus the CA and client-certificate
settings); AUTH from the URL or ``redis_username`` / ``redis_password``.
"""

from __future__ import annotations

from typing import Any

import redis

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


def make_redis(settings: Settings) -> redis.Redis:
    """A client for ``settings.redis_url`` with AUTH and TLS applied."""
    return redis.Redis.from_url(settings.redis_url, **redis_options(settings))

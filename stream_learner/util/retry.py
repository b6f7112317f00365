"""Retrying an action while a dependency (Redis, Kafka) is unavailable, stoppably.

An error is *transient* when waiting can cure it: the server is down,
restarting, loading its data, failing over, or too slow to answer. It is
*permanent* when only a person can: wrong credentials, missing permissions,
a TLS certificate or protocol that does not match, a request the server will
never accept. :func:`is_transient` tells them apart for redis-py, both
Kafka transports (:func:`stream_learner.bus.kafka_error_kind`) and the
standard library; :class:`Retry` runs an action until it succeeds,
waiting with a :class:`~stream_learner.util.backoff.Backoff` between tries,
re-raising permanent errors at once and raising :class:`Stopped` as soon as
a stop event is set (a SIGTERM never waits for a dependency to come back).

>>> import threading
>>> attempts = []
>>> def flaky() -> str:
...     attempts.append(1)
...     if len(attempts) < 3:
...         raise ConnectionRefusedError("down")
...     return "done"
>>> quiet = lambda exc, delay: None  # instead of the warning logged before each wait
>>> Retry("demo", backoff=Backoff(0.001, 0.001), on_retry=quiet).call(flaky), len(attempts)
('done', 3)
>>> Retry("demo").call(lambda: int("x"))
Traceback (most recent call last):
...
ValueError: invalid literal for int() with base 10: 'x'
>>> stop = threading.Event(); stop.set()
>>> Retry("demo", stop=stop, on_retry=quiet).call(lambda: (_ for _ in ()).throw(TimeoutError("slow")))
Traceback (most recent call last):
...
stream_learner.util.retry.Stopped: stopped while waiting for demo
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import redis
import structlog

from ..config import Settings, mask_secrets
from ..errors import StreamLearnerError
from .backoff import Backoff

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: redis-py errors that a wait can cure. ``AuthenticationError`` and
#: ``AuthorizationError`` subclass ``ConnectionError`` and are excluded below.
_REDIS_TRANSIENT: tuple[type[BaseException], ...] = (
    redis.ConnectionError,  # refused, reset, closed, and BusyLoadingError (LOADING) and MaxConnectionsError
    redis.TimeoutError,
    redis.exceptions.TryAgainError,  # a cluster slot migrating
    redis.exceptions.AskError,  # and MovedError: the slot moved; the client asks its new owner next
    redis.exceptions.ClusterDownError,  # and MasterDownError
    redis.exceptions.ReadOnlyError,  # a replica that is being promoted
    redis.exceptions.OutOfMemoryError,  # maxmemory: eviction or an operator frees it
)
_REDIS_PERMANENT: tuple[type[BaseException], ...] = (
    redis.AuthenticationError,  # NOAUTH, WRONGPASS
    redis.exceptions.AuthorizationError,
    redis.exceptions.AuthenticationWrongNumberOfArgsError,
    redis.exceptions.NoPermissionError,  # NOPERM: an ACL forbids the command
)
#: TLS errors that mean "the connection dropped", not "the configuration is wrong".
_SSL_TRANSIENT: tuple[type[BaseException], ...] = (
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
    ssl.SSLSyscallError,
)


class Stopped(StreamLearnerError):
    """The stop event was set while an action waited for a dependency; the action did not complete."""


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (redis-py wraps socket errors)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """True if waiting may cure ``exc`` (retry it), False if only a person can (raise it).

    Transient: connection refused, reset or timed out, a server loading its
    data or failing over, a broker without a leader, the Kafka
    client's retriable errors (kafka-python's ``retriable``, librdkafka's
    ``retriable()``). Permanent: authentication and authorization
    failures, TLS certificate or protocol mismatches (anywhere in the
    exception's chain, since redis-py wraps them in ``ConnectionError``),
    a request the server refuses as such (a message too large, a script
    error), and anything unknown.

    >>> is_transient(redis.ConnectionError("Connection refused")), is_transient(redis.AuthenticationError("WRONGPASS"))
    (True, False)
    >>> from stream_learner.bus.kafka_python import errors as kafka_errors
    >>> is_transient(kafka_errors.KafkaTimeoutError()), is_transient(kafka_errors.TopicAuthorizationFailedError())
    (True, False)
    >>> is_transient(kafka_errors.MessageSizeTooLargeError()), is_transient(ValueError("bad"))
    (False, False)
    """
    from ..bus import kafka_error_kind  # the transport's classification, for either Kafka client

    chain = _chain(exc)
    for link in chain:
        if isinstance(link, ssl.SSLError) and not isinstance(link, _SSL_TRANSIENT):
            return False  # certificate verification, wrong protocol or version: configuration
    if isinstance(exc, _REDIS_PERMANENT):
        return False
    if isinstance(exc, _REDIS_TRANSIENT):
        return True
    kind = kafka_error_kind(exc)
    if kind is not None:
        return kind == "transient"
    # The standard library's own: a socket that was refused, reset or timed out.
    return isinstance(exc, (ConnectionError, TimeoutError))


def dependency_failure(exc: BaseException, settings: Settings) -> str | None:
    """One clear line for a permanent error of Redis or Kafka (``None`` for anything else).

    >>> from stream_learner.config import Settings
    >>> dependency_failure(redis.AuthenticationError("invalid password"), Settings(redis_url="redis://:pw@r:6379/0"))
    'cannot authenticate to Redis at r:6379: AuthenticationError: invalid password'
    >>> dependency_failure(ValueError("x"), Settings()) is None
    True
    """
    from ..bus import kafka_error_kind

    text = f"{type(exc).__name__}: {mask_secrets(str(exc))}"
    redis_at = _host_port(settings.redis_url)
    kafka_at = settings.bootstrap_servers
    tls = next((link for link in _chain(exc) if isinstance(link, ssl.SSLError)), None)
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)):
        return f"cannot authenticate to Redis at {redis_at}: {text}"
    if isinstance(exc, (redis.exceptions.AuthorizationError, redis.exceptions.NoPermissionError)):
        return f"Redis at {redis_at} refuses a command the role needs (ACL): {text}"
    if isinstance(exc, redis.RedisError):
        if tls is not None:
            return f"TLS with Redis at {redis_at} failed: {text}"
        return f"Redis at {redis_at} refused the role for good: {text}"
    kind = kafka_error_kind(exc)
    if kind == "authentication":
        return f"cannot authenticate to Kafka at {kafka_at}: {text}"
    if kind == "authorization":
        return f"Kafka at {kafka_at} refuses what the role needs (ACL): {text}"
    if tls is not None:
        return f"TLS with Kafka at {kafka_at} failed: {text}"
    if kind is not None:
        return f"Kafka at {kafka_at} refused the role for good: {text}"
    return None


def _host_port(url: str) -> str:
    parsed = urlsplit(url)
    return f"{parsed.hostname}:{parsed.port or 6379}" if parsed.hostname else mask_secrets(url)


class Retry:
    """Runs actions until they succeed while their errors are transient (see the module docstring).

    ``what`` names the dependency in logs and in :class:`Stopped`;
    ``backoff`` paces the tries (a fresh one per :meth:`call`, from ``first``
    to ``limit`` seconds with jitter unless given); ``classify`` decides which
    errors to retry (:func:`is_transient` by default); ``on_retry(exc,
    delay)`` runs before each wait instead of the default warning (log and
    count there). A wait ends at once when ``stop`` is set, raising
    :class:`Stopped` from the last error. ``wait(delay)``, if given, waits
    instead of sleeping (the joiner polls its paused consumer, which keeps
    its group membership); it should return early once ``stop`` is set.
    """

    def __init__(
        self,
        what: str,
        *,
        stop: threading.Event | None = None,
        backoff: Backoff | None = None,
        first: float = 0.1,
        limit: float = 5.0,
        classify: Callable[[BaseException], bool] = is_transient,
        on_retry: Callable[[BaseException, float], None] | None = None,
        wait: Callable[[float], None] | None = None,
    ) -> None:
        self.what = what
        self.stop = stop
        self.wait = wait
        self._backoff = backoff
        self.first = first
        self.limit = limit
        self.classify = classify
        self.on_retry = on_retry

    def call(self, action: Callable[[], T]) -> T:
        """``action()``'s result, once it succeeds; a permanent error is raised as it is."""
        backoff = self._backoff or Backoff(self.first, self.limit, jitter=0.2)
        backoff.reset()
        failed = False
        while True:
            try:
                result = action()
            except Exception as exc:
                if not self.classify(exc):
                    raise
                delay = backoff.next_delay()
                if self.on_retry is not None:
                    self.on_retry(exc, delay)
                else:
                    log.warning(
                        "dependency_unavailable",
                        dependency=self.what,
                        error=f"{type(exc).__name__}: {exc}",
                        retry_in_s=round(delay, 3),
                    )
                failed = True
                if self.wait is not None:
                    self.wait(delay)
                    stopped = self.stop is not None and self.stop.is_set()
                else:
                    stopped = (self.stop if self.stop is not None else threading.Event()).wait(delay)
                if stopped:
                    raise Stopped(f"stopped while waiting for {self.what}") from exc
                continue
            if failed and self.on_retry is None:
                log.info("dependency_back", dependency=self.what)
            return result

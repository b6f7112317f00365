"""The serving node's HTTP front: an asyncio server bounded in connections, admission, work and time.

:class:`HttpFront` holds every connection on one event loop thread, reads
requests, admits them within :class:`NodeLimits`, answers small bodies on
the loop and hands large ones to bounded worker threads, writes answers
and drains on stop; :class:`~stream_learner.serving.node.ServingNode` is
what answers (``_get`` for a GET, ``_answer_predict`` and
``_answer_heavy`` for a ``POST /predict`` body) and owns the state this
front reads.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import structlog

from ..config import Settings
from ..metrics import Metrics
from .telemetry import ServingMetrics

log = structlog.get_logger(__name__)

#: Largest request body accepted by default (``serving_max_body_bytes``).
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_BATCH = 10_000
#: Largest request line and headers.
MAX_HEAD_BYTES = 64 * 1024
#: A body at most this large is answered on the event loop itself: never queued behind large batches.
LIGHT_BYTES = 64 * 1024
#: A large body shed for overload is answered (503) after this long (seconds).
SHED_DELAY_S = 1.0


@dataclass(frozen=True)
class NodeLimits:
    """What the HTTP node gives its clients, at most (the ``serving_*`` settings of the same names).

    * ``max_connections`` open at once; one more closes the connection idle
      the longest (never one with a request in flight), or is refused if
      none is idle;
    * ``max_inflight`` requests admitted at once, and their bodies at most
      ``4 * max_body_bytes`` together (checked on ``Content-Length``,
      before a body is read); beyond: 503 with ``Retry-After``. Bodies of
      up to :data:`LIGHT_BYTES` count apart (``max_inflight`` of them), so
      large batches never shed a single request;
    * ``max_body_bytes`` a body (413), ``max_batch_values`` the work one
      request may ask for: the feature values of all its instances, and
      instances times the model's features (413);
    * ``request_timeout_s`` from a request's first byte to its last, and to
      its answer being taken: a slow client is cut by total time, not per
      byte; ``idle_timeout_s`` a kept-alive connection may wait for its next request;
    * ``workers`` threads decode and predict large bodies, one at a time,
      paced to half of the time while small requests come; bodies of up to
      :data:`LIGHT_BYTES` are answered on the event loop itself (a fraction
      of a millisecond each, and no hand-over between threads, each of which
      waits for the GIL under load), so a client sending single requests
      never waits behind large batches.
    """

    max_connections: int = 1024
    max_inflight: int = 64
    max_body_bytes: int = MAX_BODY_BYTES
    max_batch_values: int = 100_000
    request_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    workers: int = 2
    max_batch: int = MAX_BATCH

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeLimits:
        """The limits the settings give."""
        return cls(
            max_connections=settings.serving_max_connections,
            max_inflight=settings.serving_max_inflight,
            max_body_bytes=settings.serving_max_body_bytes,
            max_batch_values=settings.serving_max_batch_values,
            request_timeout_s=settings.serving_request_timeout_s,
            idle_timeout_s=settings.serving_idle_timeout_s,
            workers=settings.serving_workers,
        )


class HttpFront:
    """The HTTP server of a serving node (see the module docstring); the node sets these attributes."""

    limits: NodeLimits
    metrics: Metrics
    telemetry: ServingMetrics
    _socket: Any
    _heavy: ThreadPoolExecutor
    _last_light: float
    _loop: asyncio.AbstractEventLoop | None
    _stopped: asyncio.Event | None
    _ready: threading.Event
    _connections: dict[_Connection, None]
    _inflight: int
    _inflight_bytes: int
    _inflight_light: int

    def _get(self, path: str) -> tuple[int, Mapping[str, Any] | bytes, str]:
        """Status, body and content type of a GET."""
        raise NotImplementedError

    def _answer_predict(self, body: bytes) -> tuple[int, Mapping[str, Any]]:
        """Status and JSON answer of a ``POST /predict`` body (a light one, on the loop)."""
        raise NotImplementedError

    def _answer_heavy(self, body: bytes) -> tuple[int, Mapping[str, Any]]:
        """The same for a large body, on a worker thread."""
        raise NotImplementedError

    # -- the event loop --------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:  # the loop thread must not print a raw traceback
            log.exception("serving_http_failed")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_log_loop_exception)
        self._loop, self._stopped = loop, asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self._socket, limit=MAX_HEAD_BYTES)
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            server.close()
            await self._drain()

    async def _drain(self) -> None:
        """Stop accepting, close idle connections, let requests in flight finish (bounded), abort the rest."""
        for connection in list(self._connections):
            if connection.idle:
                connection.close()
        # Bounded well inside a container's default 10 s stop grace, slow clients or not.
        deadline = time.monotonic() + min(self.limits.request_timeout_s, 5.0)
        while any(not c.idle for c in self._connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self._connections):
            connection.writer.transport.abort()
        await asyncio.sleep(0)

    def _admit_connection(self, connection: _Connection) -> bool:
        """Room for one more connection: close the one idle the longest if need be."""
        if len(self._connections) >= self.limits.max_connections:
            idle = next((c for c in self._connections if c.idle), None)
            if idle is None:
                return False
            self.telemetry.http_refused.labels(reason="evicted_idle").inc()
            # Out of the count at once: its coroutine notices the close later.
            self._connections.pop(idle, None)
            idle.idle = False
            idle.close()
        self._connections[connection] = None
        self.telemetry.http_connections.set(len(self._connections))
        return True

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(writer)
        if not self._admit_connection(connection):
            self.telemetry.http_refused.labels(reason="connections").inc()
            writer.write(
                _response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "too many connections"}, close=True, retry_after=1)
            )
            writer.close()
            return
        try:
            while await self._one_request(connection, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, OSError):
            pass  # the client went away or was too slow: nothing to answer, nothing to log
        finally:
            self._connections.pop(connection, None)
            self.telemetry.http_connections.set(len(self._connections))
            connection.close()

    async def _one_request(
        self, connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read, answer and write one request; False when the connection is to be closed."""
        limits = self.limits
        # Move this connection to the end (the newest) of the eviction order while it waits.
        self._connections.pop(connection, None)
        self._connections[connection] = None
        connection.idle = True
        try:
            first = await asyncio.wait_for(reader.read(1), limits.idle_timeout_s)
        except TimeoutError:
            return False
        if not first:
            return False
        connection.idle = False
        deadline = time.monotonic() + limits.request_timeout_s
        try:
            head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), limits.request_timeout_s)
        except TimeoutError:
            self.telemetry.http_refused.labels(reason="timeout").inc()
            await self._write(
                writer, _response(HTTPStatus.REQUEST_TIMEOUT, {"error": "request too slow"}, close=True), deadline + 1
            )
            return False
        except (asyncio.LimitOverrunError, ValueError):
            await self._write(
                writer,
                _response(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    {"error": f"request line and headers over {MAX_HEAD_BYTES} bytes"},
                    close=True,
                ),
                deadline,
            )
            return False
        try:
            method, path, version, headers = _parse_head(head)
        except ValueError as exc:
            await self._write(writer, _response(HTTPStatus.BAD_REQUEST, {"error": str(exc)}, close=True), deadline)
            return False
        # A node that is stopping answers this request and then closes the connection.
        keep_alive = _keep_alive(version, headers) and not (self._stopped is not None and self._stopped.is_set())
        if method == "GET":
            status, body, content_type = self._get(path)
            await self._write(
                writer, _response(status, body, close=not keep_alive, content_type=content_type), deadline
            )
            return keep_alive
        if method != "POST":
            await self._write(
                writer, _response(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"no method {method}"}, close=True), deadline
            )
            return False
        if path != "/predict":
            # The body is not read: the connection cannot be reused.
            await self._write(
                writer, _response(HTTPStatus.NOT_FOUND, {"error": f"no such path {path}"}, close=True), deadline
            )
            return False
        length = _content_length(headers)
        if length is None or length < 0 or length > limits.max_body_bytes:
            status = (
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE
                if (length or 0) > limits.max_body_bytes
                else HTTPStatus.LENGTH_REQUIRED
            )
            self.telemetry.http_refused.labels(reason="body").inc()
            await self._write(
                writer,
                _response(
                    status,
                    {"error": f"a body of 0 to {limits.max_body_bytes} bytes with its Content-Length"},
                    close=True,
                ),
                deadline,
            )
            return False
        # Admission before the body is read: what is buffered and decoded at once is bounded. Light
        # requests have their own count, so that large batches never shed a single request.
        light = length <= LIGHT_BYTES
        if light:
            self._last_light = time.monotonic()
            overloaded = self._inflight_light >= limits.max_inflight
        else:
            overloaded = (
                self._inflight >= limits.max_inflight or self._inflight_bytes + length > 4 * limits.max_body_bytes
            )
        if overloaded:
            self.telemetry.http_refused.labels(reason="overload").inc()
            if not light:
                # Shed after its Retry-After, not at once: a client retrying in a loop otherwise
                # costs the event loop a connection per attempt (a waiting coroutine costs nothing).
                await asyncio.sleep(SHED_DELAY_S)
            await self._write(
                writer,
                _response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "overloaded, retry"}, close=True, retry_after=1),
                deadline,
            )
            return False
        if light:
            self._inflight_light += 1
        else:
            self._inflight += 1
            self._inflight_bytes += length
        self.telemetry.http_inflight.set(self._inflight + self._inflight_light)
        try:
            try:
                body = await asyncio.wait_for(reader.readexactly(length), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.telemetry.http_refused.labels(reason="timeout").inc()
                await self._write(
                    writer,
                    _response(HTTPStatus.REQUEST_TIMEOUT, {"error": "request too slow"}, close=True),
                    deadline + 1,
                )
                return False
            if light:
                # A small body costs a fraction of a millisecond: answered on the loop itself. Handed to
                # a thread, it would wait for the GIL at each hand-over (a convoy under load).
                status, answer = self._answer_predict(body)
            else:
                loop = asyncio.get_running_loop()
                status, answer = await loop.run_in_executor(self._heavy, self._answer_heavy, body)
            del body
        finally:
            if light:
                self._inflight_light -= 1
            else:
                self._inflight -= 1
                self._inflight_bytes -= length
            self.telemetry.http_inflight.set(self._inflight + self._inflight_light)
        reply = _response(status, answer, close=not keep_alive)
        # Timed from its first byte to its reply being handed to the socket (observed first, so that
        # a client that has its answer finds it counted).
        self.metrics.serving_request_seconds.labels(code=str(int(status))).observe(
            time.monotonic() - (deadline - limits.request_timeout_s)
        )
        await self._write(writer, reply, deadline)
        return keep_alive

    async def _write(self, writer: asyncio.StreamWriter, data: bytes, deadline: float) -> None:
        """Write an answer; a client that does not take it within the request's time is cut."""
        writer.write(data)
        try:
            await asyncio.wait_for(writer.drain(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            self.telemetry.http_refused.labels(reason="timeout").inc()
            writer.transport.abort()
            raise


class _Connection:
    """One client connection: its writer, and whether it waits for a request (evictable)."""

    __slots__ = ("idle", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.idle = False

    def close(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.close()


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own complaints (a transport reset under it, ...) go to the JSON log, not stderr."""
    exc = context.get("exception")
    if isinstance(exc, (ConnectionError, TimeoutError)):
        log.debug("serving_http_connection_error", error=str(exc))
        return
    log.warning(
        "serving_http_loop_error",
        message=context.get("message"),
        error=f"{type(exc).__name__}: {exc}" if exc is not None else None,
    )


_STATUS_TEXT = {s.value: s.phrase for s in HTTPStatus}


def _response(
    status: int,
    body: Mapping[str, Any] | bytes,
    *,
    close: bool,
    content_type: str = "application/json",
    retry_after: int | None = None,
) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [
        f"HTTP/1.1 {int(status)} {_STATUS_TEXT.get(int(status), '')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Connection: close" if close else "Connection: keep-alive",
    ]
    if retry_after is not None:
        lines.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Method, path, HTTP version and headers (lower-case names) of a request head; ValueError if it is not one."""
    text = head.decode("latin-1")
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x request line: {request_line[:100]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"not a header line: {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        headers.pop("content-length", None)  # chunked bodies are refused (411), as before
    return parts[0], parts[1], parts[2], headers


def _content_length(headers: Mapping[str, str]) -> int | None:
    try:
        return int(headers.get("content-length", ""))
    except ValueError:
        return None


def _keep_alive(version: str, headers: Mapping[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"

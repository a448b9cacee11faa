"""The pass-through's HTTP/1.1 client: pooled keep-alive connections, one ``httptools``
parser per connection, response bodies handed over as they arrive.

Written for the hot path (bench/RESULTS.md: ``aiohttp``'s client cost ~100 µs of CPU per
proxied request, this one ~20 µs), so it does only what the proxy needs: one request per
connection at a time, no redirects, cookies, decompression or proxies. Health checks and
everything else off the hot path keep using ``aiohttp``.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import NamedTuple, cast

import httptools

# A reader slower than its upstream: stop reading from the upstream socket above this much
# buffered body, go on below a quarter of it (the kernel's buffers then hold the rest).
_READ_HIGH_WATER = 256 * 1024
_READ_LOW_WATER = _READ_HIGH_WATER // 4
# Idle connections are closed after this long: sooner than uvicorn's 5 s keep-alive (vLLM's
# server), so it is the gateway that closes an idle connection, never the engine just as the
# gateway writes the next request to it.
_IDLE_SECONDS = 4.0
# An answer's header lines together; more is not an HTTP answer worth relaying.
_MAX_HEADER_BYTES = 256 * 1024
# The parser keeps a header (or trailer) line until it ends: bytes read without the parser
# getting anywhere (no headers complete, no body) are bounded by this.
_MAX_UNPARSED_BYTES = 1024 * 1024
# Requests that may be sent again when a reused connection dies before any byte of answer
# (RFC 9110 9.2.2). Any other request may have been acted on: it is never sent twice.
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class UpstreamError(Exception):
    """The upstream could not be reached, or broke off or garbled its answer."""


class Origin(NamedTuple):
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Response:
    """One upstream answer: ``status`` and ``headers`` once returned by
    ``ConnectionPool.send``, then the body through ``read()``. Call ``release()`` when done
    with it (the connection goes back to the pool if it can), or ``abort()`` to drop it."""

    def __init__(self, connection: _Connection, head_only: bool) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.received = False  # any byte of the answer, interim 1xx included
        self.complete = False
        self.keep_alive = False
        self._connection = connection
        self._head_only = head_only
        self._interim = False
        self._started: asyncio.Future[None] = connection.loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None  # only while read() waits

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- what the connection's parser feeds -----------------------------------------------

    def _on_headers(self, status: int, keep_alive: bool) -> None:
        if 100 <= status < 200:  # interim (e.g. 100 Continue): the real answer follows
            self.headers = []
            self._interim = True
            return
        self.status = status
        self.keep_alive = keep_alive and not self._head_only
        if not self._started.done():
            self._started.set_result(None)
        if self._head_only:  # a HEAD answer has headers only, whatever they announce
            self._finish()

    def _on_body(self, chunk: bytes) -> None:
        if self.complete:
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _READ_HIGH_WATER and not self._paused:
            self._paused = True
            self._connection.pause_reading()
        self._wake()

    def _on_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self.status:  # no headers yet: not this request's answer
            self._fail(UpstreamError("upstream sent an answer without a status line"))
            return
        self._finish()

    def _finish(self) -> None:
        self.complete = True
        self._connection.response_done(self)
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self.complete or self._error is not None:
            return
        self._error = error
        if not self._started.done():
            self._started.set_result(None)  # wait_started() raises
        self._wake()

    # -- what the proxy calls -------------------------------------------------------------

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    @property
    def drained(self) -> bool:
        """The answer is complete and every byte of it has been read."""
        return self.complete and not self._chunks

    async def wait_started(self) -> None:
        await self._started
        if self._error is not None:
            raise self._raised()

    async def read(self) -> bytes:
        """The body bytes that have arrived since the last call (waiting for some if none
        have); ``b""`` at the end. Raises ``UpstreamError`` if the answer broke off."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._raised()
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft() if len(self._chunks) == 1 else self._take_all()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < _READ_LOW_WATER:
            self._paused = False
            self._connection.resume_reading()
        return chunk

    def _raised(self) -> UpstreamError:
        """A fresh copy of the error to raise: the kept one, raised, would hold a traceback
        whose frames hold this response, a cycle per broken answer for the collector."""
        assert self._error is not None
        return UpstreamError(*self._error.args)

    def _take_all(self) -> bytes:
        chunk = b"".join(self._chunks)
        self._chunks.clear()
        return chunk

    def release(self) -> None:
        """Done with the answer: a complete keep-alive answer frees its connection for the
        next request; anything else closes it (an unread body cannot be skipped cheaply)."""
        if self._paused:
            self._paused = False
            self._connection.resume_reading()
        self._connection.finish(self, reusable=self.complete and self.keep_alive)

    def abort(self) -> None:
        """Drop the answer and its connection now (the upstream sees the connection close).
        Once released, it does nothing: the connection may carry another request by then."""
        self._fail(UpstreamError("aborted"))
        self._connection.finish(self, reusable=False)


class _Connection(asyncio.Protocol):
    """One upstream connection; carries at most one request at a time."""

    def __init__(
        self, pool: ConnectionPool, origin: Origin, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.pool = pool
        self.origin = origin
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
        self.loop = loop
        self.closed = False
        self.idle_since = 0.0  # when the last answer was complete: the upstream's idle clock
        self._unparsed_bytes = 0  # read since the parser last got somewhere
        self._header_bytes = 0  # in the answer's header lines
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._owner: Response | None = None  # holds the connection until released
        self._response: Response | None = None  # being parsed (None once complete)

    def start(self, response: Response, request: bytes) -> None:
        assert self._transport is not None
        self._owner = self._response = response
        self._unparsed_bytes = self._header_bytes = 0
        self._transport.write(request)

    def pause_reading(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()

    def response_done(self, response: Response) -> None:
        if self._response is response:
            self._response = None
            self.idle_since = time.monotonic()

    def finish(self, response: Response, reusable: bool) -> None:
        if self._owner is not response:  # released already; may be someone else's by now
            return
        self._owner = self._response = None
        if reusable and not self.closed:
            self.pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        response.received = True
        parser = self._parser
        if parser is None:
            return
        self._unparsed_bytes += len(data)
        if self._unparsed_bytes > _MAX_UNPARSED_BYTES:
            self._broken(UpstreamError("upstream sent a header or trailer line over 1 MiB"))
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(UpstreamError("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._broken(UpstreamError(f"upstream sent invalid HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self._response
        self._owner = self._response = None  # a dead connection belongs to nobody
        # The parser and the transport refer back to this protocol: let it go uncollected.
        self._parser = None
        self._transport = None
        if response is None or response.complete:
            return
        # Neither a length nor chunked framing (HTTP/1.0 style): the end of the connection
        # is the end of the body; a reset is not.
        ends_at_close = (
            response.header(b"content-length") is None
            and response.header(b"transfer-encoding") is None
        )
        if response.status and exc is None and ends_at_close:
            response._finish()  # a body delimited by the end of the connection
            return
        reason = f": {exc}" if exc else ""
        response._fail(UpstreamError(f"upstream {self.origin} closed the connection{reason}"))

    def _broken(self, error: UpstreamError) -> None:
        response = self._response
        self.close()
        if response is not None:
            response._fail(error)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        response = self._response
        if response is None or response.status:
            # A second answer (or bytes after the end of one) to a single request: what
            # follows would be taken for the next request's answer. Never reuse this one.
            self.close()

    # Once closed (a broken answer), whatever else the same read held is not parsed into it.

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None and not self.closed:
            self._header_bytes += len(name) + len(value)
            if self._header_bytes > _MAX_HEADER_BYTES:
                self._broken(UpstreamError("upstream sent over 256 KiB of headers"))
                return
            self._response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._response is not None and self._parser is not None and not self.closed:
            status = self._parser.get_status_code()
            if not 100 <= status <= 599:
                self._broken(UpstreamError(f"upstream sent an invalid status {status}"))
                return
            self._unparsed_bytes = 0
            self._response._on_headers(status, self._parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self.closed:
            self._unparsed_bytes = 0
            self._response._on_body(body)

    def on_message_complete(self) -> None:
        if self._response is not None and not self.closed:
            self._response._on_complete()


class ConnectionPool:
    """Keep-alive connections per origin, most recently used first."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        idle_seconds: float = _IDLE_SECONDS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.idle_seconds = idle_seconds
        self._idle: dict[Origin, list[_Connection]] = {}
        self._sweep: asyncio.TimerHandle | None = None  # due while any connection is idle
        self._tls = tls  # the system's trusted CAs unless given

    async def send(
        self,
        origin: Origin,
        request: bytes,
        *,
        method: str = "POST",
        gone: asyncio.Future[None] | None = None,
        stopped: asyncio.Future[None] | None = None,
    ) -> Response:
        """Writes ``request`` (head and body, already encoded, for ``method``) and returns
        the answer once its headers are in. When ``gone`` (the client left) or ``stopped``
        (the upstream is being stopped) completes first, the connection is dropped at once
        and ``UpstreamError`` raised. A GET, HEAD, OPTIONS or TRACE on a
        reused connection that died before any byte of answer is sent once more on a new
        connection; any other request may have been acted on, and is never sent twice."""
        head_only = method == "HEAD"
        for attempt in range(2):
            connection = self._idle_connection(origin)
            reused = connection is not None
            if connection is None:
                connection = await self._connect(origin, gone)
            if gone is not None and gone.done():
                connection.close()
                raise UpstreamError("the client left before the request was sent")
            if connection.closed:  # closed by the upstream as soon as it was opened
                raise UpstreamError(f"upstream {origin} closed the connection at once")
            response = Response(connection, head_only)

            def drop(_: object, response: Response = response) -> None:
                response.abort()

            if gone is not None:
                gone.add_done_callback(drop)
            if stopped is not None:
                stopped.add_done_callback(drop)
            connection.start(response, request)
            try:
                await response.wait_started()
                return response
            except UpstreamError:
                response.abort()
                stale = reused and not response.received
                replay = attempt == 0 and stale and method in _REPLAYABLE
                given_up = any(f is not None and f.done() for f in (gone, stopped))
                if replay and not given_up:
                    continue
                raise
            except BaseException:
                response.abort()
                raise
            finally:
                if gone is not None:
                    gone.remove_done_callback(drop)
                if stopped is not None:
                    stopped.remove_done_callback(drop)
        raise AssertionError("unreachable")

    def put_back(self, connection: _Connection) -> None:
        self._idle.setdefault(connection.origin, []).append(connection)
        if self._sweep is None:
            self._sweep = connection.loop.call_later(self.idle_seconds, self._close_idle)

    def _close_idle(self) -> None:
        """Close the connections idle for ``idle_seconds``, and come back when the next one
        will be: an upstream that keeps connections open longer is not left holding them."""
        self._sweep = None
        now = time.monotonic()
        self._close_idle_before(now - self.idle_seconds)
        oldest = [idle[0] for idle in self._idle.values() if idle]
        if oldest:
            first = min(oldest, key=lambda connection: connection.idle_since)
            due = first.idle_since + self.idle_seconds - now
            self._sweep = first.loop.call_later(max(due, 0.0) + 0.01, self._close_idle)

    def _close_idle_before(self, moment: float) -> None:
        """Close connections idle since before ``moment``. The list is in the order they were
        put back, so nearly all of them are at its front; one missed here is closed when taken."""
        for idle in self._idle.values():
            while idle and idle[0].idle_since < moment:
                idle.pop(0).close()

    def forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self.idle_seconds:
                return connection
            connection.close()
        return None

    async def _connect(
        self, origin: Origin, gone: asyncio.Future[None] | None = None
    ) -> _Connection:
        """A new connection; given up at once when ``gone`` completes first."""
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.tls else None
        connecting = asyncio.ensure_future(
            loop.create_connection(
                lambda: _Connection(self, origin, loop),
                origin.host,
                origin.port,
                ssl=tls,
                server_hostname=origin.host if tls else None,
            )
        )

        def give_up(_: object) -> None:
            connecting.cancel()

        if gone is not None:
            gone.add_done_callback(give_up)
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await connecting
        except asyncio.CancelledError:
            if gone is not None and gone.done() and connecting.cancelled():
                raise UpstreamError("the client left while connecting") from None
            raise
        except TimeoutError:
            raise UpstreamError(
                f"connecting to {origin} timed out after {self.connect_timeout:g} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot connect to {origin}: {exc}") from exc
        finally:
            if gone is not None:
                gone.remove_done_callback(give_up)
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

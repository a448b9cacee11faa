"""uvicorn's server, told when it stops taking requests, and its HTTP/1.1 protocol
(httptools) with the limits it lacks on a request's head.

uvicorn bounds neither the size of a request's head (request line and headers, which
httptools buffers whole) nor the time a client may take to send it: without any key, a
client could fill the gateway's memory with one endless header, or hold its connections by
sending a byte now and then. Real clients send a head of a few KiB in one go, so the limits
are far beyond them (nginx allows 32 KiB and 60 s).

Most heads arrive whole in one read: then no timer is armed, and a request costs three
comparisons more.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from types import FrameType

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import BadRequest, GatewayError, HeadersTooLarge, RequestTimeout

MAX_HEAD_BYTES = 64 * 1024


# A second SIGINT sooner than this after the first is the same Ctrl-C, delivered twice:
# `uv run` passes on to its child the signal that their process group got already.
_SAME_SIGNAL_SECONDS = 0.5


class GatewayServer(uvicorn.Server):
    """Calls ``on_stopping`` as it stops taking requests: before the drain of requests under
    way, which the app's lifespan shutdown only follows; and ``on_forced_exit`` after a
    second Ctrl-C, for which uvicorn skips the lifespan shutdown (the engines must still
    stop)."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_stopping: Callable[[], None],
        on_forced_exit: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(config)
        self._on_stopping = on_stopping
        self._on_forced_exit = on_forced_exit
        self._first_signal_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._first_signal_at is None:
            self._first_signal_at = now
        elif sig == signal.SIGINT and now - self._first_signal_at < _SAME_SIGNAL_SECONDS:
            return
        super().handle_exit(sig, frame)
        if self.force_exit and self._loop is not None:
            # From Python 3.12 the server waits for its open connections even then: cut them
            # (in the loop's thread: this is a signal handler).
            self._loop.call_soon_threadsafe(self._cut_connections)

    def _cut_connections(self) -> None:
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_stopping()
        await super().shutdown(sockets)
        if self.force_exit:
            await self._on_forced_exit()


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Refuses a head still incomplete after ``MAX_HEAD_BYTES`` (431: checked per read, so a
    head that arrives whole in one read may be larger) or ``head_seconds`` after
    its first byte (408), and closes a connection that sends nothing for ``head_seconds``
    after opening."""

    head_seconds = 30.0

    _head_started = False  # a request's head has begun and is not complete
    _in_body = False  # between a head's end and its message's end
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_seconds, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_body:
            super().data_received(data)
            return
        self._head_bytes += len(data)
        super().data_received(data)
        if not self._head_started or self.transport.is_closing():
            return
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(HeadersTooLarge("the request's headers are over 64 KiB"))
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_seconds, self._head_too_slow)

    def on_message_begin(self) -> None:
        self._head_started = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_started = False
        self._in_body = True
        self._head_bytes = 0
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_started:
            self._refuse(RequestTimeout("the request's headers took too long to arrive"))
        elif self.cycle is None:
            self.transport.close()  # opened and never used

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a request it cannot parse is text/plain: make it OpenAI's.
        self._refuse(BadRequest(f"malformed HTTP request ({msg.rstrip('.').lower()})"))

    def _refuse(self, error: GatewayError) -> None:
        """Answer ``error`` and close: written here, since no request (and no app) has it."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # an answer is under way on this connection: no room for another
            return
        body = error.body_bytes()
        head = [b"HTTP/1.1 %d %s" % (error.status, HTTPStatus(error.status).phrase.encode())]
        head += [b"%s: %s" % header for header in error.headers()]
        head += [b"content-length: %d" % len(body), b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()


def bounded_http_protocol(head_seconds: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with its time limit set."""
    return type(
        "BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"head_seconds": head_seconds}
    )

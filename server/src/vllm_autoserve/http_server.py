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
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from http import HTTPStatus
from types import FrameType

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .errors import BadRequest, GatewayError, HeadersTooLarge, RequestTimeout

MAX_HEAD_BYTES = 64 * 1024


# A second SIGINT sooner than this after the first is the same Ctrl-C, delivered twice:
# `uv run` passes on to its child the signal that their process group got already.
_SAME_SIGNAL_SECONDS = 0.5
# After a second Ctrl-C, what requests under way get to write their last words in.
_LAST_WORDS_SECONDS = 0.1


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

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # A closed terminal (SIGHUP) stops the gateway as SIGTERM does: drained, engines
        # stopped. Not under nohup, which ignores it.
        hangup = threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN
        )
        with super().capture_signals():  # which raises the signal again at its exit
            previous = signal.signal(signal.SIGHUP, self.handle_exit) if hangup else None
            try:
                yield
            finally:
                if hangup:  # before that: a SIGHUP ends the process as a SIGTERM does
                    signal.signal(signal.SIGHUP, previous)

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
        # The requests under way are cancelled first, and answer as at the end of a drain
        # (a stream with its error event, not a bare cut); a moment later, whatever is left
        # is cut.
        for task in list(self.server_state.tasks):
            task.cancel()
        assert self._loop is not None
        self._loop.call_later(_LAST_WORDS_SECONDS, self._abort_connections)

    def _abort_connections(self) -> None:
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
    its first byte (408), or a body that pauses for ``body_seconds`` (408), closes a
    connection that sends nothing for ``head_seconds`` after opening, or the rest of a body
    it answered early for as long, and serves a request that asks for an upgrade to HTTP/2
    as HTTP/1.1."""

    head_seconds = 30.0
    body_seconds = 60.0

    _head_started = False  # a request's head has begun and is not complete
    _in_body = False  # between a head's end and its message's end
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None  # armed while a body is incomplete
    _body_read_at = 0.0  # loop time of the last read of an incomplete body
    _discarding = False  # a request was refused: nothing more is read on this connection
    _close_when_answered = False  # ... which closes once the answers due before it are out

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_seconds, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._in_body:
            self._feed(data)
            if self._in_body:
                self._body_read()
            return
        self._head_bytes += len(data)
        self._feed(data)
        if self._in_body:  # a head whose body has not all arrived with it
            self._body_read()
            return
        if not self._head_started or self.transport.is_closing():
            return
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(HeadersTooLarge("the request's headers are over 64 KiB"))
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_seconds, self._head_too_slow)

    def _feed(self, data: bytes) -> None:
        """uvicorn's ``data_received``, but for an upgrade it does not serve (``h2c``)."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            elif self.scope["method"] != "CONNECT":  # a CONNECT's app refuses it
                self._ignore_upgrade(data[upgrade.args[0] :])

    def _ignore_upgrade(self, rest: bytes) -> None:
        """Serve a request that asked for an upgrade (Java's HTTP client asks for ``h2c`` on
        every plain-HTTP request) as HTTP/1.1, as RFC 9110 lets a server do.

        httptools takes such a request to end with its head: its body, unparsed, would be
        read as the next request. So the request is taken up again: its head, without the
        upgrade, goes to a new parser that passes on only the body, and what follows."""
        assert self.cycle is not None
        self.cycle.more_body = True  # the old parser called the message complete
        self._in_body = True
        upgrade_headers = (b"connection", b"upgrade", b"http2-settings")
        head = [
            b"%s / HTTP/%s"
            % (self.scope["method"].encode(), self.parser.get_http_version().encode())
        ]
        head += [b"%s: %s" % header for header in self.headers if header[0] not in upgrade_headers]
        self.parser = httptools.HttpRequestParser(_HeadAlreadyParsed(self))
        with contextlib.suppress(AttributeError):  # as uvicorn sets up its own parser
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self._feed(b"\r\n".join(head) + b"\r\n\r\n" + rest)

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

    def on_response_complete(self) -> None:
        # The body still arriving is this answer's own request's unless a request answered
        # later waits in the pipeline (it was read after this one).
        answered_early = self._in_body and not self.pipeline
        last_due = not self.pipeline
        super().on_response_complete()
        if self._close_when_answered and last_due:
            self.transport.close()
            return
        if answered_early and not self.transport.is_closing():
            # Answered before its body was read (a 401, a 413): uvicorn reads the rest and
            # drops it, so that the client sees the answer, but a keyless client must not
            # hold the connection by sending a byte now and then.
            self.loop.call_later(self.head_seconds, self._close_if_still_in, self.cycle)

    def _close_if_still_in(self, cycle: RequestResponseCycle | None) -> None:
        """Close if the body of the request ``cycle`` answered is still arriving (a later
        request has a cycle of its own)."""
        if self.cycle is cycle and self._in_body and not self.transport.is_closing():
            self.transport.close()

    def _body_read(self) -> None:
        self._body_read_at = self.loop.time()
        if self._body_timer is None:
            self._body_timer = self.loop.call_later(self.body_seconds, self._body_too_slow)

    def _body_too_slow(self) -> None:
        """Checked every ``body_seconds`` while a body is incomplete, not re-armed per read."""
        self._body_timer = None
        if not self._in_body or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:  # the app's pause (it has not read what came), not the client's
            self._body_read_at = now
        paused_for = now - self._body_read_at
        if paused_for < self.body_seconds:
            self._body_timer = self.loop.call_later(
                self.body_seconds - paused_for, self._body_too_slow
            )
            return
        self._refuse(RequestTimeout("the request's body stopped arriving"))

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
        """Answer ``error`` and close, written here: no request has begun (so no app could),
        or its own body is what is malformed. Where an earlier request's answer is still
        due, the connection closes once it is out, unanswered: an answer written now would
        be read as that request's."""
        self._discarding = True
        cycle = self.cycle
        if cycle is None or (cycle.response_complete and not self._in_body):
            pass  # nothing else is due on this connection
        elif self.pipeline or not self._in_body:
            if self._in_body and self.pipeline[0][0] is cycle:
                self.pipeline.popleft()  # the faulty request, queued: it is not run
            self._close_when_answered = True
            return
        elif cycle.response_started or cycle.response_complete:
            self.transport.close()  # its own answer is under way or given (an early 401)
            return
        else:
            # This request's own body is at fault: its app is told the client left, and the
            # answer is this error.
            cycle.disconnected = True
            cycle.message_event.set()
        body = error.body_bytes()
        head = [b"HTTP/1.1 %d %s" % (error.status, HTTPStatus(error.status).phrase.encode())]
        head += [b"%s: %s" % header for header in error.headers()]
        head += [b"content-length: %d" % len(body), b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()


class _HeadAlreadyParsed:
    """Parser callbacks that skip the head of the first request (the protocol has it) and
    pass on everything else."""

    def __init__(self, protocol: BoundedHttpToolsProtocol) -> None:
        self._protocol = protocol
        self._in_first = True

    def on_message_begin(self) -> None:
        if not self._in_first:
            self._protocol.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._in_first:
            self._protocol.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_first:
            self._protocol.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self._in_first:
            self._protocol.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._protocol.on_body(body)

    def on_message_complete(self) -> None:
        self._in_first = False
        self._protocol.on_message_complete()


def bounded_http_protocol(
    head_seconds: float, body_seconds: float = 60.0
) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with its time limits set."""
    limits = {"head_seconds": head_seconds, "body_seconds": body_seconds}
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), limits)

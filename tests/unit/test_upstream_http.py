"""The pass-through's HTTP/1.1 client against small real servers that answer with exact
bytes: keep-alive reuse, framings, broken answers, back-pressure, cancellation, TLS."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme

from tests.support.raw_upstream import Server, answering, read_request, serving
from vllm_autoserve.upstream_http import ConnectionPool, Origin, Response, UpstreamError

POST = b"POST /v1/x HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}"


def origin(server: Server, tls: bool = False) -> Origin:
    return Origin("127.0.0.1" if not tls else "localhost", server.port, tls)


async def body_of(response: Response) -> bytes:
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
    response.release()
    return b"".join(parts)


async def whole_answer(pool: ConnectionPool, server: Server) -> bytes:
    return await body_of(await pool.send(origin(server), POST))


keep_alive_ok = answering(
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Test: yes\r\n\r\nhello", repeat=True
)


async def test_answers_and_reuses_one_keep_alive_connection() -> None:
    pool = ConnectionPool()
    async with serving(keep_alive_ok) as server:
        for _ in range(3):
            response = await pool.send(origin(server), POST)
            assert response.status == 200
            assert (b"X-Test", b"yes") in response.headers
            assert await body_of(response) == b"hello"
    pool.close()
    assert server.connections == 1
    assert server.requests == [POST] * 3


async def test_a_connection_the_upstream_closed_while_idle_is_replaced_transparently() -> None:
    # The answer says keep-alive; then the connection closes as an idle timeout would.
    one_answer_then_close = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    pool = ConnectionPool()
    async with serving(one_answer_then_close) as server:
        assert await body_of(await pool.send(origin(server), POST)) == b"ok"
        await server.closed.wait()
        await asyncio.sleep(0.05)  # the close reaches the pool, which drops the connection
        assert await body_of(await pool.send(origin(server), POST)) == b"ok"
    pool.close()
    assert server.connections == 2
    assert len(server.requests) == 2  # the second request was sent once, not twice


@pytest.mark.parametrize(
    "answer, body",
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"abcde",
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", b"until the end"),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nnew",
            b"new",
        ),
    ],
    ids=["chunked", "ends-at-close", "interim-100"],
)
async def test_framings(answer: bytes, body: bytes) -> None:
    pool = ConnectionPool()
    async with serving(answering(answer)) as server:
        response = await pool.send(origin(server), POST)
        assert await body_of(response) == body
    pool.close()


async def test_head_answer_ends_after_its_headers() -> None:
    async def head(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await writer.drain()
        await reader.read()  # keeps the connection open: the answer must not wait for a body

    pool = ConnectionPool()
    async with serving(head) as server:
        request = b"HEAD /v1/x HTTP/1.1\r\nHost: test\r\n\r\n"
        response = await pool.send(origin(server), request, method="HEAD")
        assert await asyncio.wait_for(body_of(response), 2) == b""
    pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"this is not HTTP at all\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly some",
        # Answers no client could take:
        b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 300_000 + b"\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["garbage", "cut-short", "status-600", "status-099", "300k-header"],
)
async def test_a_broken_answer_is_an_upstream_error(answer: bytes) -> None:
    pool = ConnectionPool()
    async with serving(answering(answer)) as server:
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(whole_answer(pool, server), 2)
    pool.close()


async def test_refused_connection_names_the_upstream() -> None:
    async with serving(keep_alive_ok) as server:
        port = server.port
    with pytest.raises(UpstreamError, match=f"127.0.0.1:{port}"):
        await ConnectionPool().send(Origin("127.0.0.1", port, False), POST)


async def test_client_leaving_closes_the_upstream_connection_before_any_answer() -> None:
    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        await read_request(reader, server)
        await reader.read()  # returns when the gateway side closes

    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    pool = ConnectionPool()
    async with serving(silent) as server:
        sent = asyncio.ensure_future(pool.send(origin(server), POST, gone=gone))
        await asyncio.wait_for(server.asked.wait(), 2)
        gone.set_result(None)
        with pytest.raises(UpstreamError):
            await sent
        await asyncio.wait_for(server.closed.wait(), 2)


async def test_a_slow_reader_holds_the_upstream_back_instead_of_buffering_everything() -> None:
    total = 32 * 1024 * 1024
    sent = 0

    async def firehose(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        nonlocal sent
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        while sent < total:
            writer.write(block)
            await writer.drain()
            sent += len(block)

    pool = ConnectionPool()
    async with serving(firehose) as server:
        response = await pool.send(origin(server), POST)
        await asyncio.sleep(0.5)  # not reading: the upstream must stall well short of the end
        assert sent < total / 2
        received = len(await body_of(response))
    pool.close()
    assert received == total


@pytest.fixture(scope="module")
def tls_pair() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


async def test_https_upstream(tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls_pair
    pool = ConnectionPool(tls=client_context)
    async with serving(keep_alive_ok, tls=server_context) as server:
        assert await body_of(await pool.send(origin(server, tls=True), POST)) == b"hello"
    pool.close()


async def test_https_upstream_with_an_untrusted_certificate_is_refused(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, _ = tls_pair
    async with serving(keep_alive_ok, tls=server_context) as server:
        with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED"):
            await ConnectionPool().send(origin(server, tls=True), POST)


async def test_a_late_abort_of_a_released_answer_leaves_the_next_request_alone() -> None:
    # A client that leaves just as its answer completes: the abort may run after the
    # connection went back to the pool and was taken by the next request.
    pool = ConnectionPool()
    async with serving(keep_alive_ok) as server:
        first = await pool.send(origin(server), POST)
        assert await body_of(first) == b"hello"  # released: the connection is idle again
        second = asyncio.ensure_future(pool.send(origin(server), POST))
        await asyncio.sleep(0)
        first.abort()
        response = await asyncio.wait_for(second, 2)
        assert await body_of(response) == b"hello"
    pool.close()
    assert server.connections == 1


@pytest.mark.parametrize("after", [0.0, 0.05, 0.5])
async def test_a_post_the_upstream_received_is_never_sent_twice(after: float) -> None:
    async def die_on_the_second(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader, server)
        await asyncio.sleep(after)  # "generating", then the engine dies without an answer

    pool = ConnectionPool()
    async with serving(die_on_the_second) as server:
        assert await body_of(await pool.send(origin(server), POST)) == b"ok"
        with pytest.raises(UpstreamError):
            await pool.send(origin(server), POST)
        await asyncio.sleep(0.1)
    pool.close()
    assert len(server.requests) == 2


async def test_a_get_on_a_connection_that_died_unanswered_is_sent_once_more() -> None:
    async def die_on_the_second(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if server.connections == 1:
            await read_request(reader, server)  # then closes without an answer

    get = b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n"
    pool = ConnectionPool()
    async with serving(die_on_the_second) as server:
        assert await body_of(await pool.send(origin(server), get, method="GET")) == b"ok"
        response = await pool.send(origin(server), get, method="GET")
        assert await body_of(response) == b"ok"
    pool.close()
    assert server.connections == 2 and len(server.requests) == 3


async def test_bytes_after_the_end_of_an_answer_retire_the_connection() -> None:
    # A second answer to one request: left in the parser, it would be taken for the next
    # request's answer (which then never started, and hung).
    doubled = answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra",
        repeat=True,
    )
    pool = ConnectionPool()
    async with serving(doubled) as server:
        for _ in range(2):
            response = await asyncio.wait_for(pool.send(origin(server), POST), 2)
            assert await body_of(response) == b"ok"
    pool.close()
    assert server.connections == 2


async def test_the_idle_clock_starts_when_the_answer_ends_not_when_it_is_released() -> None:
    # The upstream's keep-alive runs from the end of its answer; a slow client may take
    # longer than that to read it. Such a connection is not used again.
    pool = ConnectionPool(idle_seconds=0.2)
    async with serving(keep_alive_ok) as server:
        response = await pool.send(origin(server), POST)
        await asyncio.sleep(0.3)  # the answer is complete; the client reads slowly
        assert await body_of(response) == b"hello"
        assert await body_of(await pool.send(origin(server), POST)) == b"hello"
    pool.close()
    assert server.connections == 2


@pytest.mark.parametrize(
    "start",
    [
        b"HTTP/1.1 200 OK\r\nX-Endless: ",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Endless: ",
    ],
    ids=["header", "trailer"],
)
async def test_a_line_that_never_ends_is_cut_off_not_buffered(start: bytes) -> None:
    async def endless(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        await read_request(reader, server)
        writer.write(start)
        for _ in range(64):
            writer.write(b"x" * 65536)
            await writer.drain()
        await reader.read()

    pool = ConnectionPool()
    async with serving(endless) as server:
        with pytest.raises(UpstreamError, match="over 1 MiB"):
            await asyncio.wait_for(whole_answer(pool, server), 5)
    pool.close()


async def test_a_client_gone_before_sending_sends_nothing() -> None:
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    gone.set_result(None)
    async with serving(keep_alive_ok) as server:
        with pytest.raises(UpstreamError, match="client left"):
            await ConnectionPool().send(origin(server), POST, gone=gone)
        await asyncio.sleep(0.1)
    assert server.requests == []


async def test_a_reset_in_a_body_that_ends_at_close_is_not_a_complete_answer() -> None:
    async def reset(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        import socket
        import struct

        await read_request(reader, server)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npart of it")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    pool = ConnectionPool()
    async with serving(reset) as server:
        response = await pool.send(origin(server), POST)
        with pytest.raises(UpstreamError):
            await body_of(response)
    pool.close()


async def test_answers_of_every_ending_leave_no_reference_cycles() -> None:
    # The gateway raises gc's thresholds; garbage that needs the cycle collector piled up
    # for minutes in the soak (a broken answer's error held its frames, which held it).
    import gc

    from vllm_autoserve.upstream_http import _Connection

    async def endings(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        request = await read_request(reader, server)
        if b"cut" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        elif b"hold" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await reader.read()
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()

    async def one(pool: ConnectionPool, server: Server, kind: bytes) -> None:
        request = POST.replace(b"/v1/x", b"/" + kind)
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            response = await pool.send(origin(server), request, gone=gone)
            if kind == b"hold":
                await response.read()
                gone.add_done_callback(lambda _: response.abort())
                gone.set_result(None)
            await body_of(response)
        except UpstreamError:
            pass

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        pool = ConnectionPool()
        async with serving(endings) as server:
            for kind in (b"ok", b"cut", b"hold") * 10:
                await one(pool, server, kind)
            await asyncio.sleep(0.1)  # connections closed and lost
        pool.close()
        del pool
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, Response | _Connection)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == []


async def test_an_upstream_that_closes_a_new_connection_at_once_is_an_upstream_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine being stopped accepts and closes at once: when the close arrived before the
    request was written (a busy loop resumes the sender late), an assertion failed and the
    client got a bare 500."""
    connect = ConnectionPool._connect

    async def connect_then_resume_late(self: ConnectionPool, *args: object) -> object:
        connection = await connect(self, *args)  # type: ignore[arg-type]
        await asyncio.sleep(0.1)  # the upstream's close arrives meanwhile
        return connection

    monkeypatch.setattr(ConnectionPool, "_connect", connect_then_resume_late)

    async def close_at_once(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        return

    async with serving(close_at_once) as server:
        pool = ConnectionPool()
        with pytest.raises(UpstreamError, match="closed the connection"):
            await pool.send(origin(server), POST)
        pool.close()


async def test_an_idle_connection_is_closed_after_idle_seconds_without_more_traffic() -> None:
    """Idle connections were closed only when another one was put back: after one request
    and silence, an upstream that keeps connections open kept this one for good."""
    pool = ConnectionPool(idle_seconds=0.2)
    async with serving(keep_alive_ok) as server:
        assert await whole_answer(pool, server) == b"hello"
        assert not server.closed.is_set()
        await asyncio.wait_for(server.closed.wait(), 2)
    pool.close()

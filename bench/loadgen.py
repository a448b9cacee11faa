"""The load generator: a separate process that the benchmark drives over stdin/stdout.

One JSON command a line in, one JSON result a line out:

    {"op": "latency", "url": "http://127.0.0.1:8000", "key": "...", "model": "bench",
     "stream": false, "max_tokens": 8, "concurrency": 16, "count": 2000, "seconds": 10}
    {"op": "open_streams", "url": ..., "key": ..., "model": "bench-hold", "count": 1000,
     "seconds": 60}          -> {"opened": n, ...}; then waits for {"op": "close_streams"}
    {"op": "quit"}

Two HTTP clients, both keep-alive HTTP/1.1 with one connection per concurrent worker,
opened (and warmed with one request) before the clock starts:

- ``raw`` (default): asyncio protocol + httptools' response parser on uvloop — a few tens of
  microseconds per request, so that the client is not what is measured;
- ``aiohttp``: aiohttp's client, closer to what applications use (``"client": "aiohttp"``).

Every load loop is bounded by ``count`` requests and ``seconds`` of wall time (a request
begun before the deadline gets ``GRACE`` seconds more, then counts as an error).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import httptools

perf = time.perf_counter
GRACE = 30.0  # seconds a request begun before a round's deadline may run past it

# Results go to a private copy of stdout; anything else that prints goes to stderr.
_OUT = os.fdopen(os.dup(1), "w")
sys.stdout = sys.stderr


def reply(cmd: dict[str, Any], result: dict[str, Any]) -> None:
    _OUT.write(json.dumps({**result, "id": cmd.get("id")}) + "\n")
    _OUT.flush()


class Timing:
    __slots__ = ("first", "gaps", "status", "total")

    def __init__(self) -> None:
        self.status = 0
        self.first = 0.0
        self.total = 0.0
        self.gaps: list[float] = []


class RawConnection(asyncio.Protocol):
    """A keep-alive client connection that times one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] | None = None
        self.first_data: asyncio.Future[None] | None = None
        self.sent = 0.0
        self.arrivals: list[float] = []
        self.body_seen = False
        self.status = 0
        self.lost = asyncio.Event()
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        for fut in (self.done, self.first_data):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        now = perf()
        self.body_seen = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover
            pass
        except httptools.HttpParserError as exc:
            if self.done is not None and not self.done.done():
                self.done.set_exception(exc)
            return
        if self.body_seen:
            self.arrivals.append(now)
            if self.first_data is not None and not self.first_data.done():
                self.first_data.set_result(None)

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body_seen = True

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def start(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.first_data = loop.create_future()
        self.arrivals = []
        self.status = 0
        self.sent = perf()
        assert self.transport is not None
        self.transport.write(request)

    async def request(self, request: bytes) -> Timing:
        self.start(request)
        assert self.done is not None
        await self.done
        end = perf()
        timing = Timing()
        timing.status = self.status
        timing.total = end - self.sent
        arrivals = self.arrivals
        timing.first = (arrivals[0] if arrivals else end) - self.sent
        timing.gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        return timing

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def build_request(host: str, path: str, key: str | None, body: bytes) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        "Accept: */*",
        f"Content-Length: {len(body)}",
    ]
    if key:
        head.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def request_body(cmd: dict[str, Any]) -> bytes:
    body: dict[str, Any] = {
        "model": cmd["model"],
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": bool(cmd.get("stream", False)),
    }
    if cmd.get("max_tokens"):
        body["max_tokens"] = cmd["max_tokens"]
    return json.dumps(body).encode()


async def _raw_connect(host: str, port: int) -> RawConnection:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(RawConnection, host, port)
    return proto


async def latency_raw(cmd: dict[str, Any]) -> dict[str, Any]:
    url = urlsplit(cmd["url"])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = cmd.get("path", "/v1/chat/completions")
    request = build_request(f"{host}:{port}", path, cmd.get("key"), request_body(cmd))
    concurrency, count = int(cmd["concurrency"]), int(cmd["count"])
    conns = [await _raw_connect(host, port) for _ in range(concurrency)]
    for conn in conns:  # warm every connection (and the proxy's upstream pool)
        await asyncio.wait_for(conn.request(request), 60)
    timings: list[Timing] = []
    errors = 0
    remaining = count
    deadline = perf() + float(cmd["seconds"])
    hard = deadline + GRACE

    async def worker(conn: RawConnection) -> None:
        nonlocal remaining, errors
        while remaining > 0 and perf() < deadline:
            remaining -= 1
            try:
                if conn.lost.is_set() or not conn.keep_alive:
                    conn = await _raw_connect(host, port)
                # A request started before the deadline may finish after it, but not long after.
                timings.append(await asyncio.wait_for(conn.request(request), hard - perf()))
            except (OSError, ConnectionError, TimeoutError, httptools.HttpParserError):
                errors += 1
                conn.close()
                conn = await _raw_connect(host, port)

    started = perf()
    await asyncio.gather(*(worker(c) for c in conns))
    wall = perf() - started
    for conn in conns:
        conn.close()
    return _summarise(timings, errors, wall)


async def latency_aiohttp(cmd: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    url = cmd["url"].rstrip("/") + cmd.get("path", "/v1/chat/completions")
    headers = {"Content-Type": "application/json"}
    if cmd.get("key"):
        headers["Authorization"] = f"Bearer {cmd['key']}"
    body = request_body(cmd)
    concurrency, count = int(cmd["concurrency"]), int(cmd["count"])
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timings: list[Timing] = []
    errors = 0
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def one() -> Timing:
            timing = Timing()
            sent = perf()
            arrivals: list[float] = []
            async with session.post(url, data=body, headers=headers) as resp:
                timing.status = resp.status
                async for _ in resp.content.iter_any():
                    arrivals.append(perf())
            end = perf()
            timing.total = end - sent
            timing.first = (arrivals[0] if arrivals else end) - sent
            timing.gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            return timing

        await asyncio.gather(*(one() for _ in range(concurrency)))  # warm the pool
        remaining = count
        deadline = perf() + float(cmd["seconds"])
        hard = deadline + GRACE

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0 and perf() < deadline:
                remaining -= 1
                try:
                    timings.append(await asyncio.wait_for(one(), hard - perf()))
                except (aiohttp.ClientError, OSError, TimeoutError):
                    errors += 1

        started = perf()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = perf() - started
    return _summarise(timings, errors, wall)


def _summarise(timings: list[Timing], errors: int, wall: float) -> dict[str, Any]:
    ok = [t for t in timings if t.status == 200]
    return {
        "n": len(ok),
        "errors": errors + len(timings) - len(ok),
        "wall": wall,
        "total": [t.total for t in ok],
        "first": [t.first for t in ok],
        "gaps": [g for t in ok for g in t.gaps],
    }


async def open_streams(cmd: dict[str, Any]) -> None:
    """Open ``count`` streams that stay open; report; wait for close_streams; close them."""
    url = urlsplit(cmd["url"])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    request = build_request(
        f"{host}:{port}", "/v1/chat/completions", cmd.get("key"), request_body(cmd)
    )
    count = int(cmd["count"])
    deadline = perf() + float(cmd["seconds"])
    conns: list[RawConnection] = []
    opened = failed = 0
    sem = asyncio.Semaphore(64)  # connect in waves, not 1,000 SYNs at once

    async def one() -> None:
        nonlocal opened, failed
        async with sem:
            try:
                conn = await asyncio.wait_for(_raw_connect(host, port), 10)
                conns.append(conn)
                conn.start(request)
                assert conn.first_data is not None
                await asyncio.wait_for(conn.first_data, max(0.1, deadline - perf()))
                if conn.status == 200:
                    opened += 1
                else:
                    failed += 1
            except (OSError, ConnectionError, TimeoutError):
                failed += 1

    started = perf()
    await asyncio.gather(*(one() for _ in range(count)))
    reply(cmd, {"opened": opened, "failed": failed, "seconds": perf() - started})
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), 600)
    close = json.loads(line)
    assert close["op"] == "close_streams"
    for conn in conns:
        conn.close()
    await asyncio.sleep(0.5)
    reply(close, {"closed": len(conns)})


def run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


def main() -> None:
    while True:
        line = sys.stdin.readline()  # not ``for line in sys.stdin``: no read-ahead
        if not line:
            return
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            return
        try:
            if op == "latency":
                client = cmd.get("client", "raw")
                reply(cmd, run(latency_aiohttp(cmd) if client == "aiohttp" else latency_raw(cmd)))
            elif op == "open_streams":
                run(open_streams(cmd))
            else:
                reply(cmd, {"error": f"unknown op {op}"})
        except Exception as exc:
            reply(cmd, {"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()

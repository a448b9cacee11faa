"""A fast stand-in for an OpenAI-compatible engine, for measuring what sits in front of it.

    python bench/upstream.py --port 9100 [--startup-delay 1.5 --events FILE]

Raw asyncio (uvloop when installed) with httptools' parser, keep-alive HTTP/1.1, no
framework, so that the upstream's own cost is as small as can be and a proxy's shows.

The behaviour is chosen by the request's ``model`` (every proxy passes it through):

- ``bench``        non-streaming chat JSON, or SSE when ``"stream": true`` — ``max_tokens``
                   chunks (default 8), written back to back;
- ``bench-tick``   SSE, one chunk every 20 ms (``--tick-ms``), ``max_tokens`` chunks (default 50);
- ``bench-hold``   SSE, one chunk, then the stream stays open until the client goes away
                   (at most ``--hold-seconds``).

``GET /health`` answers 200 and ``GET /v1/models`` lists the three models. With
``--startup-delay`` the server starts listening only after that many seconds (as vLLM does
once its model is loaded); with ``--events FILE`` it appends one JSON line per milestone:
``listening``, the first ``health_ok`` and the first ``request`` with ``time.monotonic()``
(system-wide on Linux, so comparable with other processes' clocks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import httptools

try:
    import orjson

    _loads = orjson.loads
    _dumps = orjson.dumps
except ImportError:  # pragma: no cover - the project env has orjson
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


MODELS = ("bench", "bench-tick", "bench-hold")


def chat_body(model: str) -> bytes:
    return _dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! " * 24},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 48, "total_tokens": 60},
        }
    )


def sse_chunk(model: str, i: int) -> bytes:
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
    }
    return b"data: " + _dumps(event) + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
_DONE = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Events:
    """Milestones for the cold-start measurement (first of each kind only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.seen: set[str] = set()

    def once(self, kind: str, **extra: Any) -> None:
        if self.path is None or kind in self.seen:
            return
        self.seen.add(kind)
        line = json.dumps({"event": kind, "t": time.monotonic(), "pid": os.getpid(), **extra})
        with open(self.path, "a") as f:
            f.write(line + "\n")


class Upstream(asyncio.Protocol):
    """One client connection: parse requests, answer them in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.queue: asyncio.Queue[tuple[bytes, bytes, bytes, bool]] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker = asyncio.get_running_loop().create_task(self.work())

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        if self.worker is not None:
            self.worker.cancel()

    # -- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        self.queue.put_nowait(
            (method, self.url, b"".join(self.body), self.parser.should_keep_alive())
        )

    # -- answering -------------------------------------------------------------------------
    async def work(self) -> None:
        while True:
            method, url, body, keep_alive = await self.queue.get()
            await self.answer(method, url.split(b"?", 1)[0], body)
            if not keep_alive:
                assert self.transport is not None
                self.transport.close()
                return

    def send_json(self, status: bytes, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(payload), payload)
        )

    async def answer(self, method: bytes, path: bytes, body: bytes) -> None:
        server = self.server
        if path == b"/health":
            server.events.once("health_ok")
            self.send_json(b"200 OK", b"{}")
            return
        if path == b"/v1/models":
            data = [{"id": m, "object": "model", "owned_by": "bench"} for m in MODELS]
            self.send_json(b"200 OK", _dumps({"object": "list", "data": data}))
            return
        if method != b"POST":
            self.send_json(b"404 Not Found", b'{"error":{"message":"not found"}}')
            return
        try:
            request = _loads(body)
            model = request.get("model", "bench")
        except ValueError:
            self.send_json(b"400 Bad Request", b'{"error":{"message":"bad json"}}')
            return
        server.events.once("request", model=model)
        if model == "bench-hold":
            await self.stream(model, 1, 0.0, hold=True)
        elif model == "bench-tick":
            await self.stream(model, int(request.get("max_tokens") or 50), server.tick)
        elif request.get("stream"):
            await self.stream(model, int(request.get("max_tokens") or 8), 0.0)
        else:
            self.send_json(b"200 OK", server.chat_bodies.setdefault(model, chat_body(model)))

    async def stream(self, model: str, chunks: int, interval: float, hold: bool = False) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(_SSE_HEAD)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(chunks):
            if i and interval:
                # Paced from the start, so scheduling jitter does not accumulate.
                await asyncio.sleep(max(0.0, start + i * interval - loop.time()))
            elif i:
                await asyncio.sleep(0)
            if transport.is_closing():
                return
            transport.write(_chunked(sse_chunk(model, i)))
        if hold:
            try:
                await asyncio.wait_for(self.closed.wait(), self.server.hold_seconds)
            except TimeoutError:
                pass
            if transport.is_closing():
                return
        transport.write(_DONE)


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.tick = args.tick_ms / 1000.0
        self.hold_seconds = args.hold_seconds
        self.events = Events(args.events)
        self.chat_bodies: dict[str, bytes] = {}

    async def run(self, host: str, port: int, startup_delay: float, lifetime: float) -> None:
        if startup_delay > 0:
            await asyncio.sleep(startup_delay)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Upstream(self), host, port, backlog=4096, reuse_address=True
        )
        self.events.once("listening")
        async with server:
            await asyncio.sleep(lifetime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=None, help="ignored (the gateway's {model})")
    parser.add_argument("--tick-ms", type=float, default=20.0)
    parser.add_argument("--hold-seconds", type=float, default=300.0)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--events", default=None, help="append milestone lines to this file")
    parser.add_argument(
        "--lifetime", type=float, default=3600.0, help="exit after this many seconds"
    )
    args = parser.parse_args()
    server = Server(args)
    try:
        import uvloop

        uvloop.run(server.run(args.host, args.port, args.startup_delay, args.lifetime))
    except ImportError:
        asyncio.run(server.run(args.host, args.port, args.startup_delay, args.lifetime))


if __name__ == "__main__":
    main()

"""The floor under the gateway: what uvicorn alone, and uvicorn plus an upstream client, cost.

    uv run python bench/floor.py [--rounds 3] [--seconds 4]

Three throw-away ASGI apps under the gateway's uvicorn settings (uvloop, httptools, no
access log), driven by ``wrk`` at saturation, CPU per request from psutil:

- ``hello``  answers a fixed JSON body: uvicorn's own cost per request;
- ``aiohttp`` forwards to the stand-in upstream with one pooled ``aiohttp`` session and
  nothing else (no auth, metrics, logs, disconnect watching): the client library's cost;
- ``raw``    forwards over pooled keep-alive connections with an asyncio protocol and
  httptools' response parser: what a hand-written upstream client would cost;
- ``splice`` no uvicorn and no ASGI: one asyncio protocol parses the client's requests with
  httptools and writes each to a pooled upstream connection, whose answer bytes go back to
  the client untouched (httptools only finds where the answer ends). No routing, headers
  rewritten or inspected, logs or metrics: the least any Python proxy does per request.

``direct`` is wrk against the stand-in itself, in the same rounds. Not designs for production
(``raw`` and ``splice`` handle no errors, timeouts or TLS); they bound what changes to the
gateway can gain. ``floor.py serve KIND PORT`` runs one app.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BODY = b'{"ok":true}'


# -- the apps -----------------------------------------------------------------------------


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


async def _lifespan(receive: Any, send: Any, startup: Any = None) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup" and startup is not None:
            startup()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


class AiohttpProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: Any = None

    def _open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self._open)
            return
        message = await receive()
        async with self.session.request(
            scope["method"],
            self.upstream + scope["path"],
            data=message["body"],
            headers={"content-type": "application/json"},
        ) as resp:
            headers = [(k, v) for k, v in resp.raw_headers if k.lower() not in (b"date", b"server")]
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.headers: list[tuple[bytes, bytes]] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.events.put_nowait(("start", self.parser.get_status_code(), self.headers))

    def on_body(self, body: bytes) -> None:
        self.events.put_nowait(("body", body))

    def on_message_complete(self) -> None:
        self.events.put_nowait(("end",))


class RawProxy:
    _DROP = (b"date", b"server", b"transfer-encoding", b"connection")

    def __init__(self, upstream: str) -> None:
        url = urlsplit(upstream)
        self.host, self.port = url.hostname, url.port
        self.idle: list[_Connection] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        body = (await receive())["body"]
        if self.idle:
            conn = self.idle.pop()
        else:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        conn.headers = []
        conn.transport.write(
            b"%s %s HTTP/1.1\r\nhost: upstream\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s"
            % (scope["method"].encode(), scope["path"].encode(), len(body), body)
        )
        while True:
            event = await conn.events.get()
            if event[0] == "start":
                headers = [(k, v) for k, v in event[2] if k not in self._DROP]
                await send({"type": "http.response.start", "status": event[1], "headers": headers})
            elif event[0] == "body":
                await send({"type": "http.response.body", "body": event[1], "more_body": True})
            else:
                break
        self.idle.append(conn)
        await send({"type": "http.response.body", "body": b""})


class _SpliceUpstream(asyncio.Protocol):
    """A pooled upstream connection: answer bytes go to the current client as they come."""

    def __init__(self, pool: list[_SpliceUpstream]) -> None:
        import httptools

        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None
        self.client: Any = None  # the client's transport while a request is out

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.client = None
        self.pool.append(self)


class _SpliceClient(asyncio.Protocol):
    """One client connection: each request parsed, rebuilt and written upstream."""

    def __init__(self, host: str, port: int, pool: list[_SpliceUpstream]) -> None:
        import httptools

        self.host, self.port, self.pool = host, port, pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.url = b""
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"host", b"connection"):
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = b"%s %s HTTP/1.1\r\nhost: upstream\r\n%s\r\n%s" % (
            self.parser.get_method(),
            self.url,
            b"".join(self.headers),
            b"".join(self.body),
        )
        self.headers, self.body = [], []
        if self.pool:
            upstream = self.pool.pop()
            upstream.client = self.transport
            upstream.transport.write(request)
        else:
            asyncio.get_running_loop().create_task(self._connect_and_send(request))

    async def _connect_and_send(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(
            lambda: _SpliceUpstream(self.pool), self.host, self.port
        )
        upstream.client = self.transport
        upstream.transport.write(request)


def serve_splice(upstream: str, port: int) -> None:
    import uvloop

    url = urlsplit(upstream)
    host, upstream_port = url.hostname or "", url.port or 80

    async def run() -> None:
        pool: list[_SpliceUpstream] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _SpliceClient(host, upstream_port, pool), "127.0.0.1", port
        )
        await server.serve_forever()

    uvloop.run(run())


def serve(kind: str, port: int) -> None:
    import uvicorn

    if kind == "splice":
        serve_splice(os.environ.get("FLOOR_UPSTREAM", ""), port)
        return

    upstream = os.environ.get("FLOOR_UPSTREAM", "")
    app: Any = {"hello": hello, "aiohttp": AiohttpProxy, "raw": RawProxy}[kind]
    if kind != "hello":
        app = app(upstream)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        access_log=False,
        log_level="warning",
        loop="auto",
        http="auto",
        lifespan="on" if kind != "hello" else "off",
    )


# -- the driver ---------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    import psutil

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stack import free_port, http_status, spawn, start_upstream

    wrk = shutil.which("wrk")
    if wrk is None:
        print("floor: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="autoserve-floor-"))
    upstream = start_upstream(workdir)
    procs = [upstream]
    try:
        apps = {}
        apps["direct"] = upstream
        for kind in ("hello", "aiohttp", "raw", "splice"):
            port = free_port()
            proc = spawn(
                kind,
                [sys.executable, __file__, "serve", kind, str(port)],
                workdir,
                {"FLOOR_UPSTREAM": upstream.url},
            )
            proc.url = f"http://127.0.0.1:{port}"
            procs.append(proc)
            deadline = time.monotonic() + 20
            while http_status(proc.url + "/health") != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            apps[kind] = proc
        script = workdir / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            """wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hi"}]}'\n"""
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        cpu: dict[str, list[float]] = {k: [] for k in apps}
        rates: dict[str, list[float]] = {k: [] for k in apps}
        order = list(apps)
        rng = random.Random(3)
        for _ in range(args.rounds):
            rng.shuffle(order)
            for kind in order:
                proc = psutil.Process(apps[kind].pid)
                before = sum(proc.cpu_times()[:2])
                out = subprocess.run(
                    [
                        wrk,
                        "-t1",
                        "-c64",
                        f"-d{args.seconds}s",
                        "-s",
                        str(script),
                        apps[kind].url + "/v1/chat/completions",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=args.seconds + 60,
                    check=False,
                ).stdout
                done = re.search(r"(\d+) requests in", out)
                rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
                if done and int(done.group(1)) and rate:
                    cpu[kind].append((sum(proc.cpu_times()[:2]) - before) / int(done.group(1)))
                    rates[kind].append(float(rate.group(1)))
        direct_rate = statistics.median(rates["direct"])
        for kind, values in cpu.items():
            rate = statistics.median(rates[kind])
            print(
                f"{kind:<8} {statistics.median(values) * 1e6:6.0f} µs CPU per request "
                f"(rounds: {', '.join(f'{v * 1e6:.0f}' for v in values)}); "
                f"{rate:8.0f} req/s, {rate / direct_rate:4.0%} of direct"
            )
    finally:
        for proc in reversed(procs):
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The floor under the gateway: what uvicorn alone, and uvicorn plus an upstream client, cost.

    uv run python bench/floor.py [--rounds 3] [--seconds 4]

Three throw-away ASGI apps under the gateway's uvicorn settings (uvloop, httptools, no
access log), driven by ``wrk`` at saturation, CPU per request from psutil:

- ``hello``  answers a fixed JSON body: uvicorn's own cost per request;
- ``aiohttp`` forwards to the stand-in upstream with one pooled ``aiohttp`` session and
  nothing else (no auth, metrics, logs, disconnect watching): the client library's cost;
- ``raw``    forwards over pooled keep-alive connections with an asyncio protocol and
  httptools' response parser: what a hand-written upstream client would cost.

Not a design for production (``raw`` handles no errors, timeouts or TLS); it bounds what
changes to the gateway can gain. ``floor.py serve KIND PORT`` runs one app.
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


def serve(kind: str, port: int) -> None:
    import uvicorn

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
        for kind in ("hello", "aiohttp", "raw"):
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
                if done and int(done.group(1)):
                    cpu[kind].append((sum(proc.cpu_times()[:2]) - before) / int(done.group(1)))
        for kind, values in cpu.items():
            print(
                f"{kind:<8} {statistics.median(values) * 1e6:6.0f} µs CPU per request "
                f"(rounds: {', '.join(f'{v * 1e6:.0f}' for v in values)})"
            )
    finally:
        for proc in reversed(procs):
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

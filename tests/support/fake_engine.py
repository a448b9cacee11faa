"""A fake OpenAI-compatible engine with fault knobs, launched by the gateway as a ``command``.

    python fake_engine.py --port 8001 [--startup-delay 2] [--fail-at-start "msg"]
        [--die-after N] [--chunks 5 --chunk-delay 0.05] [--die-mid-stream K] [--split-events]
        [--wedge-after N]
        [--hang-at-start] [--ignore-sigterm] [--spawn-child [--stubborn-child]] [--pid-file F]

Like vLLM, it requires ``Authorization: Bearer $VLLM_API_KEY`` when that variable is set
(``/health`` and ``/stats`` are open). ``/stats`` reports what it saw, for assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import web

FAKE_ENGINE = Path(__file__).resolve()


def error_response(status: int, message: str, kind: str, **extra: str) -> web.Response:
    """An error as vLLM's server words it: ``{"error": {message, type, [param,] code}}``."""
    return web.json_response(
        {"error": {"message": message, "type": kind, **extra, "code": status}}, status=status
    )


def completion_text(model: str, n: int) -> list[str]:
    return [f"tok{i}-{model} " for i in range(n)]


class Engine:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key = os.environ.get("VLLM_API_KEY")
        self.requests = 0
        self.cancelled = 0
        self.completed_streams = 0
        self.events_written = 0  # server-sent events handed to the socket, every stream
        self.auth_headers: list[str] = []
        self.x_api_keys: list[str] = []
        self.started = time.time()

    def check_auth(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        self.auth_headers.append(header)
        if "x-api-key" in request.headers:
            self.x_api_keys.append(request.headers["x-api-key"])
        if self.key and header != f"Bearer {self.key}":
            return error_response(401, "Unauthorized", "invalid_request_error")
        return None

    def count(self) -> None:
        self.requests += 1
        if self.args.die_after and self.requests > self.args.die_after:
            os._exit(3)

    def wedged(self, request: web.Request) -> bool:
        """Past ``--wedge-after N`` requests: alive, but every connection is dropped."""
        if self.args.wedge_after and self.requests >= self.args.wedge_after:
            assert request.transport is not None
            request.transport.abort()
            return True
        return False

    async def health(self, request: web.Request) -> web.Response:
        if self.wedged(request):
            return web.Response()
        return web.Response(text="")

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "pid": os.getpid(),
                "requests": self.requests,
                "cancelled": self.cancelled,
                "completed_streams": self.completed_streams,
                "events_written": self.events_written,
                "auth_headers": self.auth_headers,
                "x_api_keys": self.x_api_keys,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "env_gateway_auth": os.environ.get("VLLM_GATEWAY_AUTH"),
                "argv": sys.argv,
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        denied = self.check_auth(request)
        if denied:
            return denied
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.args.model,
                        "object": "model",
                        "created": 0,
                        "owned_by": "fake",
                        "max_model_len": self.args.max_model_len,
                    }
                ],
            }
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        denied = self.check_auth(request)
        if denied:
            return denied
        if self.wedged(request):
            return web.Response()
        self.count()
        if request.method == "GET":  # the redirected call of --modal-redirect
            return web.json_response(
                {
                    "id": "cmpl-redirected",
                    "object": "chat.completion",
                    "model": "fake",
                    "choices": [],
                    "usage": None,
                }
            )
        if request.content_type != "application/json":  # as vLLM's validate_json_request
            return error_response(
                400, "Unsupported Media Type: Only 'application/json' is allowed", "Bad Request"
            )
        body = await request.json()
        model = body.get("model", "")
        if self.args.modal_redirect:
            raise web.HTTPSeeOther(request.path + "?__modal_function_call_id=fc-123")
        if self.args.garbage or self.args.close_early:
            return await self.misbehave(request)
        if int(body.get("max_tokens") or 0) > 100_000:
            return error_response(
                400, "max_tokens is too large", "BadRequestError", param="max_tokens"
            )
        chat = request.path.endswith("chat/completions")
        n = int(body.get("max_tokens") or self.args.chunks)
        pieces = [p + "x" * self.args.pad for p in completion_text(model, n)]
        if body.get("stream"):
            return await self.stream(request, model, pieces, chat)
        if self.args.response_delay:
            try:
                await asyncio.sleep(self.args.response_delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        content = "".join(pieces)
        choice = (
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "length",
            }
            if chat
            else {"index": 0, "text": content, "finish_reason": "length"}
        )
        return web.json_response(
            {
                "id": "cmpl-fake",
                "object": "chat.completion" if chat else "text_completion",
                "created": 0,
                "model": model,
                "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
            }
        )

    async def misbehave(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        if self.args.garbage:
            transport.write(b"\x00\x01 this is not HTTP \xff\r\n\r\n")
        else:
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"id": "cut'
            )
        await asyncio.sleep(0.05)
        transport.close()
        await asyncio.sleep(30)  # never answer properly; the connection is gone anyway
        return web.StreamResponse()

    async def stream(
        self, request: web.Request, model: str, pieces: list[str], chat: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i, piece in enumerate(pieces):
                if self.args.die_mid_stream and i == self.args.die_mid_stream:
                    if self.args.split_events:  # half an event, then nothing
                        await response.write(b'data: {"id": "cmpl-fake", "obj')
                        await asyncio.sleep(0.1)
                    os._exit(4)
                delta = (
                    {"delta": {"content": piece}, "index": 0, "finish_reason": None}
                    if chat
                    else {"text": piece, "index": 0, "finish_reason": None}
                )
                chunk = {
                    "id": "cmpl-fake",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": 0,
                    "model": model,
                    "choices": [delta],
                }
                await self.write_event(response, b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if self.args.chunk_delay:
                    await asyncio.sleep(self.args.chunk_delay)
            await self.write_event(response, b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.cancelled += 1
            raise
        self.completed_streams += 1
        return response

    async def write_event(self, response: web.StreamResponse, event: bytes) -> None:
        if self.args.split_events:  # as a remote upstream may: an event in two reads
            await response.write(event[: len(event) // 2])
            await asyncio.sleep(0.02)
            event = event[len(event) // 2 :]
        await response.write(event)  # waits while the reader holds back (flow control)
        self.events_written += 1

    async def transcriptions(self, request: web.Request) -> web.Response:
        """Says what it was sent: the model, the language and the audio's size."""
        denied = self.check_auth(request)
        if denied:
            return denied
        self.count()
        form = await request.post()
        audio = form["file"]
        assert isinstance(audio, web.FileField)
        size = len(audio.file.read())
        return web.json_response(
            {"text": f"{form.get('model')} heard {size} bytes in {form.get('language', '?')}"}
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        denied = self.check_auth(request)
        if denied:
            return denied
        self.count()
        body = await request.json()
        return web.json_response(
            {
                "object": "list",
                "model": body.get("model"),
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="fake")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--fail-at-start", default=None)
    parser.add_argument("--hang-at-start", action="store_true")
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--die-mid-stream", type=int, default=0)
    parser.add_argument(
        "--wedge-after",
        type=int,
        default=0,
        help="after N requests stay alive but drop every connection, /health's too",
    )
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument(
        "--split-events",
        action="store_true",
        help="write every event in two halves (with --die-mid-stream K: die after half of K)",
    )
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument(
        "--garbage", action="store_true", help="answer with bytes that are not HTTP"
    )
    parser.add_argument(
        "--close-early",
        action="store_true",
        help="promise a body, send half of it, close the connection",
    )
    parser.add_argument(
        "--modal-redirect",
        action="store_true",
        help="answer POSTs like a Modal web call past 150 s: 303 to a GET",
    )
    parser.add_argument(
        "--response-delay",
        type=float,
        default=0.0,
        help="think this long before a non-streamed answer (like vLLM generating)",
    )
    parser.add_argument("--pad", type=int, default=0, help="bytes of padding in every chunk")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--spawn-child", action="store_true")
    parser.add_argument(
        "--stubborn-child", action="store_true", help="the child of --spawn-child ignores SIGTERM"
    )
    parser.add_argument("--pid-file", default=None)
    parser.add_argument(
        "--tls-cert",
        default=None,
        help="serve HTTPS with this PEM file (key and certificate chain)",
    )
    args = parser.parse_args()

    print(f"fake engine starting on port {args.port}", flush=True)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = [os.getpid()]
    if args.spawn_child:  # like vLLM's EngineCore: a child that outlives a crashed parent
        ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if args.stubborn_child else ""
        code = f"import signal, time; {ignore}time.sleep(3600)"
        child = subprocess.Popen([sys.executable, "-c", code])
        pids.append(child.pid)
    if args.pid_file:
        Path(args.pid_file).write_text(" ".join(map(str, pids)))
    if args.fail_at_start:
        time.sleep(args.startup_delay)
        print(args.fail_at_start, file=sys.stderr, flush=True)
        sys.exit(1)
    if args.hang_at_start:
        print("loading weights: stuck (fake)", flush=True)
        while True:
            time.sleep(1)
    time.sleep(args.startup_delay)

    engine = Engine(args)
    app = web.Application()
    app.router.add_get("/health", engine.health)
    app.router.add_get("/stats", engine.stats)
    app.router.add_get("/v1/models", engine.models)
    app.router.add_post("/v1/chat/completions", engine.completions)
    app.router.add_get("/v1/chat/completions", engine.completions)
    app.router.add_post("/v1/completions", engine.completions)
    app.router.add_post("/v1/messages", engine.completions)  # OpenAI's shapes, Anthropic's route
    app.router.add_post("/v1/embeddings", engine.embeddings)
    app.router.add_post("/v1/audio/transcriptions", engine.transcriptions)
    print("fake engine ready", flush=True)
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        handle_signals=not args.ignore_sigterm,
        handler_cancellation=True,
        ssl_context=tls,
    )


if __name__ == "__main__":
    main()

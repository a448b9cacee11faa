"""vLLM's own HTTP front with no model behind it: the stand-in for "talking to vLLM directly".

    <cpu-engine-venv>/bin/python bench/upstream_vllm_front.py --port 9100

Runs in the CPU engine's venv (``vllm_autoserve.cpu_engine``), because it is made of vLLM's
own parts: its FastAPI route for ``/v1/chat/completions`` (request parsed into vLLM's
``ChatCompletionRequest``, its cancellation and load-tracking wrappers, ``JSONResponse`` of
the response model or ``StreamingResponse`` of SSE lines), the middleware and exception
handlers ``vllm serve`` installs for a generating model, and uvicorn configured as vLLM
configures it (access log on, as by default). Only the serving object behind the route is
replaced: it answers at once instead of templating, tokenizing and generating, so this is a
lower bound of what vLLM's front costs per request, with no model time at all.

Behaviour by ``model``, as ``upstream.py``: ``bench`` chat JSON or ``max_tokens`` SSE chunks
with ``"stream": true``; ``bench-tick`` one chunk every 20 ms; ``bench-hold`` one chunk, then
open until the client leaves. ``GET /health`` answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncGenerator
from typing import Any

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import uvicorn
from fastapi import FastAPI, Request
from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.entrypoints.openai.chat_completion.api_router import attach_router
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
)
from vllm.entrypoints.serve.engine.protocol import UsageInfo
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

MODELS = ("bench", "bench-tick", "bench-hold")


class AnswerAtOnce:
    """Stands in for vLLM's ``OpenAIServingChat``: the same return types, no engine."""

    def __init__(self, tick: float, hold_seconds: float) -> None:
        self.tick = tick
        self.hold_seconds = hold_seconds

    async def create_chat_completion(
        self, request: ChatCompletionRequest, raw_request: Request
    ) -> ChatCompletionResponse | AsyncGenerator[str, None]:
        if request.model == "bench-hold":
            return self.stream(request.model, 1, 0.0, hold=True)
        if request.model == "bench-tick":
            return self.stream(request.model, request.max_tokens or 50, self.tick)
        if request.stream:
            return self.stream(request.model, request.max_tokens or 8, 0.0)
        return ChatCompletionResponse(
            model=request.model,
            choices=[
                ChatCompletionResponseChoice(
                    index=0,
                    message=ChatMessage(role="assistant", content="Hello! " * 24),
                    finish_reason="stop",
                )
            ],
            usage=UsageInfo(prompt_tokens=12, completion_tokens=48, total_tokens=60),
        )

    async def stream(
        self, model: str, chunks: int, interval: float, hold: bool = False
    ) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(chunks):
            if i and interval:  # paced from the start, so jitter does not accumulate
                await asyncio.sleep(max(0.0, start + i * interval - loop.time()))
            chunk = ChatCompletionStreamResponse(
                id="chatcmpl-bench",
                object="chat.completion.chunk",
                created=1700000000,
                model=model,
                choices=[
                    ChatCompletionResponseStreamChoice(
                        index=0, delta=DeltaMessage(content=f"tok{i} ")
                    )
                ],
            )
            yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
        if hold:
            await asyncio.sleep(self.hold_seconds)  # cancelled when the client leaves
        yield "data: [DONE]\n\n"


def create_app(tick: float, hold_seconds: float) -> FastAPI:
    app = FastAPI()
    # What ``vllm serve`` installs for a generating model with its default arguments.
    defaults = argparse.Namespace(
        allowed_origins=["*"],
        allow_credentials=False,
        allowed_methods=["*"],
        allowed_headers=["*"],
        api_key=None,
        enable_request_id_headers=False,
        middleware=[],
        log_error_stack=False,
        sse_keep_alive_interval=0,
    )
    init_exception_handler(app)
    init_entrypoints_middleware(defaults, app, ("generate",))
    attach_router(app)
    app.state.args = defaults
    app.state.openai_serving_chat = AnswerAtOnce(tick, hold_seconds)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": m, "object": "model", "owned_by": "bench"} for m in MODELS]
        return {"object": "list", "data": data}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tick-ms", type=float, default=20.0)
    parser.add_argument("--hold-seconds", type=float, default=300.0)
    args = parser.parse_args()
    app = create_app(args.tick_ms / 1000.0, args.hold_seconds)
    # As vLLM's ``serve_http``: uvicorn's defaults (uvloop, httptools), access log on,
    # keep-alive 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE).
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_keep_alive=5)


if __name__ == "__main__":
    main()

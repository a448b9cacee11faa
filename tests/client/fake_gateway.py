"""An in-memory stand-in for the gateway's HTTP API, served through ``httpx2.MockTransport``.

Only for unit tests of the client: the real gateway is exercised in ``test_client_gateway``.
A model becomes healthy ``start_seconds`` after its first ``/up``; ``/up`` long-polls like the
gateway's (it holds the call until healthy or ``wait`` has passed). Knobs script the rest.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2

BASE_URL = "http://gateway.test/v1"
API_KEY = "test-key"


@dataclass
class Call:
    method: str
    path: str
    body: dict[str, Any]
    headers: httpx2.Headers
    query: str = ""
    at: float = field(default_factory=time.monotonic)


@dataclass
class FakeGateway:
    start_seconds: float = 0.0
    """How long after the first ``/up`` a model is healthy."""
    fail: str | None = None
    """Answer ``/up`` with ``failed`` and this error."""
    pending_forever: bool = False
    up_retry_after: str | None = None
    """A ``Retry-After`` header on ``/up`` answers that are not healthy."""
    up_errors: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)
    """Statuses (and headers) answered to the next ``/up`` calls, before the real answers."""
    redirect_up: bool = False
    """Answer ``POST /up`` with Modal's 303 to ``GET /up?__modal_function_call_id=...``."""
    model_errors: deque[tuple[int, dict[str, Any], dict[str, str]]] = field(default_factory=deque)
    """Answers (status, body, headers) to the next requests that name a model."""
    chunks: int = 3
    break_stream: bool = False
    """Break a streamed chat answer off after its first chunk (the connection is lost)."""
    pools: list[dict[str, Any]] = field(default_factory=list)
    """What ``/status`` lists (one healthy pool "m" when empty)."""
    calls: list[Call] = field(default_factory=list)
    _started: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- what tests look at ----------------------------------------------------------------

    def paths(self) -> list[str]:
        with self._lock:
            return [c.path for c in self.calls]

    def times(self, path: str) -> list[float]:
        with self._lock:
            return [c.at for c in self.calls if c.path == path]

    def count(self, path: str) -> int:
        return self.paths().count(path)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [c.body for c in self.calls if c.path == path]

    def queue_not_ready(self, times: int = 1) -> None:
        for _ in range(times):
            self.model_errors.append(
                (
                    503,
                    error_body("[m] is starting", "service_unavailable", "model_not_ready"),
                    {"Retry-After": "5"},
                )
            )

    def queue_model_failed(self, message: str) -> None:
        self.model_errors.append(
            (503, error_body(message, "engine_error", "model_failed"), {"Retry-After": "5"})
        )

    # -- serving ------------------------------------------------------------------------------

    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self.handle)

    def async_transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self.handle_async)

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        hold = self._record(request)
        if hold > 0:
            time.sleep(hold)
        return self._answer(request)

    async def handle_async(self, request: httpx2.Request) -> httpx2.Response:
        hold = self._record(request)
        if hold > 0:
            await asyncio.sleep(hold)
        return self._answer(request)

    def _record(self, request: httpx2.Request) -> float:
        """Log the call; return how long to hold it (the long-poll of ``/up``)."""
        body = json.loads(request.content) if request.content else {}
        path = request.url.path
        with self._lock:
            self.calls.append(
                Call(request.method, path, body, request.headers, request.url.query.decode())
            )
            if path != "/v1/up" or request.method != "POST" or self.up_errors or self.fail:
                return 0.0
            if self.redirect_up:
                return 0.0
            started = self._started.setdefault(body["model_path"], time.monotonic())
        if self.pending_forever:
            return min(float(body.get("wait", 0)), 0.2)
        left = started + self.start_seconds - time.monotonic()
        return max(0.0, min(left, float(body.get("wait", 0))))

    def _answer(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return httpx2.Response(
                401, json=error_body("bad key", "authentication_error", "invalid_api_key")
            )
        if path == "/v1/up":
            return self._up(request)
        if path == "/v1/down":
            return httpx2.Response(200, json={"model": "m", "status": "down", "state": "cold"})
        if path == "/v1/status":
            return httpx2.Response(200, json={"pools": self.pools or [pool_json("m", "healthy")]})
        body = json.loads(request.content) if request.content else {}
        with self._lock:
            scripted = (
                self.model_errors.popleft() if self.model_errors and "model" in body else None
            )
        if scripted is not None:
            status, error, headers = scripted
            return httpx2.Response(status, json=error, headers=headers)
        handler = _ROUTES.get(path)
        if handler is None:
            return httpx2.Response(
                404, json=error_body("no such route", "invalid_request_error", "not_found")
            )
        return handler(self, body)

    def _up(self, request: httpx2.Request) -> httpx2.Response:
        with self._lock:
            if self.up_errors:
                status, headers = self.up_errors.popleft()
                return httpx2.Response(
                    status, json=error_body("busy", "server_error", None), headers=headers
                )
            if self.redirect_up and request.method == "POST":
                return httpx2.Response(
                    303, headers={"Location": "/v1/up?__modal_function_call_id=fc-1"}
                )
        if request.method == "GET":
            return httpx2.Response(200, json=pool_json("m", "healthy"))
        model = json.loads(request.content)["model_path"]
        if self.fail is not None:
            return httpx2.Response(200, json={**pool_json(model, "failed"), "error": self.fail})
        started = self._started[model]
        healthy = not self.pending_forever and time.monotonic() >= started + self.start_seconds
        headers = (
            {} if healthy or self.up_retry_after is None else {"Retry-After": self.up_retry_after}
        )
        return httpx2.Response(
            200, json=pool_json(model, "healthy" if healthy else "starting"), headers=headers
        )

    def _chat(self, body: dict[str, Any]) -> httpx2.Response:
        model = body["model"]
        if body.get("stream"):
            events = [chunk_json(model, f"tok{i} ") for i in range(self.chunks)]
            sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            if self.break_stream:
                first = f"data: {json.dumps(events[0])}\n\n".encode()
                return httpx2.Response(
                    200, content=_broken_off(first), headers={"content-type": "text/event-stream"}
                )
            return httpx2.Response(
                200, content=sse.encode(), headers={"content-type": "text/event-stream"}
            )
        return httpx2.Response(200, json=completion_json(model, "hello"))

    def _completions(self, body: dict[str, Any]) -> httpx2.Response:
        return httpx2.Response(
            200,
            json={
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "text": "hello", "finish_reason": "stop", "logprobs": None}
                ],
            },
        )

    def _embeddings(self, body: dict[str, Any]) -> httpx2.Response:
        return httpx2.Response(
            200,
            json={
                "object": "list",
                "model": body["model"],
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            },
        )

    def _responses(self, body: dict[str, Any]) -> httpx2.Response:
        response = {
            "id": "resp-1",
            "object": "response",
            "created_at": 0,
            "model": body["model"],
            "status": "completed",
            "output": [],
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
        }
        if not body.get("stream"):
            return httpx2.Response(200, json=response)
        events = [
            {"type": kind, "sequence_number": n, "response": response}
            for n, kind in enumerate(("response.created", "response.completed"))
        ]
        return httpx2.Response(
            200,
            content="".join(
                f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events
            ).encode(),
            headers={"content-type": "text/event-stream"},
        )


_ROUTES: dict[str, Callable[[FakeGateway, dict[str, Any]], httpx2.Response]] = {
    "/v1/chat/completions": FakeGateway._chat,
    "/v1/completions": FakeGateway._completions,
    "/v1/embeddings": FakeGateway._embeddings,
    "/v1/responses": FakeGateway._responses,
}


def _broken_off(first: bytes) -> Iterator[bytes]:
    yield first
    raise httpx2.RemoteProtocolError("peer closed connection without sending complete message")


def error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def pool_json(model: str, state: str) -> dict[str, Any]:
    status = {"healthy": "healthy", "failed": "failed"}.get(state, "pending")
    return {
        "model": model,
        "status": status,
        "state": state,
        "since": time.time() - 65,
        "last_request": None,
        "in_flight": 0,
        "engines": 1 if state != "cold" else 0,
        "gpus": [],
        "error": None,
        "aliases": [],
        "backend": "local",
    }


def completion_json(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        ],
    }


def chunk_json(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }

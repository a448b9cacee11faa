"""ASGI type aliases shared by the hot-path modules (no framework on the pass-through)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import GatewayError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """A complete response in two messages, with its length (not chunked: HTTP/1.0 clients
    read it as it is)."""
    if status != 204:  # which must not have one
        headers = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, error: GatewayError) -> None:
    """``error`` as a complete response, in OpenAI's error format."""
    await send_bytes(send, error.status, error.body_bytes(), error.headers())


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of the request header ``name`` (lower case), if any."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None

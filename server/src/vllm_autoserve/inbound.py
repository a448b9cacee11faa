"""Reading what a client sent: the body (within its size limit) and the model it names."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson

from .asgi import Receive
from .errors import BadRequest, PayloadTooLarge


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class DisconnectWatch:
    """``gone`` completes when the client disconnects (its body already read).

    Watching takes a task per request, a tenth of the gateway's CPU for a quick answer, so
    it starts only once the request has lasted ``after`` seconds, or at once by ``start()``
    (a held request). A client that leaves sooner is noticed that much later; a generation
    lasts far longer than that."""

    __slots__ = ("_receive", "_stopped", "_task", "_timer", "gone")

    def __init__(self, receive: Receive, after: float) -> None:
        loop = asyncio.get_running_loop()
        self.gone: asyncio.Future[None] = loop.create_future()
        self._receive = receive
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._timer = loop.call_later(after, self.start)

    def start(self) -> None:
        if self._task is None and not self._stopped:
            self._timer.cancel()
            self._task = asyncio.ensure_future(self._watch())

    def stop(self) -> None:
        self._stopped = True
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            # The cancelled task keeps its CancelledError, whose frames hold this watch:
            # dropping the task here spares the collector a cycle per watched request.
            self._task = None

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self.gone.done():
            self.gone.set_result(None)


async def read_body(receive: Receive, limit: int, content_length: bytes | None) -> bytes:
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise BadRequest("invalid Content-Length header") from None
        if declared > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def model_of(body: bytes, content_type: bytes | None) -> tuple[str, dict[str, Any] | None]:
    """The requested model, and the parsed JSON body (None for multipart forms)."""
    if content_type and content_type.lower().startswith(b"multipart/form-data"):
        return _multipart_model(body, content_type), None
    if not body:
        raise BadRequest("request body is empty; a JSON object with 'model' is required")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, not {_json_type(data)}")
    model = data.get("model")
    if model is None:
        raise BadRequest("'model' is required", param="model", code="missing_model")
    if not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, not {_json_type(model)}", param="model")
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be a boolean, not {_json_type(stream)}", param="stream")
    return model, data


_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.IGNORECASE)
_MODEL_PART = re.compile(
    rb'content-disposition:\s*form-data;\s*name="?model"?\s*\r\n(?:[^\r\n]+\r\n)*\r\n(.*?)\r\n--',
    re.IGNORECASE | re.DOTALL,
)


def _multipart_model(body: bytes, content_type: bytes) -> str:
    """The ``model`` field of a form (audio transcription requests are multipart)."""
    if not _BOUNDARY.search(content_type):
        raise BadRequest("multipart request without a boundary")
    found = _MODEL_PART.search(body)
    if found is None:
        raise BadRequest("'model' is required", param="model", code="missing_model")
    try:
        return found.group(1).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("'model' is not valid UTF-8", param="model") from None


def _json_type(value: object) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)

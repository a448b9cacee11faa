"""Reading what a client sent: the body (within its size limit) and the model it names."""

from __future__ import annotations

import asyncio
import json
import re

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


def model_of(body: bytes, content_type: bytes | None) -> tuple[str, slice | None]:
    """The requested model, and where its value is in a multipart form (None for JSON)."""
    if content_type and content_type.lower().startswith(b"multipart/form-data"):
        return _multipart_model(body, content_type)
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
    if stream is not None and not _lax_bool(stream):
        raise BadRequest(f"'stream' must be a boolean, not {_json_type(stream)}", param="stream")
    return model, None


# What vLLM's request models (pydantic, lax mode) take for a boolean: what vLLM answers,
# the gateway passes on.
_BOOLEAN_STRINGS = frozenset(
    {"0", "1", "f", "t", "n", "y", "no", "on", "off", "yes", "true", "false"}
)


def _lax_bool(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int | float):
        return value in (0, 1)
    return isinstance(value, str) and value.lower() in _BOOLEAN_STRINGS


_MODEL_KEY = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*')  # a key: no string holds a bare '"'


def with_model(body: bytes, model: str, form_value: slice | None, asked: str) -> bytes:
    """The body naming ``model`` instead of ``asked`` (an alias: the engine knows the
    canonical name), every other byte as sent."""
    if form_value is not None:
        return body[: form_value.start] + model.encode() + body[form_value.stop :]
    # The one "model" key in the body is the top-level one: its value is replaced in place,
    # in milliseconds where re-encoding a body of millions of numbers takes seconds.
    keys = _MODEL_KEY.finditer(body)
    key = next(keys, None)
    if key is not None and next(keys, None) is None:
        start = key.end()
        sent = orjson.dumps(asked)
        if body.startswith(sent, start):
            replaced = body[:start] + orjson.dumps(model) + body[start + len(sent) :]
            # Unless the one literal key was a nested one (the top-level key escaped).
            if orjson.loads(replaced).get("model") == model:
                return replaced
    # Otherwise (nested or repeated keys, an escaped name): the standard library's json
    # keeps every number exactly as sent, big integers included.
    try:
        data = json.loads(body)
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    data["model"] = model
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


_MAX_FORM_PARTS = 1000  # as Starlette (vLLM's server) allows
_BOUNDARY = re.compile(rb'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_FIELD_NAME = re.compile(rb';\s*name\s*=\s*(?:"([^"]*)"|([^;\s]+))', re.IGNORECASE)


def _multipart_model(body: bytes, content_type: bytes) -> tuple[str, slice]:
    """The ``model`` field of a form (audio transcription requests are multipart), and
    where its value is in the body."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise BadRequest("multipart request without a boundary")
    delimiter = b"\r\n--" + (found.group(1) or found.group(2))
    value: slice | None = None
    parts = 0
    position = body.find(delimiter[2:])  # the first delimiter may start the body
    while position != -1:
        line_end = body.find(b"\r\n", position)
        if line_end == -1 or body.startswith(b"--", position + len(delimiter) - 2):
            break  # the closing delimiter, or a cut body
        head_end = body.find(b"\r\n\r\n", line_end)
        if head_end == -1:
            break
        value_end = body.find(delimiter, head_end + 4)
        if value_end == -1:
            break
        parts += 1
        if parts > _MAX_FORM_PARTS:
            raise BadRequest(f"the form has over {_MAX_FORM_PARTS} parts")
        if _names_model(body[line_end + 2 : head_end]):
            if value is not None:  # the gateway and the engine could each take another
                raise BadRequest("the form gives 'model' twice", param="model")
            value = slice(head_end + 4, value_end)
        position = value_end + 2
    if value is None:
        raise BadRequest("'model' is required", param="model", code="missing_model")
    try:
        return body[value].decode("utf-8"), value
    except UnicodeDecodeError:
        raise BadRequest("'model' is not valid UTF-8", param="model") from None


def _names_model(part_headers: bytes) -> bool:
    """Whether a form part's headers make it the field ``model``."""
    for line in part_headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            field = _FIELD_NAME.search(value)
            return field is not None and (field.group(1) or field.group(2)) == b"model"
    return False


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


def is_json(content_type: bytes | None) -> bool:
    """Whether a ``Content-Type`` says JSON."""
    return content_type is not None and content_type.lower().startswith(b"application/json")


def with_json_content_type(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` saying the body is JSON (``curl -d`` says form-urlencoded)."""
    kept = [(k, v) for k, v in headers if k.lower() != b"content-type"]
    return [*kept, (b"content-type", b"application/json")]

"""Streaming pass-through of one request to one upstream.

Pooled keep-alive connections (``upstream_http``) for the gateway's lifetime; bytes go
through as they arrive (no re-encoding, no decompression, no buffering beyond the socket's,
but for a stream's event that arrives in pieces, held until it is whole); the gateway's own
key is replaced by the engine's; when the client goes away the upstream connection is closed
at once, which makes vLLM abort the generation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import (
    SplitResult,
    quote,
    unquote,
    unquote_plus,
    urlencode,
    urljoin,
    urlsplit,
)

from . import metrics
from .asgi import Send
from .errors import (
    BadRequest,
    GatewayError,
    ModelStopped,
    UpstreamDisconnected,
    UpstreamRefusedCredentials,
    UpstreamUnavailable,
)
from .pools.base import Upstream
from .upstream_http import ConnectionPool, Origin, Response, UpstreamError

log = logging.getLogger("vllm_autoserve.proxy")

# Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded either way.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# ... plus those the gateway sets itself, and its own key in either header.
_REQUEST_DROP = _HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"authorization",
    b"x-api-key",
    b"expect",
    b"modal-key",  # Modal's proxy token: the gateway's to send, never a client's
    b"modal-secret",
    # uvicorn (vLLM's server) believes these from 127.0.0.1, where the gateway connects
    # from: a client's own would set the engine's idea of its address and scheme.
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-real-ip",
}
_RESPONSE_DROP = _HOP_BY_HOP | {b"date", b"server"}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_PLAIN_CONNECTION = frozenset({b",keep-alive", b",close"})  # name no other header

_MODAL_CALL_PARAM = "__modal_function_call_id"
_MAX_MODAL_REDIRECTS = 20  # 20 x 150 s: longer than any generation should take


@dataclass
class Forwarded:
    """What happened to one forwarded request (for the access log and metrics)."""

    status: int = 0
    bytes_out: int = 0
    stream: bool = False
    client_gone: bool = False
    upstream_broke: bool = False
    note_head: Callable[[bytes], None] | None = None
    """Called with the first bytes of a 200 answer, as they arrive (the Responses API's ids)."""
    anthropic: bool = False
    """The request is for vLLM's Anthropic API: the gateway's own errors take its shape."""


@dataclass(frozen=True)
class _Target:
    """An upstream base URL taken apart once: where to connect and what to send."""

    origin: Origin
    host_header: bytes
    path_prefix: str
    credentials: bytes | None  # ``Authorization`` for ``user:password@`` in the URL
    base: str  # scheme and authority, to resolve a redirect's ``Location`` against


def _origin(url: SplitResult) -> Origin:
    tls = url.scheme == "https"
    return Origin(url.hostname or "", url.port or (443 if tls else 80), tls)


@functools.lru_cache(maxsize=1024)
def _target(base_url: str) -> _Target:
    url = urlsplit(base_url)
    origin = _origin(url)
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    if origin.port != (443 if origin.tls else 80):
        host += f":{origin.port}"
    credentials = None
    if url.username is not None:
        pair = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
        credentials = b"Basic " + base64.b64encode(pair)
    return _Target(
        origin=origin,
        host_header=host.encode("idna"),
        path_prefix=quote(url.path, safe="/%:@!$&'()*+,;=~"),  # ASCII, escapes kept
        credentials=credentials,
        base=f"{url.scheme}://{host}",
    )


class Proxy:
    def __init__(self) -> None:
        # Generations can be long and silent; only connecting has a deadline.
        self.connections = ConnectionPool(connect_timeout=10.0)

    async def close(self) -> None:
        self.connections.close()

    async def forward(
        self,
        upstream: Upstream,
        *,
        method: str,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        send: Send,
        gone: asyncio.Future[None],
        label: str,
        result: Forwarded,
        shown_as: str | None = None,
        stopped: asyncio.Future[None] | None = None,
    ) -> None:
        """Send the request upstream and stream the answer back, noting in ``result`` what
        was sent; raises ``UpstreamUnavailable`` if nothing could be sent to the client yet.
        ``label`` names the model in the log and metrics, ``shown_as`` (default: the same)
        in what the client is told.
        ``gone`` completes when the client disconnects: the upstream request is then closed
        at once, answered or not. ``stopped`` completes when ``/down`` stops the model: an
        answer under way is then ended with ``model_stopped``."""
        shown = shown_as or label
        target = _target(upstream.url)
        url = target.path_prefix + path
        if query or upstream.params:
            client_query = query.decode("latin-1")
            if client_query and upstream.params:
                client_query = _without_params(client_query, upstream.params)
            url += "?" + "&".join(
                part for part in (client_query, urlencode(upstream.params)) if part
            )
        # latin-1: the client's raw path and query bytes go upstream exactly as they came.
        lines = [
            b"%s %s HTTP/1.1\r\nHost: %s\r\n"
            % (method.encode(), url.encode("latin-1"), target.host_header)
        ]
        lines.extend(b"%s: %s\r\n" % header for header in _end_to_end(headers, _REQUEST_DROP))
        authorization = _authorization(upstream.api_key, target)
        if authorization:
            lines.append(b"Authorization: %s\r\n" % authorization)
        lines.extend(b"%s: %s\r\n" % header for header in upstream.headers)
        if body or method in _BODY_METHODS:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        head = b"".join(lines)
        # One line break per line and no other: the server in front parsed these already,
        # but an ASGI server that let one through must not be able to add headers or
        # requests to the upstream connection.
        breaks = len(lines) + 1
        if head.count(b"\n") != breaks or head.count(b"\r") != breaks:
            raise BadRequest("line break in the request target or a header")
        try:
            response = await self._request(target, method, url, head + body, gone, stopped)
        except UpstreamError as exc:
            if gone.done():  # the client left first; the upstream was told by the close
                result.client_gone = True
                return
            # The engine's address stays in the gateway's log, never in a client's answer.
            if stopped is None or not stopped.done():
                log.warning("%s: the engine did not answer: %s", label, exc)
            raise UpstreamUnavailable(f"the engine serving '{shown}' did not answer") from None
        if response.status == 401:  # never the client's key, which is not sent upstream
            response.release()
            log.warning(
                "%s: the engine refused the gateway's credentials (401): check the key it "
                "is given (a url model's api_key, an --api-key in vllm_args, Modal's proxy "
                "token)",
                label,
            )
            raise UpstreamRefusedCredentials(
                f"the engine serving '{shown}' refused the gateway's credentials; "
                "the gateway's configuration needs fixing, not the client's key"
            )

        def close_upstream(_: object) -> None:
            response.abort()

        gone.add_done_callback(close_upstream)
        if stopped is not None:
            stopped.add_done_callback(close_upstream)
        try:
            await self._relay(response, send, gone, result, label, target, shown, stopped)
        finally:
            gone.remove_done_callback(close_upstream)
            if stopped is not None:
                stopped.remove_done_callback(close_upstream)
            response.release()
            if result.stream:
                metrics.child(metrics.OPEN_STREAMS, label).dec()

    async def _request(
        self,
        target: _Target,
        method: str,
        url: str,
        request: bytes,
        gone: asyncio.Future[None],
        stopped: asyncio.Future[None] | None,
    ) -> Response:
        """One upstream request; follows Modal's own 303s (a web call past 150 s is answered
        with a redirect to the same URL plus ``__modal_function_call_id``), nothing else."""
        for redirects in range(_MAX_MODAL_REDIRECTS + 1):
            response = await self.connections.send(
                target.origin, request, method=method, gone=gone, stopped=stopped
            )
            if response.status != 303 or redirects == _MAX_MODAL_REDIRECTS:
                return response
            location = response.header(b"location") or ""
            if _MODAL_CALL_PARAM not in location:
                return response
            redirected = urlsplit(urljoin(target.base + url, location))
            if _origin(redirected) != target.origin:  # elsewhere: the client's business
                return response
            response.abort()
            url = redirected.path + (f"?{redirected.query}" if redirected.query else "")
            request = _get_request(url, request)
            method = "GET"
        return response

    async def _relay(
        self,
        response: Response,
        send: Send,
        gone: asyncio.Future[None],
        result: Forwarded,
        label: str,
        target: _Target,
        shown_as: str,
        stopped: asyncio.Future[None] | None,
    ) -> None:
        result.status = response.status
        raw = _end_to_end(response.headers, _RESPONSE_DROP)
        if response.status in (204, 304):  # no body, whatever a length says
            raw = [(k, v) for k, v in raw if k.lower() != b"content-length"]
        elif 300 <= response.status < 400:
            raw = [
                (k, _gateway_location(v, target) if k.lower() == b"location" else v) for k, v in raw
            ]
        content_type = response.header(b"content-type") or ""
        result.stream = content_type.lower().startswith("text/event-stream")
        if result.stream:
            metrics.child(metrics.OPEN_STREAMS, label).inc()
        await send({"type": "http.response.start", "status": response.status, "headers": raw})
        unfinished = b""  # a stream's event whose end has not arrived yet: held back
        try:
            while chunk := await response.read():
                result.bytes_out += len(chunk)
                if result.note_head is not None:
                    if result.status == 200:
                        result.note_head(chunk[:4096])
                    result.note_head = None
                if response.drained:  # the last chunk: end the body with it, one write
                    body = unfinished + chunk
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    return
                if result.stream:
                    chunk, unfinished = _whole_events(unfinished + chunk)
                    if not chunk:
                        continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            if gone.done():
                result.client_gone = True
                return
            result.upstream_broke = True  # in the access line: ended without its end
            if stopped is not None and stopped.done():
                # Cut by the gateway before the engine is stopped, so that the answer ends
                # the same way whatever the engine would have made of its stop.
                error: GatewayError = ModelStopped(
                    f"[{shown_as}] was stopped with /down while this request ran"
                )
            else:
                log.warning(
                    "%s: the engine broke off its answer after %d bytes: %s",
                    label,
                    result.bytes_out,
                    exc,
                )
                error = UpstreamDisconnected(
                    f"the engine serving '{shown_as}' broke off the stream"
                )
            if result.stream:
                # Say why in the stream itself, after the last whole event (a half one would
                # make the client's parser fail before it reads why), then end the connection
                # without the final chunk so that no client can take the cut answer for a
                # complete one.
                with contextlib.suppress(OSError):
                    await send(
                        {
                            "type": "http.response.body",
                            "body": error.sse_event(anthropic=result.anthropic),
                            "more_body": True,
                        }
                    )
            return
        if gone.done():
            result.client_gone = True
            return
        await send({"type": "http.response.body", "body": unfinished, "more_body": False})


_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")  # a blank line ends a server-sent event
_MAX_UNFINISHED = 1 << 20  # a longer "event" is no event: pass it on as it is


def _whole_events(data: bytes) -> tuple[bytes, bytes]:
    """``data`` split after its last complete server-sent event: (to send, to hold back)."""
    if data.endswith(b"\n\n") or len(data) > _MAX_UNFINISHED:  # vLLM's chunks: whole events
        return data, b""
    end = 0
    for ending in _EVENT_ENDS:
        at = data.rfind(ending)
        if at >= 0:
            end = max(end, at + len(ending))
    return data[:end], data[end:]


def _without_params(query: str, params: tuple[tuple[str, str], ...]) -> str:
    """The client's query without parameters the gateway sets (Modal's ``model_path``): a
    server may read the first of several, and the client's would pick the engine."""
    names = {name for name, _ in params}
    return "&".join(
        part for part in query.split("&") if unquote_plus(part.partition("=")[0]) not in names
    )


def _end_to_end(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """``headers`` without those in ``drop`` (hop-by-hop ones among them) and without those
    a ``Connection`` header names (RFC 9110 7.6.1)."""
    kept = []
    options = b""
    for name, value in headers:
        lowered = name.lower()
        if lowered not in drop:
            kept.append((name, value))
        elif lowered == b"connection":
            options += b"," + value
    if options and options.lower() not in _PLAIN_CONNECTION:
        named = {option.strip().lower() for option in options.split(b",")}
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept


def _gateway_location(location: bytes, target: _Target) -> bytes:
    """A redirect to the engine itself (vLLM's server redirects ``/v1/models/`` to
    ``http://127.0.0.1:PORT/v1/models``) as the same path on the gateway, like nginx's
    ``proxy_redirect default``: the engine's address is never the client's to see or use."""
    try:
        url = urlsplit(location.decode("latin-1"))
        elsewhere = bool(url.netloc) and _origin(url) != target.origin
    except ValueError:  # a port out of range, a bad IPv6 address
        return location
    if elsewhere:
        return location  # the client's business
    path = url.path
    prefix = target.path_prefix.rstrip("/")
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        path = path[len(prefix) :] or "/"
    query = f"?{url.query}" if url.query else ""
    fragment = f"#{url.fragment}" if url.fragment else ""
    return (path + query + fragment).encode("latin-1")


def _authorization(api_key: str | None, target: _Target) -> bytes | None:
    """The engine's key (never the gateway's); else credentials written into the URL."""
    if api_key:
        return b"Bearer " + api_key.encode("latin-1")  # ASCII: ModelConfig._header_safe
    return target.credentials


def _get_request(url: str, previous: bytes) -> bytes:
    """The GET that follows a Modal 303: the previous request's headers, without a body."""
    head = previous.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    kept = [line for line in head if not line.lower().startswith(b"content-length:")]
    return b"\r\n".join([b"GET %s HTTP/1.1" % url.encode("latin-1"), *kept]) + b"\r\n\r\n"

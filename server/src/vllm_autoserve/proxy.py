"""Streaming pass-through of one request to one upstream.

One pooled ``aiohttp`` session for the gateway's lifetime; bytes go through as they arrive
(no re-encoding, no decompression, no buffering beyond the socket's); the gateway's own key
is replaced by the engine's; when the client goes away the upstream connection is closed at
once, which makes vLLM abort the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp
import orjson
from yarl import URL

from . import metrics
from .asgi import Send
from .errors import UpstreamUnavailable
from .pools.base import Upstream

log = logging.getLogger("vllm_autoserve.proxy")

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the gateway sets itself.
_REQUEST_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "authorization",
        "expect",
    }
)
_REQUEST_DROP_BYTES = frozenset(name.encode() for name in _REQUEST_DROP)
_RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"date",
        b"server",
    }
)

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


class Proxy:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            # Generations can be long and silent; only connecting has a deadline.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Proxy.open() was not awaited"
        return self._session

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
    ) -> Forwarded:
        """Send the request upstream and stream the answer back; raises ``UpstreamUnavailable``
        if nothing could be sent to the client yet. ``gone`` completes when the client
        disconnects: the upstream request is then closed at once, answered or not."""
        url = upstream.url + path
        if query or upstream.params:
            query_string = "&".join(
                part for part in (query.decode("latin-1"), urlencode(upstream.params)) if part
            )
            url += "?" + query_string
        out_headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in headers
            if k.lower() not in _REQUEST_DROP_BYTES
        ]
        if upstream.api_key:
            out_headers.append(("Authorization", f"Bearer {upstream.api_key}"))
        result = Forwarded()
        # A non-streamed answer only starts once generated: a client leaving before that
        # must cancel the request too, or the engine generates for nobody.
        request = asyncio.ensure_future(
            self._request(method, URL(url, encoded=True), body, out_headers)
        )

        def cancel_request(_: object) -> None:
            request.cancel()

        # A callback, not asyncio.wait(): that builds a waiter and two callbacks per call.
        gone.add_done_callback(cancel_request)
        try:
            response = await request
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if request.cancelled() and gone.done() and not (task and task.cancelling()):
                result.client_gone = True
                return result
            raise
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamUnavailable(
                f"upstream did not answer: {exc or type(exc).__name__}"
            ) from exc
        finally:
            gone.remove_done_callback(cancel_request)

        def close_upstream(_: object) -> None:
            # A fresh exception for the reader first: aiohttp's close() would otherwise set
            # its one shared "Connection closed" instance, whose traceback grows with every
            # raise and keeps every response it was raised in alive (a leak per disconnect).
            response.content.set_exception(aiohttp.ClientConnectionError("client disconnected"))
            response.close()

        gone.add_done_callback(close_upstream)
        try:
            await self._relay(response, send, gone, result, label)
        finally:
            gone.remove_done_callback(close_upstream)
            response.release()
            if result.stream:
                metrics.child(metrics.OPEN_STREAMS, label).dec()
        return result

    async def _request(
        self, method: str, url: URL, body: bytes, headers: list[tuple[str, str]]
    ) -> aiohttp.ClientResponse:
        """One upstream request; follows Modal's own 303s (a web call past 150 s is answered
        with a redirect to the same URL plus ``__modal_function_call_id``), nothing else."""
        for _ in range(_MAX_MODAL_REDIRECTS):
            response = await self.session.request(
                method, url, data=body, headers=headers, allow_redirects=False
            )
            location = response.headers.get("Location", "")
            if response.status != 303 or _MODAL_CALL_PARAM not in location:
                return response
            target = url.join(URL(location, encoded=True))
            if target.origin() != url.origin():
                return response
            response.release()
            method, url, body = "GET", target, b""
        return response

    async def _relay(
        self,
        response: aiohttp.ClientResponse,
        send: Send,
        gone: asyncio.Future[None],
        result: Forwarded,
        label: str,
    ) -> None:
        result.status = response.status
        raw = [(k, v) for k, v in response.raw_headers if k.lower() not in _RESPONSE_DROP]
        result.stream = response.content_type == "text/event-stream"
        if result.stream:
            metrics.child(metrics.OPEN_STREAMS, label).inc()
        await send({"type": "http.response.start", "status": response.status, "headers": raw})
        try:
            async for chunk in response.content.iter_any():
                result.bytes_out += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            exc.__traceback__ = None  # it may be a shared instance (see close_upstream)
            if gone.done():
                result.client_gone = True
                return
            result.upstream_broke = True
            log.warning("upstream broke off the response after %d bytes: %s", result.bytes_out, exc)
            if result.stream:
                # Say why in the stream itself, then end the connection without the final
                # chunk so that no client can take the cut answer for a complete one.
                error = {
                    "error": {
                        "message": f"upstream broke off the stream: {exc}",
                        "type": "engine_error",
                        "code": "upstream_disconnected",
                    }
                }
                with contextlib.suppress(OSError):
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"data: " + orjson.dumps(error) + b"\n\n",
                            "more_body": True,
                        }
                    )
            return
        if gone.done():
            result.client_gone = True
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

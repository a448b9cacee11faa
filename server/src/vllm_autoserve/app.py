"""``create_app(pools, config, keys)``: the gateway as one ASGI app.

A thin pure-ASGI front does what every request needs (``/health``, auth, lifespan) and sends
``/v1/*`` model traffic straight to the pass-through below, which holds a request until its
model is healthy and streams the answer back. Everything else (``/up``, ``/status``...)
goes to the FastAPI app in ``control.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import re
import time
from typing import Any

import orjson

from . import metrics, stored_responses
from .asgi import ASGIApp, Message, Receive, Scope, Send, send_bytes
from .auth import ApiKeys
from .config import Config
from .control import create_control_app
from .cors import CrossOrigin
from .errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    ShuttingDown,
    Unauthorized,
    UpstreamUnavailable,
)
from .inbound import ClientGone, DisconnectWatch, model_of, read_body, with_model
from .logs import AccessEntry, AccessLog
from .pools.base import Pool, PoolState, Upstream
from .pools.registry import Pools
from .proxy import Forwarded, Proxy

log = logging.getLogger("vllm_autoserve.app")

_CONTROL_PATHS = frozenset({"/v1/up", "/v1/down", "/v1/status", "/v1/models"})
# vLLM's model routes outside /v1/ (every /v1/ route but the gateway's own is passed through).
_ROOT_ROUTES = frozenset(
    {"/tokenize", "/detokenize", "/pooling", "/classify", "/score", "/rerank", "/v2/rerank"}
)
# vLLM's inference routes (POST only), each its own label in metrics and the access log.
_KNOWN_ROUTES = _ROOT_ROUTES | frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/rerank",
        "/v1/score",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    }
)
_CONTROL_BODY_LIMIT = 64 * 1024
# Watch for the client leaving only once a request lasts this long (see DisconnectWatch).
_WATCH_AFTER_SECONDS = 0.02
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_HEALTH_BODY = orjson.dumps({"status": "ok"})
_JSON = [(b"content-type", b"application/json")]


class GatewayApp:
    """The ASGI callable that uvicorn (or Modal's ``@modal.asgi_app``) serves."""

    def __init__(self, pools: Pools, config: Config, keys: ApiKeys) -> None:
        self.pools = pools
        self.config = config
        self.keys = keys
        self.proxy = Proxy()
        self.access = AccessLog()
        self.cross_origin = CrossOrigin(config.gateway.cors_origins, keyless=keys.open)
        self.control: ASGIApp = create_control_app(pools, config)
        self._sent_as_is = config.names_sent_as_is()
        self.stored = stored_responses.StoredResponses()
        self._public = {"/health", *config.gateway.public_routes}
        if "/status" in self._public:
            self._public.add("/v1/status")
        # Opening the model list opens its entries too (``models.retrieve``).
        self._public_prefix = "/v1/models/" if "/v1/models" in self._public else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind == "websocket":  # not part of the API: refuse the upgrade (uvicorn answers 403)
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            return
        origin = _header(scope, b"origin")
        if origin is not None or self.cross_origin.keyless:
            checked = await self._check_cross_origin(scope, origin, send)
            if checked is None:
                return
            send = checked
        path: str = scope["path"]
        if path == "/health":
            if scope["method"] in ("GET", "HEAD"):
                await send_bytes(send, 200, _HEALTH_BODY, _JSON)
            else:
                await _send_error(
                    send, MethodNotAllowed("/health takes GET or HEAD", allow="GET, HEAD")
                )
            return
        if (
            path.startswith("/v1/")
            and path not in _CONTROL_PATHS
            and not path.startswith("/v1/models/")
        ) or path in _ROOT_ROUTES:
            await self._pass_through(scope, receive, send)  # checks the key itself
            return
        if not self._allowed(scope, path):
            error = _unauthorized()
            await _send_error(send, error)
            return
        await self._control(scope, receive, send)

    async def _check_cross_origin(
        self, scope: Scope, origin: bytes | None, send: Send
    ) -> Send | None:
        """Answers a preflight or a refused request itself (None); otherwise the ``send``
        to answer with, which sets the CORS headers (for an allowed origin only)."""
        error = self.cross_origin.refusal(origin, _header(scope, b"host"))
        if origin is None or error is not None:
            if error is not None:
                await _send_error(send, error)
                return None
            return send
        allowed = self.cross_origin.allows(origin)
        if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method"):
            if not allowed:
                error = Forbidden(
                    "cross-origin requests from this page are not allowed; list its origin "
                    "in [gateway] cors_origins"
                )
                await _send_error(send, error)
                return None
            requested = _header(scope, b"access-control-request-headers")
            await send_bytes(send, 204, b"", self.cross_origin.preflight_headers(origin, requested))
            return None
        return self.cross_origin.answering(send, origin)

    def _allowed(self, scope: Scope, path: str) -> bool:
        if path in self._public or (
            self._public_prefix is not None and path.startswith(self._public_prefix)
        ):
            return True
        return self.keys.allows(_header(scope, b"authorization")) or self.keys.allows_key(
            _header(scope, b"x-api-key")
        )

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The gateway's own routes, with their (small) bodies read within a limit first."""
        if scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                body = await read_body(
                    receive, _CONTROL_BODY_LIMIT, _header(scope, b"content-length")
                )
            except ClientGone:
                return
            except GatewayError as error:
                await _send_error(send, error)
                return
            if body:
                invalid = _json_problem(body)
                if invalid is not None:
                    await _send_error(send, invalid)
                    return
                scope = _as_json(scope)
            receive = _replay(body, receive)
        started: list[bool] = []

        async def noting_start(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.append(True)
            await send(message)

        try:
            await self.control(scope, receive, noting_start)
        except asyncio.CancelledError:
            if not started:  # an /up long-poll when the drain ended (see _answer_shutdown)
                with contextlib.suppress(Exception):
                    await _send_error(send, ShuttingDown())

    # -- lifespan -------------------------------------------------------------------------

    async def startup(self) -> None:
        await self.pools.start()

    def stopping(self) -> None:
        """The server stops taking requests: those waiting for an engine to start are let go
        at once, not after ``drain_seconds`` (which is for generations under way)."""
        self.pools.refuse_starts()

    async def shutdown(self) -> None:
        await self.pools.close()
        await self.proxy.close()
        await asyncio.sleep(0)  # requests cancelled by the shutdown write their access lines
        self.access.flush()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- the pass-through -----------------------------------------------------------------

    async def _pass_through(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path: str = scope["path"]
        route = path if path in _KNOWN_ROUTES else "other"
        model = "-"  # the metrics' label: configured or started models only
        asked: str | None = None
        held = 0.0
        outcome = Forwarded()
        try:
            if not self._allowed(scope, path):  # refused here, so that it is logged and counted
                raise _unauthorized()
            if _CONTROL_CHARS.search(path):
                raise BadRequest("the path contains control characters")
            if route != "other" and scope["method"] != "POST":  # vLLM's inference routes
                raise MethodNotAllowed(f"{path} takes POST, not {scope['method']}", allow="POST")
            body = await read_body(
                receive, self.config.gateway.max_body_bytes, _header(scope, b"content-length")
            )
            model, pool, body, headers = self._route(scope, path, body)
            if route == "/v1/responses":
                outcome.note_head = functools.partial(self.stored.note, model=model)
            watch = DisconnectWatch(receive, after=_WATCH_AFTER_SECONDS)
            gone = watch.gone
            try:
                held_from = time.perf_counter()
                try:
                    upstream = await self._hold(pool, watch)
                finally:
                    held = time.perf_counter() - held_from
                    if held > 0.001:
                        metrics.child(metrics.HELD_SECONDS, model).observe(held)
                if upstream is None:
                    outcome.client_gone = True
                    return
                overhead = time.perf_counter() - started - held
                metrics.child(metrics.OVERHEAD_SECONDS, route).observe(overhead)
                with pool.lease():
                    await self._forward(pool, upstream, scope, headers, body, send, gone, outcome)
            finally:
                watch.stop()
        except ClientGone:
            outcome.client_gone = True
        except GatewayError as error:
            if isinstance(error, ModelNotFound):
                asked = error.asked
            await _answer_error(send, error, outcome)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when drain_seconds are over: say so, rather
            # than leave uvicorn to answer a bare 500 (or cut a stream without a word).
            await _answer_shutdown(send, outcome)
        finally:
            elapsed = time.perf_counter() - started
            status = str(outcome.status) if not outcome.client_gone else "499"
            metrics.child(metrics.REQUESTS, model, route, status).inc()
            metrics.child(metrics.REQUEST_SECONDS, model, route).observe(elapsed)
            self.access.write(
                AccessEntry(
                    created=time.time(),
                    model=model if asked is None else asked,
                    route=route,
                    status=int(status),
                    duration=elapsed,
                    held=held,
                    bytes_out=outcome.bytes_out,
                    upstream_broke=outcome.upstream_broke,
                    client=scope["client"][0] if scope.get("client") else "-",
                )
            )

    def _route(
        self, scope: Scope, path: str, body: bytes
    ) -> tuple[str, Pool, bytes, list[tuple[bytes, bytes]]]:
        """The model a request goes to, its pool, and the body and headers it goes with."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if stored_responses.names_one(path):  # a stored response, by its id
            model = self.stored.model_of(path)
            pool = self.pools.find(model)
            if pool is None or pool.state is not PoolState.HEALTHY:
                raise NotFound(
                    f"the engine of '{model}' that stored this response has stopped since, "
                    "and the response with it",
                    code="response_not_found",
                )
            return model, pool, body, headers
        content_type = _header(scope, b"content-type")
        requested, form_value = model_of(body, content_type)
        if form_value is None and not _is_json(content_type):
            # Taken as JSON (``curl -d`` says form-urlencoded): the engine is told so too.
            headers = _with_json_content_type(headers)
        try:
            model = self.pools.resolve(requested)
        except ModelNotFound as error:
            error.asked = requested  # a well-formed name: the access line says what was asked
            raise
        if model != requested and requested not in self._sent_as_is:
            body = with_model(body, model, form_value, requested)
        return model, self.pools.get(model), body, headers

    async def _hold(self, pool: Pool, watch: DisconnectWatch) -> Upstream | None:
        """The pool's upstream, holding the request while it starts; None if the client left."""
        hold = self.config.gateway.hold_seconds
        if pool.state is PoolState.HEALTHY:
            return await pool.ensure_ready(hold)
        watch.start()
        ready = asyncio.create_task(pool.ensure_ready(hold))
        first: set[asyncio.Future[Any]] = {ready, watch.gone}
        try:
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not ready.done():  # the client left, or this request was cancelled
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ready
        if ready.cancelled():
            return None
        return ready.result()

    async def _forward(
        self,
        pool: Pool,
        upstream: Upstream,
        scope: Scope,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        send: Send,
        gone: asyncio.Future[None],
        outcome: Forwarded,
    ) -> None:
        try:
            await self.proxy.forward(
                upstream,
                method=scope["method"],
                path=_raw_path(scope),
                query=scope["query_string"],
                headers=headers,
                body=body,
                send=send,
                gone=gone,
                label=pool.name,
                result=outcome,
            )
        except UpstreamUnavailable:
            pool.report_unreachable()
            raise


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once (already read), then the client's messages."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


async def _answer_error(send: Send, error: GatewayError, outcome: Forwarded) -> None:
    outcome.status = error.status
    error_body = error.body_bytes()
    outcome.bytes_out = len(error_body)
    await send_bytes(send, error.status, error_body, error.headers())


async def _answer_shutdown(send: Send, outcome: Forwarded) -> None:
    """The end of a request the gateway's shutdown cut: a 503 if nothing was sent yet, an
    error event in a stream under way (left unfinished, so that it reads as cut)."""
    with contextlib.suppress(Exception):  # the client may be gone too
        if outcome.status == 0:
            await _answer_error(send, ShuttingDown(), outcome)
        elif outcome.stream:
            event = ShuttingDown().sse_event()
            await send({"type": "http.response.body", "body": event, "more_body": True})
            outcome.upstream_broke = True


def _json_problem(body: bytes) -> BadRequest | None:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return BadRequest(f"request body is not valid JSON: {exc}")
    return None


async def _send_error(send: Send, error: GatewayError) -> None:
    await send_bytes(send, error.status, error.body_bytes(), error.headers())


def _as_json(scope: Scope) -> Scope:
    """A JSON body sent without its content type (``curl -d`` says form-urlencoded) is
    taken as JSON, as the pass-through does."""
    if _is_json(_header(scope, b"content-type")):
        return scope
    return {**scope, "headers": _with_json_content_type(scope["headers"])}


def _is_json(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.lower().startswith(b"application/json")


def _with_json_content_type(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-type"]
    return [*kept, (b"content-type", b"application/json")]


def _unauthorized() -> Unauthorized:
    return Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")


def _raw_path(scope: Scope) -> str:
    """The path as the client sent it (percent-encoding kept), for the upstream request."""
    raw: bytes | None = scope.get("raw_path")
    return raw.decode("latin-1") if raw else str(scope["path"])


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def tune_gc_for_serving() -> None:
    """Call once, after start-up: what is loaded by then lives as long as the process, so
    keep it out of the cyclic collector's scans, and let the young generation grow before a
    collection (every proxied request allocates a few hundred short-lived objects)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


def create_app(pools: Pools, config: Config, keys: ApiKeys) -> GatewayApp:
    """The gateway's ASGI app over any ``Pools`` backend (local or Modal)."""
    return GatewayApp(pools, config, keys)

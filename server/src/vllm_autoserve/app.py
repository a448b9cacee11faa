"""``create_app(pools, config, keys)``: the gateway as one ASGI app.

A thin pure-ASGI front does what every request needs (``/health``, CORS, lifespan) and sends
``/v1/*`` model traffic straight to the pass-through (``passthrough.py``), which holds a
request until its model is healthy and streams the answer back. Everything else (``/up``,
``/status``...) goes, once its key is checked, to the FastAPI app in ``control.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

import orjson

from .asgi import ASGIApp, Message, Receive, Scope, Send, header, send_bytes, send_error
from .auth import ApiKeys, unauthorized
from .config import Config
from .control import create_control_app
from .cors import CrossOrigin
from .errors import BadRequest, Forbidden, GatewayError, MethodNotAllowed, ShuttingDown
from .inbound import ClientGone, is_json, read_body, with_json_content_type
from .logs import AccessLog
from .passthrough import ROOT_ROUTES, PassThrough
from .pools.registry import Pools
from .proxy import Proxy

log = logging.getLogger("vllm_autoserve.app")

_CONTROL_PATHS = frozenset({"/v1/up", "/v1/down", "/v1/status", "/v1/models"})
_CONTROL_BODY_LIMIT = 64 * 1024
_JSON_ROUTES = frozenset({"/up", "/v1/up", "/down", "/v1/down"})  # control routes with a body
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
        self.pass_through = PassThrough(
            pools, config, allowed=self._allowed, proxy=self.proxy, access=self.access
        )
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
        origin = header(scope, b"origin")
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
                await send_error(
                    send, MethodNotAllowed("/health takes GET or HEAD", allow="GET, HEAD")
                )
            return
        if (
            path.startswith("/v1/")
            and path not in _CONTROL_PATHS
            and not path.startswith("/v1/models/")
        ) or path in ROOT_ROUTES:
            await self.pass_through(scope, receive, send)  # checks the key itself
            return
        if not self._allowed(scope, path):
            error = unauthorized()
            await send_error(send, error)
            return
        await self._control(scope, receive, send)

    async def _check_cross_origin(
        self, scope: Scope, origin: bytes | None, send: Send
    ) -> Send | None:
        """Answers a preflight or a refused request itself (None); otherwise the ``send``
        to answer with, which sets the CORS headers (for an allowed origin only)."""
        error = self.cross_origin.refusal(origin, header(scope, b"host"))
        if origin is None or error is not None:
            if error is not None:
                await send_error(send, error)
                return None
            return send
        allowed = self.cross_origin.allows(origin)
        if scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method"):
            if not allowed:
                error = Forbidden(
                    "cross-origin requests from this page are not allowed; list its origin "
                    "in [gateway] cors_origins"
                )
                await send_error(send, error)
                return None
            requested = header(scope, b"access-control-request-headers")
            await send_bytes(send, 204, b"", self.cross_origin.preflight_headers(origin, requested))
            return None
        return self.cross_origin.answering(send, origin)

    def _allowed(self, scope: Scope, path: str) -> bool:
        if path in self._public or (
            self._public_prefix is not None and path.startswith(self._public_prefix)
        ):
            return True
        return self.keys.allows(header(scope, b"authorization")) or self.keys.allows_key(
            header(scope, b"x-api-key")
        )

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The gateway's own routes, with their (small) bodies read within a limit first."""
        if scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                body = await read_body(
                    receive, _CONTROL_BODY_LIMIT, header(scope, b"content-length")
                )
            except ClientGone:
                return
            except GatewayError as error:
                await send_error(send, error)
                return
            if body and scope["path"] in _JSON_ROUTES:  # elsewhere: 404 or 405 comes first
                invalid = _json_problem(body)
                if invalid is not None:
                    await send_error(send, invalid)
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
            # An /up long-poll when the drain ended (see passthrough._answer_shutdown).
            if not started:
                with contextlib.suppress(Exception):
                    await send_error(send, ShuttingDown())

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
            try:
                message = await receive()
            except asyncio.CancelledError:  # a forced exit: no shutdown message comes
                return
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


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once (already read), then the client's messages."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _json_problem(body: bytes) -> BadRequest | None:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return BadRequest(f"request body is not valid JSON: {exc}")
    return None


def _as_json(scope: Scope) -> Scope:
    """A JSON body sent without its content type (``curl -d`` says form-urlencoded) is
    taken as JSON, as the pass-through does."""
    if is_json(header(scope, b"content-type")):
        return scope
    return {**scope, "headers": with_json_content_type(scope["headers"])}


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

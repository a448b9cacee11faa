"""The pass-through: one model request, held until its model is healthy, then streamed.

Checks the key, reads the body within its limit, finds the model (and its pool) the request
names, holds it while the pool starts (or answers 503 when the hold is over), forwards it
with ``proxy`` and writes the access line and metrics, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import Callable
from typing import Any

from . import metrics, stored_responses
from .asgi import Receive, Scope, Send, header, send_bytes
from .auth import unauthorized
from .config import Config
from .errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    ModelNotFound,
    ModelStopped,
    NotFound,
    ShuttingDown,
    UpstreamUnavailable,
)
from .inbound import (
    ClientGone,
    DisconnectWatch,
    is_json,
    model_of,
    read_body,
    with_json_content_type,
    with_model,
)
from .logs import AccessEntry, AccessLog
from .pools.base import Pool, PoolState, Upstream
from .pools.registry import Pools
from .proxy import Forwarded, Proxy

# vLLM's model routes outside /v1/ (every /v1/ route but the gateway's own is passed through).
ROOT_ROUTES = frozenset(
    {
        "/tokenize",
        "/detokenize",
        "/pooling",
        "/classify",
        "/score",
        "/generative_scoring",
        "/rerank",
        "/v2/rerank",
        "/invocations",  # SageMaker's route: the body is one of the others', model and all
    }
)
# vLLM's inference routes (POST only), each its own label in metrics and the access log.
_KNOWN_ROUTES = ROOT_ROUTES | frozenset(
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
# Watch for the client leaving only once a request lasts this long (see DisconnectWatch).
_WATCH_AFTER_SECONDS = 0.02
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_UTF8_BOM = b"\xef\xbb\xbf"


class PassThrough:
    """The ASGI app of model requests (``/v1/*`` but the gateway's own, and ``ROOT_ROUTES``)."""

    def __init__(
        self,
        pools: Pools,
        config: Config,
        *,
        allowed: Callable[[Scope, str], bool],
        proxy: Proxy,
        access: AccessLog,
    ) -> None:
        self.pools = pools
        self.config = config
        self.proxy = proxy
        self.access = access
        self.stored = stored_responses.StoredResponses()
        self._allowed = allowed
        self._sent_as_is = config.names_sent_as_is()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path: str = scope["path"]
        route = path if path in _KNOWN_ROUTES else "other"
        model = "-"  # the metrics' label: configured or started models only
        asked: str | None = None
        held = 0.0
        outcome = Forwarded(anthropic=route.startswith("/v1/messages"))
        try:
            if not self._allowed(scope, path):  # refused here, so that it is logged and counted
                raise unauthorized()
            if _CONTROL_CHARS.search(path):
                raise BadRequest("the path contains control characters")
            if route != "other" and scope["method"] != "POST":  # vLLM's inference routes
                raise MethodNotAllowed(f"{path} takes POST, not {scope['method']}", allow="POST")
            body = await read_body(
                receive, self.config.gateway.max_body_bytes, header(scope, b"content-length")
            )
            name, pool, body, headers = self._route(scope, path, body)
            hub_wait = 0.0
            if pool is None:  # a name with no pool yet: unlisted ones must exist first
                asked_from = time.perf_counter()
                await self.pools.admit(name)
                pool = self.pools.get(name)
                hub_wait = time.perf_counter() - asked_from  # the Hub's time, not the gateway's
            model = name
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
                overhead = time.perf_counter() - started - held - hub_wait
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
    ) -> tuple[str, Pool | None, bytes, list[tuple[bytes, bytes]]]:
        """The model a request goes to, its pool (None if it has none yet), and the body
        and headers it goes with."""
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
        content_type = header(scope, b"content-type")
        if body.startswith(_UTF8_BOM):  # some Windows clients write one; vLLM reads past it
            body = body[len(_UTF8_BOM) :]
        requested, form_value = model_of(body, content_type)
        if form_value is None and not is_json(content_type):
            # Taken as JSON (``curl -d`` says form-urlencoded): the engine is told so too.
            headers = with_json_content_type(headers)
        try:
            model = self.pools.resolve(requested)
        except ModelNotFound as error:
            error.asked = requested  # a well-formed name: the access line says what was asked
            raise
        if model != requested and requested not in self._sent_as_is:
            body = with_model(body, model, form_value, requested)
        pool = self.pools.find(model)
        if pool is not None:
            pool.last_active = time.monotonic()  # as ``Pools.get`` notes a use
        return model, pool, body, headers

    async def _hold(self, pool: Pool, watch: DisconnectWatch) -> Upstream | None:
        """The pool's upstream, holding the request while it starts; None if the client left."""
        hold = self.config.gateway.hold_seconds
        if pool.ready:
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
        downs = pool.downs
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
                shown_as=pool.shown_name,
                result=outcome,
                stopped=pool.stopped,
            )
        except UpstreamUnavailable:
            if pool.downs != downs:  # the engine went because /down stopped it: say so
                raise ModelStopped(
                    f"[{pool.shown_name}] was stopped with /down while this request ran"
                ) from None
            pool.report_unreachable()
            raise


async def _answer_error(send: Send, error: GatewayError, outcome: Forwarded) -> None:
    outcome.status = error.status
    error_body = error.body_bytes(anthropic=outcome.anthropic)
    outcome.bytes_out = len(error_body)
    await send_bytes(send, error.status, error_body, error.headers())


async def _answer_shutdown(send: Send, outcome: Forwarded) -> None:
    """The end of a request the gateway's shutdown cut: a 503 if nothing was sent yet, an
    error event in a stream under way (left unfinished, so that it reads as cut)."""
    with contextlib.suppress(Exception):  # the client may be gone too
        if outcome.status == 0:
            await _answer_error(send, ShuttingDown(), outcome)
        elif outcome.stream:
            event = ShuttingDown().sse_event(anthropic=outcome.anthropic)
            await send({"type": "http.response.body", "body": event, "more_body": True})
            outcome.upstream_broke = True


def _raw_path(scope: Scope) -> str:
    """The path as the client sent it (percent-encoding kept), for the upstream request."""
    raw: bytes | None = scope.get("raw_path")
    return raw.decode("latin-1") if raw else str(scope["path"])

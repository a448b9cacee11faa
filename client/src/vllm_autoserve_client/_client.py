"""``AutoserveClient`` and ``AsyncAutoserveClient``: OpenAI clients that wait out cold starts.

Thin twins over ``AutoserveBase``. They hook the SDK where its own ``AzureOpenAI`` does:
``_prepare_options`` (run for every attempt, streaming included) fills in the default model
and, the first time a model is named, waits for its pool; ``_send_request`` turns the
gateway's ``503 model_not_ready`` into one more wait and one retry of the same request;
``copy`` (and so ``with_options``) carries the settings and shares the ready-state.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Self, Unpack

import httpx2
from openai import AsyncOpenAI, AsyncStream, NotFoundError, OpenAI, Stream
from openai._compat import cached_property
from openai._models import FinalRequestOptions
from openai._types import HttpxSendArgs
from openai.resources import AsyncCompletions, AsyncEmbeddings, Completions, Embeddings
from openai.resources.chat import AsyncChat, Chat
from openai.resources.responses import AsyncResponses, Responses
from typing_extensions import override

from . import _resources
from ._base import AutoserveBase, json_object, up_answer, up_body, up_not_found, up_options
from ._options import AsyncClientOptions, AsyncCopyOptions, ClientOptions, CopyOptions
from ._ready import ReadyState
from ._requests import (
    MODEL_EXTENSION,
    MODEL_NOT_READY,
    GatewayError,
    is_gateway_503,
    model_of,
    with_default_model,
)
from ._settings import DEFAULT_UP_TIMEOUT, LOGGER_NAME, resolve_api_key, resolve_base_url
from ._up import UpAnswer, WaitCallback, async_wait_for_pool, wait_for_pool

log = logging.getLogger(LOGGER_NAME)


class AutoserveClient(AutoserveBase[httpx2.Client, Stream[Any]], OpenAI):
    """An ``openai.OpenAI`` that waits for a model's pool before the model's first request.

    >>> client = AutoserveClient(model="Qwen/Qwen3-8B", base_url="https://gw.example/v1",
    ...                          api_key="...")  # doctest: +SKIP
    >>> client.chat.completions.create(  # doctest: +SKIP
    ...     messages=[{"role": "user", "content": "Hi"}])

    Takes the SDK's arguments plus ``model`` (the default model), ``up_timeout`` (seconds to
    wait for a pool, in all; 20 minutes by default) and ``on_wait(model, state, elapsed)``.
    ``base_url`` falls back to ``AUTOSERVE_BASE_URL``, then ``OPENAI_BASE_URL``; ``api_key``
    to ``AUTOSERVE_API_KEY``, ``VLLM_GATEWAY_AUTH``, then ``OPENAI_API_KEY``.
    """

    def __init__(
        self,
        *,
        model: str | None = None,
        up_timeout: float = DEFAULT_UP_TIMEOUT,
        on_wait: WaitCallback | None = None,
        api_key: str | Callable[[], str] | None = None,
        base_url: str | httpx2.URL | None = None,
        _ready: ReadyState | None = None,
        **kwargs: Unpack[ClientOptions],
    ) -> None:
        url = resolve_base_url(None if base_url is None else str(base_url))
        key = api_key if callable(api_key) else resolve_api_key(api_key)
        super().__init__(api_key=key, base_url=url, **kwargs)
        self._init_autoserve(model, up_timeout, on_wait, _ready)

    @override
    def copy(
        self,
        *,
        model: str | None = None,
        up_timeout: float | None = None,
        on_wait: WaitCallback | None = None,
        _extra_kwargs: Mapping[str, Any] = {},
        **kwargs: Unpack[CopyOptions],
    ) -> Self:
        """A new client with the same options, some overridden; it shares the ready-state."""
        return super().copy(
            _extra_kwargs={**self._autoserve_kwargs(model, up_timeout, on_wait), **_extra_kwargs},
            **kwargs,
        )

    with_options = copy

    @cached_property
    def chat(self) -> Chat:
        return _resources.DefaultModelChat(self)

    @cached_property
    def completions(self) -> Completions:
        return _resources.DefaultModelCompletions(self)

    @cached_property
    def embeddings(self) -> Embeddings:
        return _resources.DefaultModelEmbeddings(self)

    @cached_property
    def responses(self) -> Responses:
        return _resources.DefaultModelResponses(self)

    def up(self, model: str | None = None, wait: float = 0) -> dict[str, Any]:
        """Ask the gateway to start ``model``'s pool (long-polling ``wait`` s); its answer."""
        name = self._model_arg(model)
        return self._noted(name, json_object(self._post_up(name, wait)))

    def wait_until_ready(self, model: str | None = None, timeout: float | None = None) -> None:
        """Return once ``model``'s pool is healthy (at once if it is known to be).

        Raises ``ModelFailedError``, or ``ModelStartTimeout`` after ``timeout`` seconds
        (default ``up_timeout``). If a wait for the model is already in flight, this joins it.
        """
        self._ensure_ready(self._model_arg(model), timeout)

    def status(self) -> dict[str, Any]:
        """The gateway's ``/status``: ``{"pools": [...]}``, every pool it knows."""
        return json_object(self.get("/status", cast_to=httpx2.Response))

    def down(self, model: str | None = None) -> dict[str, Any]:
        """Stop ``model``'s pool (local) or let it scale to zero (Modal)."""
        name = self._model_arg(model)
        self._ready.forget(self._ready_key(name))
        return json_object(self.post("/down", body={"model_path": name}, cast_to=httpx2.Response))

    def _post_up(self, model: str, wait: float, left: float | None = None) -> httpx2.Response:
        options = up_options(wait, self.timeout, left)
        try:
            return self.post(
                "/up", body=up_body(model, wait), cast_to=httpx2.Response, options=options
            )
        except NotFoundError as exc:
            raise up_not_found(exc) from None

    def _pool_healthy(self, model: str) -> bool:
        """Whether ``/up`` says so (it starts a pool that is cold); true if it cannot say."""
        try:
            return json_object(self._post_up(model, 0)).get("status") == "healthy"
        except Exception:
            return True

    def _ensure_ready(self, model: str, timeout: float | None = None) -> None:
        def wait(left: float) -> None:
            plan = self._pool_wait(model, left)

            def poll(wait: float) -> UpAnswer:
                return up_answer(self._post_up(model, wait, plan.remaining()))

            wait_for_pool(plan, poll)

        self._ready.ensure(self._ready_key(model), self._up_timeout(timeout), wait)

    @override
    def _prepare_options(self, options: FinalRequestOptions) -> FinalRequestOptions:
        options = with_default_model(super()._prepare_options(options), self.model)
        model = model_of(options)
        if model is not None:
            self._ensure_ready(model)
        return options

    @override
    def _send_request(
        self, request: httpx2.Request, *, stream: bool, **kwargs: Unpack[HttpxSendArgs]
    ) -> httpx2.Response:
        try:
            response = super()._send_request(request, stream=stream, **kwargs)
        except httpx2.TimeoutException:
            # Held by the gateway past the client's timeout: the pool went away meanwhile.
            model = request.extensions.get(MODEL_EXTENSION)
            if model is None or self._pool_healthy(model):
                raise
            log.info("[%s] no answer in time and the pool is not healthy: waiting for it", model)
            response = self._resend_when_ready(model, request, stream=stream, **kwargs)
        model = is_gateway_503(request, response)
        if model is None:
            return response
        error = GatewayError.parse(response.read())
        if error.code == MODEL_NOT_READY:
            log.info("[%s] the gateway says the pool is not ready: waiting, then retrying", model)
            response = self._resend_when_ready(model, request, stream=stream, **kwargs)
            if is_gateway_503(request, response) is None:
                return response
            error = GatewayError.parse(response.read())
        self._judge_503(response, model, error)
        return response

    def _resend_when_ready(
        self,
        model: str,
        request: httpx2.Request,
        *,
        stream: bool,
        **kwargs: Unpack[HttpxSendArgs],
    ) -> httpx2.Response:
        """The pool went away: forget it was ready, wait for it, send the request again."""
        self._ready.forget(self._ready_key(model))
        self._ensure_ready(model)
        return super()._send_request(request, stream=stream, **kwargs)


class AsyncAutoserveClient(AutoserveBase[httpx2.AsyncClient, AsyncStream[Any]], AsyncOpenAI):
    """An ``openai.AsyncOpenAI`` that waits for a model's pool before the model's first request.

    >>> client = AsyncAutoserveClient(model="Qwen/Qwen3-8B")  # doctest: +SKIP
    >>> stream = await client.chat.completions.create(  # doctest: +SKIP
    ...     messages=[{"role": "user", "content": "Hi"}], stream=True)

    The same arguments and environment fallbacks as ``AutoserveClient``. One wait per
    (gateway, model) is shared by every task using the client and its copies; as with
    ``AsyncOpenAI``, use one client per event loop.
    """

    def __init__(
        self,
        *,
        model: str | None = None,
        up_timeout: float = DEFAULT_UP_TIMEOUT,
        on_wait: WaitCallback | None = None,
        api_key: str | Callable[[], Awaitable[str]] | None = None,
        base_url: str | httpx2.URL | None = None,
        _ready: ReadyState | None = None,
        **kwargs: Unpack[AsyncClientOptions],
    ) -> None:
        url = resolve_base_url(None if base_url is None else str(base_url))
        key = api_key if callable(api_key) else resolve_api_key(api_key)
        super().__init__(api_key=key, base_url=url, **kwargs)
        self._init_autoserve(model, up_timeout, on_wait, _ready)

    @override
    def copy(
        self,
        *,
        model: str | None = None,
        up_timeout: float | None = None,
        on_wait: WaitCallback | None = None,
        _extra_kwargs: Mapping[str, Any] = {},
        **kwargs: Unpack[AsyncCopyOptions],
    ) -> Self:
        """A new client with the same options, some overridden; it shares the ready-state."""
        return super().copy(
            _extra_kwargs={**self._autoserve_kwargs(model, up_timeout, on_wait), **_extra_kwargs},
            **kwargs,
        )

    with_options = copy

    @cached_property
    def chat(self) -> AsyncChat:
        return _resources.AsyncDefaultModelChat(self)

    @cached_property
    def completions(self) -> AsyncCompletions:
        return _resources.AsyncDefaultModelCompletions(self)

    @cached_property
    def embeddings(self) -> AsyncEmbeddings:
        return _resources.AsyncDefaultModelEmbeddings(self)

    @cached_property
    def responses(self) -> AsyncResponses:
        return _resources.AsyncDefaultModelResponses(self)

    async def up(self, model: str | None = None, wait: float = 0) -> dict[str, Any]:
        """Ask the gateway to start ``model``'s pool (long-polling ``wait`` s); its answer."""
        name = self._model_arg(model)
        return self._noted(name, json_object(await self._post_up(name, wait)))

    async def wait_until_ready(
        self, model: str | None = None, timeout: float | None = None
    ) -> None:
        """Return once ``model``'s pool is healthy; see ``AutoserveClient.wait_until_ready``."""
        await self._ensure_ready(self._model_arg(model), timeout)

    async def status(self) -> dict[str, Any]:
        """The gateway's ``/status``: ``{"pools": [...]}``, every pool it knows."""
        return json_object(await self.get("/status", cast_to=httpx2.Response))

    async def down(self, model: str | None = None) -> dict[str, Any]:
        """Stop ``model``'s pool (local) or let it scale to zero (Modal)."""
        name = self._model_arg(model)
        self._ready.forget(self._ready_key(name))
        response = await self.post("/down", body={"model_path": name}, cast_to=httpx2.Response)
        return json_object(response)

    async def _post_up(self, model: str, wait: float, left: float | None = None) -> httpx2.Response:
        options = up_options(wait, self.timeout, left)
        try:
            return await self.post(
                "/up", body=up_body(model, wait), cast_to=httpx2.Response, options=options
            )
        except NotFoundError as exc:
            raise up_not_found(exc) from None

    async def _pool_healthy(self, model: str) -> bool:
        """Whether ``/up`` says so (it starts a pool that is cold); true if it cannot say."""
        try:
            return json_object(await self._post_up(model, 0)).get("status") == "healthy"
        except Exception:
            return True

    async def _ensure_ready(self, model: str, timeout: float | None = None) -> None:
        async def wait(left: float) -> None:
            plan = self._pool_wait(model, left)

            async def poll(wait: float) -> UpAnswer:
                return up_answer(await self._post_up(model, wait, plan.remaining()))

            await async_wait_for_pool(plan, poll)

        await self._ready.ensure_async(self._ready_key(model), self._up_timeout(timeout), wait)

    @override
    async def _prepare_options(self, options: FinalRequestOptions) -> FinalRequestOptions:
        options = with_default_model(await super()._prepare_options(options), self.model)
        model = model_of(options)
        if model is not None:
            await self._ensure_ready(model)
        return options

    @override
    async def _send_request(
        self, request: httpx2.Request, *, stream: bool, **kwargs: Unpack[HttpxSendArgs]
    ) -> httpx2.Response:
        try:
            response = await super()._send_request(request, stream=stream, **kwargs)
        except httpx2.TimeoutException:
            # Held by the gateway past the client's timeout: the pool went away meanwhile.
            model = request.extensions.get(MODEL_EXTENSION)
            if model is None or await self._pool_healthy(model):
                raise
            log.info("[%s] no answer in time and the pool is not healthy: waiting for it", model)
            response = await self._resend_when_ready(model, request, stream=stream, **kwargs)
        model = is_gateway_503(request, response)
        if model is None:
            return response
        error = GatewayError.parse(await response.aread())
        if error.code == MODEL_NOT_READY:
            log.info("[%s] the gateway says the pool is not ready: waiting, then retrying", model)
            response = await self._resend_when_ready(model, request, stream=stream, **kwargs)
            if is_gateway_503(request, response) is None:
                return response
            error = GatewayError.parse(await response.aread())
        self._judge_503(response, model, error)
        return response

    async def _resend_when_ready(
        self,
        model: str,
        request: httpx2.Request,
        *,
        stream: bool,
        **kwargs: Unpack[HttpxSendArgs],
    ) -> httpx2.Response:
        """The pool went away: forget it was ready, wait for it, send the request again."""
        self._ready.forget(self._ready_key(model))
        await self._ensure_ready(model)
        return await super()._send_request(request, stream=stream, **kwargs)

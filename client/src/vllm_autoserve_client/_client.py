"""``AutoserveClient`` and ``AsyncAutoserveClient``: OpenAI clients that wait out cold starts.

Both are thin twins over ``_AutoserveBase``. They hook the SDK where its own ``AzureOpenAI``
does: ``_prepare_options`` (every attempt, streaming included) fills in the default model and
waits for the pool the first time a model is named; ``_send_request`` turns the gateway's
``503 model_not_ready`` into one more wait and one retry; ``copy`` carries the settings and
the ready-state over to ``with_options`` copies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Generic, Self, TypeVar, Unpack

import httpx2
from openai import AsyncOpenAI, AsyncStream, OpenAI, Stream
from openai._base_client import BaseClient
from openai._compat import cached_property
from openai._models import FinalRequestOptions
from openai._types import HttpxSendArgs, RequestOptions
from openai.resources import AsyncCompletions, AsyncEmbeddings, Completions, Embeddings
from openai.resources.chat import AsyncChat, Chat
from typing_extensions import override

from . import _resources
from ._errors import AutoserveError, ModelFailedError
from ._ready import Key, ReadyState
from ._requests import (
    MODEL_EXTENSION,
    MODEL_FAILED,
    MODEL_NOT_READY,
    NO_BLIND_RETRY,
    GatewayError,
    is_gateway_503,
    model_of,
    with_default_model,
)
from ._settings import DEFAULT_UP_TIMEOUT, LOGGER_NAME, resolve_api_key, resolve_base_url
from ._up import (
    PoolWait,
    UpAnswer,
    WaitCallback,
    async_wait_for_pool,
    parse_retry_after,
    wait_for_pool,
)

log = logging.getLogger(LOGGER_NAME)

_HttpxClientT = TypeVar("_HttpxClientT", httpx2.Client, httpx2.AsyncClient)
_DefaultStreamT = TypeVar("_DefaultStreamT", Stream[Any], AsyncStream[Any])

_UP_SLACK = 30.0
"""Read timeout of an ``/up`` call beyond the ``wait`` it asks the gateway for."""


class _AutoserveBase(
    BaseClient[_HttpxClientT, _DefaultStreamT], Generic[_HttpxClientT, _DefaultStreamT]
):
    """What the sync and async clients share: settings, ready-state, request inspection."""

    model: str | None
    """The default model: requests that name none get this one."""
    up_timeout: float
    """Seconds, in all, that a request waits for its model's pool to become healthy."""
    on_wait: WaitCallback | None
    """Called as ``on_wait(model, state, elapsed_seconds)`` with every answer of ``/up``."""
    _ready: ReadyState

    def _init_autoserve(
        self,
        model: str | None,
        up_timeout: float,
        on_wait: WaitCallback | None,
        ready: ReadyState | None,
    ) -> None:
        self.model = model
        self.up_timeout = up_timeout
        self.on_wait = on_wait
        self._ready = ready if ready is not None else ReadyState()

    def _autoserve_kwargs(
        self, model: str | None, up_timeout: float | None, on_wait: WaitCallback | None
    ) -> dict[str, Any]:
        """The constructor arguments a copy needs; the ready-state is shared, not copied."""
        return {
            "model": self.model if model is None else model,
            "up_timeout": self.up_timeout if up_timeout is None else up_timeout,
            "on_wait": self.on_wait if on_wait is None else on_wait,
            "_ready": self._ready,
        }

    def _ready_key(self, model: str) -> Key:
        return (str(self.base_url), model)

    def _model_arg(self, model: str | None) -> str:
        name = model or self.model
        if not name:
            raise ValueError("No model: pass one, or give the client a default with model=")
        return name

    def _pool_wait(self, model: str, timeout: float | None) -> PoolWait:
        return PoolWait(model, self.up_timeout if timeout is None else timeout, self.on_wait)

    def _judge_503(self, request: httpx2.Request, model: str, error: GatewayError) -> None:
        """Keep the SDK from retrying the gateway's 503s blindly; a failed pool raises."""
        if error.code in (MODEL_NOT_READY, MODEL_FAILED):
            request.extensions[NO_BLIND_RETRY] = True
        if error.code == MODEL_FAILED:
            self._ready.forget(self._ready_key(model))
            raise ModelFailedError(model, error.message)

    @override
    def _build_request(
        self, options: FinalRequestOptions, *, retries_taken: int = 0
    ) -> httpx2.Request:
        request = super()._build_request(options, retries_taken=retries_taken)
        model = model_of(options)
        # Multipart bodies may be streams that cannot be sent twice: no transparent retry.
        if model is not None and options.files is None:
            request.extensions[MODEL_EXTENSION] = model
        return request

    @override
    def _should_retry(self, response: httpx2.Response) -> bool:
        if response.request.extensions.get(NO_BLIND_RETRY):
            return False
        return super()._should_retry(response)


def _up_options(wait: float) -> RequestOptions:
    # tenacity does the retrying; Modal answers a call past 150 s with a 303 to follow.
    return {"max_retries": 0, "timeout": wait + _UP_SLACK, "follow_redirects": True}


def _json_object(response: httpx2.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise AutoserveError(
            f"{response.request.url} did not answer like a vLLM Autoserve gateway "
            f"(HTTP {response.status_code}): {response.text[:200]!r}"
        )
    return body


def _up_answer(response: httpx2.Response) -> UpAnswer:
    return _json_object(response), parse_retry_after(response.headers.get("retry-after"))


class AutoserveClient(_AutoserveBase[httpx2.Client, Stream[Any]], OpenAI):
    """An ``openai.OpenAI`` that waits for a model's pool before its first request.

    >>> client = AutoserveClient(model="Qwen/Qwen3-0.6B", base_url="https://gw.example/v1",
    ...                          api_key="sk-...")
    >>> client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}])  # doctest: +SKIP

    Takes the SDK's arguments plus ``model`` (the default model), ``up_timeout`` (seconds to
    wait for a pool, in all) and ``on_wait(model, state, elapsed_seconds)``. ``base_url`` falls
    back to ``AUTOSERVE_BASE_URL`` then ``OPENAI_BASE_URL``; ``api_key`` to
    ``AUTOSERVE_API_KEY``, ``VLLM_GATEWAY_AUTH``, then ``OPENAI_API_KEY``.
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
        **kwargs: Any,
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
        **kwargs: Any,
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

    def up(self, model: str | None = None, wait: float = 0) -> dict[str, Any]:
        """Ask the gateway to start ``model``'s pool; with ``wait`` long-poll that long."""
        name = self._model_arg(model)
        answer = _json_object(
            self.post(
                "/up",
                body={"model_path": name, "wait": wait},
                cast_to=httpx2.Response,
                options=_up_options(wait),
            )
        )
        if answer.get("status") == "healthy":
            self._ready.mark_ready(self._ready_key(name))
        return answer

    def wait_until_ready(self, model: str | None = None, timeout: float | None = None) -> None:
        """Return once ``model``'s pool is healthy (at once if known to be).

        Raises ``ModelFailedError`` or ``ModelStartTimeout`` (after ``timeout``, default
        ``up_timeout``). If a wait for the model is already in flight, this joins it.
        """
        self._ensure_ready(self._model_arg(model), timeout)

    def status(self) -> dict[str, Any]:
        """The gateway's ``/status``: every known pool."""
        return _json_object(self.get("/status", cast_to=httpx2.Response))

    def down(self, model: str | None = None) -> dict[str, Any]:
        """Stop ``model``'s pool (local) or let it scale to zero (Modal)."""
        name = self._model_arg(model)
        self._ready.forget(self._ready_key(name))
        return _json_object(self.post("/down", body={"model_path": name}, cast_to=httpx2.Response))

    def _ensure_ready(self, model: str, timeout: float | None = None) -> None:
        def poll(wait: float) -> UpAnswer:
            return _up_answer(
                self.post(
                    "/up",
                    body={"model_path": model, "wait": wait},
                    cast_to=httpx2.Response,
                    options=_up_options(wait),
                )
            )

        self._ready.ensure(
            self._ready_key(model), lambda: wait_for_pool(self._pool_wait(model, timeout), poll)
        )

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
        response = super()._send_request(request, stream=stream, **kwargs)
        model = is_gateway_503(request, response)
        if model is None:
            return response
        error = GatewayError.parse(response.read())
        if error.code == MODEL_NOT_READY:
            log.info("[%s] the gateway says the pool is not ready: waiting, then retrying", model)
            self._ready.forget(self._ready_key(model))
            self._ensure_ready(model)
            response = super()._send_request(request, stream=stream, **kwargs)
            if is_gateway_503(request, response) is None:
                return response
            error = GatewayError.parse(response.read())
        self._judge_503(request, model, error)
        return response


class AsyncAutoserveClient(_AutoserveBase[httpx2.AsyncClient, AsyncStream[Any]], AsyncOpenAI):
    """An ``openai.AsyncOpenAI`` that waits for a model's pool before its first request.

    >>> client = AsyncAutoserveClient(model="Qwen/Qwen3-0.6B")  # doctest: +SKIP
    >>> stream = await client.chat.completions.create(  # doctest: +SKIP
    ...     messages=[{"role": "user", "content": "Hi"}], stream=True)

    The same arguments and environment fallbacks as ``AutoserveClient``. One wait per
    (gateway, model) is shared by every task, thread and event loop using the client.
    """

    def __init__(
        self,
        *,
        model: str | None = None,
        up_timeout: float = DEFAULT_UP_TIMEOUT,
        on_wait: WaitCallback | None = None,
        api_key: str | Callable[[], Any] | None = None,
        base_url: str | httpx2.URL | None = None,
        _ready: ReadyState | None = None,
        **kwargs: Any,
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
        **kwargs: Any,
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

    async def up(self, model: str | None = None, wait: float = 0) -> dict[str, Any]:
        """Ask the gateway to start ``model``'s pool; with ``wait`` long-poll that long."""
        name = self._model_arg(model)
        answer = _json_object(
            await self.post(
                "/up",
                body={"model_path": name, "wait": wait},
                cast_to=httpx2.Response,
                options=_up_options(wait),
            )
        )
        if answer.get("status") == "healthy":
            self._ready.mark_ready(self._ready_key(name))
        return answer

    async def wait_until_ready(
        self, model: str | None = None, timeout: float | None = None
    ) -> None:
        """Return once ``model``'s pool is healthy; see ``AutoserveClient.wait_until_ready``."""
        await self._ensure_ready(self._model_arg(model), timeout)

    async def status(self) -> dict[str, Any]:
        """The gateway's ``/status``: every known pool."""
        return _json_object(await self.get("/status", cast_to=httpx2.Response))

    async def down(self, model: str | None = None) -> dict[str, Any]:
        """Stop ``model``'s pool (local) or let it scale to zero (Modal)."""
        name = self._model_arg(model)
        self._ready.forget(self._ready_key(name))
        return _json_object(
            await self.post("/down", body={"model_path": name}, cast_to=httpx2.Response)
        )

    async def _ensure_ready(self, model: str, timeout: float | None = None) -> None:
        async def poll(wait: float) -> UpAnswer:
            return _up_answer(
                await self.post(
                    "/up",
                    body={"model_path": model, "wait": wait},
                    cast_to=httpx2.Response,
                    options=_up_options(wait),
                )
            )

        async def wait() -> None:
            await async_wait_for_pool(self._pool_wait(model, timeout), poll)

        await self._ready.ensure_async(self._ready_key(model), wait)

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
        response = await super()._send_request(request, stream=stream, **kwargs)
        model = is_gateway_503(request, response)
        if model is None:
            return response
        error = GatewayError.parse(await response.aread())
        if error.code == MODEL_NOT_READY:
            log.info("[%s] the gateway says the pool is not ready: waiting, then retrying", model)
            self._ready.forget(self._ready_key(model))
            await self._ensure_ready(model)
            response = await super()._send_request(request, stream=stream, **kwargs)
            if is_gateway_503(request, response) is None:
                return response
            error = GatewayError.parse(await response.aread())
        self._judge_503(request, model, error)
        return response

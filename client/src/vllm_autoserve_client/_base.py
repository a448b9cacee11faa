"""What ``AutoserveClient`` and ``AsyncAutoserveClient`` share, and how they call the gateway.

``AutoserveBase`` holds the settings (default model, ``up_timeout``, ``on_wait``) and the
ready-state, and hooks the SDK's request building so that the gateway's 503s can be told
apart: a request that names a model carries it in a request extension, and the SDK is kept
from retrying ``model_not_ready``/``model_failed`` answers with its own blind backoff.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import httpx2
from openai import AsyncStream, NotFoundError, Stream
from openai._base_client import BaseClient
from openai._models import FinalRequestOptions
from openai._types import RequestOptions
from typing_extensions import override

from ._errors import AutoserveError, ModelFailedResponse
from ._ready import Key, ReadyState
from ._requests import (
    MODEL_EXTENSION,
    MODEL_FAILED,
    MODEL_NOT_READY,
    MODEL_STOPPED,
    NO_BLIND_RETRY,
    GatewayError,
    model_of,
)
from ._up import PoolWait, UpAnswer, WaitCallback, parse_retry_after

_HttpxClientT = TypeVar("_HttpxClientT", httpx2.Client, httpx2.AsyncClient)
_DefaultStreamT = TypeVar("_DefaultStreamT", Stream[Any], AsyncStream[Any])

_UP_SLACK = 30.0
"""Read timeout of an ``/up`` call beyond the ``wait`` it asks the gateway for."""


class AutoserveBase(BaseClient[_HttpxClientT, _DefaultStreamT]):
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

    def _up_timeout(self, timeout: float | None) -> float:
        return self.up_timeout if timeout is None else timeout

    def _pool_wait(self, model: str, timeout: float) -> PoolWait:
        # As the SDK tries a request 1 + max_retries times, so does a wait its connections.
        return PoolWait(model, timeout, self.on_wait, connect_attempts=self.max_retries + 1)

    def _noted(self, model: str, answer: dict[str, Any]) -> dict[str, Any]:
        """An ``/up`` answer, remembered as ready if it says healthy."""
        if answer.get("status") == "healthy":
            self._ready.mark_ready(self._ready_key(model))
        return answer

    def _judge_503(self, response: httpx2.Response, model: str, error: GatewayError) -> None:
        """Keep the SDK from retrying the gateway's 503s blindly; a failed pool raises."""
        if error.code in (MODEL_NOT_READY, MODEL_FAILED):
            response.request.extensions[NO_BLIND_RETRY] = True
        if error.code in (MODEL_FAILED, MODEL_STOPPED):  # the next call waits for it anew
            self._ready.forget(self._ready_key(model))
        if error.code == MODEL_FAILED:
            raise ModelFailedResponse(model, error.message, response=response, body=error.body)

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


def up_body(model: str, wait: float) -> dict[str, Any]:
    return {"model_path": model, "wait": wait}


def up_options(
    wait: float, timeout: float | httpx2.Timeout | None, left: float | None = None
) -> RequestOptions:
    """Options of one ``/up`` call asking the gateway to hold it ``wait`` s.

    The client's own connect timeout holds; the read timeout is long enough for the hold, or
    for a call the gateway answers at once the client's (at most ``_UP_SLACK``), so that a
    gateway that never answers fails as fast as with the plain SDK; and no call outlasts
    ``left``, what remains of the whole wait. tenacity does the retrying; Modal answers a
    call past 150 s with a 303 to follow.
    """
    own = timeout if isinstance(timeout, httpx2.Timeout) else httpx2.Timeout(timeout)
    read = wait + _UP_SLACK if wait > 0 else min(own.read or _UP_SLACK, _UP_SLACK)
    connect = own.connect
    if left is not None:
        read = min(read, max(left, 0.0) + 1.0)
        connect = min(connect or math.inf, max(left, 0.0) + 1.0)
    limits = httpx2.Timeout(connect=connect, read=read, write=own.write, pool=own.pool)
    return {"max_retries": 0, "timeout": limits, "follow_redirects": True}


def up_not_found(exc: NotFoundError) -> Exception:
    """A 404 from ``/up``: the gateway's own (an unlisted model) says which ``code``; any
    other means that ``base_url`` is not a gateway (a bare vLLM server, say)."""
    if isinstance(exc.body, dict) and exc.body.get("code"):
        return exc
    return AutoserveError(
        f"{exc.request.url} was not found (HTTP 404): is the base URL that of a vLLM "
        "Autoserve gateway? (a plain OpenAI-compatible server has no /up, /down or /status)"
    )


def json_object(response: httpx2.Response) -> dict[str, Any]:
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


def up_answer(response: httpx2.Response) -> UpAnswer:
    return json_object(response), parse_retry_after(response.headers.get("retry-after"))

"""What a request means to the gateway: which model it names, and the gateway's 503s.

Pure functions over the SDK's ``FinalRequestOptions`` and responses, shared by both clients.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx2
from openai._compat import model_copy
from openai._models import FinalRequestOptions

DEFAULT_MODEL_ENDPOINTS = frozenset(
    {"/chat/completions", "/completions", "/embeddings", "/responses"}
)
"""Where a missing ``model`` is filled in with the client's default."""

MODEL_NOT_READY = "model_not_ready"
MODEL_FAILED = "model_failed"
MODEL_STOPPED = "model_stopped"

MODEL_EXTENSION = "vllm_autoserve_client.model"
"""Request extension: the model a request names, for the 503 handling in ``_send_request``."""

NO_BLIND_RETRY = "vllm_autoserve_client.no_blind_retry"
"""Request extension: the SDK must not retry this answer with its own backoff."""


def model_of(options: FinalRequestOptions) -> str | None:
    """The model a request names: ``extra_body``'s ``model`` first, as the SDK merges it."""
    if options.method.lower() != "post":
        return None
    for body in (options.extra_json, options.json_data):
        if isinstance(body, Mapping):
            model = body.get("model")
            if isinstance(model, str) and model:
                return model
    return None


def with_default_model(options: FinalRequestOptions, model: str | None) -> FinalRequestOptions:
    """``options`` with ``model`` filled in where the request names none.

    The caller's body is never changed: the copy gets a new dict.
    """
    if model is None or options.url not in DEFAULT_MODEL_ENDPOINTS or model_of(options):
        return options
    body = options.json_data
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        return options
    options = model_copy(options)
    options.json_data = {**body, "model": model}
    return options


@dataclass(frozen=True)
class GatewayError:
    """The ``code`` and ``message`` of an OpenAI-shaped error body."""

    code: str | None
    message: str
    body: Any = None
    """The ``error`` object, as the SDK's errors carry it in ``.body``."""

    @classmethod
    def parse(cls, content: bytes) -> GatewayError:
        try:
            body: Any = json.loads(content)
        except ValueError:
            return cls(None, content.decode(errors="replace").strip())
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls(None, "", body)
        code = error.get("code")
        message = str(error.get("message") or "")
        return cls(code if isinstance(code, str) else None, message, error)


def is_gateway_503(request: httpx2.Request, response: httpx2.Response) -> str | None:
    """The model of a request the gateway answered with 503, or ``None``.

    Only requests that name a model (and whose body can be sent again) carry it.
    """
    model = request.extensions.get(MODEL_EXTENSION)
    if response.status_code != 503 or not isinstance(model, str):
        return None
    return model

"""The gateway's own routes: ``/up``, ``/down``, ``/status``, ``/v1/models``, ``/metrics``.

These are small and rare, so they use FastAPI (validation, OpenAPI at ``/docs``); the hot
pass-through of ``/v1/*`` does not go through here (see ``passthrough.py``).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import metrics
from .config import Config
from .engine_models import EngineModels
from .errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
)
from .pools.registry import Pools
from .pools.status import ModelEntry, PoolState

# OpenAI's routes without their /v1: what a client sends whose base URL lacks it.
_OPENAI_WITHOUT_V1 = re.compile(
    r"^/(chat/completions|completions|embeddings|models|responses|audio|messages)(/|$)"
)


class UpRequest(BaseModel):
    # Strict: `true` is not a count of containers, nor "inf" a number of seconds.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model_path: str = Field(description="Model (Hugging Face repo id, configured name or alias).")
    wait: float = Field(0.0, ge=0, description="Long-poll up to this many seconds (capped).")
    min_containers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Keep this many engines warm until /down (Modal: warm containers; "
        "locally 1 means the engine is not stopped when idle). 0 unpins.",
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_model(cls, data: Any) -> Any:
        # `model` is accepted too: it is what OpenAI-shaped callers naturally send.
        if isinstance(data, dict) and "model_path" not in data and "model" in data:
            return {**data, "model_path": data["model"]}
        return data


class DownRequest(UpRequest):
    """``/down`` takes the same body; ``wait`` and ``min_containers`` are ignored."""


def _error_response(error: GatewayError) -> JSONResponse:
    headers = {k.decode(): v.decode() for k, v in error.headers() if k != b"content-type"}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def create_control_app(pools: Pools, config: Config) -> FastAPI:
    app = FastAPI(
        title="vLLM Autoserve gateway",
        description="OpenAI-compatible gateway that starts vLLM engines on demand.",
        default_response_class=JSONResponse,
        redirect_slashes=False,  # "/up/" is no route: a 404, not a redirect built from Host
    )

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return _error_response(BadRequest("invalid request: " + "; ".join(problems)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow")  # Starlette names the route's methods
            return _error_response(
                MethodNotAllowed(
                    f"{request.url.path} takes {allow or 'another method'}, not {request.method}",
                    allow=allow,
                )
            )
        if exc.status_code == 404:
            path = request.url.path
            if _OPENAI_WITHOUT_V1.match(path):  # a client whose base URL lacks /v1
                return _error_response(
                    NotFound(
                        f"no such route; the OpenAI API is under /v1 (/v1{path}): does "
                        "the client's base URL end in /v1?"
                    )
                )
            return _error_response(NotFound("no such route"))
        return _error_response(BadRequest(str(exc.detail)))

    @app.post("/up")
    @app.post("/v1/up", include_in_schema=False)
    async def up(request: UpRequest) -> dict[str, Any]:
        """Start a model's pool if needed; with ``wait`` long-poll until healthy or failed."""
        name = pools.resolve(request.model_path)
        await pools.admit(name)
        wait = min(request.wait, config.gateway.max_up_wait_seconds)
        status = await pools.get(name).up(wait, pin=request.min_containers)
        return status.as_json()

    @app.post("/down")
    @app.post("/v1/down", include_in_schema=False)
    async def down(request: DownRequest) -> dict[str, Any]:
        """Stop a model's pool (local) or let it scale to zero (Modal)."""
        name = pools.resolve(request.model_path)
        result = (await pools.down(name)).as_json()
        result["status"] = "down"
        return result

    @app.get("/status")
    @app.get("/v1/status", include_in_schema=False)
    async def status() -> dict[str, Any]:
        """Every known pool."""
        return {"pools": [s.as_json() for s in pools.statuses()]}

    engine_models = EngineModels(pools)

    def model_entry(entry: ModelEntry, states: dict[str, PoolState]) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "id": entry.id,
            "object": "model",
            "created": entry.created,
            "owned_by": "vllm-autoserve",
            "root": entry.root,
        }
        if entry.parent is not None:
            fields["parent"] = entry.parent
        length = engine_models.max_model_len(entry.id, entry.pool)
        if length is not None:
            fields["max_model_len"] = length
        fields["state"] = states.get(entry.pool, PoolState.COLD).value
        return fields

    def pool_states() -> dict[str, PoolState]:
        return {s.model: s.state for s in pools.statuses()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """OpenAI's model list: configured models and aliases, plus running ones."""
        await engine_models.refresh()
        states = pool_states()
        return {"object": "list", "data": [model_entry(e, states) for e in pools.listing()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        await engine_models.refresh()
        for entry in pools.listing():
            if entry.id == model_id:
                return model_entry(entry, pool_states())
        raise ModelNotFound(f"[{model_id[:256]}] is not a known model", param="model")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app

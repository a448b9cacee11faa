"""What the Modal gateway and the engine containers agree on: names, engine shapes, shared state.

Names are part of the deployment contract (docs/deploy.md): the app
``vllm-autoserve``, the gateway's label ``gateway``, the secrets ``vllm-gateway-auth`` and
``autoserve-hf-secret``, the volumes ``huggingface-cache`` and ``vllm-cache``.

Engine shapes: models that need the same container settings (GPU spec, concurrency,
scale-down window, startup deadline, pool bound, snapshots) share one engine class, named
``Engine`` for the ``[defaults]`` shape and ``Engine_<GPU>_<hash>`` for the others. Both sides
compute the names from the same configuration file, so the gateway finds a model's class
without asking Modal.

Shared state, one ``modal.Dict`` named ``vllm-autoserve-state``:

    "engine-key"        -> str    VLLM_API_KEY of every engine; random, created on first use
    "boot/<model>"      -> {"call": FunctionCall id ("" while being spawned), "at": epoch s}
    "failure/<model>"   -> {"error": engine log tail, "at": epoch s}   written by a container
                                                                       whose engine failed
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol

from .config import MODAL_MAX_GPUS, Config
from .errors import ConfigError

APP_NAME = "vllm-autoserve"
GATEWAY_LABEL = "gateway"
GATEWAY_SECRET = "vllm-gateway-auth"
HF_SECRET = "autoserve-hf-secret"
HF_CACHE_VOLUME = "huggingface-cache"
VLLM_CACHE_VOLUME = "vllm-cache"
STATE_DICT = "vllm-autoserve-state"

DEFAULT_GPU = "H100"
DEFAULT_MAX_INPUTS = 32
ENGINE_PORT = 8000
DEFAULT_CLASS = "Engine"
SAFE_HOLD = 140.0
"""Longest wait that still answers before Modal's redirect (a web request that has not
started its response after 150 s is answered with a 303)."""
ENGINE_KEY = "engine-key"
START_MARGIN_SECONDS = 60
"""Modal's ``startup_timeout`` and the gateway's wait exceed an engine's own start deadline
(``startup_seconds``) by this much, so that they see its failure, log tail included."""
MODAL_MIN_SCALEDOWN = 2
"""The shortest ``scaledown_window`` Modal accepts."""
MODAL_MAX_SCALEDOWN = 3600
"""The longest ``scaledown_window`` Modal accepts."""
PROXY_KEY_ENV = "MODAL_PROXY_KEY"  # a workspace proxy token, in the gateway's secret
PROXY_SECRET_ENV = "MODAL_PROXY_SECRET"


class StateDict(Protocol):
    """The part of ``modal.Dict`` (its ``.aio`` methods) that the gateway and engines use."""

    async def get(self, key: str) -> Any: ...

    async def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool: ...

    async def pop(self, key: str) -> Any: ...


@dataclass(frozen=True)
class EngineShape:
    """Container settings fixed per engine class (a Modal class cannot vary them per model)."""

    gpu: str
    max_inputs: int
    scaledown_seconds: int
    startup_seconds: int
    max_containers: int | None
    memory_snapshot: bool


def modal_gpu(spec: str | int | None, tensor_parallel_size: int | None = None) -> str:
    """A Modal GPU spec from the configuration's ``gpu`` (an int is a count of the default GPU;
    unset: as many default GPUs as the tensor-parallel size)."""
    if spec is None:
        spec = tensor_parallel_size or 1
        if spec > MODAL_MAX_GPUS:
            raise ConfigError(
                f"tensor_parallel_size = {spec} needs {spec} GPUs: Modal gives one container "
                f"at most {MODAL_MAX_GPUS}"
            )
    if isinstance(spec, int):
        if spec <= 0:
            raise ConfigError('gpu = 0: engines on Modal need a GPU (e.g. gpu = "H100")')
        if spec > MODAL_MAX_GPUS:
            raise ConfigError(
                f"gpu = {spec}: Modal gives one container at most {MODAL_MAX_GPUS} GPUs"
            )
        return DEFAULT_GPU if spec == 1 else f"{DEFAULT_GPU}:{spec}"
    return spec


def engine_shape(config: Config, model: str) -> EngineShape:
    settings = config.model(model)
    gpu = modal_gpu(settings.gpu, settings.tensor_parallel_size)
    snapshot = bool(settings.memory_snapshot)
    if snapshot and ":" in gpu and not gpu.endswith(":1"):
        snapshot = False  # Modal's memory snapshots do not work with multi-GPU containers
    return EngineShape(
        gpu=gpu,
        max_inputs=settings.max_inputs or DEFAULT_MAX_INPUTS,
        scaledown_seconds=int(
            min(
                max(settings.effective_idle_seconds(config.gateway), MODAL_MIN_SCALEDOWN),
                MODAL_MAX_SCALEDOWN,
            )
        ),
        startup_seconds=int(settings.effective_startup_seconds(config.gateway)),
        max_containers=settings.max_containers,
        memory_snapshot=snapshot,
    )


def class_name(shape: EngineShape, default: EngineShape) -> str:
    if shape == default:
        return DEFAULT_CLASS
    gpu = re.sub(r"[^A-Za-z0-9]", "_", shape.gpu.replace(":", "x"))
    digest = hashlib.sha256(repr(shape).encode()).hexdigest()[:6]
    return f"{DEFAULT_CLASS}_{gpu}_{digest}"


def engine_shapes(config: Config) -> dict[str, EngineShape]:
    """Every engine class the app needs: the defaults' shape first, then the listed models'."""
    default = engine_shape(config, "")
    shapes = {DEFAULT_CLASS: default}
    for name, model in config.models.items():
        if model.url is None and model.command is None:
            shape = engine_shape(config, name)
            shapes.setdefault(class_name(shape, default), shape)
    return shapes


def class_for(config: Config, model: str) -> str:
    """The engine class that serves ``model``."""
    return class_name(engine_shape(config, model), engine_shape(config, ""))


def boot_key(model: str) -> str:
    return f"boot/{model}"


def failure_key(model: str) -> str:
    return f"failure/{model}"


async def engine_key(state: StateDict) -> str:
    """The engines' API key: created once by whoever needs it first, then read by everyone."""
    await state.put(ENGINE_KEY, secrets.token_urlsafe(32), skip_if_exists=True)
    key = await state.get(ENGINE_KEY)
    if not isinstance(key, str) or not key:
        raise RuntimeError(f"modal.Dict {STATE_DICT!r} holds no usable {ENGINE_KEY!r}")
    return key


async def report_failure(state: StateDict, model: str, error: str) -> None:
    """Tell the gateways why this model's engine failed (Modal retries a crashed container
    forever and never fails the waiting ``boot`` call, so the Dict carries the reason)."""
    await state.put(failure_key(model), {"error": error, "at": time.time()})


def proxy_headers(config: Config) -> tuple[tuple[bytes, bytes], ...]:
    """The proxy token the gateway sends to engines that require one (``[gateway]
    modal_proxy_auth``), from its environment; none otherwise."""
    if not config.gateway.modal_proxy_auth:
        return ()
    key, secret = os.environ.get(PROXY_KEY_ENV, ""), os.environ.get(PROXY_SECRET_ENV, "")
    if not (re.fullmatch(r"[\x21-\x7e]+", key) and re.fullmatch(r"[\x21-\x7e]+", secret)):
        raise ConfigError(
            f"[gateway] modal_proxy_auth = true needs {PROXY_KEY_ENV} and {PROXY_SECRET_ENV} "
            f"in the {GATEWAY_SECRET!r} secret: create a token with `modal workspace "
            "proxy-tokens create` and add its Modal-Key and Modal-Secret there"
        )
    return ((b"Modal-Key", key.encode()), (b"Modal-Secret", secret.encode()))

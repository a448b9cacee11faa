"""The Modal app ``vllm-autoserve``: an OpenAI-compatible gateway in front of GPU engine pools.

    AUTOSERVE_CONFIG=autoserve.toml modal deploy -m vllm_autoserve.gateway

The gateway (``@modal.asgi_app(label="gateway")``) is the same ASGI app as the local one,
over ``ModalPools``. Each model gets its own autoscaled container pool: the engine classes
are parametrized by ``model_path``, and models with different container settings (GPU type
and count, concurrency, scale-down window...) get different classes, one per "engine shape"
(see ``modal_layout``). The configuration file is read here at deploy time and shipped with
the app, so the containers rebuild the same classes. See docs/deploy.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import modal

from .config import CONFIG_ENV, Config, load_config
from .engine import EngineFailed
from .errors import GatewayError
from .modal_engine import ContainerEngine
from .modal_handles import LiveDict
from .modal_layout import (
    APP_NAME,
    ENGINE_PORT,
    GATEWAY_LABEL,
    GATEWAY_SECRET,
    HF_CACHE_VOLUME,
    HF_SECRET,
    MODAL_MAX_SCALEDOWN,
    SAFE_HOLD,
    START_MARGIN_SECONDS,
    VLLM_CACHE_VOLUME,
    EngineShape,
    engine_key,
    engine_shapes,
    report_failure,
)

if TYPE_CHECKING:
    from .app import GatewayApp

log = logging.getLogger("vllm_autoserve.gateway")

# ## Constants

MINUTES = 60  # seconds
VLLM_VERSION = "0.33.0"  # pinned: engine flags and behaviour change between releases
# The toolkit for vLLM's JIT kernels: the CUDA of the torch that vLLM pins (a test checks).
CUDA_IMAGE = "nvidia/cuda:13.0.0-devel-ubuntu22.04"
PYTHON_VERSION = "3.12"
HF_CACHE_PATH = "/root/.cache/huggingface"
VLLM_CACHE_PATH = "/root/.cache/vllm"
CONFIG_IN_CONTAINER = "/root/autoserve.toml"
REQUEST_TIMEOUT = 60 * MINUTES  # the longest single request, e.g. a long streamed generation
GATEWAY_MAX_INPUTS = 500  # concurrent requests one gateway container holds
GATEWAY_TARGET_INPUTS = 200  # above this, Modal adds gateway containers
GATEWAY_PACKAGES = [  # the gateway's dependencies, pinned as in uv.lock
    "fastapi==0.165.0",
    "aiohttp==3.14.5",
    "httptools==0.9.0",
    "orjson==3.13.0",
    "pydantic==2.14.4",
    "prometheus-client==0.26.0",
    "psutil==7.2.2",
]

# ## Configuration: read at deploy time, shipped with the app


def _load() -> tuple[Config, str | None]:
    if modal.is_local():
        path = os.environ.get(CONFIG_ENV) or None
        return load_config(path), path
    shipped = Path(CONFIG_IN_CONTAINER)
    return load_config(shipped if shipped.exists() else None), None


def gateway_config(config: Config) -> Config:
    """The configuration the gateway runs with: ``hold_seconds`` and ``/up``'s longest wait
    kept under Modal's 150 s web limit (a longer wait is answered with a redirect, not with
    the gateway's own 503 or status). An ``idle_seconds`` over Modal's longest scale-down
    window is reported here; the engine classes and pools use that window."""
    gateway = config.gateway
    if gateway.hold_seconds > SAFE_HOLD:
        log.warning(
            "[gateway] hold_seconds = %g is over Modal's 150 s web limit; using %g",
            gateway.hold_seconds,
            SAFE_HOLD,
        )
    for name in ["", *config.models]:
        model = config.model(name)
        idle = model.effective_idle_seconds(gateway)
        if idle > MODAL_MAX_SCALEDOWN and model.url is None and model.command is None:
            log.warning(
                "%s: idle_seconds = %g is over Modal's longest scale-down window; using %d",
                f'models."{name}"' if name else "[defaults]",
                idle,
                MODAL_MAX_SCALEDOWN,
            )
    clamped = {
        "hold_seconds": min(gateway.hold_seconds, SAFE_HOLD),
        "max_up_wait_seconds": min(gateway.max_up_wait_seconds, SAFE_HOLD),
    }
    settings = gateway.model_copy(update=clamped)
    return config.model_copy(update={"gateway": settings})


CONFIG, CONFIG_FILE = _load()
GATEWAY_CONFIG = gateway_config(CONFIG)
SHAPES = engine_shapes(CONFIG)


def _with_config(image: modal.Image) -> modal.Image:
    image = image.add_local_python_source("vllm_autoserve")  # the same engine and pool code
    if CONFIG_FILE is not None:
        image = image.add_local_file(CONFIG_FILE, CONFIG_IN_CONTAINER)
    return image


# ## Images

engine_image = _with_config(
    modal.Image.from_registry(CUDA_IMAGE, add_python=PYTHON_VERSION)
    .entrypoint([])  # no CUDA banner in the logs
    .uv_pip_install(f"vllm=={VLLM_VERSION}", "orjson==3.13.0")
    .env({"HF_XET_HIGH_PERFORMANCE": "1"})  # saturate the network when downloading weights
)
gateway_image = _with_config(
    modal.Image.debian_slim(python_version=PYTHON_VERSION).uv_pip_install(*GATEWAY_PACKAGES)
)

# ## Weights, compile cache and secrets

hf_cache = modal.Volume.from_name(HF_CACHE_VOLUME, create_if_missing=True)
vllm_cache = modal.Volume.from_name(VLLM_CACHE_VOLUME, create_if_missing=True)
hf_secret = modal.Secret.from_name(HF_SECRET)  # HF_TOKEN, for gated repos
gateway_secret = modal.Secret.from_name(GATEWAY_SECRET)  # VLLM_GATEWAY_AUTH

app = modal.App(APP_NAME, include_source=False)  # the images add the package themselves

# ## The engine: one container pool per model


class _Engine:
    """vLLM for ``model_path``: started in ``@modal.enter``, stopped in ``@modal.exit``."""

    model_path: str
    engine: ContainerEngine | None = None

    async def _start_engine(self, *, sleep_mode: bool) -> ContainerEngine:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        logging.getLogger("vllm_autoserve.engine").setLevel(logging.DEBUG)  # vLLM's own output
        # A request straight to an engine URL may name anything: a name the gateway would
        # refuse fails the container at once, with a one-line reason.
        try:
            canonical = CONFIG.resolve(self.model_path)
        except GatewayError as exc:
            raise EngineFailed(f"[{self.model_path}] is refused: {exc.message}") from None
        if canonical != self.model_path:
            raise EngineFailed(f"[{self.model_path}] is not a canonical model name")
        state = LiveDict()
        key = await engine_key(state)
        engine = ContainerEngine(self.model_path, CONFIG, api_key=key, sleep_mode=sleep_mode)
        try:
            await engine.start()
        except EngineFailed as exc:
            await report_failure(state, self.model_path, str(exc))
            raise
        return engine

    @modal.enter()
    async def start(self) -> None:
        self.engine = await self._start_engine(sleep_mode=False)

    @modal.method()
    async def boot(self) -> str:
        """Spawned once per model by the gateway: by the time a container takes this call its
        engine is healthy (``enter`` waited); raises ``EngineFailed`` with the log tail if the
        engine has died since."""
        assert self.engine is not None
        return await self.engine.check()

    @modal.exit()
    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()


class _SnapshotEngine(_Engine):
    """Memory snapshots: vLLM is loaded, put to sleep and snapshotted once; containers restore
    the snapshot and wake it up (Modal's GPU snapshots; single-GPU containers only)."""

    @modal.enter(snap=True)
    async def start(self) -> None:
        self.engine = await self._start_engine(sleep_mode=True)
        await self.engine.sleep()

    @modal.enter(snap=False)
    async def wake(self) -> None:
        assert self.engine is not None
        await self.engine.wake_up()


def engine_options(shape: EngineShape) -> dict[str, Any]:
    """The ``@app.cls`` arguments of one engine shape."""
    return {
        "image": engine_image,
        "gpu": shape.gpu,  # the model's GPU type and count, from the configuration
        "volumes": {  # weights and compile artifacts outlive containers: faster cold starts
            HF_CACHE_PATH: hf_cache,
            VLLM_CACHE_PATH: vllm_cache,
        },
        "secrets": [hf_secret],  # HF_TOKEN only: engines never see the gateway's keys
        "scaledown_window": shape.scaledown_seconds,  # idle_seconds: then scale to zero
        # Loading large weights takes minutes; the engine's own deadline comes first.
        "startup_timeout": shape.startup_seconds + START_MARGIN_SECONDS,
        "timeout": REQUEST_TIMEOUT,  # one request (a long generation) may run this long
        "max_containers": shape.max_containers,  # cost ceiling of one model's pool
        "enable_memory_snapshot": shape.memory_snapshot,  # opt-in: faster cold starts
        "experimental_options": (  # the snapshot includes GPU memory (vLLM asleep)
            {"enable_gpu_snapshot": True} if shape.memory_snapshot else None
        ),
    }


def _serve(self: _Engine) -> None:
    """vLLM itself answers on ENGINE_PORT: ``enter`` started it and waited until healthy."""


def _engine_class(name: str, shape: EngineShape) -> Any:
    namespace = {
        "__module__": __name__,
        "__qualname__": name,  # Modal finds the class by this name in the container
        "__doc__": f"Engines on {shape.gpu}, one container pool per model_path.",
        "__annotations__": {"model_path": str},
        "model_path": modal.parameter(),  # one autoscaled container pool per model
        # Requests reach vLLM on its port; Modal waits this long for it to listen. With
        # modal_proxy_auth, Modal's front refuses requests without the proxy token.
        "serve": modal.web_server(
            ENGINE_PORT,
            startup_timeout=shape.startup_seconds + START_MARGIN_SECONDS,
            requires_proxy_auth=CONFIG.gateway.modal_proxy_auth,
        )(_serve),
    }
    user_cls = type(name, (_SnapshotEngine if shape.memory_snapshot else _Engine,), namespace)
    # vLLM batches concurrent requests: one container takes max_inputs at once.
    concurrent = modal.concurrent(max_inputs=shape.max_inputs)(user_cls)
    return app.cls(**engine_options(shape))(concurrent)


ENGINE_CLASSES: dict[str, Any] = {name: _engine_class(name, s) for name, s in SHAPES.items()}
globals().update(ENGINE_CLASSES)  # module attributes: how Modal finds them in the container
Engine = ENGINE_CLASSES["Engine"]

# ## The gateway


@app.function(
    image=gateway_image,
    # VLLM_GATEWAY_AUTH: the keys clients send; HF_TOKEN: asking the Hub whether an unlisted
    # (perhaps private) model exists before a GPU container is started for it.
    secrets=[gateway_secret, hf_secret],
    min_containers=GATEWAY_CONFIG.gateway.min_containers,  # 1: no gateway cold start
    timeout=REQUEST_TIMEOUT,  # a streamed answer may run long after its first byte
)
@modal.concurrent(  # I/O bound: one container relays many requests
    max_inputs=GATEWAY_MAX_INPUTS, target_inputs=GATEWAY_TARGET_INPUTS
)
@modal.asgi_app(label=GATEWAY_LABEL)  # https://{workspace}-{environment}--gateway.modal.run
def gateway() -> GatewayApp:
    from .app import create_app, tune_gc_for_serving
    from .auth import ApiKeys, keys_from_env
    from .logs import setup_logging
    from .pools.modal import ModalPools

    # Access and pool lines at INFO, as with `vllm-autoserve serve` (unless the runtime
    # already set logging up).
    if not logging.getLogger().handlers:
        setup_logging("info")
    logging.getLogger("vllm_autoserve").setLevel(logging.INFO)
    if not GATEWAY_CONFIG.gateway.modal_proxy_auth:
        log.warning(
            "engine URLs answer anyone who guesses them, and may start GPU containers for "
            "them: set [gateway] modal_proxy_auth = true (docs/deploy.md, Security)"
        )
    app = create_app(ModalPools(GATEWAY_CONFIG), GATEWAY_CONFIG, ApiKeys(keys_from_env()))
    tune_gc_for_serving()
    return app


# ## Upkeep


@app.function(image=gateway_image, schedule=modal.Period(days=1))
async def keep_engine_key() -> None:
    """Read the engines' key once a day: Modal drops a Dict entry after 7 days unread, and
    an engine restored from a memory snapshot keeps the key it was snapshotted with, so a new
    key would lock the gateway out of it."""
    await engine_key(LiveDict())


# ## Smoke test of the deployment


@app.local_entrypoint()
def smoke(model: str = "Qwen/Qwen3-0.6B", prompt: str = "Say hi in five words.") -> None:
    """``modal run -m vllm_autoserve.gateway --model M``: start M on the deployed gateway and
    chat once (``VLLM_GATEWAY_AUTH`` holds the key)."""
    from vllm_autoserve_client import AutoserveClient

    from .auth import keys_from_env

    url = modal.Function.from_name(APP_NAME, "gateway").get_web_url()
    print(f"gateway: {url}")
    keys = keys_from_env()  # several while keys are rotated: any one of them will do
    if not keys:
        raise SystemExit("set VLLM_GATEWAY_AUTH to the gateway's key")
    client = AutoserveClient(model=model, base_url=f"{url}/v1", api_key=keys[0])
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}]
    )
    print(answer.choices[0].message.content)

"""The engine inside a Modal engine container: vLLM for one model, started and judged by
``engine.py`` like a local engine, on an event loop of its own.

Modal runs a container's event loop only while it runs user code (``@modal.enter``, inputs),
and blocks it while it waits for the web server's port; the engine's output reader and health
checks must go on in between, so they live on a private loop in a daemon thread, and the
container's hooks hand coroutines over to it.

    engine = ContainerEngine("Qwen/Qwen3-8B", config, api_key=key)
    await engine.start()      # returns once /health answers; EngineFailed with the log tail
    await engine.check()      # later: still healthy?
    engine.stop()             # @modal.exit: SIGTERM → grace → SIGKILL to the whole group
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp

from .config import Config
from .engine import EngineFailed, EngineProcess, engine_environment, vllm_command
from .modal_layout import ENGINE_PORT

log = logging.getLogger("vllm_autoserve.modal_engine")

T = TypeVar("T")

FAST_BOOT_ARGS = ("--enforce-eager",)
"""Skip torch.compile and CUDA graph capture: minutes off every cold start, some throughput
lost. ``vllm_args = ["--no-enforce-eager"]`` in the configuration turns it back off (vLLM
takes the last occurrence of a flag)."""
SLEEP_MODE_ARGS = ("--enable-sleep-mode",)
SLEEP_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # exposes /sleep and /wake_up


def engine_argv(
    config: Config, model: str, *, port: int = ENGINE_PORT, sleep_mode: bool = False
) -> tuple[list[str], dict[str, str]]:
    """vLLM's command line and extra environment for ``model`` in an engine container."""
    settings = config.model(model)
    tensor_parallel = settings.tensor_parallel_size or settings.gpu_count()
    extra = [*FAST_BOOT_ARGS, *(SLEEP_MODE_ARGS if sleep_mode else ()), *(settings.vllm_args or [])]
    argv = vllm_command(
        python=sys.executable,
        model=model,
        served_names=config.served_names(model),
        host="0.0.0.0",  # Modal reaches the web server on the container's external interface
        port=port,
        tensor_parallel_size=tensor_parallel if tensor_parallel > 1 else None,
        lora_modules=settings.lora_modules,
        extra_args=extra,
    )
    env = {**(SLEEP_MODE_ENV if sleep_mode else {}), **(settings.env or {})}
    return argv, env


class ContainerEngine:
    """One vLLM engine process, run and watched from a private event loop."""

    def __init__(
        self,
        model: str,
        config: Config,
        *,
        api_key: str,
        port: int = ENGINE_PORT,
        sleep_mode: bool = False,
        argv: list[str] | None = None,
    ) -> None:
        self.model = model
        self.port = port
        self.api_key = api_key
        # Modal's startup_timeout is START_MARGIN_SECONDS longer: the engine's deadline comes
        # first, leaving time to stop vLLM and report why it failed.
        self.startup_seconds = config.model(model).effective_startup_seconds(config.gateway)
        default_argv, extra_env = engine_argv(config, model, port=port, sleep_mode=sleep_mode)
        self.process = EngineProcess(
            model,
            argv or default_argv,
            env=engine_environment(extra_env, api_key),
            health_url=f"http://127.0.0.1:{port}/health",
            stop_grace=config.gateway.stop_grace_seconds,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"engine {model}", daemon=True
        )
        self._session: aiohttp.ClientSession | None = None

    # -- handing work to the engine's loop ------------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if not self._thread.is_alive():
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(self._submit(coro))

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, timeout: float | None = None) -> None:
        """Start vLLM and return once it is healthy; ``EngineFailed`` (with the log tail) if it
        exits first or misses the deadline (then it is stopped)."""
        await self._run(self._start(timeout or self.startup_seconds))

    async def _start(self, timeout: float) -> None:
        await self.process.start()
        try:
            await asyncio.wait_for(self.process.wait_healthy(self._http()), timeout)
        except TimeoutError:
            await self.process.stop()
            raise self.process.failure(
                f"engine did not become healthy within {timeout:g} s"
            ) from None
        except EngineFailed:
            await self.process.stop()
            raise
        log.info("[%s] engine healthy on port %d", self.model, self.port)

    async def check(self) -> str:
        """``"healthy"`` if the engine answers ``/health``; ``EngineFailed`` otherwise."""
        return await self._run(self._check())

    async def _check(self) -> str:
        if self.process.returncode is not None:
            raise self.process.failure(f"engine exited with code {self.process.returncode}")
        try:
            timeout = aiohttp.ClientTimeout(total=10)
            async with self._http().get(self.process.health_url, timeout=timeout) as resp:
                if resp.status == 200:
                    return "healthy"
                problem = f"/health answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            problem = f"/health did not answer: {exc or type(exc).__name__}"
        raise self.process.failure(problem)

    async def sleep(self) -> None:
        """vLLM's sleep mode, level 1: weights to CPU memory, KV cache dropped (before a snapshot)."""
        await self._run(self._post("/sleep?level=1"))

    async def wake_up(self) -> None:
        await self._run(self._post("/wake_up"))

    async def _post(self, path: str) -> None:
        url = f"http://127.0.0.1:{self.port}{path}"
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with self._http().post(url, headers=headers) as resp:
            if resp.status >= 400:
                raise self.process.failure(f"POST {path} answered {resp.status}")

    def log_tail(self) -> str:
        return self.process.log_tail()

    def stop(self) -> None:
        """Stop the engine and its loop (blocking; for ``@modal.exit``)."""
        if not self._thread.is_alive():
            return
        grace = self.process.stop_grace + 10
        try:
            self._submit(self._stop()).result(timeout=grace)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("[%s] engine did not stop cleanly: %s", self.model, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _stop(self) -> None:
        await self.process.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

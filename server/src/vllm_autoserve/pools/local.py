"""Engines as supervised subprocesses on this host: ports, GPU slots, health, idle, restart."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from ..config import Config, ModelConfig
from ..engine import (
    EngineFailed,
    EngineProcess,
    engine_environment,
    exit_account,
    fill_placeholders,
    free_port,
)
from ..engine import vllm_command as build_vllm_command
from .base import Pool, PoolState, StopReason, Upstream
from .registry import Pools
from .slots import EngineSlots, SlotHolder, detect_gpus
from .static import StaticPool

log = logging.getLogger("vllm_autoserve.pools")

ENGINE_HOST = "127.0.0.1"
CPU_HOST_MAX_ENGINES = 3  # [gateway] max_engines when unset, on a host without GPUs
_PROBE_PAUSE = 1.0  # between the two health checks of an engine that refused a request
_FRESH_SECONDS = 1.0  # the least an engine serves before it is stopped for another's start
_MAX_TURN_SECONDS = 120.0  # ... and the most it is kept for its turn (a first launch may
# include a download of many minutes)
_UNUSED_SECONDS = 10.0  # an engine not asked for this long is idle, however new
# A model nobody has asked for this long is no longer wanted: its start may be evicted, and
# stops nothing. Longer than a client retrying a 503 (Retry-After at most 30 s) or polling
# /up leaves between asks.
_ABANDONED_START_SECONDS = 60.0


def _engine_python(settings: ModelConfig) -> tuple[str, bool]:
    """The interpreter with vLLM, and whether it is the provisioned CPU build."""
    if settings.engine_python:
        return settings.engine_python, False
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable, False
    from .. import cpu_engine

    python = cpu_engine.cpu_engine_python()
    if python is None:
        raise EngineFailed(
            "vLLM is not installed for the gateway's Python. Install it (`pip install vllm`), "
            "set `engine_python` to an interpreter that has it, or provision the CPU build "
            "with `vllm-autoserve engine install-cpu`."
        )
    return str(python), True


class LocalPool(Pool):
    backend = "local"
    down_ends_answers = True

    def __init__(
        self,
        name: str,
        settings: ModelConfig,
        config: Config,
        *,
        session: Callable[[], aiohttp.ClientSession],
        slots: EngineSlots,
        neighbours: Callable[[], list[SlotHolder]],
    ) -> None:
        super().__init__(name, settings, config)
        self._session = session
        self._slots = slots
        self._neighbours = neighbours
        self._engine: EngineProcess | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._awaiting_slot = False
        self.on_idle = slots.wake

    # -- launch ---------------------------------------------------------------------------

    def _argv(self, port: int) -> tuple[list[str], dict[str, str]]:
        settings = self.settings
        served = self.config.served_names(self.name)
        extra_env: dict[str, str] = {}
        if settings.command is not None:
            values = {"port": str(port), "model": self.name, "host": ENGINE_HOST}
            return fill_placeholders(settings.command, values), extra_env
        python, cpu_build = _engine_python(settings)
        prefix: list[str] = []
        extra_args = list(settings.vllm_args or [])
        if cpu_build:
            from .. import cpu_engine

            prefix = cpu_engine.cpu_launch_prefix()
            extra_args = [*cpu_engine.cpu_engine_args(), *extra_args]
            # A local folder needs no hub; a repo id must be downloaded.
            extra_env = cpu_engine.cpu_engine_env(offline=Path(self.name).is_dir())
        argv = build_vllm_command(
            python=python,
            model=self.name,
            served_names=served,
            host=ENGINE_HOST,
            port=port,
            tensor_parallel_size=settings.tensor_parallel_size,
            lora_modules=settings.lora_modules,
            extra_args=extra_args,
        )
        return prefix + argv, extra_env

    async def _launch(self) -> Upstream:
        if self._watcher is not None:  # the clean-up after an engine that died
            await asyncio.wait({self._watcher})  # however it ends; this task stays cancellable
        count = self.settings.gpu_count()
        self._awaiting_slot = True  # stays so if the startup deadline cuts the wait short
        devices = await self._slots.acquire(
            self.name, count, self._neighbours, shown_as=self.shown_name, wanted=self._wanted
        )
        self._awaiting_slot = False
        self._launched_at = time.monotonic()  # its start's own time begins
        port = free_port(ENGINE_HOST)
        api_key = secrets.token_urlsafe(24)
        argv, extra_env = self._argv(port)
        env = engine_environment({**extra_env, **(self.settings.env or {})}, api_key)
        if self._slots.hands_out_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        engine = EngineProcess(
            self.shown_name,
            argv,
            env=env,
            health_url=f"http://{ENGINE_HOST}:{port}/health",
            stop_grace=self.config.gateway.stop_grace_seconds,
            own_listener=self.settings.command is None,
        )
        self._engine = engine
        await engine.start()
        await engine.wait_healthy(self._session())
        self._watcher = asyncio.create_task(self._watch(engine), name=f"watch {self.name}")
        return Upstream(url=f"http://{ENGINE_HOST}:{port}", api_key=api_key)

    async def _watch(self, engine: EngineProcess) -> None:
        code = await engine.wait_exit()
        if self._engine is engine:
            # Failed at once, so that requests get a 503 with Retry-After, not a 502; its
            # leftover children may take a few seconds to go, and a restart waits for them.
            self._engine_died(str(engine.failure(f"engine exited with {exit_account(code)}")))
            await engine.stop()
            self._slots.release(self.name)

    def report_unreachable(self) -> None:
        # A healthy engine refused a request: if its /health fails too, it is wedged though
        # alive, and would fail every request while it kept its slot and never went idle.
        if self._state is PoolState.HEALTHY and self._engine and self._probe is None:
            self._probe = asyncio.create_task(self._probe_engine(self._engine))

    async def _probe_engine(self, engine: EngineProcess) -> None:
        """Stop ``engine`` as if it had died if ``/health`` is refused twice, 1 s apart (the
        watcher cleans up; the next request after the cooldown starts it anew). A health
        check that only times out stops nothing: a busy engine on a small host may be slow."""
        try:
            for attempt in range(2):
                if attempt:
                    await asyncio.sleep(_PROBE_PAUSE)
                if await engine.health(self._session()) is not False:
                    return
            if self._engine is engine and engine.returncode is None:  # else: it exited
                self._engine_died(
                    f"[{self.shown_name}] the engine stopped answering on its port while its "
                    "process ran; it was stopped"
                )
                await engine.stop()
        finally:
            self._probe = None

    async def _terminate(self, reason: StopReason | None) -> None:
        if self._probe is not None:
            self._probe.cancel()
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.stop()
        self._slots.release(self.name)

    def _engines(self) -> int:
        return 0 if self._awaiting_slot else super()._engines()  # none launched yet

    def _waiting_for_slot(self) -> bool:
        return self._awaiting_slot and self._state is PoolState.STARTING

    def _progress(self) -> str:
        if self._making_way:
            return (
                "is finishing its requests under way to make way for another model's engine "
                "(all engine slots are in use); it starts again after"
            )
        if self._awaiting_slot:
            return (
                "is waiting for GPUs or an engine slot ([gateway] max_engines), which busy, "
                "pinned or just started engines hold"
            )
        return super()._progress()

    def _start_account(self) -> str:
        if self._awaiting_slot:
            return (
                "it was still waiting for GPUs or an engine slot ([gateway] max_engines): the "
                "engines that hold them are busy, pinned or just started"
            )
        return self._engine.log_tail() if self._engine else ""

    def at_rest(self) -> bool:
        # A crashed engine is failed at once, and cleaned up after (its slot released last).
        cleaned_up = self._watcher is None or self._watcher.done()
        return super().at_rest() and cleaned_up and not self._slots.holds(self.name)

    def _gpus(self) -> list[int]:
        return self._slots.held_by(self.name)

    # -- SlotHolder -----------------------------------------------------------------------

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def making_way(self) -> bool:
        return self._making_way

    def _wanted(self) -> bool:
        """Whether someone waits for this model, or asked for it lately (a client sleeping
        out a 503's Retry-After): its start may have others stopped for it."""
        recent = time.monotonic() - self.last_active < _ABANDONED_START_SECONDS
        return self._pinned or self._waiting > 0 or recent

    def _served_its_turn(self) -> bool:
        """Healthy for as long as its own launch took at least (a second at least, two
        minutes at most): until then it is not stopped for another model while in use, so
        that two busy models sharing a slot spend at most half of the time starting, and the
        requests it was started for (which take a moment to see it healthy, and clients that
        come back) are served."""
        launch = self._healthy_since - self._launched_at
        turn = min(max(_FRESH_SECONDS, launch), _MAX_TURN_SECONDS)
        return time.monotonic() - self._healthy_since >= turn

    def evictable_since(self) -> float | None:
        if self._pinned or not self._slots.holds(self.name):  # pinned: kept until /down
            return None
        if self._state is PoolState.HEALTHY and self._in_flight == 0:
            unused = time.monotonic() - self.last_active >= _UNUSED_SECONDS
            if self._making_way or (self._waiting == 0 and (self._served_its_turn() or unused)):
                return self.last_active
        if self._state is PoolState.STARTING and not self._wanted():
            return self.last_active  # a start nobody has waited for in a while
        return None

    def make_way_since(self) -> float | None:
        """When it turned healthy, if it may be asked to make way for another model's start:
        not pinned, and its turn served."""
        if (
            self._state is not PoolState.HEALTHY
            or self._pinned
            or self._making_way
            or not self._slots.holds(self.name)
            or not self._served_its_turn()
        ):
            return None
        return self._healthy_since

    def make_way(self, on: bool) -> None:
        """Take no new requests (they wait) until those under way are answered and another
        start evicts the engine; ``False``: take them again (that start got its slot or gave
        up first)."""
        if on == self._making_way or (
            on and (self._state is not PoolState.HEALTHY or self._pinned)
        ):
            return
        self._making_way = on
        if on:
            log.info(
                "[%s] takes no new requests: it makes way for another model's engine once its "
                "%d under way are answered",
                self.name,
                self._in_flight,
            )
        else:
            self._notify_waiters()

    def evict(self) -> asyncio.Future[object]:
        return asyncio.ensure_future(self.down(StopReason.EVICTED))


class LocalPools(Pools):
    """Pools of this host: subprocess engines, and static upstreams for ``url =`` models."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        devices = detect_gpus(config.gateway.local_gpus)
        max_engines = config.gateway.max_engines
        if max_engines is None and not devices:
            # Nothing else bounds CPU engines (a few GB of memory each): without a bound,
            # every new name a key holder sends starts one more. Pinned ones all get a slot.
            max_engines = max(CPU_HOST_MAX_ENGINES, len(config.pinned_engines()))
        self.slots = EngineSlots(devices, max_engines)

    def _backend_of(self, settings: ModelConfig) -> str:
        return StaticPool.backend if settings.url is not None else LocalPool.backend

    def _create(self, name: str, settings: ModelConfig) -> Pool:
        if settings.url is not None:
            return StaticPool(name, settings, self.config, self.session)
        return LocalPool(
            name,
            settings,
            self.config,
            session=self.session,
            slots=self.slots,
            neighbours=self._local_pools,
        )

    async def start(self) -> None:
        """Also start every model with ``min_containers``, pinned: kept until ``/down``."""
        await super().start()
        if self.config.gateway.max_engines is None and not self.slots.hands_out_gpus:
            log.info(
                "no GPUs: [gateway] max_engines = %d (local engines at once; set it to change)",
                self.slots.max_engines,
            )
        for name in self.config.pinned_engines():
            pool = self.get(name)
            pins = self.config.model(name).min_containers
            assert pins  # as pinned_engines() chose it
            await pool.pin(pins)
            await pool.up(0)

    def _local_pools(self) -> list[SlotHolder]:
        return [pool for pool in self._pools.values() if isinstance(pool, LocalPool)]

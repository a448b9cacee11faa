"""The ``Pools`` registry: every model's pool, created on first use, and the idle reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod

import aiohttp

from .. import metrics
from ..config import Config, ModelConfig
from ..errors import ModelNotFound
from ..hub import HubCheck
from .base import Pool
from .status import ModelEntry, PoolState, PoolStatus, StopReason, Upstream

log = logging.getLogger("vllm_autoserve.pools")
_RUNNING = frozenset({PoolState.STARTING, PoolState.HEALTHY})


class Pools(ABC):
    """Every model's pool, created on first use; the interface ``create_app`` needs.

    Pools of unlisted models (any repo id, with ``allow_unlisted``) are forgotten once at
    rest, the least recently used first, when more than ``unlisted_kept`` of them are: their
    ``/status`` rows and metric series would otherwise grow with every name ever asked for.
    """

    engines_outlive_gateway = False
    """Whether engines run beyond this process (Modal's pools, shared by gateway replicas)."""
    unlisted_kept = 64
    forget_after_seconds = 60.0
    """A pool used this recently is kept: a request may hold it and not have started it yet."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._pools: dict[str, Pool] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[PoolStatus]] = set()
        self._created = int(time.time())
        self._closing = False
        self.hub = HubCheck()
        for name in config.models:  # each configured model has its series from the start
            metrics.set_pool_state(name, PoolState.COLD.value)

    @abstractmethod
    def _create(self, name: str, settings: ModelConfig) -> Pool:
        """Build the pool for a canonical model name."""

    @abstractmethod
    def _backend_of(self, settings: ModelConfig) -> str:
        """The ``backend`` of the pool ``_create`` would build, without building it."""

    def resolve(self, requested: str) -> str:
        """Canonical name of a requested model or alias (raises 400/404 errors)."""
        return self.config.resolve(requested)

    def get(self, name: str) -> Pool:
        """The model's pool, made on first use, for a request or call that uses it now (which
        keeps it from being forgotten for a while: see ``find`` for a mere look-up)."""
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = self._create(name, self.config.model(name))
            if self._closing:
                pool.refuse_starts()
        pool.last_active = time.monotonic()
        return pool

    async def admit(self, name: str) -> None:
        """Refuse (404) an unlisted name that the Hugging Face Hub says does not exist,
        before any engine is started for it (``hub.py``)."""
        if name in self.config.models or name in self._pools:
            return
        if await self.hub.missing(name):
            error = ModelNotFound(
                f"[{name}] is not a model on the Hugging Face Hub: a typo? (a private or "
                "gated repo needs the gateway's HF_TOKEN)",
                param="model",
            )
            error.asked = name  # for the access line; never a metrics label
            raise error

    def find(self, name: str) -> Pool | None:
        """The model's pool if it has one; none is made."""
        return self._pools.get(name)

    async def down(self, name: str) -> PoolStatus:
        """Stop a model's pool. A model never started here has nothing to stop, and gets no
        pool (no row in ``/status``) unless its engines outlive this process (Modal); if it
        is not configured either, the name is most likely mistyped: 404, as ``ollama stop``
        (on Modal, only when the Hub does not know it)."""
        pool = self._pools.get(name)
        if pool is None and name not in self.config.models:
            # On Modal another gateway replica may have started it: only a name the Hub
            # does not know is surely a typo there.
            if not self.engines_outlive_gateway or await self.hub.missing(name):
                raise ModelNotFound(
                    f"[{name}] is neither configured nor started here: nothing to stop",
                    param="model_path",
                )
        if pool is None and not self.engines_outlive_gateway:
            return self._cold_status(name)
        return await self.get(name).down()

    def statuses(self) -> list[PoolStatus]:
        names = list(self.config.models) + [n for n in self._pools if n not in self.config.models]
        result = []
        for name in names:
            pool = self._pools.get(name)
            result.append(pool.status() if pool is not None else self._cold_status(name))
        return result

    def _cold_status(self, name: str) -> PoolStatus:
        return PoolStatus(
            model=name,
            state=PoolState.COLD,
            since=self._created,
            last_request=None,
            in_flight=0,
            engines=0,
            aliases=self.config.aliases_of(name),
            backend=self._backend_of(self.config.model(name)),
        )

    def healthy_upstreams(self) -> list[tuple[str, Upstream]]:
        return [
            (name, pool.upstream)
            for name, pool in self._pools.items()
            if pool.state is PoolState.HEALTHY and pool.upstream is not None
        ]

    def listing(self) -> list[ModelEntry]:
        """Configured models, their aliases, and any other model that is running."""
        entries: list[ModelEntry] = []
        created = self._created
        for name, model in self.config.models.items():
            # A local folder's model goes by its aliases: its path is no business of clients.
            public = self.config.shown_name(name)
            names = [*model.aliases] if public != name else [name, *model.aliases]
            entries.extend(ModelEntry(id=n, root=public, created=created, pool=name) for n in names)
            entries.extend(
                ModelEntry(id=adapter, root=path, created=created, pool=name, parent=public)
                for adapter, path in model.lora_modules.items()
            )
        for name, pool in self._pools.items():
            # Unlisted models while they run; a failed name stays in /status, not in pickers.
            if name not in self.config.models and pool.state in _RUNNING:
                entries.append(ModelEntry(id=name, root=name, created=created, pool=name))
        return entries

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_idle(), name="idle reaper")

    def refuse_starts(self) -> None:
        """Start no engine from now on, and let requests and ``/up`` calls waiting for one
        go (``503 gateway_shutting_down``): the gateway is stopping. Starts under way here
        are stopped at once: nobody waits for them any more (the drain is for generations)."""
        self._closing = True
        for pool in self._pools.values():
            pool.refuse_starts()
            if pool.state is PoolState.STARTING and not self.engines_outlive_gateway:
                stop = asyncio.ensure_future(pool.down(StopReason.SHUTDOWN))
                self._background.add(stop)
                stop.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stop every engine this gateway started, and start none from now on."""
        self.refuse_starts()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(
            *(pool.down(StopReason.SHUTDOWN) for pool in self._pools.values()),
            return_exceptions=True,
        )
        if self._http is not None:
            await self._http.close()
        await self.hub.close()

    def session(self) -> aiohttp.ClientSession:
        """The pools' own HTTP session (health checks), apart from the proxy's."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    async def _reap_idle(self) -> None:
        interval = min(1.0, self._smallest_idle() / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for pool in list(self._pools.values()):
                if pool.idle_due(now):
                    task = asyncio.create_task(
                        pool.down(StopReason.IDLE), name=f"idle stop {pool.name}"
                    )
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
            self._forget_unlisted(now)

    def _forget_unlisted(self, now: float) -> None:
        resting = [
            pool
            for name, pool in self._pools.items()
            if name not in self.config.models and pool.at_rest()
        ]
        if len(resting) <= self.unlisted_kept:
            return
        resting.sort(key=lambda pool: pool.last_active)
        for pool in resting[: len(resting) - self.unlisted_kept]:
            if now - pool.last_active < self.forget_after_seconds:
                break
            del self._pools[pool.name]
            metrics.forget_model(pool.name)
            log.info("[%s] forgotten: unlisted and at rest", pool.name)

    def _smallest_idle(self) -> float:
        values = [self.config.gateway.idle_seconds]
        values += [m.idle_seconds for m in self.config.models.values() if m.idle_seconds]
        values += [self.config.defaults.idle_seconds] if self.config.defaults.idle_seconds else []
        return max(0.05, min(values))

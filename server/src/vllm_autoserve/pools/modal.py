"""Modal-backed pools: one autoscaled container pool per model, started with a ``boot`` call.

Starting a model means having one ``boot`` call of its engine class (``Cls(model_path=...)``)
spawned and waiting for it to return: Modal starts a container for it, the container's
``@modal.enter`` starts vLLM and returns once it is healthy, ``boot`` then answers at once.
Every gateway replica shares the call through the ``modal.Dict`` (see ``modal_layout``):

    boot/<model> absent        claim it (put ... skip_if_exists=True); the winner spawns and
                               stores the call id, the others wait for it
    boot/<model> = call        poll it: FunctionCall.get(timeout=0), TimeoutError = pending
    call returned              healthy, if the pool still has containers (else it scaled to
                               zero since: forget the call and boot again)
    call raised / failure/...  failed, with the engine's log tail; the call is cancelled so
                               that Modal stops restarting crashing containers

Within one gateway the ``Pool`` state machine makes the start single flight; across replicas
the claim in the Dict does. ``/down`` unpins warm containers and forgets the boot call, and the
pool scales to zero after its scale-down window. The Modal calls go through two small
protocols (``StateDict``, ``EngineHandles``) so that tests can pass stand-ins;
``modal_handles`` implements them over the deployed app with the ``.aio`` interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..config import Config, ModelConfig
from ..engine import EngineFailed
from ..modal_layout import (
    MODAL_MIN_SCALEDOWN,
    START_MARGIN_SECONDS,
    StateDict,
    boot_key,
    engine_key,
    engine_shape,
    failure_key,
    proxy_headers,
)
from .base import Pool, PoolStatus, StopReason, Upstream
from .registry import Pools
from .static import StaticPool

log = logging.getLogger("vllm_autoserve.pools.modal")

POLL_SECONDS = 0.5
POLL_MAX_SECONDS = 3.0
CLAIM_SECONDS = 60.0
"""A claim with no call id after this long was left by a replica that died while spawning."""
IDLE_MARGIN_SECONDS = 30.0
"""Go cold this much before Modal scales the pool down, so a stale 'healthy' is never routed."""
RESTORE_WINDOW_WITHIN = 120.0
"""After a ``/down``, the pool's scale-down window is 2 s until its containers are gone, at
most this long."""
RESTORE_POLL_SECONDS = 1.0


class BootExpired(Exception):
    """The boot call's result is gone (Modal keeps outputs for a limited time)."""


class EngineHandles(Protocol):
    """What a Modal pool asks of the deployed engine classes (one pool per model path)."""

    async def spawn_boot(self, model: str) -> str:
        """Spawn ``boot`` of the model's pool; the ``FunctionCall`` id."""
        ...

    async def poll_boot(self, call_id: str) -> None:
        """Return if the call returned; ``TimeoutError`` while pending, ``BootExpired`` if its
        result is gone, the call's own exception if it raised."""
        ...

    async def cancel_boot(self, call_id: str) -> None: ...

    async def web_url(self, model: str) -> str: ...

    async def runners(self, model: str) -> int:
        """Containers of the model's pool, running or starting."""
        ...

    async def set_min_containers(self, model: str, count: int) -> None: ...

    async def set_scaledown_window(self, model: str, seconds: int) -> None:
        """How long the model's idle containers stay up (overrides the class's)."""
        ...


class ModalPool(Pool):
    """One model's Modal container pool, as seen by one gateway replica."""

    backend = "modal"

    def __init__(
        self,
        name: str,
        settings: ModelConfig,
        config: Config,
        *,
        state: StateDict,
        engines: EngineHandles,
        engine_key: Callable[[], Awaitable[str]],
        proxy_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(name, settings, config)
        self._shared = state
        self._handles = engines
        self._engine_key = engine_key
        self._proxy_headers = proxy_headers
        self._scaledown_seconds = engine_shape(config, name).scaledown_seconds
        self._restore: asyncio.Task[None] | None = None  # the window, after a /down

    @property
    def idle_seconds(self) -> float:
        # Modal scales the pool down after its scaledown window, which is idle_seconds cut
        # to Modal's range: the gateway forgets the pool a little sooner.
        window = float(self._scaledown_seconds)
        return max(window - IDLE_MARGIN_SECONDS, window / 2)

    @property
    def startup_seconds(self) -> float:
        # The engine's own deadline is startup_seconds from its container's start; this wait
        # began before, so it gets the margin Modal gets (the failure, with its tail, first).
        return super().startup_seconds + START_MARGIN_SECONDS

    # -- start ----------------------------------------------------------------------------

    async def _launch(self) -> Upstream:
        key = await self._engine_key()
        await self._restore_window()  # if a /down shortened it
        if self.settings.min_containers:
            await self._handles.set_min_containers(self.name, self.settings.min_containers)
        while True:
            call_id, since, spawned = await self._boot_call()
            if await self._wait_boot(call_id, since, fresh=spawned):
                break
            log.info("[%s] the pool scaled to zero since its last boot; booting again", self.name)
            await self._forget(call_id)
        url = (await self._handles.web_url(self.name)).rstrip("/")
        params = (("model_path", self.name),)
        return Upstream(url=url, api_key=key, params=params, headers=self._proxy_headers)

    async def _boot_call(self) -> tuple[str, float, bool]:
        """The model's boot call (id, claim time, spawned here): the one in the Dict, or one
        this replica spawns (once)."""
        key = boot_key(self.name)
        while True:
            entry = _entry(await self._shared.get(key))
            now = time.time()
            if entry is None:
                if await self._shared.put(key, {"call": "", "at": now}, skip_if_exists=True):
                    try:
                        call_id = await self._handles.spawn_boot(self.name)
                    except BaseException:
                        await self._shared.pop(key)
                        raise
                    await self._shared.put(key, {"call": call_id, "at": now})
                    log.info("[%s] spawned boot call %s", self.name, call_id)
                    return call_id, now, True
                continue  # another replica claimed it first: use theirs
            call_id, since = entry
            if call_id:
                return call_id, since, False
            if now - since > CLAIM_SECONDS:
                await self._shared.pop(key)
                continue
            await asyncio.sleep(POLL_SECONDS)

    async def _wait_boot(self, call_id: str, since: float, *, fresh: bool) -> bool:
        """True once the boot call returned and the pool has containers; False if the call is
        stale (result expired, or the pool scaled to zero since); ``EngineFailed`` if it failed."""
        interval = POLL_SECONDS
        seen_pending = False
        while True:
            try:
                await self._handles.poll_boot(call_id)
            except TimeoutError:
                seen_pending = True
            except BootExpired:
                return False
            except EngineFailed:
                raise
            except Exception as exc:
                raise EngineFailed(f"[{self.name}] engine failed to start: {exc}") from exc
            else:
                # A call spawned or seen running here is fresh; one found finished may be
                # from before the pool last scaled to zero.
                return fresh or seen_pending or await self._handles.runners(self.name) > 0
            failure = await self._shared.get(failure_key(self.name))
            if isinstance(failure, dict) and float(failure.get("at", 0)) >= since:
                raise EngineFailed(str(failure.get("error") or f"[{self.name}] engine failed"))
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, POLL_MAX_SECONDS)

    async def pin(self, count: int) -> None:
        """``/up`` with ``min_containers``: keep that many engine containers warm on Modal."""
        await super().pin(count)
        await self._handles.set_min_containers(self.name, count)

    # -- stop -----------------------------------------------------------------------------

    async def down(self, reason: StopReason = StopReason.DOWN) -> PoolStatus:
        """Idle or gateway shutdown: forget the pool here only (Modal scales it down, and other
        replicas may use it). ``/down``: also unpin it and forget its boot call everywhere,
        whether or not this replica started it."""
        status = await super().down(reason)
        if reason is StopReason.DOWN:
            await self._release(unpin=True, now=True)
        return status

    async def _terminate(self, reason: StopReason | None) -> None:
        if reason is None:  # a failed start: the next start must spawn a fresh boot
            await self._release(unpin=bool(self.settings.min_containers))

    async def _restore_window_when_gone(self) -> None:
        """The deploy's scale-down window again once the pool's containers are gone (or
        after a while): other replicas may still route to the pool, and with a window of
        2 s it would go cold at every pause of their users."""
        polls = int(RESTORE_WINDOW_WITHIN / RESTORE_POLL_SECONDS)
        with contextlib.suppress(Exception):  # a start restores it too
            for _ in range(polls):  # Modal says when containers are gone only when asked
                if await self._handles.runners(self.name) == 0:
                    break
                await asyncio.sleep(RESTORE_POLL_SECONDS)
        await self._restore_window()

    async def _restore_window(self) -> None:
        try:
            await self._handles.set_scaledown_window(self.name, self._scaledown_seconds)
        except Exception:  # a start must not fail for it: the pool only lingers less
            log.exception("[%s] could not restore the scale-down window", self.name)

    def refuse_starts(self) -> None:
        super().refuse_starts()
        if self._restore is not None:
            self._restore.cancel()  # the gateway stops; the next start restores it

    async def _release(self, *, unpin: bool, now: bool = False) -> None:
        """Forget the boot call everywhere; ``unpin``: lift a ``min_containers`` pin; ``now``:
        let idle containers go within seconds, not after the scale-down window (``/down``,
        as Ollama's and llama-swap's unload free the GPU at once)."""
        try:
            entry = _entry(await self._shared.pop(boot_key(self.name)))
            if entry is not None and entry[0]:
                await self._handles.cancel_boot(entry[0])  # stops a crash-looping start
            if unpin:
                await self._handles.set_min_containers(self.name, 0)
            if now:
                await self._handles.set_scaledown_window(self.name, MODAL_MIN_SCALEDOWN)
                if self._restore is None or self._restore.done():
                    self._restore = asyncio.create_task(
                        self._restore_window_when_gone(), name=f"window {self.name}"
                    )
        except Exception:
            log.exception("[%s] could not release the Modal pool", self.name)

    async def _forget(self, call_id: str) -> None:
        entry = _entry(await self._shared.get(boot_key(self.name)))
        if entry is not None and entry[0] == call_id:
            await self._shared.pop(boot_key(self.name))


class LocalOnlyPool(Pool):
    """A ``command`` model: it runs a local program, which a Modal deployment cannot start."""

    backend = "modal"

    async def _launch(self) -> Upstream:
        raise EngineFailed(
            f"[{self.name}] runs a local command; it is not served by the Modal deployment"
        )

    async def _terminate(self, reason: StopReason | None) -> None:
        """Nothing was started."""


class ModalPools(Pools):
    """Every model's Modal pool; ``url =`` models are routed as static upstreams."""

    engines_outlive_gateway = True

    def __init__(
        self,
        config: Config,
        *,
        state: StateDict | None = None,
        engines: EngineHandles | None = None,
    ) -> None:
        super().__init__(config)
        if state is None or engines is None:
            from ..modal_handles import live_handles

            state, engines = live_handles(config)
        self.state = state
        self.engines = engines
        self.proxy_headers = proxy_headers(config)  # fails the start-up if missing
        self._key: str | None = None
        self._key_lock = asyncio.Lock()

    async def engine_key(self) -> str:
        """The engines' API key, read (or created) once per gateway process."""
        if self._key is None:
            async with self._key_lock:
                if self._key is None:
                    self._key = await engine_key(self.state)
        return self._key

    def _create(self, name: str, settings: ModelConfig) -> Pool:
        if settings.url is not None:
            return StaticPool(name, settings, self.config, self.session)
        if settings.command is not None:
            return LocalOnlyPool(name, settings, self.config)
        return ModalPool(
            name,
            settings,
            self.config,
            state=self.state,
            engines=self.engines,
            engine_key=self.engine_key,
            proxy_headers=self.proxy_headers,
        )

    def _backend_of(self, settings: ModelConfig) -> str:
        return StaticPool.backend if settings.url is not None else ModalPool.backend


def _entry(value: Any) -> tuple[str, float] | None:
    """``(call id, since)`` of a ``boot/<model>`` entry; None if absent or unreadable."""
    if not isinstance(value, dict):
        return None
    return str(value.get("call") or ""), float(value.get("at") or 0.0)

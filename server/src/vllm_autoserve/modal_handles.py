"""``StateDict`` and ``EngineHandles`` over the deployed Modal app, with Modal's async APIs.

Every call uses the ``.aio`` interface so that the gateway's event loop is never blocked.
The engine classes are looked up by name (``modal.Cls.from_name``), so this works inside the
gateway's container and from any process with Modal credentials alike. APIs relied on, as
checked in modal 1.6.4's sources (``modal/dict.py``, ``modal/cls.py``, ``modal/_functions.py``):

- ``Dict.from_name(name, create_if_missing=True)``; ``put(key, value, skip_if_exists=True)``
  returns False when the key already existed; ``get(key)`` returns None when absent;
  ``pop(key, default)``.
- ``Cls.from_name(app, name)(model_path=...)`` is one parametrized instance (its own pool);
  ``Obj.update_autoscaler(min_containers=...)`` overrides that pool's autoscaler until the next
  deploy; the bound methods ``boot.spawn`` and ``serve.get_web_url`` / ``get_current_stats``.
- ``FunctionCall.from_id(id)`` is lazy (no ``.aio`` needed); ``get(timeout=0)`` raises the
  builtin ``TimeoutError`` while the call runs and ``modal.exception.OutputExpiredError``
  when its result has expired; ``cancel()``.
"""

from __future__ import annotations

import warnings
from typing import Any

import modal
import modal.exception

from .config import Config
from .modal_layout import APP_NAME, STATE_DICT, class_for
from .pools.modal import BootExpired

# ``Obj.update_autoscaler`` is the documented call for one parametrized instance, but modal
# 1.6 implements it with ``Function.update_autoscaler``, which warns that it is deprecated
# (its replacement, ``Function.autoscaler``, has no per-instance form): the warning is Modal's
# own, and would be logged on every start, pin and /down.
warnings.filterwarnings(
    "ignore",
    message=r".*`Function\.update_autoscaler\(\)` is deprecated",
    category=modal.exception.DeprecationError,
)


class LiveDict:
    """The shared ``modal.Dict``."""

    def __init__(self, name: str = STATE_DICT) -> None:
        self._dict = modal.Dict.from_name(name, create_if_missing=True)

    async def get(self, key: str) -> Any:
        return await self._dict.get.aio(key)

    async def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        return await self._dict.put.aio(key, value, skip_if_exists=skip_if_exists)

    async def pop(self, key: str) -> Any:
        return await self._dict.pop.aio(key, None)


class LiveEngines:
    """The deployed engine classes: one parametrized instance (one pool) per model."""

    def __init__(self, config: Config, app_name: str = APP_NAME) -> None:
        self.config = config
        self.app_name = app_name
        self._classes: dict[str, modal.Cls] = {}
        self._objects: dict[str, Any] = {}

    def _obj(self, model: str) -> Any:
        obj = self._objects.get(model)
        if obj is None:
            name = class_for(self.config, model)
            cls = self._classes.get(name)
            if cls is None:
                cls = self._classes[name] = modal.Cls.from_name(self.app_name, name)
            obj = self._objects[model] = cls(model_path=model)
        return obj

    async def spawn_boot(self, model: str) -> str:
        call = await self._obj(model).boot.spawn.aio()
        return str(call.object_id)

    async def poll_boot(self, call_id: str) -> None:
        try:
            await modal.FunctionCall.from_id(call_id).get.aio(timeout=0)
        except modal.exception.OutputExpiredError as exc:
            raise BootExpired(call_id) from exc

    async def cancel_boot(self, call_id: str) -> None:
        await modal.FunctionCall.from_id(call_id).cancel.aio()

    async def web_url(self, model: str) -> str:
        url = await self._obj(model).serve.get_web_url.aio()
        if not url:
            raise RuntimeError(f"[{model}] the engine class has no web URL; is the app deployed?")
        return str(url)

    async def runners(self, model: str) -> int:
        stats = await self._obj(model).serve.get_current_stats.aio()
        return int(stats.num_total_runners)

    async def set_min_containers(self, model: str, count: int) -> None:
        await self._obj(model).update_autoscaler.aio(min_containers=count)

    async def set_scaledown_window(self, model: str, seconds: int) -> None:
        await self._obj(model).update_autoscaler.aio(scaledown_window=seconds)


def live_handles(config: Config) -> tuple[LiveDict, LiveEngines]:
    return LiveDict(), LiveEngines(config)

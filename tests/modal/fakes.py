"""Stand-ins for the Modal handles of ``pools/modal.py``: a shared Dict and the engine classes.

Every operation yields to the event loop once, as a network call would, so that races between
concurrent callers can happen here as they would against Modal.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from vllm_autoserve.pools.modal import BootExpired

PENDING = "pending"
DONE = "done"
EXPIRED = "expired"


class FakeDict:
    """``modal.Dict``'s ``.aio`` subset: ``get``, ``put(skip_if_exists=...)``, ``pop``."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.puts = 0

    async def get(self, key: str) -> Any:
        await asyncio.sleep(0)
        return self.data.get(key)

    async def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        await asyncio.sleep(0)
        self.puts += 1
        if skip_if_exists and key in self.data:
            return False
        self.data[key] = value
        return True

    async def pop(self, key: str) -> Any:
        await asyncio.sleep(0)
        return self.data.pop(key, None)


class FakeEngines:
    """The engine classes: each ``boot`` call is pending until the test settles it."""

    _ids = itertools.count(1)

    def __init__(self, url: str = "https://ws-main--engine.modal.run", runners: int = 1) -> None:
        self.url = url
        self.runner_count = runners
        self.calls: dict[str, Any] = {}
        self.spawned: list[tuple[str, str]] = []
        self.cancelled: list[str] = []
        self.min_containers: dict[str, int] = {}
        self.scaledown_windows: dict[str, int] = {}
        self.auto_finish = False
        self.spawn_started = asyncio.Event()

    # -- what the test does ---------------------------------------------------------------

    def settle(self, outcome: Any = DONE, call_id: str | None = None) -> None:
        """Finish one call (default: every pending one) with DONE, EXPIRED or an exception."""
        for cid, state in self.calls.items():
            if (call_id is None and state == PENDING) or cid == call_id:
                self.calls[cid] = outcome

    # -- EngineHandles --------------------------------------------------------------------

    async def spawn_boot(self, model: str) -> str:
        await asyncio.sleep(0)
        call_id = f"fc-{next(self._ids)}"
        self.calls[call_id] = DONE if self.auto_finish else PENDING
        self.spawned.append((model, call_id))
        self.spawn_started.set()
        return call_id

    async def poll_boot(self, call_id: str) -> None:
        await asyncio.sleep(0)
        state = self.calls[call_id]
        if state == PENDING:
            raise TimeoutError
        if state == EXPIRED:
            raise BootExpired(call_id)
        if isinstance(state, BaseException):
            raise state

    async def cancel_boot(self, call_id: str) -> None:
        await asyncio.sleep(0)
        self.cancelled.append(call_id)

    async def web_url(self, model: str) -> str:
        await asyncio.sleep(0)
        return self.url + "/"

    async def runners(self, model: str) -> int:
        await asyncio.sleep(0)
        return self.runner_count

    async def set_min_containers(self, model: str, count: int) -> None:
        await asyncio.sleep(0)
        self.min_containers[model] = count

    async def set_scaledown_window(self, model: str, seconds: int) -> None:
        await asyncio.sleep(0)
        self.scaledown_windows[model] = seconds

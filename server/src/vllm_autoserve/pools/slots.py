"""Local engine slots: how many engines may run at once (``[gateway] max_engines``), and
which GPU indices each holds (``CUDA_VISIBLE_DEVICES``).

A model needing N GPUs takes N free indices, and a slot when engines are counted. When too
few are free, idle engines (healthy, no request in flight, not pinned; or starting for
nobody) are stopped least-recently-used first. If none is idle, the busy engine serving
longest makes way: it takes no new requests (they wait, as for a cold start), and is
stopped once those under way are answered, as llama-swap and Ollama swap models. No engine
is stopped for another before it has served as long as its own launch took, so that two
busy models sharing one slot spend at most half of the time starting. Starts take what is
freed in the order they came (``_turn_of``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..engine import EngineFailed

log = logging.getLogger("vllm_autoserve.pools")

_RESCAN_SECONDS = 1.0


class SlotHolder(Protocol):
    name: str

    @property
    def pinned(self) -> bool:
        """Kept until ``/down``: never evicted, never asked to make way."""

    @property
    def making_way(self) -> bool:
        """Taking no new requests until it is evicted (``make_way``)."""

    def evictable_since(self) -> float | None:
        """Monotonic time of last activity if idle and holding a slot, else None."""

    def evict(self) -> Awaitable[object]:
        """Stop the engine, releasing its slot and GPUs."""

    def make_way_since(self) -> float | None:
        """Monotonic time it turned healthy if it may be asked to make way, else None."""

    def make_way(self, on: bool) -> None:
        """Hold new requests until the engine is evicted (``False``: serve them again)."""


@dataclass(eq=False)
class _Start:
    """A start waiting for its slot and devices."""

    name: str
    count: int
    wanted: Callable[[], bool]


def detect_gpus(configured: int | None) -> list[int]:
    """Device indices the gateway may hand out.

    ``[gateway] local_gpus`` wins; then the gateway's own ``CUDA_VISIBLE_DEVICES``; then
    the devices ``nvidia-smi -L`` lists; none on a machine without NVIDIA GPUs.
    """
    if configured is not None:
        return list(range(configured))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(part) for part in visible.split(",") if part.strip().isdigit()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return list(range(len(re.findall(r"^GPU \d+", out, re.MULTILINE))))


class EngineSlots:
    def __init__(self, devices: Sequence[int], max_engines: int | None = None) -> None:
        self.devices = list(devices)
        self.max_engines = max_engines
        self._held: dict[str, list[int]] = {}  # engine → its GPUs (none on a host without)
        self._released = asyncio.Event()
        self._waiting: list[_Start] = []  # in the order they came

    @property
    def hands_out_gpus(self) -> bool:
        """Whether GPUs are handed out (``CUDA_VISIBLE_DEVICES`` is set for engines)."""
        return bool(self.devices)

    def held_by(self, name: str) -> list[int]:
        return list(self._held.get(name, []))

    def holds(self, name: str) -> bool:
        return name in self._held

    def _free(self) -> list[int]:
        taken = {d for devices in self._held.values() for d in devices}
        return [d for d in self.devices if d not in taken]

    def _room(self) -> bool:
        return self.max_engines is None or len(self._held) < self.max_engines

    async def acquire(
        self,
        name: str,
        count: int,
        holders: Callable[[], Sequence[SlotHolder]],
        shown_as: str | None = None,
        wanted: Callable[[], bool] = lambda: True,
    ) -> list[int]:
        """Take a slot and ``count`` devices for ``name``, evicting idle engines or waiting
        if needed; ``shown_as`` names the model in an error (default: ``name``). Other
        engines are stopped for it only while ``wanted()`` (someone waits for this start)."""
        if not self.hands_out_gpus:
            count = 0  # a host without GPUs runs engines on none
        if count == 0 and self.max_engines is None:
            return []
        if count > len(self.devices):
            raise EngineFailed(
                f"[{shown_as or name}] needs {count} GPUs but this host has {len(self.devices)} "
                f"(devices {self.devices})"
            )
        start = _Start(name, count, wanted)
        self._waiting.append(start)
        said_so = False
        making_way: SlotHolder | None = None  # a busy engine asked to make way for this one
        try:
            while True:
                turn = self._turn_of(start, holders())
                free = self._free()
                if turn and len(free) >= count and self._room():
                    self._held[name] = free[:count]
                    return free[:count]
                # Others are stopped only for a start someone waits for, and that could take
                # their place (pinned engines do not hold too much of what it needs).
                stops_others = turn and wanted() and self._feasible(count, holders())
                if making_way is not None and not (
                    making_way.making_way and self.holds(making_way.name)
                ):
                    making_way = None  # evicted, or pinned since: another may be needed
                elif making_way is not None and not stops_others:
                    making_way.make_way(False)  # this start can no longer use its place
                    making_way = None
                if stops_others and await self._evict_an_idle_one(name, holders()):
                    continue
                if stops_others and making_way is None:
                    # None is idle: the one serving longest stops taking requests, so that
                    # a steadily busy model cannot keep this one from ever starting.
                    making_way = _longest_serving(name, holders())
                    if making_way is not None:
                        making_way.make_way(True)
                        continue
                if not said_so:
                    said_so = True
                    log.info(
                        "[%s] waiting for GPUs or an engine slot, held by: %s",
                        name,
                        ", ".join(f"[{holder}]" for holder in self._held) or "-",
                    )
                # Wait for a release, or for a holder to go idle (then it can be evicted).
                self._released.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), _RESCAN_SECONDS)
        finally:
            self._waiting.remove(start)
            self._released.set()  # the next in line looks again
            if making_way is not None:
                making_way.make_way(False)  # this start gave up, or got its slot elsewhere

    def _turn_of(self, start: _Start, holders: Sequence[SlotHolder]) -> bool:
        """Whether ``start`` may take what is freed: the first of the starts someone waits
        for and that can be met without pinned engines' devices (so that what a start had
        evicted for it is not taken by the evicted engine's own restart), else any."""
        served = [s for s in self._waiting if s.wanted() and self._feasible(s.count, holders)]
        return not served or served[0] is start

    def _feasible(self, count: int, holders: Sequence[SlotHolder]) -> bool:
        """Whether evicting every engine that is not pinned would make room for ``count``."""
        pinned = [holder.name for holder in holders if holder.pinned and self.holds(holder.name)]
        pinned_devices = sum(len(self._held[name]) for name in pinned)
        if count > len(self.devices) - pinned_devices:
            return False
        return self.max_engines is None or len(pinned) < self.max_engines

    async def _evict_an_idle_one(self, name: str, holders: Sequence[SlotHolder]) -> bool:
        """Stop the least recently used idle engine other than ``name``'s, if there is one."""
        idle = [
            (since, holder)
            for holder in holders
            if holder.name != name and (since := holder.evictable_since()) is not None
        ]
        if not idle:
            return False
        _, lru = min(idle, key=lambda pair: pair[0])
        log.info("[%s] stopping unused [%s] to make room for it", name, lru.name)
        await lru.evict()
        return True

    def wake(self) -> None:
        """A holder went idle: starts waiting for GPUs look again."""
        self._released.set()

    def release(self, name: str) -> None:
        if self._held.pop(name, None) is not None:
            self._released.set()


def _longest_serving(name: str, holders: Sequence[SlotHolder]) -> SlotHolder | None:
    """The engine other than ``name``'s that may make way and has served longest."""
    busy = [
        (since, holder)
        for holder in holders
        if holder.name != name and (since := holder.make_way_since()) is not None
    ]
    return min(busy, key=lambda pair: pair[0])[1] if busy else None

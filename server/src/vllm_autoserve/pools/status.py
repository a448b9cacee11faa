"""What pools report and hand out: states, upstreams, status rows, model list entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class PoolState(StrEnum):
    COLD = "cold"
    STARTING = "starting"
    HEALTHY = "healthy"
    STOPPING = "stopping"
    FAILED = "failed"


class StopReason(StrEnum):
    """Why a pool's engine is stopped (its value is what the log says)."""

    DOWN = "down"  # a user's /down
    IDLE = "idle"
    SHUTDOWN = "gateway shutdown"
    EVICTED = "evicted to make room"  # for another model's GPUs or engine slot

    @property
    def automatic(self) -> bool:
        """A stop the gateway makes on its own: it keeps a pin and lets held requests wait."""
        return self is not StopReason.DOWN


@dataclass(frozen=True)
class Upstream:
    """Where a healthy pool's requests go."""

    url: str
    """Base URL without a trailing slash; the request's path is appended."""
    api_key: str | None = None
    """Sent upstream as ``Authorization: Bearer``; never the gateway's own key."""
    params: tuple[tuple[str, str], ...] = ()
    """Query parameters added to every request (Modal routes by ``?model_path=``)."""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    """Headers added to every request (Modal's proxy token)."""


@dataclass
class PoolStatus:
    model: str
    state: PoolState
    since: float
    last_request: float | None
    in_flight: int
    engines: int
    held: int = 0
    """Requests (and ``/up`` calls) waiting for the engine to turn healthy."""
    gpus: list[int] = field(default_factory=list)
    error: str | None = None
    aliases: list[str] = field(default_factory=list)
    backend: str = "local"
    pinned: bool = False
    waiting_for_slot: bool = False
    """Starting, but waiting for GPUs or an engine slot that other engines hold."""
    making_way: bool = False
    """Healthy, but taking no new requests: it is stopped for another model's start once
    those under way are answered."""

    @property
    def up_status(self) -> str:
        """The three-valued status of the ``/up`` contract."""
        if self.state is PoolState.HEALTHY and not self.making_way:
            return "healthy"
        if self.state is PoolState.FAILED:
            return "failed"
        return "pending"

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "status": self.up_status,
            "state": self.state.value,
            "since": self.since,
            "last_request": self.last_request,
            "in_flight": self.in_flight,
            "held": self.held,
            "engines": self.engines,
            "gpus": self.gpus,
            "error": self.error,
            "aliases": self.aliases,
            "backend": self.backend,
            "pinned": self.pinned,
            "waiting_for_slot": self.waiting_for_slot,
            "making_way": self.making_way,
        }


@dataclass(frozen=True)
class ModelEntry:
    """One row of ``/v1/models``."""

    id: str
    root: str
    created: int
    pool: str
    """The pool whose state this entry shows (a configured name, maybe a local path)."""
    parent: str | None = None
    """The model a LoRA adapter runs on (its ``root`` is the adapter's repo id or path)."""

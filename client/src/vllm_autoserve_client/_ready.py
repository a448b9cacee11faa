"""Which pools are known healthy, and the one wait in flight for each that is not.

A key is ``(gateway base URL, model)``. However many threads and tasks ask for the same key
at once, exactly one of them (the leader) waits for the pool; the others wait for its
outcome and share it, success or error. The state is guarded by a ``threading.Lock`` and
each wait in flight is a ``concurrent.futures.Future``, so one ``ReadyState`` serves
threads and any number of event loops alike: nothing in it belongs to a loop.

Every caller keeps its own deadline: a follower stops waiting when its own time is up, and
if the leader's time is up first (or it is cancelled, or interrupted), its followers do not
inherit that: one of them becomes the next leader, with what is left of its own time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future

from ._errors import ModelStartTimeout

Key = tuple[str, str]


class _Abandoned(Exception):
    """The leader stopped waiting (cancelled, interrupted) without an outcome."""


class ReadyState:
    """Ready flags and single-flight waits per ``(gateway, model)``; shared by client copies.

    >>> state = ReadyState()
    >>> state.ensure(("http://gw/v1/", "m"), 60, lambda seconds_left: None)  # the first waits
    >>> state.is_ready(("http://gw/v1/", "m"))
    True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: set[Key] = set()
        self._flights: dict[Key, Future[None]] = {}

    def is_ready(self, key: Key) -> bool:
        with self._lock:
            return key in self._ready

    def mark_ready(self, key: Key) -> None:
        with self._lock:
            self._ready.add(key)

    def forget(self, key: Key) -> None:
        """The pool went away (scaled to zero, restarted): the next request waits again."""
        with self._lock:
            self._ready.discard(key)

    def ensure(self, key: Key, timeout: float, wait: Callable[[float], object]) -> None:
        """Return once ``key`` is ready, calling ``wait(seconds_left)`` unless another caller
        already is; ``ModelStartTimeout`` after ``timeout`` seconds."""
        started = time.monotonic()
        while True:
            flight, leader = self._join(key)
            if flight is None:
                return
            left = timeout - (time.monotonic() - started)
            if leader:
                self._lead(key, flight, wait, max(left, 0.0))
                return
            concurrent.futures.wait([flight], timeout=max(left, 0.0))
            if not flight.done():
                raise ModelStartTimeout(key[1], time.monotonic() - started)
            try:
                flight.result()
                return
            except _Abandoned:
                continue

    async def ensure_async(
        self, key: Key, timeout: float, wait: Callable[[float], Awaitable[object]]
    ) -> None:
        """``ensure`` for coroutines: followers await the flight without blocking their loop."""
        started = time.monotonic()
        while True:
            flight, leader = self._join(key)
            if flight is None:
                return
            left = timeout - (time.monotonic() - started)
            if leader:
                try:
                    await wait(max(left, 0.0))
                except BaseException as exc:
                    self._settle(key, flight, exc)
                    raise
                self._settle(key, flight, None)
                return
            # The wrapper, not the flight, is what a timeout or a cancellation cancels.
            outcome = asyncio.wrap_future(flight)
            try:
                done, _ = await asyncio.wait([outcome], timeout=max(left, 0.0))
            finally:
                if not outcome.done():  # timed out or cancelled: nobody will read it
                    outcome.cancel()
            if not done:
                raise ModelStartTimeout(key[1], time.monotonic() - started)
            try:
                outcome.result()
                return
            except _Abandoned:
                continue

    def _join(self, key: Key) -> tuple[Future[None] | None, bool]:
        """``(None, False)`` if ready; else the flight in progress and whether we lead it."""
        with self._lock:
            if key in self._ready:
                return None, False
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            flight = self._flights[key] = Future()
            # A running future cannot be cancelled, so a follower whose own await is
            # cancelled (asyncio.wrap_future passes cancellation on) cannot cancel the flight.
            flight.set_running_or_notify_cancel()
            return flight, True

    def _lead(
        self, key: Key, flight: Future[None], wait: Callable[[float], object], left: float
    ) -> None:
        try:
            wait(left)
        except BaseException as exc:
            self._settle(key, flight, exc)
            raise
        self._settle(key, flight, None)

    def _settle(self, key: Key, flight: Future[None], exc: BaseException | None) -> None:
        with self._lock:
            self._flights.pop(key, None)
            if exc is None:
                self._ready.add(key)
        if exc is None:
            flight.set_result(None)
        elif isinstance(exc, Exception) and not isinstance(exc, ModelStartTimeout):
            flight.set_exception(exc)
        else:  # the leader's own time is up, or it was stopped: not its followers' outcome
            flight.set_exception(_Abandoned())

"""Which pools are known healthy, and the one wait in flight for each that is not.

A key is ``(gateway base URL, model)``. However many threads and tasks ask for the same key
at once, exactly one of them (the leader) waits for the pool; the others wait for its
outcome and share it, success or error. The state is guarded by a ``threading.Lock`` and
each wait in flight is a ``concurrent.futures.Future``, so one ``ReadyState`` serves
threads and any number of event loops alike: nothing in it belongs to a loop.

If the leader is cancelled (or interrupted) before it finishes, its followers do not inherit
that: one of them becomes the next leader.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future

Key = tuple[str, str]


class _Abandoned(Exception):
    """The leader stopped waiting (cancelled, interrupted) without an outcome."""


class ReadyState:
    """Ready flags and single-flight waits per ``(gateway, model)``; shared by client copies.

    >>> state = ReadyState()
    >>> state.ensure(("http://gw/v1/", "m"), lambda: None)  # the first caller waits
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

    def ensure(self, key: Key, wait: Callable[[], object]) -> None:
        """Return once ``key`` is ready, calling ``wait`` unless another caller already is."""
        while True:
            flight, leader = self._join(key)
            if flight is None:
                return
            if leader:
                self._lead(key, flight, wait)
                return
            try:
                flight.result()
                return
            except _Abandoned:
                continue

    async def ensure_async(self, key: Key, wait: Callable[[], Awaitable[object]]) -> None:
        """``ensure`` for coroutines: followers await the flight without blocking their loop."""
        while True:
            flight, leader = self._join(key)
            if flight is None:
                return
            if leader:
                try:
                    await wait()
                except BaseException as exc:
                    self._settle(key, flight, exc)
                    raise
                self._settle(key, flight, None)
                return
            try:
                await asyncio.wrap_future(flight)
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

    def _lead(self, key: Key, flight: Future[None], wait: Callable[[], object]) -> None:
        try:
            wait()
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
        elif isinstance(exc, Exception):
            flight.set_exception(exc)
        else:
            flight.set_exception(_Abandoned())

"""Waiting for one model's pool with the gateway's ``/up``.

Each poll is ``POST {base_url}/up`` with ``{"model_path": model, "wait": W}``. The first asks
with ``W = 0``: a healthy pool costs one quick call, and a cold one is reported (and started)
at once. The next ones long-poll: the gateway holds the call until the pool is healthy or
failed, or ``W`` seconds pass (it caps ``W``), so a pool that becomes healthy is noticed at
once. Between polls tenacity decides how long to
sleep: not at all after a call the gateway held, the gateway's ``Retry-After`` when it sends
one, otherwise exponential backoff with jitter (a gateway that answers at once, or an error
worth retrying: 408, 429, 5xx, a call without answer up to ``max_retries`` times in a row,
which is also asked with ``W = 0``). The whole wait ends at
``up_timeout`` with ``ModelStartTimeout``; a ``failed`` pool ends it with ``ModelFailedError``.

The policy (``PoolWait``) knows nothing about HTTP: the client hands ``wait_for_pool`` (or
``async_wait_for_pool``) a ``poll(wait) -> (answer, retry_after)`` that makes the call.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import tenacity
from openai import APIConnectionError, APIStatusError

from ._errors import ModelFailedError, ModelStartTimeout
from ._settings import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)

WaitCallback = Callable[[str, str, float], object]
"""``on_wait(model, state, elapsed_seconds)``, called with every answer of ``/up``."""

UpAnswer = tuple[Mapping[str, Any], float | None]
"""What one poll returns: the JSON answer of ``/up`` and its ``Retry-After`` in seconds."""

MAX_LONG_POLL = 30.0
"""Longest ``wait`` asked of the gateway per call (it caps the value itself, too)."""

HELD = 1.0
"""An answer that took this long was held by the gateway: poll again without sleeping."""

CONNECT_ATTEMPTS = 3
"""Consecutive failed calls (no answer) before giving up, unless told otherwise: a wrong URL
should fail, not spin."""

_LOG_EVERY = 30.0


class _Pending(Exception):
    """The pool is not healthy yet; raised inside an attempt so that tenacity retries."""

    def __init__(self, state: str, retry_after: float | None, held: bool) -> None:
        super().__init__(state)
        self.state = state
        self.retry_after = retry_after
        self.held = held


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header in its seconds form; ``None`` if absent or odd."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


class PoolWait:
    """How one wait for ``model`` goes: what each answer means, when to poll again, when to stop."""

    def __init__(
        self,
        model: str,
        timeout: float,
        on_wait: WaitCallback | None = None,
        *,
        connect_attempts: int = CONNECT_ATTEMPTS,
    ) -> None:
        self.model = model
        self.timeout = max(0.0, timeout)
        self.on_wait = on_wait
        self.connect_attempts = max(1, connect_attempts)
        self._answered = False  # the last call got an answer: the gateway is there
        self._heard = False  # some call got an HTTP answer, if only an error
        self._started = time.monotonic()
        self._state: str | None = None
        self._waited = False
        self._logged_at = -math.inf
        self._failed_connections = 0
        self._polls = 0
        # 0.1 s, 0.2 s, 0.4 s ... up to 5 s, plus up to 0.25 s of jitter.
        self._backoff = tenacity.wait_exponential(multiplier=0.1, max=5.0) + tenacity.wait_random(
            0, 0.25
        )

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def remaining(self) -> float:
        return self.timeout - self.elapsed()

    def long_poll(self) -> float:
        """The ``wait`` to ask of the gateway for the next call."""
        self._polls += 1
        if self._polls == 1 or not self._answered:  # a gateway not heard from: ask quickly
            return 0.0
        return round(max(0.0, min(self.remaining(), MAX_LONG_POLL)), 3)

    def judge(self, answer: UpAnswer, seconds: float) -> dict[str, Any]:
        """Return a healthy answer; raise ``ModelFailedError``, or ``_Pending`` to poll again."""
        body, retry_after = answer
        self._answered = True
        self._heard = True
        status = str(body.get("status") or "pending")
        state = str(body.get("state") or status)
        self._report(state)
        if status == "healthy":
            return dict(body)
        if status == "failed":
            raise ModelFailedError(self.model, str(body.get("error") or ""))
        raise _Pending(state, retry_after, held=seconds >= HELD)

    def timeout_error(self) -> ModelStartTimeout:
        return ModelStartTimeout(self.model, self.elapsed(), self._state, answered=self._heard)

    def retrying(self) -> dict[str, Any]:
        """Keyword arguments for ``tenacity.Retrying`` and ``tenacity.AsyncRetrying``."""
        return {
            "retry": self._should_retry,
            "wait": self._sleep_seconds,
            "stop": self._should_stop,
            "reraise": True,
        }

    def _should_retry(self, retry_state: tenacity.RetryCallState) -> bool:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, _Pending):
            self._failed_connections = 0
            return True
        if isinstance(exc, APIConnectionError):  # includes APITimeoutError
            self._answered = False
            self._failed_connections += 1
            return self._failed_connections < self.connect_attempts
        if isinstance(exc, APIStatusError):
            self._heard = True  # the gateway answered, with an error
            if exc.response.headers.get("x-should-retry") == "false":  # /down stopped it
                return False
            return _retryable_status(exc.status_code)
        return False

    def _should_stop(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.remaining() <= 0

    def _sleep_seconds(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after: float | None = None
        if isinstance(exc, _Pending):
            retry_after = exc.retry_after
        elif isinstance(exc, APIStatusError):
            retry_after = parse_retry_after(exc.response.headers.get("retry-after"))
        if retry_after is not None:
            delay = retry_after
        elif isinstance(exc, _Pending) and exc.held:
            delay = 0.0
        else:
            delay = self._backoff(retry_state)
        return max(0.0, min(delay, self.remaining()))

    def _report(self, state: str) -> None:
        elapsed = self.elapsed()
        if self.on_wait is not None:
            self.on_wait(self.model, state, elapsed)
        changed = state != self._state
        self._state = state
        if state == "healthy":
            level = logging.INFO if self._waited else logging.DEBUG
            log.log(level, "[%s] pool healthy after %.1f s", self.model, elapsed)
            return
        self._waited = True
        if changed or elapsed - self._logged_at >= _LOG_EVERY:
            self._logged_at = elapsed
            log.info("[%s] waiting for the pool: %s (%.1f s)", self.model, state, elapsed)


def wait_for_pool(plan: PoolWait, poll: Callable[[float], UpAnswer]) -> dict[str, Any]:
    """Poll ``/up`` until the pool is healthy; return the healthy answer."""
    try:
        for attempt in tenacity.Retrying(**plan.retrying()):
            with attempt:
                started = time.monotonic()
                answer = poll(plan.long_poll())
                return plan.judge(answer, time.monotonic() - started)
    except _Pending:
        raise plan.timeout_error() from None
    except (APIConnectionError, APIStatusError) as exc:
        if plan.remaining() <= 0:
            raise plan.timeout_error() from exc
        raise
    raise plan.timeout_error()  # not reached: tenacity re-raises the last error


async def async_wait_for_pool(
    plan: PoolWait, poll: Callable[[float], Awaitable[UpAnswer]]
) -> dict[str, Any]:
    """``wait_for_pool`` for an async ``poll``."""
    try:
        async for attempt in tenacity.AsyncRetrying(**plan.retrying()):
            with attempt:
                started = time.monotonic()
                answer = await poll(plan.long_poll())
                return plan.judge(answer, time.monotonic() - started)
    except _Pending:
        raise plan.timeout_error() from None
    except (APIConnectionError, APIStatusError) as exc:
        if plan.remaining() <= 0:
            raise plan.timeout_error() from exc
        raise
    raise plan.timeout_error()  # not reached: tenacity re-raises the last error

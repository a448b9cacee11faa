"""The ``Pool`` state machine: one model's engines (``registry.Pools`` holds them all).

    cold ──► starting ──► healthy ──► stopping ──► cold
                 │            │           ▲
                 └──► failed ◄┘───────────┘   (failed ──► starting again after a cooldown;
                                               failed ──► stopping on /down;
                                               healthy ──► cold: a static upstream that
                                               stopped answering, checked again when asked)

All transitions go through ``Pool._move``, which checks ``_ALLOWED``. The event loop is the
lock: a check and the move that follows it never have an ``await`` between them, so two
callers can never both see ``cold`` and both start an engine.

Requests and ``/up`` never read the state and act on it themselves: they call
``ensure_ready`` (hold until healthy) or ``up`` (start, optionally long-poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

from .. import metrics
from ..config import Config, ModelConfig
from ..engine import EngineFailed, with_cause
from ..errors import ModelFailed, ModelNotReady, ModelStopped, ShuttingDown
from .status import PoolState, PoolStatus, StopReason, Upstream

__all__ = [
    "EngineFailed",
    "IllegalTransition",
    "Pool",
    "PoolState",
    "PoolStatus",
    "StopReason",
    "Upstream",
]

log = logging.getLogger("vllm_autoserve.pools")


_ALLOWED: dict[PoolState, frozenset[PoolState]] = {
    PoolState.COLD: frozenset({PoolState.STARTING}),
    PoolState.STARTING: frozenset({PoolState.HEALTHY, PoolState.FAILED, PoolState.STOPPING}),
    PoolState.HEALTHY: frozenset({PoolState.STOPPING, PoolState.FAILED, PoolState.COLD}),
    PoolState.STOPPING: frozenset({PoolState.COLD}),
    PoolState.FAILED: frozenset({PoolState.STARTING, PoolState.STOPPING}),
}


class IllegalTransition(RuntimeError):
    pass


MAX_FAILURE_COOLDOWN_SECONDS = 300.0
BACKOFF_RESET_SECONDS = 60.0  # healthy this long, an engine's earlier failures are forgiven


def _summary(error: str | None) -> str | None:
    """An error's first line: what went wrong, and its cause (``with_cause``)."""
    lines = (error or "").strip().splitlines()
    return lines[0] if lines else None


class Pool(ABC):
    """One model's engines. Subclasses say how to launch and stop them."""

    backend = "local"
    backs_off = True
    """Whether failed starts lengthen the cooldown: not for an upstream the gateway only
    checks (``url``), which costs nothing to check again and may be back any moment."""
    down_ends_answers = False
    """Whether ``/down`` ends the answers under way (``stopped``): where it stops the engine
    under them. Modal's containers finish theirs; a ``url`` upstream is never stopped."""

    def __init__(self, name: str, settings: ModelConfig, config: Config) -> None:
        self.name = name
        self.shown_name = config.shown_name(name)
        """The name clients know it by, in what they are told (``Config.shown_name``)."""
        self.settings = settings
        self.config = config
        self._state = PoolState.COLD
        self._since = time.time()
        self._error: str | None = None
        self._failed_at = 0.0
        self._failed_starts = 0  # starts in a row that failed: each doubles the cooldown
        self._healthy_since = 0.0
        self._changed = asyncio.Event()
        self._start_task: asyncio.Task[None] | None = None
        self._upstream: Upstream | None = None
        self._in_flight = 0
        self._waiting = 0  # requests and /up calls waiting for a state change
        self._last_request: float | None = None
        self.last_active = time.monotonic()
        """When a request or call last asked for this pool (``time.monotonic``)."""
        self._launched_at = 0.0  # when the engine's launch began (after any wait for a slot)
        self._pinned = False
        self._downs = 0  # explicit /down calls: requests held across one give up
        self._stop_task: asyncio.Task[None] | None = None
        self._stop_reason: StopReason | None = None  # why the stop under way, if any
        self._cut: asyncio.Future[None] | None = None  # see ``stopped``
        self._restart_after_stop = False
        self._closing = False  # the gateway is shutting down: no engine is started any more
        self._making_way = False  # for another model's start: new requests wait (``make_way``)
        self.on_idle: Callable[[], None] | None = None
        """Called when the last request in flight ends (GPU slots wait for idle engines)."""
        # Read when scraped: no gauge update per request.
        metrics.child(metrics.IN_FLIGHT, name).set_function(lambda: self._in_flight)
        metrics.child(metrics.HELD, name).set_function(lambda: self._waiting)

    # -- what subclasses provide ----------------------------------------------------------

    @abstractmethod
    async def _launch(self) -> Upstream:
        """Start an engine and return once it is healthy; raise ``EngineFailed`` if not."""

    @abstractmethod
    async def _terminate(self, reason: StopReason | None) -> None:
        """Stop whatever ``_launch`` started (idempotent); ``reason`` is None after a failed
        start."""

    def _engines(self) -> int:
        return 1 if self._state in (PoolState.HEALTHY, PoolState.STARTING) else 0

    def _gpus(self) -> list[int]:
        return []

    def _waiting_for_slot(self) -> bool:
        return False

    # -- settings -------------------------------------------------------------------------

    @property
    def idle_seconds(self) -> float:
        return self.settings.effective_idle_seconds(self.config.gateway)

    @property
    def startup_seconds(self) -> float:
        return self.settings.effective_startup_seconds(self.config.gateway)

    # -- the state machine ----------------------------------------------------------------

    @property
    def state(self) -> PoolState:
        return self._state

    @property
    def ready(self) -> bool:
        """Healthy and taking requests: ``ensure_ready`` answers at once."""
        return self._ready_upstream() is not None

    def _ready_upstream(self) -> Upstream | None:
        if self._state is PoolState.HEALTHY and not self._making_way:
            return self._upstream
        return None

    @property
    def upstream(self) -> Upstream | None:
        """Where requests go while healthy."""
        return self._upstream

    def _move(self, new: PoolState, *, reason: str, error: str | None = None) -> None:
        old = self._state
        if new not in _ALLOWED[old]:
            raise IllegalTransition(f"[{self.name}] cannot go from {old} to {new}")
        self._state = new
        self._since = time.time()
        fields: dict[str, object] = {"model": self.name, "old": old.value, "new": new.value}
        if new is PoolState.FAILED:
            self._error = error
            self._failed_at = time.monotonic()
            # A start that failed, or an engine that died soon after it was up (out of memory
            # at its first request, say), backs off further; one that ran a while does not.
            crashed_soon = old is PoolState.HEALTHY and not self._ran_a_while()
            backs_off = old is PoolState.STARTING or crashed_soon
            self._failed_starts = self._failed_starts + 1 if backs_off else 0
            metrics.ENGINE_FAILURES.labels(self.name).inc()
        elif new is PoolState.STARTING:
            self._launched_at = time.monotonic()  # a subclass may move it past a wait
            metrics.ENGINE_STARTS.labels(self.name).inc()
        elif new is PoolState.HEALTHY:
            self._error = None
            self._healthy_since = time.monotonic()
            took = self._healthy_since - self._launched_at
            metrics.COLD_START_SECONDS.labels(self.name).observe(took)
            fields["start_seconds"] = round(took, 2)
        elif new is PoolState.COLD:
            self._error = None
        if old is PoolState.HEALTHY and new is not PoolState.FAILED and self._ran_a_while():
            self._failed_starts = 0
        if new is not PoolState.HEALTHY:
            self._upstream = None
            self._making_way = False
        metrics.set_pool_state(self.name, new.value)
        level = logging.WARNING if new is PoolState.FAILED else logging.INFO
        summary = _summary(error)
        fields.update(reason=reason, error=summary)
        took_part = f" in {fields['start_seconds']:.1f} s" if "start_seconds" in fields else ""
        log.log(
            level,
            "[%s] pool %s -> %s (%s)%s%s",
            self.name,
            old.value,
            new.value,
            reason,
            took_part,
            f": {summary}" if summary else "",
            extra={"fields": fields},
        )
        self._notify_waiters()

    def _notify_waiters(self) -> None:
        """Whoever waits for a change looks at the pool again."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _ran_a_while(self) -> bool:
        """Whether the engine has been healthy long enough to forget earlier failures."""
        return time.monotonic() - self._healthy_since >= BACKOFF_RESET_SECONDS

    def _cooldown_left(self) -> float:
        """How long a failed pool waits before the next start: ``failure_cooldown_seconds``,
        doubled by every start in a row that failed (at most 5 minutes), so that a model
        that cannot start (a typo, no memory for it) is not reloaded at every retry. No
        cooldown after an engine that died once it had run a while: not a crash loop, so the
        next request starts it again at once, as Ollama and llama-swap do."""
        if self._failed_starts == 0:
            return 0.0
        base = self.config.gateway.failure_cooldown_seconds
        doublings = max(0, self._failed_starts - 1) if self.backs_off else 0
        cooldown = min(base * 2.0**doublings, max(base, MAX_FAILURE_COOLDOWN_SECONDS))
        return max(0.0, self._failed_at + cooldown - time.monotonic())

    def refuse_starts(self) -> None:
        """From now on start nothing: the gateway is shutting down (``Pools.refuse_starts``)."""
        self._closing = True
        self._notify_waiters()  # so that they give up

    def _kick(self, reason: str) -> None:
        """Start an engine if none is running or starting (single flight)."""
        if self._closing:
            return
        if self._state is PoolState.COLD or (
            self._state is PoolState.FAILED and self._cooldown_left() == 0
        ):
            if self._state is PoolState.FAILED:
                metrics.ENGINE_RESTARTS.labels(self.name).inc()
            self._move(PoolState.STARTING, reason=reason)
            self.last_active = time.monotonic()
            self._start_task = asyncio.create_task(self._run_start(), name=f"start {self.name}")

    async def _run_start(self) -> None:
        try:
            upstream = await asyncio.wait_for(self._launch(), self.startup_seconds)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            tail = self._start_account()  # before the engine, and its output, are gone
            await self._terminate(None)
            self._move(
                PoolState.FAILED,
                reason="startup deadline",
                error=with_cause(
                    f"[{self.shown_name}] engine did not become healthy within "
                    f"{self.startup_seconds:g} s",
                    tail,
                ),
            )
        except EngineFailed as exc:
            await self._terminate(None)
            self._move(PoolState.FAILED, reason="engine failed", error=str(exc))
        except Exception as exc:
            log.exception("[%s] unexpected error while starting", self.name)
            await self._terminate(None)
            self._move(PoolState.FAILED, reason="start error", error=f"[{self.shown_name}] {exc}")
        else:
            self._upstream = upstream
            self.last_active = time.monotonic()
            self._move(PoolState.HEALTHY, reason="engine healthy")

    def _start_account(self) -> str:
        """What a start cut short by its deadline had got to (the engine's last output)."""
        return ""

    def _progress(self) -> str:
        """Where a start is, for a request that gave up waiting for it."""
        return f"is {self._state.value}"

    def _engine_died(self, error: str) -> None:
        """Called by subclasses when a healthy engine goes away on its own."""
        if self._state is PoolState.HEALTHY:
            self._move(PoolState.FAILED, reason="engine died", error=error)

    async def _wait_change(self, timeout: float) -> None:
        changed = self._changed
        self._waiting += 1  # until this waiter has looked at the change (see at_rest)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)
        finally:
            self._waiting -= 1
            self.last_active = time.monotonic()  # asked for until now, not only when asked

    # -- the ways in ----------------------------------------------------------------------

    async def ensure_ready(self, timeout: float) -> Upstream:
        """Return the upstream once healthy, starting the engine if needed.

        From ``healthy``: at once. From ``cold`` (or ``failed`` past its cooldown): starts
        one engine and waits. From ``starting``/``stopping``: waits. From ``failed`` within
        the cooldown, or after a start this call waited for failed: raises ``ModelFailed``
        with the engine's error. When ``/down`` stops the pool meanwhile: ``ModelStopped``;
        past ``timeout``: ``ModelNotReady``.
        """
        upstream = self._ready_upstream()
        if upstream is not None:
            return upstream  # (``lease`` notes the request)
        self._last_request = time.time()  # one that waits, and may fail, counts too
        deadline = time.monotonic() + timeout
        downs = self._downs
        saw_start = False
        while True:
            upstream = self._ready_upstream()
            if upstream is not None:
                return upstream
            state = self._state
            if self._closing:
                raise ShuttingDown()
            if self._downs != downs or self._stopping_for_down():
                raise ModelStopped(f"[{self.shown_name}] was stopped with /down")
            if state is PoolState.FAILED and (saw_start or self._cooldown_left() > 0):
                raise ModelFailed(
                    self._error or f"[{self.shown_name}] engine failed",
                    retry_after=max(self._cooldown_left(), 1.0),
                )
            if state in (PoolState.COLD, PoolState.FAILED):
                self._kick("request")
            saw_start = saw_start or self._state is PoolState.STARTING
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ModelNotReady(
                    f"[{self.shown_name}] {self._progress()}; not healthy after {timeout:g} s. "
                    "Retry later, or call /up and wait for status 'healthy'.",
                    retry_after=min(max(timeout, 1.0), 30.0),
                )
            await self._wait_change(remaining)

    def _stopping_for_down(self) -> bool:
        """Whether a ``/down`` is stopping the pool right now: whoever comes to wait for it
        then is told so, instead of starting it again as soon as it is stopped."""
        return self._stop_reason is not None and not self._stop_reason.automatic

    @property
    def stopped(self) -> asyncio.Future[None]:
        """Completes when ``/down`` stops this pool's engine (``down_ends_answers``): the
        answers under way are ended with ``model_stopped`` before the engine is told to stop
        (which might end them in a way that reads as complete, an abort)."""
        if self._cut is None:
            self._cut = asyncio.get_running_loop().create_future()
        return self._cut

    @property
    def downs(self) -> int:
        """How many times ``/down`` was called: a request it cut short sees the count move."""
        return self._downs

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Count a request in flight: a pool with requests in flight is never idle."""
        self._in_flight += 1
        self._last_request = time.time()
        self.last_active = time.monotonic()
        try:
            yield
        finally:
            self._in_flight -= 1
            self.last_active = time.monotonic()
            if self._in_flight == 0 and self.on_idle is not None:
                self.on_idle()

    async def up(self, wait: float, pin: int | None = None) -> PoolStatus:
        """Start the pool if needed, pinned to ``pin`` engines if given; with ``wait`` > 0
        long-poll until healthy or failed (``ModelStopped`` if ``/down`` stops it meanwhile)."""
        if self._closing:
            raise ShuttingDown()
        if self._stopping_for_down():  # a wait begun before the /down, most likely
            raise ModelStopped(f"[{self.shown_name}] is being stopped with /down")
        if pin is not None:  # only once the call is taken: a refused one leaves no pin
            await self.pin(pin)
        self.last_active = time.monotonic()
        downs = self._downs
        if self._state is PoolState.STOPPING:
            # Start again as soon as the stop under way is done.
            self._restart_after_stop = True
        else:
            self._kick("up")  # starts a cold pool, or a failed one past its cooldown
        deadline = time.monotonic() + wait
        while not self.ready and self._state is not PoolState.FAILED:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self._closing:
                raise ShuttingDown()
            if self._downs != downs:
                raise ModelStopped(
                    f"[{self.shown_name}] was stopped with /down while this call waited"
                )
            if self._state is PoolState.COLD:
                self._kick("up")
                continue
            await self._wait_change(remaining)
        return self.status()

    async def down(self, reason: StopReason = StopReason.DOWN) -> PoolStatus:
        """Stop the engine (any state); a failed pool is reset to cold.

        The stop runs as one task owned by the pool, so that a caller giving up (a cancelled
        start that was evicting this pool for its GPUs, say) never leaves it half-stopped.
        """
        if not reason.automatic:
            self._pinned = False
            self._failed_starts = 0  # the operator's turn: the next failure waits the least
            self._downs += 1
            self._restart_after_stop = False
            cut, self._cut = self._cut, None
            if cut is not None and self.down_ends_answers:
                cut.set_result(None)
            if self._stop_task is not None:  # an idle stop under way is now the /down's
                self._stop_reason = reason
        if self._stop_task is None and self._state in (
            PoolState.STARTING,
            PoolState.HEALTHY,
            PoolState.FAILED,
        ):
            self._move(PoolState.STOPPING, reason=reason)
            self._stop_reason = reason
            self._stop_task = asyncio.create_task(self._stop(reason), name=f"stop {self.name}")
        if self._stop_task is not None:
            await asyncio.shield(self._stop_task)
        return self.status()

    async def _stop(self, reason: StopReason) -> None:
        try:
            task, self._start_task = self._start_task, None
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            try:
                await self._terminate(reason)
            except Exception:
                log.exception("[%s] error while stopping the engine", self.name)
        finally:
            self._stop_task = None
            self._stop_reason = None
            self._move(PoolState.COLD, reason=reason)
        if self._restart_after_stop:
            self._restart_after_stop = False
            self._kick("up")

    async def pin(self, count: int) -> None:
        """Keep ``count`` engines warm whatever the traffic (0 unpins). Locally one engine
        is all a pool has: pinned, it is never stopped for being idle, only by ``/down``."""
        self._pinned = count > 0
        if self._pinned and self._making_way:  # a pinned engine never makes way
            self._making_way = False
            self._notify_waiters()
        if not self._pinned and self._in_flight == 0 and self.on_idle is not None:
            self.on_idle()  # a start waiting for GPUs may take this engine's now

    def idle_due(self, now: float) -> bool:
        return (
            not self._pinned
            and self._state is PoolState.HEALTHY
            and self._in_flight == 0
            and now - self.last_active >= self.idle_seconds
        )

    def at_rest(self) -> bool:
        """Nothing to lose by forgetting this pool: no engine, stop, request, waiter or pin,
        and no failure still within its cooldown (which keeps a crashing model from
        restarting)."""
        return (
            not self._pinned
            and self._in_flight == 0
            and self._waiting == 0
            and self._stop_task is None
            and (
                self._state is PoolState.COLD
                or (self._state is PoolState.FAILED and self._cooldown_left() == 0)
            )
        )

    def report_unreachable(self) -> None:
        """The proxy could not connect to a healthy upstream."""

    def status(self) -> PoolStatus:
        return PoolStatus(
            model=self.name,
            state=self._state,
            since=self._since,
            last_request=self._last_request,
            in_flight=self._in_flight,
            held=self._waiting,
            engines=self._engines(),
            gpus=self._gpus(),
            error=self._error,
            aliases=self.config.aliases_of(self.name),
            backend=self.backend,
            pinned=self._pinned,
            waiting_for_slot=self._waiting_for_slot(),
            making_way=self._making_way,
        )

"""An upstream that is already running (``url = ...``): routed to, never started or stopped."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
from yarl import URL

from ..config import Config, ModelConfig
from ..engine import EngineFailed
from ..engine_models import MODEL_LIST_ERRORS, model_list
from .base import Pool, PoolState, StopReason, Upstream

log = logging.getLogger("vllm_autoserve.pools")

# A static upstream that refuses connections this long is reported failed (not held for the
# whole startup deadline: nothing here can make it come up).
_REACH_SECONDS = 10.0


def _short(problem: str) -> str:
    """The cause without the address that most connection errors name."""
    if problem.startswith(("/health", "/v1/models", "no answer")):
        return problem
    if "CERTIFICATE_VERIFY_FAILED" in problem:
        return "its TLS certificate is not trusted (CERTIFICATE_VERIFY_FAILED)"
    return "could not connect (the gateway's log has the details)"


def _redact(text: str, url: str) -> str:
    secret = URL(url).password
    return text.replace(secret, "***") if secret else text


class StaticPool(Pool):
    backend = "static"
    backs_off = False

    def __init__(
        self,
        name: str,
        settings: ModelConfig,
        config: Config,
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        super().__init__(name, settings, config)
        assert settings.url is not None
        self.url = settings.url.rstrip("/")
        # What messages show: never credentials written into the URL.
        self.shown_url = str(URL(self.url).with_user(None))
        self._session = session
        self._probe: asyncio.Task[None] | None = None

    async def _launch(self) -> Upstream:
        try:
            api_key = self.settings.upstream_api_key()
        except ValueError as exc:
            raise EngineFailed(f"[{self.name}] {exc}") from None
        deadline = time.monotonic() + min(_REACH_SECONDS, self.startup_seconds / 2)
        problem = "no answer"
        while time.monotonic() < deadline:
            problem = await self._check()
            if not problem:
                await self._check_served(api_key)
                return Upstream(url=self.url, api_key=api_key)
            await asyncio.sleep(0.25)
        self._log_problem(problem)
        raise EngineFailed(f"[{self.name}] the upstream is not reachable: {_short(problem)}")

    def _log_problem(self, problem: str) -> None:
        # Its address stays in the gateway's log: the errors clients get do not name it.
        log.warning("[%s] upstream %s: %s", self.name, self.shown_url, _redact(problem, self.url))

    async def _check(self) -> str:
        """Empty when the upstream is up: ``/health`` 200, or no ``/health`` but ``/v1/models``."""
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            async with self._session().get(self.url + "/health", timeout=timeout) as resp:
                if resp.status == 200:
                    return ""
                if resp.status != 404:
                    return f"/health answered {resp.status}"
            async with self._session().get(self.url + "/v1/models", timeout=timeout) as resp:
                return "" if resp.status < 500 else f"/v1/models answered {resp.status}"
        except TimeoutError:
            return "no answer within 5 s"
        except (aiohttp.ClientError, OSError) as exc:
            return str(exc) or type(exc).__name__

    async def _check_served(self, api_key: str | None) -> None:
        """Warns when the upstream's model list shows that requests will be refused: its key
        is wrong, or it serves no model of this name (the name requests go upstream with).
        Its health check needs neither, so the pool turns healthy all the same."""
        try:
            status, listing = await model_list(
                self._session(), Upstream(url=self.url, api_key=api_key)
            )
        except MODEL_LIST_ERRORS:
            return  # no list to read: nothing to say
        if status in (401, 403):
            log.warning(
                "[%s] upstream %s refuses the gateway's key (%d to /v1/models): "
                "check this model's api_key",
                self.name,
                self.shown_url,
                status,
            )
            return
        entries = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(entries, list):
            return
        served = [e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]
        if served and self.name not in served:
            log.warning(
                "[%s] upstream %s does not list this name among its models (%s): requests "
                "for it go upstream as %r and will likely be refused; name the model as the "
                "upstream does, with aliases for other names",
                self.name,
                self.shown_url,
                ", ".join(served[:10]) + (", ..." if len(served) > 10 else ""),
                self.name,
            )

    async def _terminate(self, reason: StopReason | None) -> None:
        """Nothing to stop: the upstream is not ours."""
        if self._probe is not None:
            self._probe.cancel()

    def _engines(self) -> int:
        return 1 if self._state is PoolState.HEALTHY else 0

    def idle_due(self, now: float) -> bool:
        return False

    def report_unreachable(self) -> None:
        # One bad answer is the answer's business: the pool goes cold (its health checked
        # again by the next request) only if the upstream's health check fails too.
        if self._state is PoolState.HEALTHY and self._probe is None:
            self._probe = asyncio.create_task(self._probe_upstream())

    async def _probe_upstream(self) -> None:
        try:
            problem = await self._check()
            if problem and self._state is PoolState.HEALTHY:
                self._log_problem(problem)
                self._move(PoolState.COLD, reason="upstream unreachable")
        finally:
            self._probe = None

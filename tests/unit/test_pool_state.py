"""The pool state machine with an in-memory engine whose start is blocked and released."""

from __future__ import annotations

import asyncio

import pytest

from vllm_autoserve.config import Config, parse_config
from vllm_autoserve.engine import EngineFailed
from vllm_autoserve.errors import ModelFailed, ModelNotReady
from vllm_autoserve.pools.base import IllegalTransition, Pool, PoolState, StopReason, Upstream


class BlockingPool(Pool):
    def __init__(self, config: Config) -> None:
        super().__init__("m", config.model("m"), config)
        self.launches = 0
        self.terminations = 0
        self.release = asyncio.Event()
        self.fail_with: str | None = None

    async def _launch(self) -> Upstream:
        self.launches += 1
        await self.release.wait()
        if self.fail_with:
            raise EngineFailed(self.fail_with)
        return Upstream(url="http://engine", api_key="k")

    async def _terminate(self, reason: StopReason | None) -> None:
        self.terminations += 1


def make(**gateway: object) -> BlockingPool:
    return BlockingPool(parse_config({"gateway": {"failure_cooldown_seconds": 0.2, **gateway}}))


async def test_many_waiters_one_launch() -> None:
    pool = make()
    waiters = [asyncio.create_task(pool.ensure_ready(5)) for _ in range(16)]
    ups = [asyncio.create_task(pool.up(5)) for _ in range(4)]
    await asyncio.sleep(0.05)
    assert pool.state is PoolState.STARTING and pool.launches == 1
    pool.release.set()
    results = await asyncio.gather(*waiters)
    assert {r.url for r in results} == {"http://engine"}
    assert {s.up_status for s in await asyncio.gather(*ups)} == {"healthy"}
    assert pool.launches == 1


async def test_hold_deadline_raises_not_ready_and_start_continues() -> None:
    pool = make()
    with pytest.raises(ModelNotReady) as info:
        await pool.ensure_ready(0.05)
    assert info.value.retry_after and info.value.status == 503
    assert pool.state is PoolState.STARTING
    pool.release.set()
    assert (await pool.ensure_ready(1)).api_key == "k"


async def test_failure_then_cooldown_then_restart() -> None:
    pool = make()
    pool.fail_with = "[m] boom"
    pool.release.set()
    with pytest.raises(ModelFailed, match="boom"):
        await pool.ensure_ready(1)
    assert pool.status().up_status == "failed" and pool.status().error == "[m] boom"
    # Within the cooldown: answered at once, no new launch.
    with pytest.raises(ModelFailed):
        await pool.ensure_ready(1)
    assert (await pool.up(0)).up_status == "failed"
    assert pool.launches == 1
    await asyncio.sleep(0.25)
    pool.fail_with = None
    await pool.ensure_ready(1)
    assert pool.launches == 2 and pool.status().error is None


@pytest.mark.parametrize(("healthy_for", "restarted_at_once"), [(0.0, False), (0.2, True)])
async def test_an_engine_that_died_after_running_a_while_is_started_again_at_once(
    monkeypatch: pytest.MonkeyPatch, healthy_for: float, restarted_at_once: bool
) -> None:
    monkeypatch.setattr("vllm_autoserve.pools.base.BACKOFF_RESET_SECONDS", 0.1)
    pool = make(failure_cooldown_seconds=60)
    pool.release.set()
    await pool.ensure_ready(1)
    await asyncio.sleep(healthy_for)
    pool._engine_died("[m] engine exited with code -9")
    if restarted_at_once:  # not a crash loop: the next request starts it, and waits for it
        await pool.ensure_ready(1)
        assert pool.launches == 2 and pool.state is PoolState.HEALTHY
    else:  # died soon after it was up: the cooldown applies
        with pytest.raises(ModelFailed, match="code -9"):
            await pool.ensure_ready(1)
        assert pool.launches == 1


async def test_startup_deadline() -> None:
    pool = make(startup_seconds=0.05)
    status = await pool.up(1)
    assert status.up_status == "failed"
    assert "did not become healthy within 0.05 s" in (status.error or "")
    assert pool.terminations == 1


async def test_down_from_starting_cancels_the_launch() -> None:
    pool = make()
    await pool.up(0)
    assert pool.state is PoolState.STARTING
    status = await pool.down()
    assert status.state is PoolState.COLD and pool.terminations == 1


async def test_idle_only_without_requests_in_flight() -> None:
    pool = make(idle_seconds=0.05)
    pool.release.set()
    await pool.ensure_ready(1)
    with pool.lease():
        await asyncio.sleep(0.1)
        assert not pool.idle_due(asyncio.get_running_loop().time() + 10**9)
    await asyncio.sleep(0.1)
    import time

    assert pool.idle_due(time.monotonic())


def test_illegal_transition_is_an_error() -> None:
    pool = make()
    with pytest.raises(IllegalTransition):
        pool._move(PoolState.HEALTHY, reason="test")

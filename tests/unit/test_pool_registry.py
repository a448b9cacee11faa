"""The pool registry forgets unlisted models at rest, and nothing else."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from vllm_autoserve import metrics
from vllm_autoserve.config import Config, ModelConfig, parse_config
from vllm_autoserve.engine import EngineFailed
from vllm_autoserve.pools.base import Pool, PoolState, StopReason, Upstream
from vllm_autoserve.pools.registry import Pools


class InstantPool(Pool):
    """Starts at once; fails when its name says so."""

    async def _launch(self) -> Upstream:
        if "broken" in self.name:
            raise EngineFailed(f"[{self.name}] repository not found")
        return Upstream(url="http://engine")

    async def _terminate(self, reason: StopReason | None) -> None:
        pass


class InstantPools(Pools):
    unlisted_kept = 2
    forget_after_seconds = 0.0

    def _create(self, name: str, settings: ModelConfig) -> Pool:
        return InstantPool(name, settings, self.config)

    def _backend_of(self, settings: ModelConfig) -> str:
        return InstantPool.backend


def make_pools() -> InstantPools:
    config: Config = parse_config(
        {"gateway": {"failure_cooldown_seconds": 0.2}, "models": {"listed": {}}}
    )
    return InstantPools(config)


def series_models() -> set[str]:
    body, _ = metrics.render()
    return {
        sample.labels["model"]
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if "model" in sample.labels
    }


async def _used(pools: Pools, name: str) -> None:
    pool = pools.get(name)
    try:
        await pool.ensure_ready(1)
    except Exception:
        pass
    await pool.down()


async def test_unlisted_pools_at_rest_are_forgotten_least_recently_used_first() -> None:
    pools = make_pools()
    for name in ("listed", "org/a", "org/b", "org/c", "org/d"):
        await _used(pools, name)
    healthy = pools.get("org/e")
    await healthy.ensure_ready(1)
    before = {s.model for s in pools.statuses()}
    assert {"org/a", "org/b", "org/c", "org/d", "org/e"} <= before
    assert {"org/a", "org/e"} <= series_models()

    pools._forget_unlisted(time.monotonic())

    after = {s.model for s in pools.statuses()}
    # Two unlisted pools at rest stay (the latest used); the healthy one and the listed one stay.
    assert after == {"listed", "org/c", "org/d", "org/e"}
    assert not {"org/a", "org/b"} & series_models()
    assert {"org/c", "org/e"} <= series_models()
    # A forgotten model comes back as new on its next request, counted again.
    await pools.get("org/a").ensure_ready(1)
    assert pools.get("org/a").state is PoolState.HEALTHY and "org/a" in series_models()
    await pools.close()


async def test_a_failure_is_remembered_through_its_cooldown() -> None:
    pools = make_pools()
    for name in ("org/broken", "org/x", "org/y"):
        pool = pools.get(name)
        try:
            await pool.ensure_ready(1)
        except Exception:
            pass
    for name in ("org/x", "org/y"):
        await pools.get(name).down()
    pools.get("org/broken").last_active -= 100  # the least recently used

    pools._forget_unlisted(time.monotonic())
    # Still failed within its cooldown: forgetting it would let the next request restart it.
    assert pools.get("org/broken").state is PoolState.FAILED

    await asyncio.sleep(0.25)
    pools.get("org/broken").last_active -= 100
    pools._forget_unlisted(time.monotonic())
    assert "org/broken" not in {s.model for s in pools.statuses()}
    await pools.close()


async def test_a_pool_with_a_request_waiting_on_it_is_kept() -> None:
    # Waiting on a stopping pool, a request wakes when it is cold, then starts it: forgotten
    # in between, the engine it starts would belong to no pool anyone can see or stop.
    pools = make_pools()
    pools.unlisted_kept = 0
    for name in ("org/a", "org/b"):
        await _used(pools, name)
    waiter = asyncio.create_task(pools.get("org/a")._wait_change(5))
    await asyncio.sleep(0.01)
    pools.get("org/a").last_active -= 100
    pools._forget_unlisted(time.monotonic())
    assert {s.model for s in pools.statuses()} == {"listed", "org/a"}
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    pools._forget_unlisted(time.monotonic() + 100)
    assert {s.model for s in pools.statuses()} == {"listed"}
    await pools.close()


async def test_a_pool_just_asked_for_is_kept() -> None:
    pools = make_pools()
    pools.forget_after_seconds = 60.0
    for name in ("org/a", "org/b", "org/c"):
        await _used(pools, name)
    pools._forget_unlisted(time.monotonic())
    # A request may hold a cold pool it has not started yet: forgetting it would orphan
    # whatever it then starts.
    assert {"org/a", "org/b", "org/c"} <= {s.model for s in pools.statuses()}
    await pools.close()

"""``ModalPool`` against stand-ins for Modal: boot, wait, fail, single flight, down."""

from __future__ import annotations

import asyncio

import pytest

from vllm_autoserve.config import parse_config
from vllm_autoserve.engine import EngineFailed
from vllm_autoserve.errors import ModelFailed
from vllm_autoserve.modal_layout import ENGINE_KEY, boot_key, failure_key, report_failure
from vllm_autoserve.pools.base import PoolState, StopReason
from vllm_autoserve.pools.modal import ModalPools

from .fakes import DONE, EXPIRED, FakeDict, FakeEngines

MODEL = "Qwen/Qwen3-0.6B"


def make_pools(
    state: FakeDict | None = None, engines: FakeEngines | None = None, **gateway: object
) -> tuple[ModalPools, FakeDict, FakeEngines]:
    state = state or FakeDict()
    engines = engines or FakeEngines()
    config = parse_config({"gateway": {"failure_cooldown_seconds": 0, **gateway}})
    return ModalPools(config, state=state, engines=engines), state, engines


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_pending_then_healthy() -> None:
    pools, state, engines = make_pools()
    pool = pools.get(MODEL)
    status = await pool.up(wait=0)
    assert status.up_status == "pending"
    await wait_for(lambda: engines.spawned)
    assert state.data[boot_key(MODEL)]["call"] == engines.spawned[0][1]
    assert (await pool.up(wait=0.05)).up_status == "pending"

    engines.settle(DONE)
    upstream = await pool.ensure_ready(5)
    assert upstream.url == "https://ws-main--engine.modal.run"
    assert upstream.params == (("model_path", MODEL),)
    assert upstream.api_key == state.data[ENGINE_KEY]
    assert pool.status().up_status == "healthy"
    assert pool.status().backend == "modal"


async def test_failed_boot_reports_the_log_tail_and_cancels_the_call() -> None:
    pools, state, engines = make_pools()
    pool = pools.get(MODEL)
    await pool.up(wait=0)
    await wait_for(lambda: engines.spawned)
    tail = f"[{MODEL}] engine exited prematurely with code 1\nValueError: no such model"
    engines.settle(EngineFailed(tail))

    status = await pool.up(wait=5)
    assert status.up_status == "failed"
    assert status.error == tail
    assert engines.cancelled == [engines.spawned[0][1]]
    assert boot_key(MODEL) not in state.data  # the next start spawns a fresh boot


async def test_a_failed_model_is_not_restarted_within_its_cooldown() -> None:
    pools, _, engines = make_pools(failure_cooldown_seconds=60)
    await pools.get(MODEL).up(wait=0)
    await wait_for(lambda: engines.spawned)
    engines.settle(RuntimeError("boom"))
    with pytest.raises(ModelFailed, match="boom"):
        await pools.get(MODEL).ensure_ready(5)
    assert len(engines.spawned) == 1


async def test_crash_looping_container_fails_through_the_dict() -> None:
    """Modal retries a crashing container forever and never fails the boot call: the
    container's failure report in the Dict is what ends the wait."""
    pools, state, engines = make_pools()
    pool = pools.get(MODEL)
    await pool.up(wait=0)
    await wait_for(lambda: engines.spawned)
    await report_failure(state, MODEL, f"[{MODEL}] CUDA out of memory")

    status = await pool.up(wait=5)
    assert status.up_status == "failed"
    assert status.error == f"[{MODEL}] CUDA out of memory"
    assert engines.cancelled == [engines.spawned[0][1]]


async def test_an_old_failure_report_does_not_fail_a_new_start() -> None:
    pools, state, engines = make_pools()
    state.data[failure_key(MODEL)] = {"error": "old", "at": 1.0}
    engines.auto_finish = True
    await pools.get(MODEL).ensure_ready(5)


async def test_single_flight_within_one_gateway() -> None:
    pools, _, engines = make_pools()
    waiters = [asyncio.create_task(pools.get(MODEL).ensure_ready(5)) for _ in range(16)]
    await wait_for(lambda: engines.spawned)
    await asyncio.sleep(0.05)
    engines.settle(DONE)
    upstreams = await asyncio.gather(*waiters)
    assert len(engines.spawned) == 1
    assert len({u.url for u in upstreams}) == 1


async def test_single_flight_across_gateway_replicas() -> None:
    """Two gateways sharing one Dict (each with its own handles) spawn one boot call."""
    shared = FakeDict()
    engines = FakeEngines()
    first, _, _ = make_pools(shared, engines)
    second, _, _ = make_pools(shared, engines)
    waiters = [
        asyncio.create_task(pools.get(MODEL).ensure_ready(5))
        for pools in (first, second)
        for _ in range(8)
    ]
    await wait_for(lambda: engines.spawned)
    await asyncio.sleep(0.05)
    engines.settle(DONE)
    upstreams = await asyncio.gather(*waiters)
    assert len(engines.spawned) == 1
    assert {u.api_key for u in upstreams} == {shared.data[ENGINE_KEY]}


async def test_a_finished_boot_of_a_pool_scaled_to_zero_is_booted_again() -> None:
    pools, state, engines = make_pools()
    engines.auto_finish = True
    state.data[boot_key(MODEL)] = {"call": "fc-old", "at": 1.0}
    engines.calls["fc-old"] = DONE
    engines.runner_count = 0  # the old call returned long ago; its containers are gone
    await pools.get(MODEL).ensure_ready(5)
    assert [call for _, call in engines.spawned] == [state.data[boot_key(MODEL)]["call"]]


async def test_an_expired_boot_result_is_booted_again() -> None:
    pools, state, engines = make_pools()
    engines.auto_finish = True
    state.data[boot_key(MODEL)] = {"call": "fc-old", "at": 1.0}
    engines.calls["fc-old"] = EXPIRED
    await pools.get(MODEL).ensure_ready(5)
    assert len(engines.spawned) == 1


async def test_a_running_boot_of_another_replica_is_reused() -> None:
    pools, state, engines = make_pools()
    state.data[boot_key(MODEL)] = {"call": "fc-theirs", "at": 1.0}
    engines.calls["fc-theirs"] = DONE
    await pools.get(MODEL).ensure_ready(5)
    assert engines.spawned == []


async def test_a_claim_left_by_a_dead_replica_is_taken_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pools, state, engines = make_pools()
    engines.auto_finish = True
    state.data[boot_key(MODEL)] = {"call": "", "at": 1.0}  # claimed long ago, never spawned
    await pools.get(MODEL).ensure_ready(5)
    assert len(engines.spawned) == 1


async def test_down_unpins_and_forgets_the_boot_call() -> None:
    config_pin = {"models": {MODEL: {"min_containers": 2}}}
    state, engines = FakeDict(), FakeEngines()
    config = parse_config(config_pin)
    pools = ModalPools(config, state=state, engines=engines)
    engines.auto_finish = True
    await pools.get(MODEL).ensure_ready(5)
    assert engines.min_containers == {MODEL: 2}  # warm containers pinned from the config

    status = await pools.get(MODEL).down()
    assert status.state is PoolState.COLD
    assert engines.min_containers == {MODEL: 0}
    assert boot_key(MODEL) not in state.data


async def test_down_lets_idle_containers_go_at_once_then_restores_the_window() -> None:
    pools, _, engines = make_pools(idle_seconds=600)
    engines.auto_finish = True
    await pools.get(MODEL).ensure_ready(5)
    assert engines.scaledown_windows == {MODEL: 600}  # the deploy's window
    engines.runner_count = 1
    await pools.get(MODEL).down()
    assert engines.scaledown_windows == {MODEL: 2}  # idle GPUs go within seconds
    await asyncio.sleep(0.1)
    assert engines.scaledown_windows == {MODEL: 2}  # while a container still runs
    engines.runner_count = 0  # gone: other replicas' users get the deploy's window again
    await wait_for(lambda: engines.scaledown_windows == {MODEL: 600})


async def test_a_start_after_down_restores_the_window_at_once() -> None:
    pools, _, engines = make_pools(idle_seconds=600)
    engines.auto_finish = True
    engines.runner_count = 1
    await pools.get(MODEL).down()
    assert engines.scaledown_windows == {MODEL: 2}
    await pools.get(MODEL).ensure_ready(5)
    assert engines.scaledown_windows == {MODEL: 600}
    await pools.close()


async def test_down_on_a_replica_that_never_started_the_model_still_releases_it() -> None:
    pools, state, engines = make_pools()
    state.data[boot_key(MODEL)] = {"call": "fc-theirs", "at": 1.0}
    await pools.get(MODEL).down()
    assert engines.min_containers == {MODEL: 0}
    assert boot_key(MODEL) not in state.data
    assert engines.cancelled == ["fc-theirs"]


async def test_idle_and_shutdown_only_forget_the_pool_locally() -> None:
    pools, state, engines = make_pools(idle_seconds=120)
    engines.auto_finish = True
    pool = pools.get(MODEL)
    await pool.ensure_ready(5)
    assert pool.idle_seconds == 90  # goes cold before Modal's scale-down window ends
    await pool.down(StopReason.IDLE)
    await pools.close()
    assert boot_key(MODEL) in state.data  # other replicas may still use the pool
    assert engines.min_containers == {}
    assert engines.cancelled == []


def test_the_pool_is_forgotten_before_modals_longest_window_ends() -> None:
    # Modal cuts idle_seconds to 3600 s: a gateway counting 2 hours would route to a pool
    # that Modal scaled to zero an hour before, a cold start inside a web request.
    pools, _, _ = make_pools(idle_seconds=7200)
    assert pools.get(MODEL).idle_seconds == 3570


async def test_command_models_are_not_started_on_modal() -> None:
    config = parse_config(
        {"models": {"local-tool": {"command": ["python", "-m", "x", "--port", "{port}"]}}}
    )
    pools = ModalPools(config, state=FakeDict(), engines=FakeEngines())
    status = await pools.get("local-tool").up(wait=5)
    assert status.up_status == "failed"
    assert "local command" in (status.error or "")


async def test_up_with_min_containers_pins_warm_containers_and_down_unpins() -> None:
    pools, _, engines = make_pools()
    engines.auto_finish = True
    pool = pools.get(MODEL)
    await pool.pin(3)
    await pool.up(wait=5)
    assert engines.min_containers == {MODEL: 3}
    assert pool.status().pinned
    await pool.down()
    assert engines.min_containers == {MODEL: 0}
    assert not pool.status().pinned

"""One wait per (gateway, model), however many threads, tasks and event loops ask at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
from openai.types.chat import ChatCompletionMessageParam

from vllm_autoserve_client import AsyncAutoserveClient, AutoserveClient, ModelStartTimeout
from vllm_autoserve_client._ready import ReadyState

from .fake_gateway import API_KEY, BASE_URL, FakeGateway
from .helpers import achat, chat

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
KEY = ("http://gw/v1/", "m")


def test_sixteen_threads_share_one_wait(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    gateway.start_seconds = 0.5
    client = make_client(model="m")
    barrier = threading.Barrier(16)

    def ask(_: int) -> str | None:
        barrier.wait()
        return chat(client)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(16)))
    assert replies == ["hello"] * 16
    # One wait: its quick first poll, then one long-poll answered when the pool is healthy.
    assert [b["wait"] for b in gateway.bodies("/v1/up")] == [0.0, pytest.approx(30, abs=1)]
    assert gateway.count("/v1/chat/completions") == 16


async def test_sixteen_tasks_share_one_wait(
    gateway: FakeGateway, make_async_client: Callable[..., AsyncAutoserveClient]
) -> None:
    gateway.start_seconds = 0.5
    client = make_async_client(model="m")

    replies = await asyncio.gather(*(achat(client) for _ in range(16)))
    assert replies == ["hello"] * 16
    assert gateway.count("/v1/up") == 2
    assert gateway.count("/v1/chat/completions") == 16


def test_two_event_loops_share_one_wait(gateway: FakeGateway) -> None:
    gateway.start_seconds = 0.5
    client = AsyncAutoserveClient(
        model="m",
        base_url=BASE_URL,
        api_key=API_KEY,
        http_client=httpx2.AsyncClient(transport=gateway.async_transport()),
    )
    barrier = threading.Barrier(2)

    async def eight_tasks() -> list[str | None]:
        return await asyncio.gather(*(achat(client) for _ in range(8)))

    def run_loop(_: int) -> list[str | None]:
        barrier.wait()
        return asyncio.run(eight_tasks())

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run_loop, range(2)))
    assert results == [["hello"] * 8] * 2
    assert gateway.count("/v1/up") == 2
    assert gateway.count("/v1/chat/completions") == 16


def test_different_models_wait_separately(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client()
    for model in ("a", "b", "a", "b"):
        client.chat.completions.create(model=model, messages=MESSAGES)
    assert [b["model_path"] for b in gateway.bodies("/v1/up")] == ["a", "b"]


# -- ReadyState on its own -----------------------------------------------------------------------


def test_followers_share_the_leaders_error_and_the_next_caller_tries_again() -> None:
    state = ReadyState()
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def failing_wait(_: float) -> None:
        calls.append(1)
        entered.set()
        release.wait(5)
        raise RuntimeError("boom")

    def ask(_: int) -> str:
        try:
            state.ensure(KEY, 60, failing_wait)
        except RuntimeError as exc:
            return str(exc)
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(8)]
        entered.wait(5)
        release.set()
        assert [f.result(5) for f in futures] == ["boom"] * 8
    assert calls == [1]
    assert not state.is_ready(KEY)
    state.ensure(KEY, 60, lambda _: None)
    assert state.is_ready(KEY)


async def test_a_cancelled_leader_hands_over_to_a_follower() -> None:
    state = ReadyState()
    leader_started = asyncio.Event()
    waits: list[str] = []

    async def slow(_: float) -> None:
        waits.append("leader")
        leader_started.set()
        await asyncio.sleep(10)

    async def quick(_: float) -> None:
        waits.append("follower")

    leader = asyncio.create_task(state.ensure_async(KEY, 60, slow))
    await leader_started.wait()
    follower = asyncio.create_task(state.ensure_async(KEY, 60, quick))
    await asyncio.sleep(0.05)
    leader.cancel()
    await asyncio.wait_for(follower, 2)
    assert waits == ["leader", "follower"]
    assert state.is_ready(KEY)


async def test_a_cancelled_follower_does_not_cancel_the_wait() -> None:
    state = ReadyState()
    release = asyncio.Event()

    async def wait(_: float) -> None:
        await release.wait()

    leader = asyncio.create_task(state.ensure_async(KEY, 60, wait))
    await asyncio.sleep(0.01)
    follower = asyncio.create_task(state.ensure_async(KEY, 60, wait))
    await asyncio.sleep(0.01)
    follower.cancel()
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.wait_for(leader, 2)
    assert state.is_ready(KEY)


def test_forget_makes_the_next_caller_wait_again() -> None:
    state = ReadyState()
    calls: list[int] = []
    state.ensure(KEY, 60, lambda _: calls.append(1))
    state.ensure(KEY, 60, lambda _: calls.append(1))
    state.forget(KEY)
    state.ensure(KEY, 60, lambda _: calls.append(1))
    assert calls == [1, 1]


def test_each_caller_keeps_its_own_deadline() -> None:
    """A follower with a short timeout stops on time; a leader whose time is up first does
    not end its followers' wait: one of them waits on, with what is left of its own time."""
    state = ReadyState()
    ready = threading.Event()
    waits: list[float] = []

    def wait_for_ready(left: float) -> None:
        waits.append(left)
        if not ready.wait(left):
            raise ModelStartTimeout(KEY[1], left)

    with ThreadPoolExecutor(3) as pool:
        patient = pool.submit(state.ensure, KEY, 30, wait_for_ready)
        time.sleep(0.1)
        hasty = pool.submit(state.ensure, KEY, 0.3, wait_for_ready)
        with pytest.raises(ModelStartTimeout):
            hasty.result(5)
        assert not patient.done()  # the hasty caller's time was its own
        ready.set()
        patient.result(5)
    assert waits == [pytest.approx(30, abs=0.1)]

    state = ReadyState()
    ready.clear()
    waits.clear()
    with ThreadPoolExecutor(3) as pool:
        hasty = pool.submit(state.ensure, KEY, 0.3, wait_for_ready)
        time.sleep(0.1)
        patient = pool.submit(state.ensure, KEY, 30, wait_for_ready)
        with pytest.raises(ModelStartTimeout):
            hasty.result(5)  # the leader's time is up...
        time.sleep(0.2)
        assert not patient.done()  # ...and its follower leads the wait on
        ready.set()
        patient.result(5)
    assert len(waits) == 2 and 29 < waits[1] < 30


async def test_each_task_keeps_its_own_deadline() -> None:
    state = ReadyState()
    ready = asyncio.Event()

    async def wait_for_ready(left: float) -> None:
        try:
            await asyncio.wait_for(ready.wait(), left)
        except TimeoutError:
            raise ModelStartTimeout(KEY[1], left) from None

    hasty_leader = asyncio.create_task(state.ensure_async(KEY, 0.2, wait_for_ready))
    await asyncio.sleep(0.05)
    patient = asyncio.create_task(state.ensure_async(KEY, 30, wait_for_ready))
    hasty_follower = asyncio.create_task(state.ensure_async(KEY, 0.3, wait_for_ready))
    with pytest.raises(ModelStartTimeout):
        await hasty_leader
    with pytest.raises(ModelStartTimeout):
        await hasty_follower
    assert not patient.done()
    ready.set()
    await asyncio.wait_for(patient, 2)
    assert state.is_ready(KEY)

"""The clients against the real gateway, with fake engines that start slowly or fail.

``hold_seconds = 1`` and a 3 s engine start-up mean the gateway alone cannot hide a cold
start: the client has to wait for the pool itself.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import openai
import pytest

from tests.support.gateway import Gateway, fake_model, running_gateway
from tests.support.waiting import wait_for
from vllm_autoserve_client import (
    AsyncAutoserveClient,
    AutoserveClient,
    ModelFailedError,
    ModelFailedResponse,
    ModelStartTimeout,
)

from .helpers import achat, achat_stream, chat, chat_stream

HOLD = "[gateway]\nhold_seconds = 1\n"
SLOW = "--startup-delay", "3"


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    config = (
        HOLD
        + "".join(fake_model(name, *SLOW) for name in ("sync", "stream", "async", "astream"))
        + fake_model("crowd", *SLOW)
        + fake_model("acrowd", *SLOW)
        + fake_model("down", *SLOW)
        + fake_model("broken", "--fail-at-start", "boom message", "--startup-delay", "0.5")
        + fake_model("dies", "--die-after", "1")
        + fake_model("glacial", "--startup-delay", "30")
    )
    with running_gateway(config) as gw:
        yield gw


class UpCounter:
    """Counts the ``/up`` calls a client makes, through an httpx2 event hook."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, request: httpx2.Request) -> None:
        if request.url.path.endswith("/up"):
            with self._lock:
                self.calls += 1

    async def hook(self, request: httpx2.Request) -> None:
        self(request)


def client_for(gw: Gateway, **kwargs: Any) -> AutoserveClient:
    return AutoserveClient(base_url=gw.url, api_key=gw.api_key, **kwargs)


def async_client_for(gw: Gateway, **kwargs: Any) -> AsyncAutoserveClient:
    return AsyncAutoserveClient(base_url=gw.url, api_key=gw.api_key, **kwargs)


def engine_starts(gw: Gateway, model: str) -> float:
    with gw.client() as c:
        text = c.get("/metrics").text
    found = re.search(rf'autoserve_engine_starts_total{{model="{model}"}} ([0-9.]+)', text)
    return float(found.group(1)) if found else 0.0


def test_sync_request_waits_out_a_cold_start(gateway: Gateway) -> None:
    with client_for(gateway, model="sync") as client:
        assert chat(client) == "tok0-sync tok1-sync tok2-sync tok3-sync tok4-sync "
    assert gateway.status()["sync"]["state"] == "healthy"


def test_sync_stream_waits_out_a_cold_start(gateway: Gateway) -> None:
    with client_for(gateway, model="stream") as client:
        chunks = [c.choices[0].delta.content for c in chat_stream(client) if c.choices]
    assert "".join(c or "" for c in chunks).startswith("tok0-stream")
    assert len([c for c in chunks if c]) == 5


async def test_async_request_and_stream_wait_out_a_cold_start(gateway: Gateway) -> None:
    async with async_client_for(gateway, model="async") as client:
        assert (await achat(client) or "").startswith("tok0-async")
    async with async_client_for(gateway, model="astream") as client:
        stream = await achat_stream(client)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("tok0-astream")


def test_sixteen_threads_start_one_engine_with_one_wait(gateway: Gateway) -> None:
    counter = UpCounter()
    http_client = httpx2.Client(event_hooks={"request": [counter]})
    barrier = threading.Barrier(16)
    with client_for(gateway, model="crowd", http_client=http_client) as client:

        def ask(_: int) -> str | None:
            barrier.wait()
            return chat(client)

        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(ask, range(16)))
    assert all((r or "").startswith("tok0-crowd") for r in replies)
    assert counter.calls == 2  # one wait: a quick first poll, then one long-poll
    assert engine_starts(gateway, "crowd") == 1
    assert gateway.status()["crowd"]["engines"] == 1


async def test_sixteen_tasks_start_one_engine_with_one_wait(gateway: Gateway) -> None:
    counter = UpCounter()
    http_client = httpx2.AsyncClient(event_hooks={"request": [counter.hook]})
    async with async_client_for(gateway, model="acrowd", http_client=http_client) as client:
        replies = await asyncio.gather(*(achat(client) for _ in range(16)))
    assert all((r or "").startswith("tok0-acrowd") for r in replies)
    assert counter.calls == 2
    assert engine_starts(gateway, "acrowd") == 1


def test_a_pool_scaled_down_is_waited_for_again(gateway: Gateway) -> None:
    counter = UpCounter()
    http_client = httpx2.Client(event_hooks={"request": [counter]})
    with client_for(gateway, model="down", http_client=http_client) as client:
        chat(client)
        assert counter.calls == 2
        with gateway.client() as admin:  # behind the client's back: it still thinks "ready"
            assert admin.post("/down", json={"model_path": "down"}).status_code == 200
        assert gateway.status()["down"]["state"] == "cold"
        # Held 1 s, then 503 model_not_ready; the client waits with /up and retries once.
        assert (chat(client) or "").startswith("tok0-down")
        assert counter.calls > 2
    assert engine_starts(gateway, "down") == 2


@pytest.mark.parametrize("use_async", [False, True])
def test_a_pool_gone_is_waited_for_even_when_the_gateway_holds_longer_than_the_timeout(
    use_async: bool,
) -> None:
    """A client timeout (1 s) shorter than the gateway's hold (10 s): the held request times
    out; the client then sees with /up that the pool is starting, waits, and resends."""
    config = "[gateway]\nhold_seconds = 10\n" + fake_model("gone", *SLOW)

    def take_down(gw: Gateway) -> None:  # behind the client's back: it still thinks "ready"
        with gw.client() as admin:
            assert admin.post("/down", json={"model_path": "gone"}).status_code == 200

    async def async_reply(gw: Gateway) -> str | None:
        async with async_client_for(gw, model="gone", timeout=1, max_retries=0) as client:
            await client.wait_until_ready()
            take_down(gw)
            return await achat(client)

    with running_gateway(config) as gw:
        if use_async:
            reply = asyncio.run(async_reply(gw))
        else:
            with client_for(gw, model="gone", timeout=1, max_retries=0) as client:
                client.wait_until_ready()
                take_down(gw)
                reply = chat(client)
        assert (reply or "").startswith("tok0-gone")
        assert engine_starts(gw, "gone") == 2


def test_a_failed_engine_raises_model_failed_error(gateway: Gateway) -> None:
    with client_for(gateway, model="broken") as client, pytest.raises(ModelFailedError) as info:
        chat(client)
    assert "boom message" in info.value.error
    assert info.value.model == "broken"


def test_an_engine_that_dies_after_serving_fails_the_requests_that_follow(
    gateway: Gateway,
) -> None:
    with client_for(gateway, model="dies", max_retries=0) as client:
        assert (chat(client) or "").startswith("tok0-dies")
        with pytest.raises(openai.APIStatusError) as died:  # the engine exits on this one
            chat(client)
        assert died.value.status_code == 502
        # Once the gateway has seen the engine exit, the model is failed (for its cooldown),
        # and the SDK's own error class says so too.
        wait_for(lambda: gateway.status()["dies"]["state"] == "failed", timeout=10)
        with pytest.raises(ModelFailedResponse) as failed:
            chat(client)
    assert isinstance(failed.value, openai.InternalServerError)
    assert failed.value.status_code == 503 and failed.value.code == "model_failed"
    assert "exited with code 3" in failed.value.error


def test_a_pool_too_slow_for_up_timeout_raises_model_start_timeout(gateway: Gateway) -> None:
    with client_for(gateway, model="glacial", up_timeout=2) as client:
        with pytest.raises(ModelStartTimeout) as info:
            chat(client)
    assert 2 <= info.value.waited < 5
    assert info.value.state == "starting"


def test_the_cli_against_the_gateway(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_autoserve_client import cli

    base = ["--base-url", gateway.url, "--api-key", gateway.api_key]
    assert cli.main([*base, "up", "sync"]) == 0
    assert "sync is healthy" in capsys.readouterr().out
    assert cli.main([*base, "status"]) == 0
    assert "sync" in capsys.readouterr().out
    assert cli.main([*base, "chat", "sync", "hello"]) == 0
    assert capsys.readouterr().out.startswith("tok0-sync")
    assert cli.main([*base, "models"]) == 0
    assert "glacial" in capsys.readouterr().out
    assert cli.main([*base, "up", "broken"]) == 1
    assert "boom message" in capsys.readouterr().err
    assert cli.main([*base, "down", "sync"]) == 0
    assert capsys.readouterr().out.strip() == "sync: down (now cold)"
    assert gateway.status()["sync"]["state"] == "cold"

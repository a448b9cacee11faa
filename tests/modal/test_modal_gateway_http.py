"""The gateway's ASGI app over ``ModalPools`` and stand-ins for Modal: /up, /status,
/v1/models, and a chat request proxied to the engine with ``?model_path=`` and the engine key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.support.gateway import free_port
from tests.support.waiting import standalone_fake_engine
from vllm_autoserve.app import GatewayApp, create_app
from vllm_autoserve.auth import ApiKeys
from vllm_autoserve.config import parse_config
from vllm_autoserve.errors import ConfigError
from vllm_autoserve.modal_layout import ENGINE_KEY
from vllm_autoserve.pools.modal import ModalPools

from .fakes import DONE, FakeDict, FakeEngines

MODEL = "Qwen/Qwen3-8B"
GATEWAY_KEY = "client-key"
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
CONFIG = {"models": {MODEL: {"aliases": ["qwen"]}}, "gateway": {"hold_seconds": 10}}


class RecordingEngine:
    """An upstream that records what reached it and answers like vLLM."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(
            {
                "path": request.path,
                "query": [(k, v) for k, v in request.query.items()],
                "forwarded_for": request.headers.get("X-Forwarded-For"),
                "auth": request.headers.get("Authorization"),
                "model": body.get("model"),
                "modal_key": request.headers.get("Modal-Key"),
                "modal_secret": request.headers.get("Modal-Secret"),
            }
        )
        message = {"role": "assistant", "content": "hello"}
        return web.json_response(
            {
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": message}],
            }
        )


@pytest.fixture
async def recording() -> AsyncIterator[tuple[RecordingEngine, str]]:
    engine = RecordingEngine()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", engine.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield engine, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def spawned(engines: FakeEngines) -> None:
    await asyncio.wait_for(engines.spawn_started.wait(), 5)


async def started(app: GatewayApp) -> httpx.AsyncClient:
    await app.startup()
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=AUTH
    )


async def test_up_pending_healthy_then_chat(recording: tuple[RecordingEngine, str]) -> None:
    upstream, url = recording
    state, engines = FakeDict(), FakeEngines(url=url)
    config = parse_config(CONFIG)
    app = create_app(
        ModalPools(config, state=state, engines=engines), config, ApiKeys([GATEWAY_KEY])
    )
    client = await started(app)
    try:
        first = (await client.post("/up", json={"model_path": "qwen"})).json()
        assert first["status"] == "pending" and first["model"] == MODEL
        status = (await client.get("/status")).json()["pools"]
        assert [(p["model"], p["status"], p["backend"]) for p in status] == [
            (MODEL, "pending", "modal")
        ]

        await spawned(engines)
        engines.settle(DONE)
        healthy = (await client.post("/up", json={"model_path": MODEL, "wait": 5})).json()
        assert healthy["status"] == "healthy"
        assert len(engines.spawned) == 1

        models = (await client.get("/v1/models")).json()["data"]
        assert {m["id"] for m in models} == {MODEL, "qwen"}

        # A client's own model_path (first, as a server may read it) or forwarding headers
        # cannot choose the engine, or what it takes the client's address to be.
        answer = await client.post(
            "/v1/chat/completions?model%5Fpath=other/model&x=1&model_path=a/b",
            json={"model": "qwen", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Forwarded-For": "6.6.6.6"},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "hello"
        assert upstream.seen == [
            {
                "path": "/v1/chat/completions",
                "query": [("x", "1"), ("model_path", MODEL)],
                "forwarded_for": None,
                "auth": f"Bearer {state.data[ENGINE_KEY]}",  # never the client's key
                "model": "qwen",  # the engine serves its aliases too
                "modal_key": None,
                "modal_secret": None,
            }
        ]
        assert state.data[ENGINE_KEY] != GATEWAY_KEY
    finally:
        await client.aclose()
        await app.shutdown()


async def test_failed_start_is_reported_by_up(recording: tuple[RecordingEngine, str]) -> None:
    _, url = recording
    engines = FakeEngines(url=url)
    config = parse_config(CONFIG)
    app = create_app(
        ModalPools(config, state=FakeDict(), engines=engines), config, ApiKeys([GATEWAY_KEY])
    )
    client = await started(app)
    try:
        await client.post("/up", json={"model_path": MODEL})
        await spawned(engines)
        engines.settle(
            RuntimeError(f"[{MODEL}] engine exited prematurely with code 1\nOSError: gated repo")
        )
        failed = (await client.post("/up", json={"model_path": MODEL, "wait": 5})).json()
        assert failed["status"] == "failed"
        assert "gated repo" in failed["error"]
    finally:
        await client.aclose()
        await app.shutdown()


ENGINE_KEY_VALUE = "engine-only-key"


@pytest.fixture
def fake_engine() -> Iterator[str]:
    """The fake engine, requiring ``VLLM_API_KEY`` as vLLM does; its base URL."""
    with standalone_fake_engine("--model", MODEL, env={"VLLM_API_KEY": ENGINE_KEY_VALUE}) as url:
        yield url


async def test_request_held_until_the_cold_model_is_healthy_then_proxied_to_the_fake_engine(
    fake_engine: str,
) -> None:
    state, engines = FakeDict(), FakeEngines(url=fake_engine)
    state.data[ENGINE_KEY] = ENGINE_KEY_VALUE
    config = parse_config(CONFIG)
    pools = ModalPools(config, state=state, engines=engines)
    app = create_app(pools, config, ApiKeys([GATEWAY_KEY]))
    client = await started(app)
    try:
        body = {"model": MODEL, "messages": [], "max_tokens": 3}
        request = asyncio.create_task(client.post("/v1/chat/completions", json=body))
        await spawned(engines)
        assert not request.done()  # held while the pool boots
        engines.settle(DONE)
        answer = await request
        assert answer.status_code == 200, answer.text
        content = answer.json()["choices"][0]["message"]["content"]
        assert content == f"tok0-{MODEL} tok1-{MODEL} tok2-{MODEL} "
        async with httpx.AsyncClient() as direct:
            stats = (await direct.get(f"{fake_engine}/stats")).json()
    finally:
        await client.aclose()
        await app.shutdown()
    assert stats["auth_headers"][-1] == f"Bearer {ENGINE_KEY_VALUE}"


async def test_with_proxy_auth_engines_get_the_gateways_proxy_token_and_no_clients(
    recording: tuple[RecordingEngine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream, url = recording
    monkeypatch.setenv("MODAL_PROXY_KEY", "wk-gateway")
    monkeypatch.setenv("MODAL_PROXY_SECRET", "ws-gateway")
    state, engines = FakeDict(), FakeEngines(url=url)
    config = parse_config({**CONFIG, "gateway": {"hold_seconds": 10, "modal_proxy_auth": True}})
    app = create_app(
        ModalPools(config, state=state, engines=engines), config, ApiKeys([GATEWAY_KEY])
    )
    client = await started(app)
    try:
        await client.post("/up", json={"model_path": MODEL})
        await spawned(engines)
        engines.settle(DONE)
        answer = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Modal-Key": "wk-client", "Modal-Secret": "ws-client"},
        )
        assert answer.status_code == 200, answer.text
        seen = upstream.seen[0]
        assert (seen["modal_key"], seen["modal_secret"]) == ("wk-gateway", "ws-gateway")
        assert seen["auth"] == f"Bearer {state.data[ENGINE_KEY]}"
    finally:
        await client.aclose()
        await app.shutdown()


def test_proxy_auth_without_a_token_stops_the_gateway_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MODAL_PROXY_KEY", raising=False)
    config = parse_config({"gateway": {"modal_proxy_auth": True}})
    with pytest.raises(ConfigError, match="modal workspace proxy-tokens create"):
        ModalPools(config, state=FakeDict(), engines=FakeEngines(url="http://127.0.0.1:9"))

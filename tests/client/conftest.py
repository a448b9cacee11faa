from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx2
import pytest

from vllm_autoserve_client import AsyncAutoserveClient, AutoserveClient

from .fake_gateway import API_KEY, BASE_URL, FakeGateway


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "AUTOSERVE_BASE_URL",
        "OPENAI_BASE_URL",
        "AUTOSERVE_API_KEY",
        "VLLM_GATEWAY_AUTH",
        "OPENAI_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
def make_client(gateway: FakeGateway) -> Iterator[Callable[..., AutoserveClient]]:
    clients: list[AutoserveClient] = []

    def make(**kwargs: Any) -> AutoserveClient:
        kwargs.setdefault("base_url", BASE_URL)
        kwargs.setdefault("api_key", API_KEY)
        kwargs.setdefault("http_client", httpx2.Client(transport=gateway.transport()))
        client = AutoserveClient(**kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
async def make_async_client(
    gateway: FakeGateway,
) -> AsyncIterator[Callable[..., AsyncAutoserveClient]]:
    clients: list[AsyncAutoserveClient] = []

    def make(**kwargs: Any) -> AsyncAutoserveClient:
        kwargs.setdefault("base_url", BASE_URL)
        kwargs.setdefault("api_key", API_KEY)
        kwargs.setdefault("http_client", httpx2.AsyncClient(transport=gateway.async_transport()))
        client = AsyncAutoserveClient(**kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()

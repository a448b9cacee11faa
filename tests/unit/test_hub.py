"""The Hub check refuses only what the Hub says does not exist; anything else starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.support.gateway import free_port
from vllm_autoserve.hub import HubCheck


def missing(name: str) -> bool:
    async def ask() -> bool:
        async with aiohttp.ClientSession() as session:
            return await HubCheck(lambda: session).missing(name)

    return asyncio.run(ask())


def test_an_unreachable_hub_refuses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert missing("some/model") is False


def test_offline_or_cached_models_are_not_asked_about(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(HubCheck, "_ask", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert missing("some/model") is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--some--model").mkdir()
    assert missing("some/model") is False

"""Arguments first, then the environment: the same fallbacks for the classes and the CLI."""

from __future__ import annotations

import openai
import pytest

from vllm_autoserve_client import AsyncAutoserveClient, AutoserveClient


def test_base_url_falls_back_to_autoserve_then_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://openai-env/v1")
    assert str(AutoserveClient(api_key="k").base_url) == "http://openai-env/v1/"
    monkeypatch.setenv("AUTOSERVE_BASE_URL", "http://autoserve-env/v1")
    assert str(AutoserveClient(api_key="k").base_url) == "http://autoserve-env/v1/"
    assert str(AutoserveClient(api_key="k", base_url="http://arg/v1").base_url) == "http://arg/v1/"


def test_a_bare_host_gets_v1() -> None:
    client = AutoserveClient(api_key="k", base_url="http://127.0.0.1:8000")
    assert str(client.base_url) == "http://127.0.0.1:8000/v1/"
    prefixed = AutoserveClient(api_key="k", base_url="https://proxy.example/autoserve/v1")
    assert str(prefixed.base_url) == "https://proxy.example/autoserve/v1/"


def test_api_key_falls_back_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOSERVE_BASE_URL", "http://gw/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "openai")
    assert AutoserveClient().api_key == "openai"
    monkeypatch.setenv("VLLM_GATEWAY_AUTH", "new-key, old-key")
    assert AutoserveClient().api_key == "new-key"
    monkeypatch.setenv("AUTOSERVE_API_KEY", "autoserve")
    assert AutoserveClient().api_key == "autoserve"
    assert AsyncAutoserveClient().api_key == "autoserve"
    assert AutoserveClient(api_key="arg").api_key == "arg"


def test_missing_settings_say_how_to_give_them(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(openai.OpenAIError, match="AUTOSERVE_BASE_URL"):
        AutoserveClient(api_key="k")
    monkeypatch.setenv("AUTOSERVE_BASE_URL", "http://gw/v1")
    with pytest.raises(openai.OpenAIError, match="AUTOSERVE_API_KEY"):
        AsyncAutoserveClient()


def test_defaults() -> None:
    client = AutoserveClient(api_key="k", base_url="http://gw/v1")
    assert client.model is None
    assert client.up_timeout == 20 * 60
    assert client.on_wait is None

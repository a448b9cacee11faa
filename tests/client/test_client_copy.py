"""Copies keep the model and settings and share the ready-state; the classes are OpenAI's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
from openai.types.chat import ChatCompletionMessageParam

from vllm_autoserve_client import AsyncAutoserveClient, AutoserveClient

from .fake_gateway import FakeGateway
from .helpers import achat, chat
from .typed_usage import ask, ask_async, tuned

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


def _on_wait(model: str, state: str, elapsed: float) -> None:
    pass


def test_with_options_keeps_model_and_settings_and_shares_the_ready_state(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m", up_timeout=42, on_wait=_on_wait)
    chat(client)
    copied = client.with_options(timeout=5, max_retries=0)
    assert isinstance(copied, AutoserveClient)
    assert (copied.model, copied.up_timeout, copied.on_wait) == ("m", 42, _on_wait)
    assert copied.timeout == 5 and copied.max_retries == 0
    assert copied._client is client._client
    chat(copied)
    assert gateway.count("/v1/up") == 1


def test_copy_can_change_our_settings(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m")
    other = client.copy(model="other", up_timeout=7)
    assert (other.model, other.up_timeout) == ("other", 7)
    assert client.model == "m"
    chat(other)
    client.chat.completions.create(model="other", messages=MESSAGES)
    assert [b["model_path"] for b in gateway.bodies("/v1/up")] == ["other"]


def test_a_trailing_slash_is_the_same_gateway(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m")
    chat(client)
    chat(client.with_options(base_url="http://gateway.test/v1/"))
    assert gateway.count("/v1/up") == 1  # the model is known ready there already


def test_a_different_base_url_is_a_different_gateway(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m")
    chat(client)
    chat(client.with_options(base_url="http://other-gateway.test/v1"))
    assert gateway.count("/v1/up") == 2  # a model ready on one gateway is not on another


async def test_async_copies(
    gateway: FakeGateway, make_async_client: Callable[..., AsyncAutoserveClient]
) -> None:
    client = make_async_client(model="m", up_timeout=9)
    await achat(client)
    copied = client.with_options(timeout=3)
    assert isinstance(copied, AsyncAutoserveClient)
    assert (copied.model, copied.up_timeout) == ("m", 9)
    await achat(copied)
    assert gateway.count("/v1/up") == 1


async def test_code_typed_for_the_sdk_takes_our_clients(
    gateway: FakeGateway,
    make_client: Callable[..., AutoserveClient],
    make_async_client: Callable[..., AsyncAutoserveClient],
) -> None:
    client = make_client(model="m")
    assert isinstance(client, openai.OpenAI)
    assert ask(client, "m") == "hello"
    assert ask(tuned(client), "m") == "hello"
    aclient = make_async_client()
    assert isinstance(aclient, openai.AsyncOpenAI)
    assert await ask_async(aclient, "m") == "hello"


def test_code_typed_for_the_sdk_type_checks_with_our_clients() -> None:
    from mypy import api

    here = Path(__file__).parent
    stdout, stderr, status = api.run(["--strict", str(here / "typed_usage.py")])
    assert status == 0, stdout + stderr


def test_misspelt_sdk_arguments_fail_type_checking_as_with_the_sdk() -> None:
    from mypy import api

    path = Path(__file__).parent / "misspelt_usage.py"
    marked = {
        number
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if "# error:" in line
    }
    stdout, _, _ = api.run(["--strict", "--no-incremental", str(path)])
    flagged = {int(line.split(":")[1]) for line in stdout.splitlines() if ": error:" in line}
    assert flagged == marked, stdout

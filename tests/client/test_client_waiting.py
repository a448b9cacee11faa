"""Waiting for a pool with /up: long-poll, backoff, Retry-After, failure, timeout, redirects."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from vllm_autoserve_client import (
    AsyncAutoserveClient,
    AutoserveClient,
    ModelFailedError,
    ModelStartTimeout,
)

from .fake_gateway import API_KEY, FakeGateway
from .helpers import achat, chat

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


def test_a_cold_model_is_waited_for_once_then_requests_go_straight_through(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    gateway.start_seconds = 0.5
    client = make_client(model="m")
    started = time.monotonic()
    chat(client)
    assert 0.5 <= time.monotonic() - started < 3
    chat(client)
    assert gateway.paths() == ["/v1/up", "/v1/up", "/v1/chat/completions", "/v1/chat/completions"]
    first, second = gateway.bodies("/v1/up")
    assert first == {"model_path": "m", "wait": 0.0}
    assert 29 < second["wait"] <= 30  # the long-poll: the gateway answers when healthy


def test_a_healthy_model_costs_one_quick_up(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m")
    chat(client)
    assert gateway.paths() == ["/v1/up", "/v1/chat/completions"]


def test_up_carries_the_key_and_default_headers(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m", default_headers={"X-Team": "blue"})
    chat(client)
    up = gateway.calls[0]
    assert up.path == "/v1/up"
    assert up.headers["authorization"] == f"Bearer {API_KEY}"
    assert up.headers["x-team"] == "blue"


def test_a_failed_pool_raises_model_failed_error_with_the_gateways_text(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    gateway.fail = "[m] engine exited with status 1\nValueError: boom"
    client = make_client(model="m")
    with pytest.raises(ModelFailedError) as info:
        chat(client)
    assert isinstance(info.value, openai.OpenAIError)
    assert info.value.model == "m"
    assert "ValueError: boom" in info.value.error
    assert str(info.value).startswith("[m] engine exited")
    assert gateway.count("/v1/chat/completions") == 0


def test_running_out_of_up_timeout_raises_model_start_timeout(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    gateway.pending_forever = True
    client = make_client(model="m", up_timeout=0.8)
    started = time.monotonic()
    with pytest.raises(ModelStartTimeout) as info:
        chat(client)
    assert 0.8 <= time.monotonic() - started < 4
    assert not isinstance(info.value, ModelFailedError)
    assert info.value.model == "m"
    assert info.value.state == "starting"
    assert 0.8 <= info.value.waited < 4
    assert "[m] not healthy after waiting" in str(info.value)
    assert gateway.count("/v1/chat/completions") == 0


def test_up_follows_modals_303_even_when_the_http_client_does_not(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    gateway.redirect_up = True
    http_client = httpx2.Client(transport=gateway.transport(), follow_redirects=False)
    client = make_client(model="m", http_client=http_client)
    chat(client)
    methods = [(c.method, c.path, c.query) for c in gateway.calls]
    assert methods[:2] == [
        ("POST", "/v1/up", ""),
        ("GET", "/v1/up", "__modal_function_call_id=fc-1"),  # httpx turns a 303 into a GET
    ]
    assert methods[2][1] == "/v1/chat/completions"


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_of_an_error_is_honoured(
    status: int, gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    gateway.up_errors.append((status, {"Retry-After": "0.6"}))
    client = make_client(model="m")
    chat(client)
    first, second = gateway.times("/v1/up")
    assert second - first >= 0.6


def test_an_up_answer_the_gateway_says_not_to_retry_is_not_retried(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    # As a wait that /down cut: trying again would start the model just stopped.
    gateway.up_errors.append((503, {"x-should-retry": "false"}))
    client = make_client(model="m")
    with pytest.raises(openai.InternalServerError):
        chat(client)
    assert gateway.paths() == ["/v1/up"]


def test_retry_after_of_a_pending_answer_is_honoured(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    gateway.start_seconds = 0.1
    gateway.up_retry_after = "0.5"
    client = make_client(model="m")
    chat(client)
    first, second = gateway.times("/v1/up")[:2]
    assert second - first >= 0.5


def test_a_refused_key_is_not_retried(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        chat(client)
    assert gateway.paths() == ["/v1/up"]


def test_a_refused_connection_fails_after_a_few_tries() -> None:
    client = AutoserveClient(model="m", base_url="http://127.0.0.1:9/v1", api_key="k")
    started = time.monotonic()
    with pytest.raises(openai.APIConnectionError):
        chat(client)
    assert time.monotonic() - started < 5


def test_on_wait_and_logging_report_the_wait(
    gateway: FakeGateway,
    make_client: Callable[..., AutoserveClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway.start_seconds = 0.3
    seen: list[tuple[str, str, float]] = []
    client = make_client(model="m", on_wait=lambda *args: seen.append(args))
    with caplog.at_level(logging.INFO, logger="vllm_autoserve_client"):
        chat(client)
    assert [(m, s) for m, s, _ in seen] == [("m", "starting"), ("m", "healthy")]
    assert seen[0][2] < 0.5 and seen[1][2] >= 0.3
    messages = [r.getMessage() for r in caplog.records if r.name == "vllm_autoserve_client"]
    assert messages[0].startswith("[m] waiting for the pool: starting")
    assert messages[-1].startswith("[m] pool healthy after")


def test_helpers(gateway: FakeGateway, make_client: Callable[..., AutoserveClient]) -> None:
    client = make_client(model="m")
    assert client.up()["status"] == "healthy"
    chat(client)
    assert gateway.paths() == ["/v1/up", "/v1/chat/completions"]  # up() marked it ready
    assert client.status()["pools"][0]["model"] == "m"
    assert client.down()["status"] == "down"
    chat(client)
    assert gateway.paths()[-2:] == ["/v1/up", "/v1/chat/completions"]  # down() forgot it
    client.wait_until_ready("other")
    assert gateway.bodies("/v1/up")[-1]["model_path"] == "other"


def test_helpers_need_a_model(make_client: Callable[..., AutoserveClient]) -> None:
    with pytest.raises(ValueError, match="No model"):
        make_client().up()


def test_wait_until_ready_takes_its_own_timeout(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    gateway.pending_forever = True
    client = make_client(model="m")
    with pytest.raises(ModelStartTimeout):
        client.wait_until_ready(timeout=0.3)


async def test_async_helpers_and_errors(
    gateway: FakeGateway, make_async_client: Callable[..., AsyncAutoserveClient]
) -> None:
    client = make_async_client(model="m")
    assert (await client.up(wait=5))["status"] == "healthy"
    assert (await client.status())["pools"]
    assert (await client.down())["status"] == "down"
    await client.wait_until_ready()
    gateway.fail = "boom"
    with pytest.raises(ModelFailedError, match="boom"):
        await client.chat.completions.create(model="x", messages=MESSAGES)


async def test_async_timeout(
    gateway: FakeGateway, make_async_client: Callable[..., AsyncAutoserveClient]
) -> None:
    gateway.pending_forever = True
    client = make_async_client(model="m", up_timeout=0.5)
    with pytest.raises(ModelStartTimeout):
        await achat(client)

"""The gateway's 503s after the pool was ready: one more wait and one retry, never blind retries."""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from vllm_autoserve_client import (
    AsyncAutoserveClient,
    AutoserveClient,
    AutoserveError,
    ModelFailedError,
)

from .fake_gateway import API_KEY, BASE_URL, FakeGateway, error_body
from .helpers import achat, achat_stream, chat, chat_stream

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
CHAT = "/v1/chat/completions"


@pytest.fixture
def ready_client(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> AutoserveClient:
    client = make_client(model="m")
    chat(client)
    assert gateway.paths() == ["/v1/up", CHAT]
    return client


def test_model_not_ready_waits_again_and_retries_once(
    gateway: FakeGateway, ready_client: AutoserveClient
) -> None:
    gateway.queue_not_ready()
    assert chat(ready_client) == "hello"
    assert gateway.paths()[2:] == [CHAT, "/v1/up", CHAT]
    chat(ready_client)
    assert gateway.paths()[5:] == [CHAT]  # ready again: straight through


def test_model_not_ready_on_a_stream(gateway: FakeGateway, ready_client: AutoserveClient) -> None:
    gateway.queue_not_ready()
    stream = chat_stream(ready_client)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "tok0 tok1 tok2 "
    assert gateway.paths()[2:] == [CHAT, "/v1/up", CHAT]


def test_model_not_ready_with_streaming_response(
    gateway: FakeGateway, ready_client: AutoserveClient
) -> None:
    gateway.queue_not_ready()
    with ready_client.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
        messages=MESSAGES, stream=True
    ) as response:
        assert response.status_code == 200
    assert gateway.paths()[2:] == [CHAT, "/v1/up", CHAT]


def test_not_ready_twice_is_an_error_without_blind_retries(
    gateway: FakeGateway, ready_client: AutoserveClient
) -> None:
    gateway.queue_not_ready(times=2)
    with pytest.raises(openai.InternalServerError) as info:
        chat(ready_client)
    assert info.value.status_code == 503
    assert info.value.code == "model_not_ready"
    assert gateway.paths()[2:] == [CHAT, "/v1/up", CHAT]  # max_retries=2 did not kick in


def test_model_failed_raises_and_forgets_the_ready_state(
    gateway: FakeGateway, ready_client: AutoserveClient
) -> None:
    gateway.queue_model_failed("[m] engine died: CUDA error")
    with pytest.raises(ModelFailedError, match="CUDA error") as info:
        chat(ready_client)
    assert info.value.model == "m"
    assert gateway.paths()[2:] == [CHAT]
    # Code written for the plain SDK, which raises InternalServerError for the same 503.
    assert isinstance(info.value, openai.InternalServerError)
    assert info.value.status_code == 503 and info.value.code == "model_failed"
    chat(ready_client)
    assert gateway.paths()[3:] == ["/v1/up", CHAT]


def test_a_request_that_down_stopped_is_not_retried_and_the_next_one_waits_anew(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m", max_retries=2)
    chat(client)
    gateway.model_errors.append(
        (
            503,
            error_body("[m] was stopped with /down", "service_unavailable", "model_stopped"),
            {"x-should-retry": "false"},
        )
    )
    with pytest.raises(openai.InternalServerError) as info:
        chat(client)
    assert info.value.code == "model_stopped"
    assert gateway.paths()[2:] == [CHAT]  # not sent again: that would start the model
    chat(client)
    assert gateway.paths()[3:] == ["/v1/up", CHAT]  # the model is waited for anew


def test_other_503s_keep_the_sdks_own_retries(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m", max_retries=1)
    gateway.model_errors.append(
        (503, error_body("overloaded", "server_error", None), {"retry-after-ms": "10"})
    )
    chat(client)
    assert gateway.paths() == ["/v1/up", CHAT, CHAT]


async def test_async_model_not_ready_waits_again_and_retries_once(
    gateway: FakeGateway, make_async_client: Callable[..., AsyncAutoserveClient]
) -> None:
    client = make_async_client(model="m")
    await achat(client)
    gateway.queue_not_ready()
    stream = await achat_stream(client)
    assert [c.choices[0].delta.content async for c in stream] == ["tok0 ", "tok1 ", "tok2 "]
    assert gateway.paths() == ["/v1/up", CHAT, CHAT, "/v1/up", CHAT]
    gateway.queue_model_failed("boom")
    with pytest.raises(ModelFailedError, match="boom"):
        await achat(client)


def test_a_server_without_up_is_said_not_to_be_a_gateway() -> None:
    """A plain OpenAI-compatible server (vLLM itself) answers /up with FastAPI's bare 404."""
    plain = httpx2.MockTransport(lambda _: httpx2.Response(404, json={"detail": "Not Found"}))
    client = AutoserveClient(
        base_url=BASE_URL, api_key=API_KEY, http_client=httpx2.Client(transport=plain)
    )
    with pytest.raises(AutoserveError, match="is the base URL that of a vLLM Autoserve gateway"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])

"""The default model: filled in where a request names none, never over one that does."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from vllm_autoserve_client import AsyncAutoserveClient, AutoserveClient

from .fake_gateway import FakeGateway

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


def test_chat_without_model_uses_the_default(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m")
    reply = client.chat.completions.create(messages=MESSAGES)  # type: ignore[call-overload]
    assert reply.choices[0].message.content == "hello"
    assert gateway.bodies("/v1/chat/completions")[0]["model"] == "m"
    assert gateway.bodies("/v1/up")[0]["model_path"] == "m"


def test_every_model_endpoint_takes_the_default(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m")
    client.completions.create(prompt="Hi")  # type: ignore[call-overload]
    client.embeddings.create(input="Hi")  # type: ignore[call-arg]
    client.responses.create(input="Hi")
    for path in ("/v1/completions", "/v1/embeddings", "/v1/responses"):
        assert gateway.bodies(path) == [gateway.bodies(path)[0]]
        assert gateway.bodies(path)[0]["model"] == "m", path
    with client.responses.stream(input="Hi") as stream:  # type: ignore[call-overload]
        assert stream.get_final_response().model == "m"


def test_an_explicit_model_wins(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m")
    client.chat.completions.create(model="other", messages=MESSAGES)
    assert gateway.bodies("/v1/chat/completions")[0]["model"] == "other"
    assert [b["model_path"] for b in gateway.bodies("/v1/up")] == ["other"]


def test_extra_body_model_wins_over_the_default(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m")
    extra = {"model": "from-extra"}
    client.chat.completions.create(messages=MESSAGES, extra_body=extra)  # type: ignore[call-overload]
    assert gateway.bodies("/v1/chat/completions")[0]["model"] == "from-extra"
    assert [b["model_path"] for b in gateway.bodies("/v1/up")] == ["from-extra"]
    assert extra == {"model": "from-extra"}


def test_the_callers_dicts_are_not_changed(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m")
    body = {"messages": copy.deepcopy(MESSAGES)}
    extra_body = {"temperature": 0.5}
    client.post("/chat/completions", body=body, cast_to=ChatCompletion)
    client.chat.completions.create(messages=body["messages"], extra_body=extra_body)  # type: ignore[call-overload]
    assert body == {"messages": MESSAGES}
    assert extra_body == {"temperature": 0.5}
    sent = gateway.bodies("/v1/chat/completions")
    assert [b["model"] for b in sent] == ["m", "m"]
    assert sent[1]["temperature"] == 0.5


def test_without_a_default_the_sdk_still_asks_for_model(
    make_client: Callable[..., AutoserveClient],
) -> None:
    client = make_client()
    with pytest.raises(TypeError, match="model"):
        client.chat.completions.create(messages=MESSAGES)  # type: ignore[call-overload]


def test_raw_and_streaming_responses_wait_and_take_the_default(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    gateway.start_seconds = 0.2
    client = make_client(model="m")
    raw = client.chat.completions.with_raw_response.create(messages=MESSAGES)  # type: ignore[call-overload]
    assert raw.parse().choices[0].message.content == "hello"
    assert gateway.paths()[:3] == ["/v1/up", "/v1/up", "/v1/chat/completions"]

    client2 = make_client(model="m2")
    with client2.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
        messages=MESSAGES, stream=True
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert gateway.bodies("/v1/chat/completions")[-1]["model"] == "m2"
    assert gateway.bodies("/v1/up")[-1]["model_path"] == "m2"


def test_client_wide_raw_response_takes_the_default(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m")
    raw = client.with_raw_response.chat.completions.create(messages=MESSAGES)  # type: ignore[call-overload]
    assert raw.parse().model == "m"
    raw_emb = client.embeddings.with_raw_response.create(input="x")  # type: ignore[call-arg]
    assert raw_emb.parse().model == "m"


def test_chat_stream_helper_takes_the_default(
    gateway: FakeGateway, make_client: Callable[..., AutoserveClient]
) -> None:
    client = make_client(model="m")
    with client.chat.completions.stream(messages=MESSAGES) as stream:  # type: ignore[call-arg]
        text = "".join(event.delta for event in stream if event.type == "content.delta")
    assert text == "tok0 tok1 tok2 "
    assert gateway.bodies("/v1/chat/completions")[0]["model"] == "m"


async def test_async_chat_streams_with_the_default(
    gateway: FakeGateway, make_async_client: Callable[..., AsyncAutoserveClient]
) -> None:
    gateway.start_seconds = 0.2
    client = make_async_client(model="m")
    stream = await client.chat.completions.create(messages=MESSAGES, stream=True)  # type: ignore[call-overload]
    text = "".join([chunk.choices[0].delta.content async for chunk in stream])
    assert text == "tok0 tok1 tok2 "
    assert gateway.paths()[:3] == ["/v1/up", "/v1/up", "/v1/chat/completions"]
    assert gateway.bodies("/v1/chat/completions")[0]["model"] == "m"


async def test_async_endpoints_take_the_default(
    gateway: FakeGateway, make_async_client: Callable[..., AsyncAutoserveClient]
) -> None:
    client = make_async_client(model="m")
    await client.completions.create(prompt="Hi")  # type: ignore[call-overload]
    await client.embeddings.create(input="Hi")  # type: ignore[call-arg]
    await client.responses.create(input="Hi")
    async with client.responses.stream(input="Hi") as stream:  # type: ignore[call-overload]
        assert (await stream.get_final_response()).model == "m"
    raw = await client.chat.completions.with_raw_response.create(messages=MESSAGES)  # type: ignore[call-overload]
    assert raw.parse().model == "m"
    for path in ("/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/chat/completions"):
        assert gateway.bodies(path)[0]["model"] == "m", path

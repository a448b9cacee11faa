"""Requests that leave ``model`` to the client's default.

The SDK's signatures insist on ``model``, so a type checker flags every call that leaves it
out; these helpers keep that to one place outside ``test_client_default_model``.
"""

from __future__ import annotations

from typing import Any

import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


def chat(client: openai.OpenAI) -> str | None:
    reply: ChatCompletion = client.chat.completions.create(messages=MESSAGES)  # type: ignore[call-overload]
    return reply.choices[0].message.content


async def achat(client: openai.AsyncOpenAI) -> str | None:
    reply: ChatCompletion = await client.chat.completions.create(messages=MESSAGES)  # type: ignore[call-overload]
    return reply.choices[0].message.content


def chat_stream(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(messages=MESSAGES, stream=True)  # type: ignore[call-overload]


async def achat_stream(client: openai.AsyncOpenAI) -> Any:
    return await client.chat.completions.create(messages=MESSAGES, stream=True)  # type: ignore[call-overload]

"""Code typed against the OpenAI SDK, handed our clients; ``test_client_copy`` type-checks it."""

from __future__ import annotations

import openai

from vllm_autoserve_client import AsyncAutoserveClient, AutoserveClient


def ask(client: openai.OpenAI, model: str) -> str | None:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}]
    )
    return reply.choices[0].message.content


async def ask_async(client: openai.AsyncOpenAI, model: str) -> str | None:
    reply = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}]
    )
    return reply.choices[0].message.content


def tuned(client: openai.OpenAI) -> openai.OpenAI:
    return client.with_options(timeout=5, max_retries=0)


def use_ours(client: AutoserveClient, aclient: AsyncAutoserveClient) -> None:
    ask(client, "m")
    ask(tuned(client), "m")
    copied: AutoserveClient = client.with_options(model="other", up_timeout=5)
    ask(copied, "other")
    _ = ask_async(aclient, "m")
    _ = aclient.copy(timeout=3)

"""Frameworks that take a base_url work through the gateway; with our client, past cold starts."""

from __future__ import annotations

from langchain_openai import ChatOpenAI

from tests.support.gateway import fake_model, running_gateway
from vllm_autoserve_client import AsyncAutoserveClient, AutoserveClient


def test_langchain_chat_openai_through_the_gateway() -> None:
    with running_gateway(fake_model("m", "--chunks", "4")) as gw:
        llm = ChatOpenAI(model="m", base_url=gw.url + "/v1", api_key=gw.api_key)  # type: ignore[arg-type]
        assert llm.invoke("hi").content == "tok0-m tok1-m tok2-m tok3-m "
        streamed = "".join(str(chunk.content) for chunk in llm.stream("hi"))
        assert streamed == "tok0-m tok1-m tok2-m tok3-m "


async def test_langchain_with_autoserve_clients_waits_out_a_cold_start() -> None:
    cfg = "[gateway]\nhold_seconds = 0.5\n" + fake_model("slow", "--startup-delay", "2")
    with running_gateway(cfg) as gw:
        base, key = gw.url + "/v1", gw.api_key
        sync_client = AutoserveClient(base_url=base, api_key=key)
        async_client = AsyncAutoserveClient(base_url=base, api_key=key)
        llm = ChatOpenAI(  # as docs/client.md shows it
            model="slow",
            base_url=base,
            api_key=key,  # type: ignore[arg-type]
            client=sync_client.chat.completions,
            async_client=async_client.chat.completions,
            root_client=sync_client,
            root_async_client=async_client,
        )
        # Kept, not replaced by LangChain's own (with_structured_output goes through them).
        assert llm.root_client is sync_client and llm.root_async_client is async_client
        # The gateway alone would answer 503 after 0.5 s; the client waits for /up instead.
        assert (await llm.ainvoke("hi")).content
        assert llm.invoke("hi").content

"""Real vLLM behind the gateway: cold start, streaming, errors, crashes, scale to zero."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from tests.support.gateway import Gateway
from tests.support.waiting import wait_for
from vllm_autoserve_client import AutoserveClient

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "Hello there"}]


def api_server_pid(gateway: Gateway, model: str) -> int:
    for pid in gateway.engine_pids():
        try:
            cmd = psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            continue
        text = " ".join(cmd)
        if ("vllm.entrypoints.openai.api_server" in text and "engine_guard" not in text
                and model in cmd):
            return pid
    raise AssertionError(f"no vLLM API server for {model}")



def test_cold_start_through_the_client_then_chat_stream_and_completions(
    vllm_gateway: Gateway,
) -> None:
    states: list[str] = []
    client = AutoserveClient(
        model="tiny-a", base_url=vllm_gateway.url + "/v1", api_key=vllm_gateway.api_key,
        on_wait=lambda model, state, elapsed: states.append(state),
    )
    assert vllm_gateway.status()["tiny-a"]["state"] == "cold"
    reply = client.chat.completions.create(messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]
    assert reply.model == "tiny-a"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert "starting" in states  # the client, not the gateway, waited out the cold start

    stream = client.chat.completions.create(messages=MESSAGES, max_tokens=32, stream=True)  # type: ignore[arg-type]
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 4 and "".join(pieces)

    legacy = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8)
    assert legacy.choices[0].text
    assert legacy.model == "tiny-a"  # the alias reached vLLM as the model's name


def test_models_are_listed_through_the_gateway(vllm_gateway: Gateway) -> None:
    with vllm_gateway.client(timeout=400) as c:  # up already, unless this test runs alone
        assert c.post("/up", json={"model_path": "tiny-a", "wait": 300}).json()["status"] == "healthy"
    sdk = openai.OpenAI(base_url=vllm_gateway.url + "/v1", api_key=vllm_gateway.api_key)
    models = {m.id: m for m in sdk.models.list()}
    assert {"tiny-a", "tiny", "tiny-b"} <= set(models)
    # As vLLM lists it, for clients that size prompts by it.
    lengths = {name: (models[name].model_extra or {}).get("max_model_len") for name in models}
    assert isinstance(lengths["tiny-a"], int) and lengths["tiny-a"] > 0
    assert lengths["tiny"] == lengths["tiny-a"]


def test_json_sent_the_way_curl_d_sends_it_is_answered_by_vllm(vllm_gateway: Gateway) -> None:
    """``curl -d`` says form-urlencoded, which vLLM refuses: the gateway says JSON."""
    body = b'{"model": "tiny-a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}'
    with vllm_gateway.client(timeout=400) as c:
        response = c.post("/v1/chat/completions", content=body,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def test_a_redirect_from_vllm_names_the_gateway_not_the_engine(vllm_gateway: Gateway) -> None:
    """vLLM redirects a trailing slash to its own address (``http://127.0.0.1:PORT/...``)."""
    body = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 4}
    with vllm_gateway.client(timeout=400) as c:
        response = c.post("/v1/chat/completions/", json=body)
    assert response.status_code == 307
    assert response.headers["location"] == "/v1/chat/completions"


def test_tokenize_and_anthropic_messages_reach_vllm(vllm_gateway: Gateway) -> None:
    """vLLM's routes outside ``/v1/`` (``/tokenize``, ``/generative_scoring``...) and
    ``/v1/messages`` go through."""
    with vllm_gateway.client(timeout=400) as c:
        assert c.post("/up", json={"model_path": "tiny", "wait": 300}).json()["status"] == "healthy"
        tokens = c.post("/tokenize", json={"model": "tiny", "prompt": "Hello there"})
        assert tokens.status_code == 200, tokens.text
        assert tokens.json()["count"] == len(tokens.json()["tokens"]) > 0
        text = c.post("/detokenize", json={"model": "tiny-a", "tokens": tokens.json()["tokens"]})
        assert text.status_code == 200 and "Hello" in text.json()["prompt"]
        scored = c.post(
            "/generative_scoring",
            json={"model": "tiny-a", "query": "Is it?", "items": ["yes", "no"],
                  "label_token_ids": [42, 514]},
        )
        assert scored.status_code == 200, scored.text
        messages = c.post(
            "/v1/messages",
            json={"model": "tiny-a", "max_tokens": 4, "messages": MESSAGES},
            headers={"x-api-key": vllm_gateway.api_key, "anthropic-version": "2023-06-01"},
        )
        assert messages.status_code == 200, messages.text
        assert messages.json()["type"] == "message"


def test_vllm_own_400_passes_through_unchanged(vllm_gateway: Gateway) -> None:
    sdk = openai.OpenAI(base_url=vllm_gateway.url + "/v1", api_key=vllm_gateway.api_key,
                        max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=10**6)  # type: ignore[arg-type]
    body = info.value.body
    assert isinstance(body, dict)
    # vLLM's own error, as vLLM words and types it, not one of the gateway's.
    assert "max_model_len" in body["message"]
    assert body["type"] == "BadRequestError" and body["param"] == "max_tokens"


def test_two_models_are_up_at_once(vllm_gateway: Gateway) -> None:
    with vllm_gateway.client(timeout=400) as c:
        up = c.post("/up", json={"model_path": "tiny-b", "wait": 120})
        assert up.json()["status"] == "healthy", up.text
        status = vllm_gateway.status()
        assert status["tiny-a"]["state"] == status["tiny-b"]["state"] == "healthy"
        for model in ("tiny-a", "tiny-b"):
            reply = c.post("/v1/chat/completions",
                           json={"model": model, "messages": MESSAGES, "max_tokens": 4})
            assert reply.status_code == 200 and reply.json()["model"] == model


def test_idle_model_scales_to_zero_and_the_next_request_starts_it(vllm_gateway: Gateway) -> None:
    with vllm_gateway.client(timeout=400) as c:  # up already, unless this test runs alone
        assert c.post("/up", json={"model_path": "tiny-b", "wait": 300}).json()["status"] == "healthy"
    old = api_server_pid(vllm_gateway, "tiny-b")
    wait_for(lambda: vllm_gateway.status()["tiny-b"]["state"] == "cold", timeout=60)
    wait_for(lambda: not psutil.pid_exists(old), timeout=30)
    client = AutoserveClient(base_url=vllm_gateway.url + "/v1", api_key=vllm_gateway.api_key)
    reply = client.chat.completions.create(model="tiny-b", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    assert api_server_pid(vllm_gateway, "tiny-b") != old


def test_engine_killed_mid_stream_is_an_error_and_the_next_request_is_served(
    vllm_gateway: Gateway,
) -> None:
    client = AutoserveClient(model="tiny-a", base_url=vllm_gateway.url + "/v1",
                             api_key=vllm_gateway.api_key, max_retries=0)
    client.wait_until_ready(timeout=300)  # up already, unless this test runs alone
    victim = api_server_pid(vllm_gateway, "tiny-a")
    group = [p.pid for p in psutil.Process(victim).children(recursive=True)] + [victim]
    received: list[str] = []
    killed = threading.Event()

    def kill_soon() -> None:
        wait_for(lambda: len(received) >= 3, timeout=60)
        psutil.Process(victim).send_signal(signal.SIGKILL)
        killed.set()

    killer = threading.Thread(target=kill_soon)
    killer.start()
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        stream = client.chat.completions.create(
            messages=MESSAGES, max_tokens=4000, stream=True, # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    killer.join()
    assert killed.is_set()
    # vLLM's engine-core children went with it (no orphan holding memory).
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                             for p in group), timeout=30)
    status = wait_for(lambda: (s := vllm_gateway.status()["tiny-a"])["state"] == "failed" and s,
                      timeout=30)
    assert "exited with code" in status["error"]
    time.sleep(1.2)  # the failure cooldown
    reply = client.chat.completions.create(messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    assert api_server_pid(vllm_gateway, "tiny-a") != victim

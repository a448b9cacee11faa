"""vLLM's features through the gateway, on real vLLM: LoRA adapters named in the
configuration, and stored responses retrieved and cancelled by their id."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.gateway import Gateway, running_gateway
from tests.support.tiny_lora import write_tiny_lora
from vllm_autoserve_client import AutoserveClient

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def vllm_gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    adapter = write_tiny_lora(tmp_path_factory.mktemp("lora") / "adapter", tiny_model)
    # No `command`: the gateway builds vLLM's command line itself, --lora-modules included.
    config = (
        "[gateway]\nstartup_seconds = 300\n"
        f'[models."{tiny_model}"]\naliases = ["tiny-base"]\n'
        f'lora_modules = {{ "tiny-lora" = "{adapter}" }}\n'
        'env = { VLLM_ENABLE_RESPONSES_API_STORE = "1" }\n'
    )
    with running_gateway(config, env={"PYTHONUNBUFFERED": "1"}) as gateway:
        yield gateway


def test_an_adapter_name_starts_its_base_model_and_reaches_vllm_as_it_is(
    vllm_gateway: Gateway, tiny_model: Path
) -> None:
    with vllm_gateway.client() as c:
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert listed["tiny-lora"]["parent"] == "tiny-base"  # as vLLM lists it: no local path
    assert listed["tiny-lora"]["root"].endswith("adapter")
    assert str(tiny_model) not in listed

    client = AutoserveClient(
        base_url=vllm_gateway.url + "/v1", api_key=vllm_gateway.api_key, up_timeout=300
    )

    def complete(model: str) -> tuple[str, str]:
        reply = client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=12, temperature=0
        )
        return reply.model, reply.choices[0].text

    adapted_model, adapted = complete("tiny-lora")
    base_model, base = complete("tiny-base")
    assert adapted_model == "tiny-lora"  # vLLM was asked for the adapter, not the base
    assert base_model == "tiny-base"  # a local folder's first alias, not its path
    assert adapted != base  # and it applied it
    # One engine serves both names.
    assert [p["model"] for p in vllm_gateway.status().values()] == [str(tiny_model)]
    assert vllm_gateway.status()[str(tiny_model)]["engines"] == 1


def test_stored_responses_are_retrieved_and_cancelled_by_their_id(vllm_gateway: Gateway) -> None:
    """These calls name no model: the gateway routes them by the id it saw created."""
    client = AutoserveClient(
        base_url=vllm_gateway.url + "/v1", api_key=vllm_gateway.api_key, up_timeout=300
    )
    created = client.responses.create(model="tiny-base", input="Hello", max_output_tokens=8)
    assert client.responses.retrieve(created.id).id == created.id

    stream = client.responses.create(
        model="tiny-base", input="Hi", max_output_tokens=8, stream=True
    )
    streamed = next(e.response.id for e in stream if e.type == "response.created")
    for _ in stream:
        pass
    assert client.responses.retrieve(streamed).id == streamed

    background = client.responses.create(
        model="tiny-base", input="Hi", max_output_tokens=500, background=True
    )
    assert client.responses.cancel(background.id).status == "cancelled"

    with pytest.raises(openai.NotFoundError, match="no response 'resp_nope'"):
        client.responses.retrieve("resp_nope")

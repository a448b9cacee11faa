"""A LoRA adapter named in the configuration, served by real vLLM behind the gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import Gateway, running_gateway
from tests.support.tiny_lora import write_tiny_lora
from vllm_autoserve_client import AutoserveClient

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lora_gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    adapter = write_tiny_lora(tmp_path_factory.mktemp("lora") / "adapter", tiny_model)
    # No `command`: the gateway builds vLLM's command line itself, --lora-modules included.
    config = (
        "[gateway]\nstartup_seconds = 300\n"
        f'[models."{tiny_model}"]\naliases = ["tiny-base"]\n'
        f'lora_modules = {{ "tiny-lora" = "{adapter}" }}\n'
    )
    with running_gateway(config, env={"PYTHONUNBUFFERED": "1"}) as gateway:
        yield gateway


def test_an_adapter_name_starts_its_base_model_and_reaches_vllm_as_it_is(
    lora_gateway: Gateway, tiny_model: Path
) -> None:
    with lora_gateway.client() as c:
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert listed["tiny-lora"]["parent"] == str(tiny_model)
    assert listed["tiny-lora"]["root"].endswith("adapter")

    client = AutoserveClient(
        base_url=lora_gateway.url + "/v1", api_key=lora_gateway.api_key, up_timeout=300
    )

    def complete(model: str) -> tuple[str, str]:
        reply = client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=12, temperature=0
        )
        return reply.model, reply.choices[0].text

    adapted_model, adapted = complete("tiny-lora")
    base_model, base = complete("tiny-base")
    assert adapted_model == "tiny-lora"  # vLLM was asked for the adapter, not the base
    assert base_model == "tiny-base"  # an alias is one of vLLM's served names: kept
    assert adapted != base  # and it applied it
    # One engine serves both names.
    assert [p["model"] for p in lora_gateway.status().values()] == [str(tiny_model)]
    assert lora_gateway.status()[str(tiny_model)]["engines"] == 1

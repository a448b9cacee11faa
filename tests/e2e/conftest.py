"""The e2e tier: the real gateway in front of real vLLM CPU engines on a tiny model.

The CPU engine is provisioned on first use (cached after, see docs/cpu.md), so a plain
`uv run pytest` on a fresh machine runs this tier too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import Gateway, running_gateway, toml_list
from vllm_autoserve.cpu_engine import cpu_engine_command, cpu_engine_env, install_cpu_engine
from vllm_autoserve.tiny_model import write_tiny_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def cpu_engine() -> Path:
    return install_cpu_engine(on_progress=lambda line: print(line, flush=True))


@pytest.fixture(scope="session")
def tiny_model(cpu_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def cpu_model(name: str, model_dir: Path, extra: str = "") -> str:
    command = cpu_engine_command(str(model_dir), "{port}", "{model}")
    env = ", ".join(f'{k} = "{v}"' for k, v in cpu_engine_env().items())
    return f'[models."{name}"]\ncommand = {toml_list(command)}\nenv = {{ {env} }}\n{extra}\n'


@pytest.fixture(scope="module")
def vllm_gateway(tiny_model: Path) -> Iterator[Gateway]:
    """Two real vLLM models; held requests give up after 5 s so the client has to wait."""
    config = (
        "[gateway]\nhold_seconds = 5\nfailure_cooldown_seconds = 1\nstartup_seconds = 300\n"
        + cpu_model("tiny-a", tiny_model, 'aliases = ["tiny"]')
        + cpu_model("tiny-b", tiny_model, "idle_seconds = 8")
    )
    with running_gateway(config, env={"PYTHONUNBUFFERED": "1"}) as gateway:
        yield gateway
    if os.environ.get("CI"):  # the gateway's own view, in CI's log
        print(gateway.log()[-4000:])

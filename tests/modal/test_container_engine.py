"""The engine container's side, run here with the fake engine in place of vLLM."""

from __future__ import annotations

import sys

import pytest

from tests.support.fake_engine import FAKE_ENGINE
from tests.support.gateway import free_port
from vllm_autoserve.config import parse_config
from vllm_autoserve.engine import EngineFailed
from vllm_autoserve.modal_engine import ContainerEngine, engine_argv

MODEL = "Qwen/Qwen3-Next-80B-A3B-Instruct"
CONFIG = parse_config(
    {
        "gateway": {"stop_grace_seconds": 2},
        "models": {
            MODEL: {"gpu": "H200:2", "aliases": ["qwen-next"], "vllm_args": ["--no-enforce-eager"]}
        },
    }
)


def fake(port: int, *knobs: str) -> list[str]:
    return [sys.executable, str(FAKE_ENGINE), "--port", str(port), "--model", MODEL, *knobs]


def test_vllm_command_line() -> None:
    argv, env = engine_argv(CONFIG, MODEL, port=8000)
    assert argv[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", MODEL]
    assert argv[argv.index("--served-model-name") + 1 : argv.index("--host")] == [
        MODEL,
        "qwen-next",
    ]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"  # from "H200:2"
    # Fast boot by default; the model's own flag comes last and wins.
    assert argv.index("--enforce-eager") < argv.index("--no-enforce-eager")
    assert env == {}
    argv, env = engine_argv(CONFIG, "other/model", sleep_mode=True)
    assert "--enable-sleep-mode" in argv and "--tensor-parallel-size" not in argv
    assert env == {"VLLM_SERVER_DEV_MODE": "1"}


async def test_start_check_and_stop() -> None:
    port = free_port()
    engine = ContainerEngine(MODEL, CONFIG, api_key="k", port=port, argv=fake(port))
    assert engine.process.env["VLLM_API_KEY"] == "k"
    try:
        await engine.start(timeout=30)
        assert await engine.check() == "healthy"
    finally:
        engine.stop()
    assert engine.process.returncode is not None
    assert "fake engine ready" in engine.log_tail()


async def test_a_failing_engine_raises_with_its_log_tail() -> None:
    port = free_port()
    argv = fake(port, "--fail-at-start", "ValueError: no such model")
    engine = ContainerEngine(MODEL, CONFIG, api_key="k", port=port, argv=argv)
    try:
        with pytest.raises(EngineFailed, match="no such model") as failure:
            await engine.start(timeout=30)
        assert str(failure.value).startswith(f"[{MODEL}] engine exited prematurely")
    finally:
        engine.stop()


async def test_a_hanging_engine_misses_its_deadline() -> None:
    port = free_port()
    engine = ContainerEngine(
        MODEL, CONFIG, api_key="k", port=port, argv=fake(port, "--hang-at-start")
    )
    try:
        with pytest.raises(EngineFailed, match="not become healthy within 1 s"):
            await engine.start(timeout=1)
    finally:
        engine.stop()
    assert engine.process.returncode is not None

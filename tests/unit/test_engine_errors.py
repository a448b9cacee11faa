"""What an engine's start and failure say: progress in the log, the cause of a failure on its
first line, then the engine's log tail."""

from __future__ import annotations

import asyncio
import logging
import sys

import aiohttp
import pytest

from tests.support.fake_engine import FAKE_ENGINE
from tests.support.gateway import free_port
from vllm_autoserve import engine
from vllm_autoserve.engine import EngineProcess, exit_account, with_cause

VLLM_LOAD_FAILURE = """\
(APIServer pid=7) INFO 11-28 10:00:00 [api_server.py:1] vLLM API server version 0.32.0
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/huggingface_hub/file_download.py", line 1, in f
OSError: We couldn't connect to 'https://huggingface.co' to load the files.
RuntimeError: Engine core initialization failed. See root cause above."""

ENGINE_CORE_KILLED = """\
(APIServer pid=7) INFO 11-28 10:00:00 [loggers.py:1] Engine 000: Avg throughput
(EngineCore_DP0 pid=9) ERROR 11-28 10:00:01 [core.py:123] EngineCore encountered an issue.
(APIServer pid=7) ERROR 11-28 10:00:01 [async_llm.py:5] AsyncLLM output_handler failed."""


def test_the_first_exception_is_the_cause_not_vllms_last_words() -> None:
    text = with_cause("[m] engine exited prematurely with code 1", VLLM_LOAD_FAILURE)
    first, _, tail = text.partition("\n")
    assert first == (
        "[m] engine exited prematurely with code 1: OSError: We couldn't connect to "
        "'https://huggingface.co' to load the files."
    )
    assert tail == VLLM_LOAD_FAILURE


def test_without_an_exception_vllms_first_error_line_is_the_cause() -> None:
    text = with_cause("[m] engine exited with code 0", ENGINE_CORE_KILLED)
    assert text.splitlines()[0] == (
        "[m] engine exited with code 0: EngineCore encountered an issue."
    )


def test_an_engine_that_said_nothing_fails_with_what_happened_alone() -> None:
    assert with_cause("[m] engine exited with code 3", "") == "[m] engine exited with code 3"
    assert with_cause("[m] engine exited with code 3", "hello\nbye") == (
        "[m] engine exited with code 3\nhello\nbye"
    )


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_long_start_says_in_the_log_what_the_engine_last_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "_PROGRESS_EVERY", 0.3)
    port = free_port()
    argv = [sys.executable, str(FAKE_ENGINE), "--port", str(port), "--startup-delay", "1.2"]

    async def start() -> None:
        process = EngineProcess("slow", argv, env={}, health_url=f"http://127.0.0.1:{port}/health")
        await process.start()
        try:
            async with aiohttp.ClientSession() as session:
                await process.wait_healthy(session)
        finally:
            await process.stop()

    # Its own handler: other tests may have set the gateway's logging up (no propagation).
    kept, logger = _Kept(), logging.getLogger("vllm_autoserve.engine")
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(kept)
    try:
        asyncio.run(start())
    finally:
        logger.removeHandler(kept)
    progress = [message for message in kept.messages if "still starting" in message]
    assert len(progress) >= 2
    assert all(line.startswith("[slow] still starting after ") for line in progress)
    said = f"the engine's last line: fake engine starting on port {port}"
    assert any(line.endswith(said) for line in progress), progress


@pytest.mark.parametrize(
    ("code", "account"),
    [
        (1, "code 1"),
        (137, "code 137 (killed by SIGKILL: out of memory?)"),  # the guard's 128 + N
        (-9, "code -9 (killed by SIGKILL: out of memory?)"),  # the guard itself killed
        (143, "code 143 (killed by SIGTERM)"),
        (255, "code 255"),
    ],
)
def test_an_exit_code_says_which_signal_killed_the_engine(code: int, account: str) -> None:
    assert exit_account(code) == account

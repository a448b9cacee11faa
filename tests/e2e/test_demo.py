"""`vllm-autoserve demo`: one command, a working endpoint, and a chat through what it prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest

from tests.support.gateway import free_port

pytestmark = pytest.mark.e2e


def test_demo_prints_a_url_and_key_that_serve_a_chat(cpu_engine: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_GATEWAY_AUTH"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_autoserve.cli", "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while not any("Press Ctrl-C" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        text = "".join(lines)
        base_url = re.search(r"base URL\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        key = re.search(r"API key\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        model = re.search(r"model\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        assert base_url == f"http://127.0.0.1:{port}/v1"
        assert "curl" in text and "AutoserveClient" in text and "autoserve chat" in text

        sdk = openai.OpenAI(base_url=base_url, api_key=key, timeout=300)
        reply = sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert reply.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()

        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert children
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in children if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

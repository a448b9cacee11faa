"""Small helpers the tests share: waiting for a condition, finding processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import psutil

from .fake_engine import FAKE_ENGINE
from .gateway import Gateway, free_port

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.1) -> T:
    """The predicate's first truthy value; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout:g} s")


def alive(pids: list[int]) -> list[int]:
    """The pids that are still running (zombies count as gone)."""
    result = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                result.append(pid)
    return result


def engine_port(gateway: Gateway) -> int:
    """The port of the (one) fake engine the gateway runs."""
    for pid in gateway.engine_pids():
        with contextlib.suppress(psutil.NoSuchProcess):
            cmd = psutil.Process(pid).cmdline()
            if str(FAKE_ENGINE) in cmd and "engine_guard" not in " ".join(cmd):
                return int(cmd[cmd.index("--port") + 1])
    raise AssertionError("no fake engine running")


@contextlib.contextmanager
def standalone_fake_engine(*knobs: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A fake engine outside any gateway (a static upstream); yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(FAKE_ENGINE), "--port", str(port), *knobs],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url), timeout=20, interval=0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False

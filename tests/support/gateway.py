"""Start the real gateway (``vllm-autoserve serve``) as a subprocess for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .fake_engine import FAKE_ENGINE

TEST_KEY = "test-gateway-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_toml_str(i) for i in items) + "]"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fake_engine_command(*knobs: str) -> list[str]:
    """The ``command`` of a model served by the fake engine (``{port}``/``{model}`` filled in)."""
    return [sys.executable, str(FAKE_ENGINE), "--port", "{port}", "--model", "{model}", *knobs]


def fake_model(name: str, *knobs: str, extra: str = "") -> str:
    """A ``[models."name"]`` TOML table running the fake engine with ``knobs``."""
    return (
        f"[models.{_toml_str(name)}]\ncommand = {toml_list(fake_engine_command(*knobs))}\n{extra}\n"
    )


@dataclass
class Gateway:
    url: str
    api_key: str
    process: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    headers: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def status(self) -> dict[str, dict[str, object]]:
        with self.client() as c:
            return {p["model"]: p for p in c.get("/status").json()["pools"]}

    def engine_pids(self) -> list[int]:
        """Every process below the gateway (guards, engines, their children)."""
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            return [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


@contextlib.contextmanager
def running_gateway(
    config_toml: str,
    *,
    env: dict[str, str] | None = None,
    key: str | None = TEST_KEY,
    args: Sequence[str] = (),
    port: int | None = None,
) -> Iterator[Gateway]:
    """Run ``vllm-autoserve serve`` on a free port with ``config_toml``; stop it afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="autoserve-test-"))
    config_path = workdir / "config.toml"
    config_path.write_text(config_toml)
    log_path = workdir / "gateway.log"
    port = port or free_port()
    proc_env = {**os.environ, **(env or {})}
    proc_env.pop("VLLM_GATEWAY_AUTH", None)
    if key is not None:
        proc_env["VLLM_GATEWAY_AUTH"] = key
    argv = [
        sys.executable,
        "-m",
        "vllm_autoserve.cli",
        "serve",
        "--config",
        str(config_path),
        "--port",
        str(port),
        *args,
    ]
    if key is None and "--no-auth" not in args:
        argv.append("--no-auth")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=proc_env)
    gateway = Gateway(
        url=f"http://127.0.0.1:{port}",
        api_key=key or "",
        process=process,
        log_path=log_path,
        config_path=config_path,
        headers={"Authorization": f"Bearer {key}"} if key else {},
    )
    try:
        _wait_healthy(gateway)
        yield gateway
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(gateway: Gateway, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(
                f"gateway exited with {gateway.process.returncode}:\n{gateway.log()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(gateway.url + "/health", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"gateway did not become healthy:\n{gateway.log()}")

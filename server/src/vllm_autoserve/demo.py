"""``vllm-autoserve demo``: a working OpenAI-compatible endpoint on this machine, one command.

With vLLM and an NVIDIA GPU present it serves a small real model; otherwise it provisions
vLLM's CPU build (once, cached) and a tiny generated model, so the whole path — cold start,
hold, streaming, scale to zero — can be seen without a GPU or a download of weights.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx

from .auth import AUTH_ENV, ApiKeys, keys_from_env
from .config import Config, parse_config

DEMO_MODEL = "tiny"
GPU_DEMO_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def demo_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vllm-autoserve"


def _has_gpu_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None and shutil.which("nvidia-smi") is not None


def cpu_demo_config() -> Config:
    """Provision the CPU engine and the tiny model (cached), and a config serving it."""
    from .cpu_engine import (
        cpu_engine_command,
        cpu_engine_env,
        cpu_engine_python,
        install_cpu_engine,
    )
    from .tiny_model import write_tiny_model

    if cpu_engine_python() is None:
        print("Preparing the vLLM CPU engine (first run only; a few minutes)...", flush=True)
    install_cpu_engine(on_progress=lambda line: print(f"  {line}", flush=True))
    model_dir = write_tiny_model(demo_home() / "tiny-model")
    command = cpu_engine_command(str(model_dir), "{port}", "{model}")
    return parse_config(
        {
            # One tiny model on a CPU: a mistyped name must not start a Hub download.
            "gateway": {"idle_seconds": 600, "allow_unlisted": False},
            "models": {DEMO_MODEL: {"command": command, "env": cpu_engine_env()}},
        }
    )


def gpu_demo_config() -> tuple[Config, str]:
    return parse_config({"models": {GPU_DEMO_MODEL: {"aliases": [DEMO_MODEL]}}}), GPU_DEMO_MODEL


def usage(base: str, key: str, model: str) -> str:
    return f"""
vLLM Autoserve demo is running.

  base URL  {base}/v1
  API key   {key}
  model     {model}

curl:
  curl -s {base}/v1/chat/completions -H "Authorization: Bearer {key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 20}}'

Python (uv run python):
from vllm_autoserve_client import AutoserveClient
client = AutoserveClient(model="{model}", base_url="{base}/v1", api_key="{key}")
print(client.chat.completions.create(messages=[{{"role": "user", "content": "Hello"}}],
                                     max_tokens=20).choices[0].message.content)

CLI:
  export AUTOSERVE_BASE_URL={base}/v1 AUTOSERVE_API_KEY={key}
  uv run autoserve status
  uv run autoserve chat {model} "Hello"

Press Ctrl-C to stop the gateway and its engine.
""".lstrip("\n")


def _warm_up(base: str, key: str, model: str) -> None:
    """Start the engine as soon as the gateway answers, so the first request is quick."""
    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    with httpx.Client(base_url=base, headers=headers, timeout=150) as client:
        for _ in range(600):
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        for _ in range(60):
            try:
                status = client.post("/up", json={"model_path": model, "wait": 60}).json()
            except httpx.HTTPError:
                return
            if status.get("status") == "healthy":
                print(
                    f"Engine for {model!r} is ready ({time.monotonic() - started:.0f} s).",
                    flush=True,
                )
                return
            if status.get("status") == "failed":
                print(f"Engine for {model!r} failed:\n{status.get('error')}", flush=True)
                return


def run_demo(*, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    from .cli import bind_problem, serve
    from .cpu_engine import CpuEngineInstallError
    from .tiny_model import TinyModelError

    problem = bind_problem(host, port)
    if problem:
        print(f"vllm-autoserve: {problem}", file=sys.stderr)
        return 1
    if _has_gpu_vllm():
        config, model = gpu_demo_config()
    else:
        try:
            config, model = cpu_demo_config(), DEMO_MODEL
        except (CpuEngineInstallError, TinyModelError) as exc:
            print(f"vllm-autoserve: {exc}", file=sys.stderr)
            return 1
    keys = keys_from_env()
    key = keys[0] if keys else secrets.token_urlsafe(24)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown_host}:{port}"
    print(usage(base, key, model), flush=True)
    if not keys:
        print(f"(a new key was generated; set {AUTH_ENV} to choose your own)\n", flush=True)
    threading.Thread(target=_warm_up, args=(base, key, model), daemon=True).start()
    sys.stdout.flush()
    return serve(config, host=host, port=port, keys=ApiKeys(keys or [key]), log_level=log_level)

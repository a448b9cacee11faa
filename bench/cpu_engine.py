"""vLLM's CPU build on the tiny model: install, start-up, requests, stream rate, and what a
SIGKILL leaves behind. Everything runs on 127.0.0.1 and is stopped by this script.

    uv run python bench/cpu_engine.py [--starts N] [--out bench/out/cpu_engine.json]

Uses the provisioned CPU engine (installing it first if needed; AUTOSERVE_CPU_ENGINE_DIR
picks another venv). The findings are summarised in docs/cpu.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from vllm_autoserve.cpu_engine import cpu_engine_command, cpu_engine_env, install_cpu_engine
from vllm_autoserve.tiny_model import write_tiny_model

KEY = "bench-engine-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def call(
    port: int, path: str, body: dict[str, Any] | None = None, key: str = KEY
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    req.add_header("Authorization", f"Bearer {key}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def stream(port: int, max_tokens: int) -> dict[str, float]:
    body: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
    body |= {"max_tokens": max_tokens, "stream": True}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode()
    )
    req.add_header("Authorization", f"Bearer {KEY}")
    req.add_header("Content-Type", "application/json")
    start = time.monotonic()
    stamps: list[float] = []
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                stamps.append(time.monotonic())
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    return {
        "content_deltas": len(stamps),
        "first_delta_s": round(stamps[0] - start, 3),
        "tokens_per_s": round(len(stamps) / (stamps[-1] - start), 1),
        "p50_gap_ms": round(gaps[len(gaps) // 2] * 1000, 1),
        "max_gap_ms": round(gaps[-1] * 1000, 1),
    }


def group(pgid: int) -> list[dict[str, Any]]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for p in psutil.process_iter(["pid", "ppid", "name", "status", "memory_info"]):
        try:
            if os.getpgid(p.pid) != pgid or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except ProcessLookupError:
            continue
        rss = p.info["memory_info"].rss if p.info["memory_info"] else 0
        out.append(
            {"pid": p.pid, "ppid": p.info["ppid"], "name": p.info["name"], "rss_mb": rss >> 20}
        )
    return out


def start(model: Path, log: Path) -> tuple[subprocess.Popen[bytes], int, float]:
    port = free_port()
    argv = cpu_engine_command(str(model), port, "tiny")
    env = {**os.environ, **cpu_engine_env(), "VLLM_API_KEY": KEY}
    began = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"engine exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                if resp.status == 200:
                    return proc, port, round(time.monotonic() - began, 1)
        except OSError:
            time.sleep(0.25)


def stop_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> float:
    began = time.monotonic()
    os.killpg(proc.pid, sig)
    while group(proc.pid) and time.monotonic() - began < 30:
        time.sleep(0.1)
    proc.wait()
    return round(time.monotonic() - began, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=2, help="start/stop cycles to time")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "out" / "cpu_engine.json"
    )
    args = parser.parse_args()
    report: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0))}
    began = time.monotonic()
    install_cpu_engine(on_progress=lambda line: None)
    report["install_or_check_s"] = round(time.monotonic() - began, 1)
    work = Path(tempfile.mkdtemp(prefix="cpu-engine-bench-"))
    model = write_tiny_model(work / "tiny")

    report["start_s"], report["sigterm_group_stop_s"] = [], []
    for i in range(args.starts):
        proc, _, took = start(model, work / f"engine-{i}.log")
        report["start_s"].append(took)
        report["sigterm_group_stop_s"].append(stop_group(proc, signal.SIGTERM))

    proc, port, took = start(model, work / "engine-requests.log")
    report["start_s"].append(took)
    report["argv"] = proc.args
    report["processes"] = group(proc.pid)
    chat: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
    status, body = call(port, "/v1/models")
    report["models"] = [status, [m["id"] for m in body["data"]]]
    status, body = call(port, "/v1/chat/completions", chat | {"max_tokens": 16})
    report["chat"] = [status, body["choices"][0]["finish_reason"], body["usage"]]
    status, body = call(port, "/v1/chat/completions", chat)
    report["chat_default_max_tokens"] = [status, body["usage"]["completion_tokens"]]
    status, body = call(
        port, "/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 8}
    )
    report["completion"] = [status, body["choices"][0]["finish_reason"]]
    report["max_tokens_beyond_context"] = call(
        port, "/v1/chat/completions", chat | {"max_tokens": 9000}
    )
    report["wrong_key"] = call(port, "/v1/models", key="wrong")
    report["stream_500"] = stream(port, 500)

    os.kill(proc.pid, signal.SIGKILL)  # the API server alone, as a crash would
    proc.wait()
    time.sleep(5)
    report["after_sigkill_of_api_server"] = group(proc.pid)
    report["sigkill_group_stop_s"] = stop_group(proc, signal.SIGKILL)
    report["after_killpg"] = group(proc.pid)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

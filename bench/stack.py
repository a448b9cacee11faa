"""The processes a benchmark run starts: the stand-in upstream, the gateway, the peers
(nginx, LiteLLM's proxy) and the load generator — each in its own process group, on
127.0.0.1 only, stopped (TERM, then KILL) by the run that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
UPSTREAM = BENCH_DIR / "upstream.py"
UPSTREAM_VLLM_FRONT = BENCH_DIR / "upstream_vllm_front.py"
LOADGEN = BENCH_DIR / "loadgen.py"
KEY = "bench-gateway-key"
HOST = "127.0.0.1"
STREAM_MODELS = ("bench", "bench-tick", "bench-hold")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_status(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return 0


def http_json(
    url: str, body: dict[str, Any], key: str | None = None, timeout: float = 120.0
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return int(resp.status), json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"{}")


@dataclass
class Proc:
    """One started process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    key: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss(self, tree: bool = False) -> int:
        """Resident set size in bytes: the process, or the process and its descendants."""
        proc = psutil.Process(self.pid)
        procs = [proc, *proc.children(recursive=True)] if tree else [proc]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def spawn(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    cpus: str | None = None,
) -> Proc:
    log_path = workdir / f"{name}.log"
    log = open(log_path, "wb")  # the child keeps its own copy
    if cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", cpus, *argv]
    popen = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        cwd=workdir,
    )
    log.close()
    return Proc(name, popen, log_path)


def wait_ready(proc: Proc, url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log_tail()}")
        if http_status(url, headers=headers) == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready after {timeout:g} s:\n{proc.log_tail()}")


# -- the stand-in upstream ----------------------------------------------------------------


def start_upstream(
    workdir: Path, name: str = "upstream", extra: Sequence[str] = (), kind: str = "bare"
) -> Proc:
    """The upstream: ``bare`` is ``upstream.py`` (raw asyncio, as cheap as can be);
    ``vllm-front`` is ``upstream_vllm_front.py``, vLLM's own HTTP front with no model;
    ``vllm`` is the real vLLM CPU engine serving the tiny model under the stand-in's model
    names. Both vLLM kinds run in the CPU engine's venv (installed first if needed)."""
    from vllm_autoserve.cpu_engine import cpu_engine_command, cpu_engine_env, install_cpu_engine

    port = free_port()
    env: dict[str, str] = {}
    if kind == "vllm":
        from vllm_autoserve.tiny_model import write_tiny_model

        install_cpu_engine()
        model = write_tiny_model(workdir / "tiny-model")
        command = cpu_engine_command(str(model), port, STREAM_MODELS[0])
        names_end = command.index("--served-model-name") + 2
        argv = [*command[:names_end], *STREAM_MODELS[1:], *command[names_end:]]
        env = cpu_engine_env()
        ready_within = 600.0  # the engine loads and warms up first
    elif kind == "vllm-front":
        argv = [str(install_cpu_engine()), str(UPSTREAM_VLLM_FRONT), "--port", str(port)]
        ready_within = 120.0  # importing vLLM takes several seconds
    else:
        argv = [sys.executable, str(UPSTREAM), "--port", str(port)]
        ready_within = 20.0
    proc = spawn(name, [*argv, *extra], workdir, env)
    proc.url = f"http://{HOST}:{port}"
    wait_ready(proc, proc.url + "/health", ready_within)
    return proc


# -- the gateway --------------------------------------------------------------------------


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def gateway_config(upstream_url: str | None, cold: Sequence[tuple[str, list[str]]] = ()) -> str:
    lines = ["[gateway]", "hold_seconds = 60", ""]
    if upstream_url:
        for model in STREAM_MODELS:
            lines += [f"[models.{_toml_str(model)}]", f"url = {_toml_str(upstream_url)}", ""]
    for model, command in cold:
        lines += [
            f"[models.{_toml_str(model)}]",
            "command = [" + ", ".join(_toml_str(a) for a in command) + "]",
            "idle_seconds = 600",
            "",
        ]
    return "\n".join(lines)


def start_gateway(
    workdir: Path,
    upstream_url: str | None,
    *,
    name: str = "gateway",
    src: str | None = None,
    cold: Sequence[tuple[str, list[str]]] = (),
    log_level: str = "info",
) -> Proc:
    """``python -m vllm_autoserve.cli serve`` with auth on; ``src`` puts another checkout's
    ``server/src`` first on PYTHONPATH (to measure a change without installing it)."""
    port = free_port()
    config = workdir / f"{name}.toml"
    config.write_text(gateway_config(upstream_url, cold))
    env = {"VLLM_GATEWAY_AUTH": KEY}
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    argv = [sys.executable, "-m", "vllm_autoserve.cli", "serve"]
    argv += ["--config", str(config), "--host", HOST, "--port", str(port)]
    if log_level != "info":  # the default; older checkouts took it before ``serve``
        argv += ["--log-level", log_level]
    proc = spawn(name, argv, workdir, env)
    proc.url = f"http://{HOST}:{port}"
    proc.key = KEY
    wait_ready(proc, proc.url + "/health", 30)
    return proc


def loaded_native_modules(pid: int) -> dict[str, bool]:
    """Whether the process has uvloop's and httptools' extension modules mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return {}
    return {
        "uvloop": "uvloop/loop." in maps,
        "httptools": "httptools/parser/parser." in maps,
        "orjson": "orjson/orjson." in maps,
        "aiohttp _http_parser": "aiohttp/_http_parser." in maps,
    }


# -- peers --------------------------------------------------------------------------------


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
    )


def start_nginx(workdir: Path, upstream_url: str) -> Proc | str:
    """nginx as a plain keep-alive reverse proxy, one worker (the gateway is one process)."""
    binary = nginx_binary()
    if binary is None:
        return "nginx is not installed (Debian: apt-get install nginx)"
    port = free_port()
    prefix = workdir / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    upstream = upstream_url.removeprefix("http://")
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    upstream engine {{ server {upstream}; keepalive 1024; }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""
    )
    proc = spawn("nginx", [binary, "-p", str(prefix), "-c", str(conf)], workdir)
    proc.url = f"http://{HOST}:{port}"
    wait_ready(proc, proc.url + "/health", 15)
    return proc


def litellm_binary(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else []
    candidates += ["/tmp/bench-litellm-venv/bin/litellm", shutil.which("litellm") or ""]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def start_litellm(workdir: Path, upstream_url: str, explicit: str | None) -> Proc | str:
    """LiteLLM's proxy with the three models as OpenAI-compatible upstreams, offline."""
    binary = litellm_binary(explicit)
    if binary is None:
        return (
            "LiteLLM's proxy is not installed (uv venv /tmp/bench-litellm-venv && "
            "VIRTUAL_ENV=/tmp/bench-litellm-venv uv pip install 'litellm[proxy]')"
        )
    port = free_port()
    entries = []
    for model in STREAM_MODELS:
        entries.append(
            f"  - model_name: {model}\n"
            f"    litellm_params:\n"
            f"      model: openai/{model}\n"
            f"      api_base: {upstream_url}/v1\n"
            f"      api_key: bench-upstream-key\n"
        )
    conf = workdir / "litellm.yaml"
    conf.write_text(
        "model_list:\n"
        + "".join(entries)
        + "litellm_settings:\n  telemetry: false\n  drop_params: true\n"
    )
    master_key = "sk-bench-" + secrets.token_hex(16)
    env = {
        # It refuses to start without a master key (and then asks for it on every request).
        "LITELLM_MASTER_KEY": master_key,
        # Keep it offline: no model-cost map download, no telemetry.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY_DISABLED": "true",
        "LITELLM_LOG": "ERROR",
        "NO_PROXY": "*",
    }
    argv = [binary, "--config", str(conf), "--host", HOST, "--port", str(port)]
    argv += ["--num_workers", "1"]
    proc = spawn("litellm", argv, workdir, env)
    proc.url = f"http://{HOST}:{port}"
    proc.key = master_key
    try:
        wait_ready(proc, proc.url + "/health/liveliness", 120)
    except RuntimeError as exc:
        proc.stop()
        return f"LiteLLM's proxy did not start: {exc}"
    return proc


# -- the load generator -------------------------------------------------------------------


class LoadGen:
    """``loadgen.py`` in its own process, driven one JSON line at a time."""

    def __init__(self, workdir: Path, cpus: str | None = None) -> None:
        argv = [sys.executable, str(LOADGEN)]
        if cpus and shutil.which("taskset"):
            argv = ["taskset", "-c", cpus, *argv]
        self.err = open(workdir / "loadgen.log", "wb")
        self.garbage = workdir / "loadgen-unexpected.txt"
        self.next_id = 0
        self.waiting: int | None = None
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            start_new_session=True,
        )

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.popen.stdin is not None
        self.next_id += 1
        self.waiting = self.next_id
        self.popen.stdin.write((json.dumps({**cmd, "id": self.next_id}) + "\n").encode())
        self.popen.stdin.flush()

    def read(self) -> dict[str, Any]:
        """The answer to the last command sent; anything else is set aside in a file."""
        assert self.popen.stdout is not None
        while True:
            line = self.popen.stdout.readline()
            if not line:
                raise RuntimeError("the load generator exited")
            try:
                result: dict[str, Any] = json.loads(line)
            except ValueError:
                result = {}
            if result.get("id") == self.waiting:
                return result
            with open(self.garbage, "ab") as f:
                f.write(b"expected id %d: " % (self.waiting or 0) + line[:2000] + b"\n")

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.send(cmd)
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send({"op": "quit"})
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)
        self.err.close()

"""How an engine is launched and judged ready or failed.

Shared by local pools and the Modal engine container: build vLLM's command line, start it in
a process group of its own (behind ``engine_guard``), keep the tail of its output, poll
``/health`` until it answers, fail fast when the process exits first, and stop it with
SIGTERM → grace → SIGKILL to the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import aiohttp

from .engine_guard import TOKEN_ENV, exit_line

log = logging.getLogger("vllm_autoserve.engine")

LOG_TAIL_LINES = 60
LOG_TAIL_CHARS = 4000
_LOG_KEEP_LINES = 400
_HEALTH_INTERVAL = 0.1  # an engine that is up waits at most this long to be seen
_PROGRESS_EVERY = 30.0  # a start this long says, in the log, what the engine last said
# Never handed to an engine: the gateway's own keys and tokens meant for the gateway.
_GATEWAY_ONLY_ENV = ("VLLM_GATEWAY_AUTH", "AUTOSERVE_API_KEY")


# "OSError: ...", also behind vLLM's process tag: "(EngineCore_DP0 pid=12) ValueError: ..."
_EXCEPTION_LINE = re.compile(r"^(\([^)]*\)\s*)?[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*\S")


# vLLM's own log lines: "(APIServer pid=7) ERROR 11-28 10:00:00 [core.py:123] message".
_VLLM_ERROR_LINE = re.compile(r"^(?:\([^)]*\)\s*)?ERROR\s+\S+\s+\S+\s+\[[^\]]*\]\s*(\S.*)")


def with_cause(what: str, tail: str) -> str:
    """``what`` went wrong, with the first exception in the engine's output tail after it on
    the same line (where ``/status``, a log line or a client's one-line error shows it), then
    the tail. The first: vLLM's last is "Engine core initialization failed. See root cause
    above". Without an exception, vLLM's first ERROR line says what happened."""
    lines = tail.splitlines()
    cause = next((line.strip() for line in lines if _EXCEPTION_LINE.match(line)), "")
    if not cause:
        logged = (_VLLM_ERROR_LINE.match(line) for line in lines)
        cause = next((found.group(1).strip() for found in logged if found), "")
    head = f"{what}: {cause}" if cause else what
    return f"{head}\n{tail}" if tail else head


class EngineFailed(Exception):
    """An engine could not start or died; ``str(exc)`` is a readable reason and log tail."""


def exit_account(code: int) -> str:
    """An exit code as an operator reads it: ``code 137 (killed by SIGKILL, ...)``. The
    guard reports an engine killed by signal N as 128 + N, as shells do; a guard killed
    itself shows as -N."""
    number = -code if code < 0 else code - 128 if code > 128 else 0
    try:
        name = signal.Signals(number).name if number else ""
    except ValueError:
        name = ""
    if not name:
        return f"code {code}"
    if number == signal.SIGKILL:  # what the kernel's out-of-memory killer sends
        return f"code {code} (killed by SIGKILL: out of memory?)"
    return f"code {code} (killed by {name})"


def vllm_command(
    *,
    python: str,
    model: str,
    served_names: Sequence[str],
    host: str,
    port: int | str,
    tensor_parallel_size: int | None = None,
    lora_modules: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """vLLM's OpenAI server for ``model`` (the module form works for GPU and CPU builds)."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    argv += ["--served-model-name", *served_names, "--host", host, "--port", str(port)]
    if tensor_parallel_size:
        argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if lora_modules:
        # vLLM's JSON form: its ``name=path`` form breaks on a comma in either.
        argv += ["--enable-lora", "--lora-modules"]
        argv += [json.dumps({"name": name, "path": path}) for name, path in lora_modules.items()]
    return argv + list(extra_args)


def fill_placeholders(template: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Replace ``{port}``, ``{model}``... in a user's ``command`` (nothing else is touched)."""
    result = []
    for arg in template:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        result.append(arg)
    return result


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def engine_environment(extra: Mapping[str, str], api_key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _GATEWAY_ONLY_ENV}
    env.update(extra)
    env["VLLM_API_KEY"] = api_key
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class EngineProcess:
    """One engine process group: start, health, output tail, stop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        health_url: str,
        stop_grace: float = 10.0,
        guarded: bool = True,
        own_listener: bool = True,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.health_url = health_url
        self.stop_grace = stop_grace
        self.guarded = guarded
        self.own_listener = own_listener
        """The engine itself listens on its port (vLLM does; a ``command`` may hand it to a
        process outside its own, as ``docker run -p`` does)."""
        self._lines: deque[str] = deque(maxlen=_LOG_KEEP_LINES)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiter: asyncio.Task[None] | None = None
        # The engine's exit code, known when the guard says the engine exited (it goes on
        # to clean up its helpers, up to a few seconds), or else when the process exits.
        self._exited: asyncio.Future[int] | None = None
        self._exit_token = secrets.token_hex(8)
        self._exit_line = exit_line(self._exit_token)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    async def start(self) -> None:
        argv, env = self.argv, self.env
        if self.guarded:
            guard = [sys.executable, "-m", "vllm_autoserve.engine_guard"]
            guard += ["--grace", str(self.stop_grace), "--parent", str(os.getpid())]
            argv = [*guard, "--", *argv]
            env = {**env, TOKEN_ENV: self._exit_token}
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise EngineFailed(f"[{self.name}] cannot start {self.argv[0]!r}: {exc}") from exc
        self._exited = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_output(), name=f"output {self.name}")
        self._waiter = asyncio.create_task(self._wait_process(), name=f"exit {self.name}")
        log.info("[%s] engine started (pid %s): %s", self.name, self._proc.pid, " ".join(self.argv))

    async def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stream = self._proc.stdout
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the stream's limit: keep a piece of it
                line = (await stream.read(64 * 1024)) + b"\n"
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if self.guarded and self._exit_line in text:
                code = text.split(self._exit_line, 1)[1]
                self._set_exited(int(code) if code.lstrip("-").isdigit() else -1)
                continue
            self._lines.append(text)
            log.debug("[%s] %s", self.name, text)

    async def _wait_process(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        await self._drain_output()
        self._set_exited(code)

    def _set_exited(self, code: int) -> None:
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(code)

    def log_tail(self, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
        tail = "\n".join(list(self._lines)[-lines:]).rstrip()  # (the guard's last line break)
        if len(tail) > chars:  # whole lines only
            tail = tail[-chars:].partition("\n")[2] or tail[-chars:]
        return tail

    def failure(self, what: str) -> EngineFailed:
        return EngineFailed(with_cause(f"[{self.name}] {what}", self.log_tail()))

    async def wait_healthy(self, session: aiohttp.ClientSession) -> None:
        """Return once ``/health`` answers 200 from the engine; raise ``EngineFailed`` if the
        engine exits.

        An engine binds its port only when it has loaded its model, and any process on the
        host may bind it first: for an engine that listens itself (``own_listener``), a 200
        counts only if the port is the engine's own, or else that process would get the
        requests, and the engine's key with them.
        """
        assert self._exited is not None
        warned = False
        started = time.monotonic()
        reported = started
        while True:
            if time.monotonic() - reported >= _PROGRESS_EVERY:  # a download may take minutes
                reported = time.monotonic()
                last = self._lines[-1] if self._lines else "(nothing yet)"
                log.info(
                    "[%s] still starting after %.0f s; the engine's last line: %s",
                    self.name,
                    reported - started,
                    last[:300],
                )
            if self._exited.done():
                raise self.failure(
                    f"engine exited prematurely with {exit_account(self._exited.result())}"
                )
            if await self.health(session) is True:
                if not self.own_listener or await asyncio.to_thread(self._owns_port) is not False:
                    return
                if not warned:
                    log.warning(
                        "[%s] %s answers, but from a process that is not the engine's",
                        self.name,
                        self.health_url,
                    )
                    warned = True
            await asyncio.wait({self._exited}, timeout=_HEALTH_INTERVAL)

    def _owns_port(self) -> bool | None:
        """Whether the engine or one of its children listens on its port; None if this
        machine will not say (no ``psutil``, or not allowed to look)."""
        port = urlsplit(self.health_url).port
        if self._proc is None or port is None:
            return None
        try:
            import psutil
        except ImportError:
            return None
        try:
            root = psutil.Process(self._proc.pid)
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    for socket_ in process.net_connections(kind="tcp"):
                        listens = socket_.status == psutil.CONN_LISTEN and socket_.laddr
                        if listens and socket_.laddr.port == port:
                            return True
        except psutil.NoSuchProcess:  # the engine itself is gone
            return False
        except (psutil.Error, AttributeError):  # not allowed to look; a psutil before 6.0
            return None
        return False

    async def health(self, session: aiohttp.ClientSession) -> bool | None:
        """``/health``: True if it answers 200 within 5 s, None if it does not answer in
        time (a busy engine may be slow), False otherwise (refused, dropped, not 200)."""
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with session.get(self.health_url, timeout=timeout) as resp:
                return resp.status == 200
        except TimeoutError:
            return None
        except (aiohttp.ClientError, OSError):
            return False

    async def wait_exit(self) -> int:
        """The engine's exit code, as soon as it has exited."""
        assert self._exited is not None
        return await asyncio.shield(self._exited)

    async def _drain_output(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 2.0)

    async def stop(self) -> None:
        """SIGTERM to the guard (which tells the engine first, then the rest), ``stop_grace``
        to exit, then SIGKILL to the group; idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            if self.guarded:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            else:
                self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_grace + 1.0)
            except TimeoutError:
                log.warning(
                    "[%s] engine ignored SIGTERM for %g s; killing", self.name, self.stop_grace
                )
        # Whatever is left of the group (children of a crashed engine) goes too.
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5.0)
        if proc.returncode is not None:
            self._set_exited(proc.returncode)
        await self._drain_output()
        for task in (self._reader, self._waiter):
            if task is not None:
                task.cancel()

    def _signal_group(self, sig: int) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

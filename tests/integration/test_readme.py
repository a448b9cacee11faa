"""The README's Python examples run as written against a real gateway."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from tests.support.gateway import fake_model, running_gateway

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2  # the sync and async clients: an empty list would skip the test below


@pytest.mark.parametrize("block", BLOCKS, ids=[f"python-{i}" for i in range(len(BLOCKS))])
def test_readme_python_example(block: str) -> None:
    config = "[gateway]\nhold_seconds = 0.5\n" + fake_model(
        "qwen", "--startup-delay", "1.5", "--chunks", "3"
    )
    with running_gateway(config, key="my-secret-key") as gateway:
        code = block.replace("http://127.0.0.1:8000", gateway.url)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert printed.getvalue().startswith("tok0-qwen tok1-qwen tok2-qwen")

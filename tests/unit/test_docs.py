"""The documentation says what the code does: the reference is current, examples parse."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from vllm_autoserve import config_reference
from vllm_autoserve.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_configuration_reference_matches_the_code() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    start = text.index(config_reference.BEGIN)
    end = text.index(config_reference.END) + len(config_reference.END)
    assert text[start:end] == config_reference.render(), (
        "docs/configuration.md is out of date: "
        "regenerate with `uv run python -m vllm_autoserve.config_reference`"
    )


def _toml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in DOCS:
        for i, block in enumerate(re.findall(r"```toml\n(.*?)```", doc.read_text(), re.DOTALL)):
            blocks.append((f"{doc.name}#{i}", block))
    return blocks


def test_the_docs_have_toml_examples() -> None:
    assert len(_toml_blocks()) >= 5  # an empty list would skip the test below


@pytest.mark.parametrize(("where", "block"), _toml_blocks())
def test_every_toml_example_in_the_docs_is_a_valid_config(where: str, block: str) -> None:
    parse_config(tomllib.loads(block), source=where)


def test_docs_links_point_to_existing_files() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"

"""Misspelt SDK arguments, which a type checker must catch as it does for ``openai.OpenAI``;
``test_client_copy`` type-checks this file and expects an error on each marked line."""

from __future__ import annotations

from vllm_autoserve_client import AsyncAutoserveClient, AutoserveClient


def misspelt() -> None:
    client = AutoserveClient(model="m", max_retires=3)  # error: max_retires
    client.with_options(timout=5)  # error: timout
    client.copy(default_header={"x": "y"})  # error: default_header
    AsyncAutoserveClient(model="m", http_client=object())  # error: http_client
    AsyncAutoserveClient(model="m").with_options(max_retries="2")  # error: max_retries

"""Where the gateway is and which key it takes: arguments first, then the environment.

The classes and the ``autoserve`` command share these fallbacks:

- base URL: ``base_url=`` / ``--base-url``, ``AUTOSERVE_BASE_URL``, ``OPENAI_BASE_URL``;
- API key: ``api_key=`` / ``--api-key``, ``AUTOSERVE_API_KEY``, ``VLLM_GATEWAY_AUTH`` (its
  first key when it lists several for rotation), ``OPENAI_API_KEY``.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

from openai import OpenAIError

BASE_URL_ENV = ("AUTOSERVE_BASE_URL", "OPENAI_BASE_URL")
API_KEY_ENV = ("AUTOSERVE_API_KEY", "VLLM_GATEWAY_AUTH", "OPENAI_API_KEY")

DEFAULT_UP_TIMEOUT = 20 * 60.0
"""Seconds a request waits, in all, for its model's pool to become healthy."""

LOGGER_NAME = "vllm_autoserve_client"


def _first_set(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def resolve_base_url(explicit: str | None) -> str:
    """The gateway's base URL, or an error naming the ways to give it.

    A bare ``scheme://host[:port]`` gets ``/v1``: the gateway serves the OpenAI API there
    (and ``/up``, ``/down``, ``/status`` at both the root and under ``/v1``).
    """
    url = explicit or _first_set(BASE_URL_ENV)
    if not url:
        raise OpenAIError(
            "No gateway URL: set AUTOSERVE_BASE_URL (or give base_url= in Python, --base-url "
            "to the autoserve command), e.g. http://127.0.0.1:8000/v1 for a local gateway or "
            "https://WORKSPACE-ENV--gateway.modal.run/v1 on Modal"
        )
    parts = urlsplit(url)
    if parts.path in ("", "/") and not parts.query:
        url = urlunsplit(parts._replace(path="/v1"))
    return url


def resolve_api_key(explicit: str | None) -> str:
    """The gateway's API key, or an error naming the ways to give it."""
    key = explicit or _first_set(API_KEY_ENV)
    if not key:
        raise OpenAIError(
            "No API key: pass api_key= (--api-key) or set AUTOSERVE_API_KEY "
            "(VLLM_GATEWAY_AUTH and OPENAI_API_KEY are read too)"
        )
    # VLLM_GATEWAY_AUTH may hold several keys, comma-separated, while they are rotated.
    return key.split(",")[0].strip()

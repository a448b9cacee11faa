"""The OpenAI SDK's own constructor and ``copy`` arguments (openai 3.0 to 3.57), spelled out.

The clients take them as ``**kwargs`` and hand them on; typing those kwargs with these
``TypedDict``s lets a type checker catch a misspelt ``max_retries`` or ``timeout`` as it does
for ``openai.OpenAI``. ``workload_identity`` and ``provider`` are typed loosely: their types
live in the SDK's private modules.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, TypedDict

import httpx2
from openai import NotGiven, Timeout


class _SharedOptions(TypedDict, total=False):
    admin_api_key: str | None
    workload_identity: Any
    organization: str | None
    project: str | None
    webhook_secret: str | None
    # Not in the oldest 3.x SDKs (3.0 raises TypeError for it).
    data_residency: Literal["global", "us", "eu", "ae", "au", "in", "jp"] | None
    websocket_base_url: str | httpx2.URL | None
    timeout: float | Timeout | NotGiven | None
    default_headers: Mapping[str, str] | None
    default_query: Mapping[str, object] | None


class _NewOptions(_SharedOptions, total=False):
    provider: Any
    max_retries: int
    _strict_response_validation: bool
    _enforce_credentials: bool


class _CopyOptions(_SharedOptions, total=False):
    provider: Any
    base_url: str | httpx2.URL | NotGiven | None
    max_retries: int | NotGiven
    set_default_headers: Mapping[str, str] | None
    set_default_query: Mapping[str, object] | None
    _enforce_credentials: bool | None


class ClientOptions(_NewOptions, total=False):
    """``openai.OpenAI(...)``'s arguments besides ``api_key`` and ``base_url``."""

    http_client: httpx2.Client | None


class AsyncClientOptions(_NewOptions, total=False):
    """``openai.AsyncOpenAI(...)``'s arguments besides ``api_key`` and ``base_url``."""

    http_client: httpx2.AsyncClient | None


class CopyOptions(_CopyOptions, total=False):
    """``openai.OpenAI.copy(...)``'s arguments (``with_options``)."""

    api_key: str | Callable[[], str] | None
    http_client: httpx2.Client | None


class AsyncCopyOptions(_CopyOptions, total=False):
    """``openai.AsyncOpenAI.copy(...)``'s arguments (``with_options``)."""

    api_key: str | Callable[[], Awaitable[str]] | None
    http_client: httpx2.AsyncClient | None

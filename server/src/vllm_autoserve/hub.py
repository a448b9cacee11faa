"""Whether an unlisted model name exists on the Hugging Face Hub, before an engine is started
for it.

A mistyped ``owner/name`` would otherwise start a whole engine (a GPU container on Modal)
that fails a minute later, and again at every retry after the cooldown. vLLM, Ollama and
LiteLLM all answer an unknown model with a quick 404; so does the gateway, when the Hub says
so. When the Hub cannot be asked (offline, ``HF_HUB_OFFLINE``, a network error or a slow
answer) or the model is in the local cache, the engine is started as before and reports
what it finds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

log = logging.getLogger("vllm_autoserve.hub")

_TIMEOUT = aiohttp.ClientTimeout(total=5)
_FORGET_MISSING_SECONDS = 60.0  # a repo may be created (or made public) meanwhile
_TRUE = {"1", "true", "yes", "on"}


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def _cache_dir() -> Path:
    explicit = os.environ.get("HF_HUB_CACHE")
    if explicit:
        return Path(explicit)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def _cached(name: str) -> bool:
    """Whether the Hub's local cache holds the repo (it may serve offline from there)."""
    return (_cache_dir() / f"models--{name.replace('/', '--')}").is_dir()


class HubCheck:
    """Asks ``GET {HF_ENDPOINT}/api/models/{name}`` once per name (with ``HF_TOKEN``, so that
    private and gated repos the token reaches count as found)."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession]) -> None:
        self._session = session
        self._found: set[str] = set()
        self._missing: dict[str, float] = {}  # name -> when the Hub said it has no such repo
        self._asking: dict[str, asyncio.Future[bool | None]] = {}

    async def missing(self, name: str) -> bool:
        """True only when the Hub says there is no such model (or none this token may see)."""
        if name in self._found:
            return False
        said = self._missing.get(name)
        if said is not None and time.monotonic() - said < _FORGET_MISSING_SECONDS:
            return True
        if _offline() or _cached(name):
            return False
        asking = self._asking.get(name)
        if asking is None:  # one question per name, however many requests ask at once
            asking = self._asking[name] = asyncio.ensure_future(self._ask(name))
            asking.add_done_callback(lambda _: self._asking.pop(name, None))
        exists = await asyncio.shield(asking)
        if exists is True:
            self._found.add(name)
        elif exists is False:
            self._missing[name] = time.monotonic()
        return exists is False

    async def _ask(self, name: str) -> bool | None:
        """True: found; False: no such repo (404, or 401 as the Hub answers for a private
        repo); None: the Hub could not be asked."""
        headers = {}
        token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = f"{_endpoint()}/api/models/{name}"
        try:
            async with self._session().get(url, headers=headers, timeout=_TIMEOUT) as answer:
                status = answer.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("[%s] could not ask the Hugging Face Hub whether it exists: %s", name, exc)
            return None
        if status == 200:
            return True
        if status in (401, 404):
            return False
        log.info("[%s] the Hugging Face Hub answered %d: starting the engine anyway", name, status)
        return None

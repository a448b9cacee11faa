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
from pathlib import Path

import aiohttp

log = logging.getLogger("vllm_autoserve.hub")

_TIMEOUT = aiohttp.ClientTimeout(total=5)
_REMEMBER_SECONDS = 60.0  # what the Hub said (or that it could not be asked), for this long
_MAX_REMEMBERED = 10_000  # names: any key holder may send new ones
_TRUE = {"1", "true", "yes", "on"}
_BAD_TOKEN = "Invalid credentials in Authorization header"  # the Hub's X-Error-Message


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def _hf_home() -> Path:
    explicit = os.environ.get("HF_HOME")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "huggingface"


def _cached(name: str) -> bool:
    """Whether the Hub's local cache holds the repo (it may serve offline from there)."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or _hf_home() / "hub")
    return (hub / f"models--{name.replace('/', '--')}").is_dir()


def _token() -> str | None:
    """The token vLLM would download with, as ``huggingface_hub`` finds it: the environment,
    else the file ``hf auth login`` writes."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("HF_TOKEN_PATH") or _hf_home() / "token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class HubCheck:
    """Asks ``GET {HF_ENDPOINT}/api/models/{name}`` once per name (with the Hugging Face token,
    so that private and gated repos it reaches count as found)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._said: dict[str, tuple[bool | None, float]] = {}  # name -> (answer, when)
        self._asking: dict[str, asyncio.Future[bool | None]] = {}

    async def missing(self, name: str) -> bool:
        """True only when the Hub says there is no such model (or none this token may see)."""
        said = self._said.get(name)
        if said is not None and (said[0] or time.monotonic() - said[1] < _REMEMBER_SECONDS):
            return said[0] is False  # found stays found; the rest is asked again in a while
        if _offline() or _cached(name):
            return False
        asking = self._asking.get(name)
        if asking is None:  # one question per name, however many requests ask at once
            asking = self._asking[name] = asyncio.ensure_future(self._ask(name))
            asking.add_done_callback(lambda _: self._asking.pop(name, None))
        exists = await asyncio.shield(asking)
        if len(self._said) >= _MAX_REMEMBERED:
            self._said.clear()
        self._said[name] = (exists, time.monotonic())
        return exists is False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _ask(self, name: str) -> bool | None:
        """True: found; False: no such repo, or none this token may see; None: the Hub could
        not be asked, or did not say (a mirror without the API, a bad token)."""
        headers = {}
        token = _token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if self._session is None or self._session.closed:
            # trust_env: the proxy settings (HTTPS_PROXY) vLLM's downloads use too
            self._session = aiohttp.ClientSession(trust_env=True)
        url = f"{_endpoint()}/api/models/{name}"
        try:
            async with self._session.get(url, headers=headers, timeout=_TIMEOUT) as answer:
                status = answer.status
                code = answer.headers.get("X-Error-Code")
                message = answer.headers.get("X-Error-Message")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("[%s] could not ask the Hugging Face Hub whether it exists: %s", name, exc)
            return None
        if status == 200:
            return True
        # As huggingface_hub reads it: the Hub answers 401 for a repo that does not exist or
        # that the caller may not see, but also for a bad token, which it names.
        if code == "RepoNotFound" or (status == 401 and message != _BAD_TOKEN):
            return False
        log.info("[%s] the Hugging Face Hub answered %d: starting the engine anyway", name, status)
        return None

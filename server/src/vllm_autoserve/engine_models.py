"""What engines say of the models they serve (vLLM's ``max_model_len``), for ``/v1/models``.

Clients size their prompts by ``max_model_len`` from vLLM's model list. The gateway answers
that list itself, cold models included, so it asks each engine once after it turns healthy
and keeps the answer for the engine's later cold spells too.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from .pools.registry import Pools
from .pools.status import Upstream

log = logging.getLogger("vllm_autoserve.engine_models")

_ASK_SECONDS = 2.0  # a model list is instant; an engine that is slow to give it is skipped
_MAX_LIST_BYTES = 1024 * 1024  # a longer list is skipped, not read


MODEL_LIST_ERRORS = (aiohttp.ClientError, TimeoutError, ValueError, RecursionError)


async def model_list(session: aiohttp.ClientSession, upstream: Upstream) -> tuple[int, Any]:
    """An engine's answer to ``GET /v1/models``, with the credentials the gateway sends it:
    its status, and its JSON if that is 200 (None for a list over 1 MiB, which is not read).
    Raises one of ``MODEL_LIST_ERRORS`` when there is no answer to read."""
    headers = {k.decode(): v.decode() for k, v in upstream.headers}
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    async with session.get(
        upstream.url + "/v1/models",
        params=dict(upstream.params),
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=_ASK_SECONDS),
        allow_redirects=False,
    ) as response:
        if response.status != 200:
            return response.status, None
        raw = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            raw += chunk
            if len(raw) > _MAX_LIST_BYTES:
                return response.status, None
        return response.status, json.loads(raw)


class EngineModels:
    def __init__(self, pools: Pools) -> None:
        self._pools = pools
        self._asked: dict[str, Upstream] = {}  # healthy pool → the upstream last asked
        # model id (as the engine lists it) → (its pool, max_model_len)
        self._lengths: dict[str, tuple[str, int]] = {}

    async def refresh(self) -> None:
        """Ask every healthy engine not asked since it started, all at once."""
        healthy = dict(self._pools.healthy_upstreams())
        due = [(n, up) for n, up in healthy.items() if self._asked.get(n) is not up]
        self._asked = {n: up for n, up in self._asked.items() if n in healthy}
        self._asked.update(due)  # asked once per engine start, answered or not
        # What the engines of forgotten pools said is forgotten with them.
        known = {status.model for status in self._pools.statuses()}
        self._lengths = {i: v for i, v in self._lengths.items() if v[0] in known}
        await asyncio.gather(*(self._ask(name, upstream) for name, upstream in due))

    def max_model_len(self, model_id: str, pool: str) -> int | None:
        """As the engine listed the name; else as it listed its model (a ``url`` upstream
        does not know the gateway's aliases)."""
        found = self._lengths.get(model_id) or self._lengths.get(pool)
        return found[1] if found else None

    async def _ask(self, name: str, upstream: Upstream) -> None:
        try:
            status, listing = await model_list(self._pools.session(), upstream)
        except MODEL_LIST_ERRORS as exc:
            log.debug("[%s] no model list from the engine: %r", name, exc)
            return
        if status != 200:
            return
        # Only the names routed to this engine: a shared upstream may list many more.
        config = self._pools.config
        ours = {name, *config.aliases_of(name), *config.model(name).lora_modules}
        entries = listing.get("data") if isinstance(listing, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            model_id, length = entry.get("id"), entry.get("max_model_len")
            if (
                isinstance(model_id, str)
                and model_id in ours
                and type(length) is int
                and length > 0
            ):
                self._lengths[model_id] = (name, length)

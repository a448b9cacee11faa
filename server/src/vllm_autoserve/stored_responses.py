"""Which model created a stored response, for the Responses API's calls by id.

``GET /v1/responses/{id}``, ``DELETE``, ``.../cancel`` and ``.../input_items`` name no model.
The gateway notes the id of every response created through it (the first ``"id": "resp_..."``
of the answer, whole or streamed) with the model that created it, and sends those calls to
that model's engine. vLLM keeps stored responses in its engine's memory only: once that engine
has stopped, they are gone.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from .errors import NotFound

_PREFIX = "/v1/responses/resp_"  # vLLM's ids; other paths there name their model in the body
_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,200})"')
_KEEP = 20_000  # ids remembered, the oldest forgotten first (about 3 MB)


def names_one(path: str) -> bool:
    """Whether a path is ``/v1/responses/{id}``, or below it."""
    return path.startswith(_PREFIX)


class StoredResponses:
    def __init__(self, keep: int = _KEEP) -> None:
        self.keep = keep
        self._models: OrderedDict[str, str] = OrderedDict()

    def note(self, head: bytes, model: str) -> None:
        """Note the id in the first bytes of an answer to ``POST /v1/responses``."""
        found = _ID.search(head)
        if found is None:
            return
        self._models[found.group(1).decode()] = model
        if len(self._models) > self.keep:
            self._models.popitem(last=False)

    def model_of(self, path: str) -> str:
        """The model whose engine holds the response a ``/v1/responses/{id}...`` path names."""
        response_id = path.removeprefix("/v1/responses/").split("/", 1)[0]
        model = self._models.get(response_id)
        if model is None:
            raise NotFound(
                f"no response '{response_id[:100]}' was created through this gateway",
                code="response_not_found",
            )
        return model

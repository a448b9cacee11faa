"""Errors of a pool that never became healthy.

Everything else a request can raise is the OpenAI SDK's own error (``APIConnectionError``,
``AuthenticationError``, ``InternalServerError``, ...), unchanged.

    openai.OpenAIError
    └── AutoserveError                 anything this package adds
        ├── ModelFailedError           the gateway reports the pool as failed (.model, .error)
        │   └── ModelFailedResponse    ... in its 503 answer to a request: also the
        │                              openai.InternalServerError the plain SDK raises for it
        └── ModelStartTimeout          not healthy within ``up_timeout`` (.model, .waited, .state)
"""

from __future__ import annotations

from typing import Any

import httpx2
from openai import InternalServerError, OpenAIError


class AutoserveError(OpenAIError):
    """Base class of the errors this package adds to the OpenAI SDK's."""


class ModelFailedError(AutoserveError):
    """The model's engine failed to start or died; ``error`` is the gateway's account of it.

    The gateway's text is usually the tail of the engine's log, so it may span many lines.
    """

    def __init__(self, model: str, error: str) -> None:
        super().__init__(self._noted(model, error))

    def _noted(self, model: str, error: str) -> str:
        """Keep ``model`` and ``error``; the message."""
        self.model = model
        self.error = error.strip() or "the engine failed (the gateway gave no details)"
        prefix = "" if self.error.startswith("[") else f"[{model}] "
        return f"{prefix}{self.error}"


class ModelFailedResponse(ModelFailedError, InternalServerError):
    """A request answered ``503 model_failed``: code written for the plain SDK catches it as
    the ``openai.InternalServerError`` it is there (``.status_code``, ``.response``)."""

    def __init__(self, model: str, error: str, *, response: httpx2.Response, body: Any) -> None:
        message = self._noted(model, error)
        InternalServerError.__init__(self, message, response=response, body=body)


class ModelStartTimeout(AutoserveError):
    """The model's pool was not healthy after waiting ``waited`` seconds."""

    def __init__(
        self, model: str, waited: float, state: str | None = None, *, answered: bool = True
    ) -> None:
        self.model = model
        self.waited = waited
        self.state = state
        if not answered:
            super().__init__(
                f"[{model}] the gateway did not answer /up within {waited:.1f} s: is it "
                "running, and is the base URL right?"
            )
            return
        last = f" (last state: {state})" if state else ""
        super().__init__(
            f"[{model}] not healthy after waiting {waited:.1f} s{last}; "
            "waiting longer may help (up_timeout=, or the CLI's --timeout), and the "
            "gateway's /status shows what it is doing"
        )

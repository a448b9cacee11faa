"""The gateway's API keys: ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, which
Anthropic's clients send), compared in constant time."""

from __future__ import annotations

import hmac
import os

from .errors import Unauthorized

AUTH_ENV = "VLLM_GATEWAY_AUTH"


def keys_from_env(value: str | None = None) -> list[str]:
    """Keys from ``VLLM_GATEWAY_AUTH``: one key, or several separated by commas (rotation)."""
    raw = os.environ.get(AUTH_ENV, "") if value is None else value
    return [key.strip() for key in raw.split(",") if key.strip()]


class ApiKeys:
    """Checks a request's ``Authorization`` header; ``ApiKeys([])`` with ``open=True`` lets
    everything through (``--no-auth``)."""

    def __init__(self, keys: list[str], *, open: bool = False) -> None:
        if not keys and not open:
            raise ValueError(f"no API key: set {AUTH_ENV}")
        self._keys = [key.encode() for key in keys]
        self.open = open and not keys

    def allows(self, authorization: bytes | None) -> bool:
        if self.open:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return self.allows_key(token)

    def allows_key(self, token: bytes | None) -> bool:
        """The key itself, as ``x-api-key`` carries it."""
        if self.open:
            return True
        token = (token or b"").strip()
        if not token:
            return False
        # Compare against every key, whatever matches first, so timing says nothing.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return matched


def unauthorized() -> Unauthorized:
    """The answer to a request without a valid key."""
    return Unauthorized(
        "missing or invalid API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"
    )

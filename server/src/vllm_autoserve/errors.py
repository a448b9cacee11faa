"""Errors the gateway answers with, in OpenAI's error format.

Every error a client can see is a ``GatewayError``; lower-level failures (a refused
connection, an engine that exited) are mapped to one of these once, where they happen.

    GatewayError                      status  type                     code
    ├── BadRequest                    400     invalid_request_error    (per case)
    │   └── InvalidModelName          400     invalid_request_error    invalid_model
    ├── Unauthorized                  401     authentication_error     invalid_api_key
    ├── Forbidden                     403     permission_error         forbidden
    ├── ModelNotFound                 404     invalid_request_error    model_not_found
    ├── NotFound                      404     invalid_request_error    not_found   (no such route)
    ├── MethodNotAllowed              405     invalid_request_error    method_not_allowed (+ Allow)
    ├── RequestTimeout                408     invalid_request_error    request_timeout
    ├── PayloadTooLarge               413     invalid_request_error    payload_too_large
    ├── HeadersTooLarge               431     invalid_request_error    request_header_fields_too_large
    ├── ModelNotReady                 503     service_unavailable      model_not_ready  (+ Retry-After)
    ├── ModelFailed                   503     engine_error             model_failed     (+ Retry-After)
    ├── ShuttingDown                  503     service_unavailable      gateway_shutting_down (+ Retry-After)
    ├── UpstreamUnavailable           502     engine_error             upstream_unavailable
    ├── UpstreamRefusedCredentials    502     engine_error             upstream_auth_failed
    └── UpstreamDisconnected          (200)   engine_error             upstream_disconnected

A stream that breaks off after its first bytes cannot change its status any more: its error
(``UpstreamDisconnected``, or ``ShuttingDown``) goes out as the stream's last event,
``sse_event()``. Answers to vLLM's Anthropic routes (``/v1/messages``) take Anthropic's
shape instead (``anthropic_body()``), which Anthropic's clients read.

``ConfigError`` is separate: it stops start-up and never reaches a client.
"""

from __future__ import annotations

from typing import Any

import orjson


class ConfigError(Exception):
    """The configuration file is invalid; the message names the key and the problem."""


class GatewayError(Exception):
    """An error answered to the client as ``{"error": {"message", "type", "code"}}``."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        """The error as Anthropic's API words it, for vLLM's ``/v1/messages`` routes."""
        fallback = "api_error" if self.status >= 500 else "invalid_request_error"
        kind = _ANTHROPIC_TYPES.get(self.status, fallback)
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def body_bytes(self, *, anthropic: bool = False) -> bytes:
        return orjson.dumps(self.anthropic_body() if anthropic else self.body())

    def sse_event(self, *, anthropic: bool = False) -> bytes:
        """The error as a server-sent event, for a stream already under way (Anthropic's
        clients read only an event named ``error``)."""
        if anthropic:
            return b"event: error\ndata: " + self.body_bytes(anthropic=True) + b"\n\n"
        return b"data: " + self.body_bytes() + b"\n\n"

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(max(1, round(self.retry_after))).encode()))
        if self.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        return headers


_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidModelName(BadRequest):
    code = "invalid_model"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"
    asked: str | None = None
    """The name asked for (a well-formed one), for the access line."""


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = super().headers()
        if self.allow:
            headers.append((b"allow", self.allow.encode()))
        return headers


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class ModelNotReady(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "model_not_ready"


class ModelFailed(GatewayError):
    """An engine that failed to start will most likely fail again: the OpenAI SDKs are told
    not to retry (``x-should-retry``), which would start it anew after the cooldown."""

    status = 503
    type = "engine_error"
    code = "model_failed"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"x-should-retry", b"false")]


class ModelStopped(GatewayError):
    """``/down`` stopped the model while a request or an ``/up`` waited on it, or cut the
    request under way: not retried by the OpenAI SDKs (``x-should-retry``), whose retry
    would start the engine that was just stopped."""

    status = 503
    type = "service_unavailable"
    code = "model_stopped"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"x-should-retry", b"false")]


class ShuttingDown(GatewayError):
    """The gateway is stopping: nothing is started any more, waiting requests are let go."""

    status = 503
    type = "service_unavailable"
    code = "gateway_shutting_down"

    def __init__(self) -> None:
        super().__init__("the gateway is shutting down; retry in a moment", retry_after=5)


class UpstreamUnavailable(GatewayError):
    status = 502
    type = "engine_error"
    code = "upstream_unavailable"


class UpstreamRefusedCredentials(GatewayError):
    """The engine answered 401 to the credentials the gateway sends it (a ``url`` model's
    ``api_key``, Modal's proxy token): the gateway's configuration, not the client's key,
    so not a 401 to the client, and not retried by the OpenAI SDKs (it would fail again)."""

    status = 502
    type = "engine_error"
    code = "upstream_auth_failed"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"x-should-retry", b"false")]


class UpstreamDisconnected(GatewayError):
    """The engine broke off a stream it had started; sent only as the stream's last event."""

    status = 502
    type = "engine_error"
    code = "upstream_disconnected"

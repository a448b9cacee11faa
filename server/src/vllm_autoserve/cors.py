"""Requests from web pages: CORS for the origins in ``[gateway] cors_origins``.

Browsers send ``Origin`` with every cross-origin request; other clients send none, so
without that header this module costs one header look-up. As in vLLM 0.32
(``--allowed-origins``), no origin is allowed by default: a page's script can then neither
read an answer nor send a request that needs a preflight.

A gateway without a key (``--no-auth``) needs more: any page the user opens can still *send*
a simple request to 127.0.0.1 (the gateway takes a JSON body whatever its content type, as
curl sends it), and a page on a domain that resolves to 127.0.0.1 is not even cross-origin.
So such a gateway refuses requests from other pages' origins and for names other than
loopback ones.
"""

from __future__ import annotations

import ipaddress

from .asgi import Message, Send
from .errors import Forbidden

_ALLOW_METHODS = b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
_MAX_AGE = b"600"
_LOOPBACK_NAMES = frozenset({b"localhost"})


class CrossOrigin:
    """The gateway's rules for requests that carry ``Origin``, and for its ``Host``."""

    def __init__(self, origins: list[str], *, keyless: bool) -> None:
        self.any_origin = "*" in origins
        self.origins = frozenset(o.encode() for o in origins if o != "*")
        self.keyless = keyless

    def allows(self, origin: bytes) -> bool:
        return self.any_origin or origin in self.origins

    def refusal(self, origin: bytes | None, host: bytes | None) -> Forbidden | None:
        """Why a keyless gateway refuses this request (None: it does not)."""
        if not self.keyless:
            return None
        if not _is_loopback_host(host):
            return Forbidden(
                "this gateway runs without a key and answers only requests addressed to "
                "localhost or a loopback address"
            )
        if origin is not None and not self.allows(origin) and not _same_origin(origin, host):
            return Forbidden(
                "this gateway runs without a key and refuses requests from web pages; "
                "list the page's origin in [gateway] cors_origins to allow it"
            )
        return None

    def preflight_headers(
        self, origin: bytes, requested_headers: bytes | None
    ) -> list[tuple[bytes, bytes]]:
        headers = self._origin_headers(origin)
        headers.append((b"access-control-allow-methods", _ALLOW_METHODS))
        if requested_headers:
            headers.append((b"access-control-allow-headers", requested_headers))
        headers.append((b"access-control-max-age", _MAX_AGE))
        return headers

    def answering(self, send: Send, origin: bytes) -> Send:
        """``send`` with this gateway's CORS headers on the answer (none for an origin it does
        not allow), in place of any the engine set: vLLM has its own settings for them."""
        extra = self._origin_headers(origin) if self.allows(origin) else []

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [
                    (name, value)
                    for name, value in message.get("headers", ())
                    if not name.lower().startswith(b"access-control-")
                ]
                message = {**message, "headers": kept + extra}
            await send(message)

        return send_with_cors

    def _origin_headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        if self.any_origin:
            return [(b"access-control-allow-origin", b"*")]
        return [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]


def _same_origin(origin: bytes, host: bytes | None) -> bool:
    """A page the gateway served itself (``/docs``) calling it back."""
    return host is not None and origin.partition(b"://")[2] == host


def _is_loopback_host(host: bytes | None) -> bool:
    """``localhost``, ``127.0.0.1``, ``[::1]``..., or ``0.0.0.0`` (which reaches this host
    too), with any port: names a page on another domain cannot take."""
    if not host:
        return False
    name = host.rsplit(b":", 1)[0] if not host.endswith(b"]") else host
    name = name.strip(b"[]").lower().rstrip(b".")
    if name in _LOOPBACK_NAMES or name.endswith(b".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified

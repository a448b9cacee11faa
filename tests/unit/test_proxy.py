"""The pass-through's request building and redirect rules, against a small real server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.raw_upstream import Server, answering, serving
from vllm_autoserve.errors import BadRequest
from vllm_autoserve.pools.base import Upstream
from vllm_autoserve.proxy import Forwarded, Proxy, _gateway_location, _target


async def forward(
    server: Server,
    headers: list[tuple[bytes, bytes]],
    query: bytes = b"",
    path: str = "/v1/chat/completions",
) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    proxy = Proxy()
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        await proxy.forward(
            Upstream(url=f"http://127.0.0.1:{server.port}", api_key="engine-key"),
            method="POST",
            path=path,
            query=query,
            headers=headers,
            body=b"{}",
            send=send,
            gone=gone,
            label="m",
            result=Forwarded(),
        )
    finally:
        await proxy.close()
    return sent


always_redirect = answering(
    b"HTTP/1.1 303 See Other\r\nLocation: /v1/chat/completions?__modal_function_call_id=fc-1"
    b"\r\nContent-Length: 0\r\n\r\n",
    repeat=True,
)


async def test_the_engine_key_replaces_the_gateways_and_hop_by_hop_headers_stay_behind() -> None:
    echo = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")

    async with serving(echo) as server:
        sent = await forward(
            server,
            [
                (b"authorization", b"Bearer gateway-key"),
                (b"connection", b"upgrade"),
                (b"x-request-id", b"abc"),
                (b"content-type", b"application/json"),
            ],
            query=b"a=1",
        )
    request = server.requests[0]
    assert request.startswith(b"POST /v1/chat/completions?a=1 HTTP/1.1\r\n")
    assert b"Authorization: Bearer engine-key\r\n" in request
    assert b"gateway-key" not in request and b"upgrade" not in request
    assert b"x-request-id: abc\r\n" in request and request.endswith(b"\r\n\r\n{}")
    assert sent[0]["status"] == 200
    assert (b"Connection", b"keep-alive") not in sent[0]["headers"]
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"ok"


@pytest.mark.parametrize(
    "headers, query",
    [([(b"x-evil", b"a\r\nX-Injected: 1")], b""), ([], b"a=1 HTTP/1.1\r\nX-Injected: 1")],
    ids=["header", "query"],
)
async def test_a_line_break_cannot_reach_the_upstream(
    headers: list[tuple[bytes, bytes]], query: bytes
) -> None:
    async with serving(always_redirect) as server:
        with pytest.raises(BadRequest):
            await forward(server, headers, query)
    assert server.requests == []


async def test_modal_redirects_are_followed_up_to_a_limit_then_passed_on() -> None:
    async with serving(always_redirect) as server:
        sent = await forward(server, [])
    assert sent[0]["status"] == 303
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert len(server.requests) == 21
    assert all(
        r.startswith(b"GET /v1/chat/completions?__modal_function_call_id=fc-1 ")
        for r in server.requests[1:]
    )


async def test_the_raw_path_and_query_go_upstream_byte_for_byte() -> None:
    # The app hands over the client's raw path decoded as latin-1 (ASGI's raw_path).
    raw_path, raw_query = b"/v1/x%20y/caf\xe9", b"q=%C3%A9&r=\xe9"
    async with serving(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as server:
        await forward(server, [], query=raw_query, path=raw_path.decode("latin-1"))
    assert server.requests[0].startswith(b"POST " + raw_path + b"?" + raw_query + b" HTTP/1.1\r\n")


async def test_headers_a_connection_header_names_stay_behind_both_ways() -> None:
    answer = answering(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: X-Hop\r\nX-Hop: engine\r\n"
        b"X-Kept: yes\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    async with serving(answer) as server:
        sent = await forward(
            server,
            [(b"connection", b"keep-alive, X-Private"), (b"x-private", b"secret"), (b"x-a", b"1")],
        )
    request = server.requests[0]
    assert b"secret" not in request and b"x-a: 1\r\n" in request
    names = [name.lower() for name, _ in sent[0]["headers"]]
    assert b"x-hop" not in names and b"x-kept" in names


async def test_a_304_with_a_content_length_reaches_the_client_without_a_body() -> None:
    # RFC 9110 lets a 304 carry the length of the representation it did not send; passed
    # on, the ASGI server would wait for that many bytes and break off the answer.
    answer = answering(b'HTTP/1.1 304 Not Modified\r\nETag: "a"\r\nContent-Length: 42\r\n\r\n')
    async with serving(answer) as server:
        sent = await forward(server, [])
    assert sent[0]["status"] == 304
    assert (b"ETag", b'"a"') in sent[0]["headers"]
    assert all(name.lower() != b"content-length" for name, _ in sent[0]["headers"])
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b""


@pytest.mark.parametrize(
    ("base", "location", "shown"),
    [
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123/v1/models?x=1", "/v1/models?x=1"),
        ("http://127.0.0.1:8123", "/v1/models", "/v1/models"),
        ("https://ws--engine.modal.run/base", "https://ws--engine.modal.run/base/v1/x", "/v1/x"),
        (
            "http://127.0.0.1:8123",
            "https://elsewhere.example/login",
            "https://elsewhere.example/login",
        ),
        ("http://127.0.0.1:8123", "http://127.0.0.1:99999/x", "http://127.0.0.1:99999/x"),
    ],
)
def test_redirects_to_the_engine_become_paths_on_the_gateway(
    base: str, location: str, shown: str
) -> None:
    assert _gateway_location(location.encode(), _target(base)) == shown.encode()

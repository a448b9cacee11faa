"""Limits on a request's head: what a client without a key can make the gateway hold."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from tests.support.gateway import TEST_KEY, fake_model, running_gateway

CONFIG = "[gateway]\nclient_header_seconds = 1\n" + fake_model(
    "slow", "--chunks", "6", "--chunk-delay", "0.4"
)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_an_endless_header_is_refused_before_it_ends() -> None:
    with running_gateway(CONFIG) as gw:
        sock = _connect(gw.url)
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            for _ in range(100):  # 100 MB, unless the gateway stops reading first
                sock.sendall(b"a" * 1_000_000)
                sent += 1
        except OSError:
            pass
        # Refused and closed while the client was still sending: never read, never kept.
        assert sent < 100, "the gateway read a 100 MB header to its end"
        answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_header_fields_too_large"
        # Large but sane headers still pass.
        status = httpx.get(gw.url + "/status", headers={**gw.headers, "X-Pad": "a" * 30_000})
        assert status.status_code == 200


def test_slow_heads_are_cut_but_slow_answers_and_bodies_are_not() -> None:
    with running_gateway(CONFIG) as gw:
        idle = _connect(gw.url)
        dripping = _connect(gw.url)
        dripping.sendall(b"GET /status HTTP/1.1\r\n")
        started = time.monotonic()
        for _ in range(3):
            time.sleep(0.5)
            try:
                dripping.sendall(b"X-A: b\r\n")
            except OSError:
                break
        assert _read_all(dripping).startswith(b"HTTP/1.1 408 ")
        assert _read_all(idle) == b""  # closed without a word
        assert time.monotonic() - started < 10

        # A stream that lasts longer than the head limit, on a kept-alive connection.
        with httpx.Client(base_url=gw.url, headers=gw.headers, timeout=60) as client:
            for _ in range(2):
                with client.stream(
                    "POST",
                    "/v1/chat/completions",
                    json={"model": "slow", "messages": [], "stream": True},
                ) as response:
                    assert response.status_code == 200
                    assert b"data: [DONE]" in response.read()

        # A body slower than the head limit is the body's business, not the head's.
        body = b'{"model_path": "slow"}'
        upload = _connect(gw.url)
        upload.sendall(
            b"POST /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (TEST_KEY.encode(), len(body))
        )
        time.sleep(1.5)
        upload.sendall(body)
        answer = _read_all(upload)  # read whole, and refused: /status takes GET
        assert answer.startswith(b"HTTP/1.1 405 ") and b"\r\nallow: get\r\n" in answer.lower()


def test_what_the_gateway_cannot_parse_or_route_is_answered_in_openai_format() -> None:
    with running_gateway(CONFIG) as gw:
        for broken in (
            b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"GET /status HTTP/1.1\nHost: x\n\n",  # bare line feeds
            b"GET /st\xffatus HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            sock = _connect(gw.url)
            sock.sendall(broken)
            answer = _read_all(sock)
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
            head, body = answer.split(b"\r\n\r\n", 1)
            assert b"content-type: application/json" in head.lower()
            assert json.loads(body)["error"]["type"] == "invalid_request_error"
        # A trailing slash is another route, not a redirect to one built from the Host header.
        for path in ("/up/", "/status/", "/metrics/"):
            answer = httpx.get(gw.url + path, headers={**gw.headers, "Host": "evil.example"})
            assert answer.status_code == 404 and "location" not in answer.headers
            assert answer.json()["error"]["code"] == "not_found"
        # A client whose base URL lacks /v1 is told so.
        sdk = openai.OpenAI(base_url=gw.url, api_key=gw.api_key, max_retries=0)
        with pytest.raises(openai.NotFoundError, match="does the client's base URL end in /v1"):
            sdk.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}])

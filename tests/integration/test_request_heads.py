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


def test_a_body_answered_early_cannot_hold_the_connection() -> None:
    with running_gateway(CONFIG) as gw:
        sock = _connect(gw.url)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n{"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")  # no key: answered at once
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 10 and not closed:
            time.sleep(0.3)
            try:
                sock.sendall(b" ")  # a byte now and then
                sock.settimeout(0.01)
                closed = sock.recv(1) == b""
            except TimeoutError:
                pass
            except OSError:
                closed = True
        # Closed after client_header_seconds (1 s here), not kept for the whole 100 MB.
        assert closed and time.monotonic() - started < 5


def test_a_pipelined_body_slower_than_the_head_limit_is_not_cut() -> None:
    # The early-answer limit is for a body whose request was answered, not the next one's.
    with running_gateway(CONFIG) as gw:
        body = json.dumps({"model": "slow", "messages": [], "max_tokens": 2}).encode()
        sock = _connect(gw.url)
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + gw.api_key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for piece in (body[:5], body[5:10], body[10:]):  # over 2 s: twice the head limit
            time.sleep(0.7)
            sock.sendall(piece)
        assert [status for status, _ in _answers(_read_all(sock))] == [200, 200]


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
        # A CONNECT is refused by the route, as any other method it does not take.
        for connect in (b"", b"Connection: Upgrade\r\nUpgrade: h2c\r\n"):
            sock = _connect(gw.url)
            sock.sendall(b"CONNECT / HTTP/1.1\r\nHost: x\r\n" + connect + b"\r\n")
            assert _read_all(sock).startswith(b"HTTP/1.1 401 ")
        # A pipelined request's malformed body: the request before it is answered, then the
        # connection closes (an answer to the faulty one would be read as the first one's).
        bad_body = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + gw.api_key.encode() + b"\r\n\r\nzz\r\n"
        )
        for first in (
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + gw.api_key.encode()
            + b"\r\n\r\n",
        ):
            sock = _connect(gw.url)
            sock.sendall(first + bad_body)
            assert [status for status, _ in _answers(_read_all(sock))] == [200]
        # A body answered early (no key: 401) and malformed after: one answer, not two.
        sock = _connect(gw.url)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n5\r\nhello\r\n"
        )
        time.sleep(0.3)  # answered by now
        sock.sendall(b"zz\r\n")
        assert [status for status, _ in _answers(_read_all(sock))] == [401]
        # A body that cannot be parsed is answered too, not met with a closed connection.
        sock = _connect(gw.url)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + gw.api_key.encode() + b"\r\n\r\nzz\r\n"
        )
        answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == (
            "invalid_request_error"
        )
        # A trailing slash is another route, not a redirect to one built from the Host header.
        for path in ("/up/", "/status/", "/metrics/"):
            answer = httpx.get(gw.url + path, headers={**gw.headers, "Host": "evil.example"})
            assert answer.status_code == 404 and "location" not in answer.headers
            assert answer.json()["error"]["code"] == "not_found"
        # A body that is not JSON does not hide the route's own answer.
        form = httpx.post(
            gw.url + "/audio/transcriptions",
            headers=gw.headers,
            data={"model": "slow"},
            files={"file": ("a.wav", b"RIFF")},
        )
        assert form.status_code == 404
        assert "does the client's base URL end in /v1" in form.json()["error"]["message"]
        posted = httpx.post(gw.url + "/status", headers=gw.headers, content=b"a=b")
        assert posted.status_code == 405 and posted.headers["allow"] == "GET"
        # A client whose base URL lacks /v1 is told so.
        sdk = openai.OpenAI(base_url=gw.url, api_key=gw.api_key, max_retries=0)
        with pytest.raises(openai.NotFoundError, match="does the client's base URL end in /v1"):
            sdk.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}])


def _answers(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each answer on a connection, read to its end."""
    answers = []
    while raw:
        head, raw = raw.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        answers.append((status, raw[:length]))
        raw = raw[length:]
    return answers


def test_a_request_asking_to_upgrade_to_http2_is_served_as_http11() -> None:
    # Java's HTTP client asks for h2c on every plain-HTTP request, its body included.
    upgrade = (
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    )
    with running_gateway(CONFIG) as gw:
        auth = b"Authorization: Bearer " + gw.api_key.encode() + b"\r\n"
        body = json.dumps({"model": "slow", "messages": [], "max_tokens": 2}).encode()
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        for framing, payload, pause in (
            (b"Content-Length: %d\r\n" % len(body), body, 0.2),  # the body in a later read
            (b"Content-Length: %d\r\n" % len(body), body, 0),  # in the head's read
            (b"Transfer-Encoding: chunked\r\n", chunked, 0.2),
        ):
            sock = _connect(gw.url)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + upgrade
                + auth
                + b"Content-Type: application/json\r\n"
                + framing
                + b"\r\n"
            )
            time.sleep(pause)
            sock.sendall(payload + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            (chat_status, chat), (health_status, _) = _answers(_read_all(sock))
            assert chat_status == 200, chat
            assert len(json.loads(chat)["choices"][0]["message"]["content"].split()) == 2
            assert health_status == 200

        # HTTP/1.0 (its connection closes after the answer) with more bytes after it.
        sock = _connect(gw.url)
        sock.sendall(b"GET /health HTTP/1.0\r\n" + upgrade + b"\r\nGET /health HTTP/1.0\r\n\r\n")
        assert [status for status, _ in _answers(_read_all(sock))] == [200]

        # A body that reads like a request stays the body: one answer, no second request.
        smuggled = b"GET /status HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
        sock = _connect(gw.url)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + upgrade
            + auth
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
        )
        time.sleep(0.2)
        sock.sendall(smuggled)
        sock.shutdown(socket.SHUT_WR)
        answers = _answers(_read_all(sock))
        assert [status for status, _ in answers] == [400], answers
        assert b"not valid JSON" in answers[0][1]


def test_a_body_that_stops_arriving_is_cut_but_a_slow_steady_one_is_not() -> None:
    """A client with a key that sent part of a body and then nothing (or vanished without
    closing) held its connection for good: only the head had a time limit."""
    config = CONFIG.replace("[gateway]\n", "[gateway]\nclient_body_seconds = 1\n")
    with running_gateway(config) as gw:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n")
        stalled = _connect(gw.url)
        stalled.sendall(head % (gw.api_key.encode(), 100) + b'{"model":')
        started = time.monotonic()
        answer = _read_all(stalled)
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer
        assert time.monotonic() - started < 5

        body = json.dumps({"model": "slow", "messages": [], "max_tokens": 2}).encode()
        steady = _connect(gw.url)
        steady.sendall(head % (gw.api_key.encode(), len(body)))
        for byte in range(0, len(body), 8):  # 0.4 s apart: over 2 s in all, twice the limit
            time.sleep(0.4)
            steady.sendall(body[byte : byte + 8])
        assert _answers(_read_all(steady))[0][0] == 200

"""Auth on every route, bad input answered in OpenAI's format, and pass-through fidelity."""

from __future__ import annotations

import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trustme

from tests.support.fake_engine import FAKE_ENGINE
from tests.support.gateway import TEST_KEY, fake_model, free_port, running_gateway
from tests.support.waiting import engine_port, standalone_fake_engine, wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}]}

PROTECTED = [
    ("POST", "/up", {"model_path": "m"}),
    ("POST", "/v1/up", {"model_path": "m"}),
    ("POST", "/down", {"model_path": "m"}),
    ("POST", "/v1/down", {"model_path": "m"}),
    ("GET", "/status", None),
    ("GET", "/v1/status", None),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/m", None),
    ("GET", "/metrics", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("POST", "/v1/chat/completions", {"model": "m", **CHAT}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "x"}),
    ("POST", "/v1/embeddings", {"model": "m", "input": "x"}),
    ("POST", "/v1/responses", {"model": "m", "input": "x"}),
    ("POST", "/tokenize", {"model": "m", "prompt": "x"}),
    ("GET", "/nonexistent", None),
]
BAD_AUTH = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Basic {TEST_KEY}"},
    {"Authorization": "Bearer"},
    {"Authorization": f"Bearer {TEST_KEY[:-1]}"},
    {"Authorization": f"Bearer {TEST_KEY}x"},
    {"Authorization": TEST_KEY},
    {"x-api-key": "wrong"},
    {"x-api-key": f"Bearer {TEST_KEY}"},
]


@pytest.fixture(scope="module")
def gateway():  # type: ignore[no-untyped-def]
    cfg = "[gateway]\nmax_body_bytes = 100000\n" + fake_model(
        "m", "--chunks", "3", extra='aliases = ["m-alias"]'
    )
    with running_gateway(cfg) as gw:
        yield gw


def test_every_route_but_health_needs_the_key(gateway) -> None:  # type: ignore[no-untyped-def]
    for method, path, body in PROTECTED:
        for headers in BAD_AUTH:
            response = httpx.request(method, gateway.url + path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(gateway.url + "/health").status_code == 200
    # Nothing was started by the refused requests.
    assert gateway.status()["m"]["state"] == "cold"


def test_the_gateway_own_answers_have_a_length_for_http_1_0_clients(gateway) -> None:  # type: ignore[no-untyped-def]
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"GET /status HTTP/1.0\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401") and b"transfer-encoding" not in head.lower()
    assert b"content-length: %d" % len(body) in head.lower()
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_several_keys_rotate() -> None:
    with running_gateway(fake_model("m"), key="old-key,new-key") as gw:
        for key in ("old-key", "new-key"):
            response = httpx.get(gw.url + "/status", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200
        bad = httpx.get(gw.url + "/status", headers={"Authorization": "Bearer old-key,new-key"})
        assert bad.status_code == 401


BAD_BODIES = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"42", 400, None),
    (b"", 400, None),
    (json.dumps(CHAT).encode(), 400, "missing_model"),
    (json.dumps({"model": 7, **CHAT}).encode(), 400, None),
    (json.dumps({"model": None, **CHAT}).encode(), 400, "missing_model"),
    (json.dumps({"model": "m", "stream": "sometimes", **CHAT}).encode(), 400, None),
    (json.dumps({"model": "../../etc/passwd"}).encode(), 400, "invalid_model"),
    (json.dumps({"model": "--trust-remote-code"}).encode(), 400, "invalid_model"),
    (json.dumps({"model": "-x/y"}).encode(), 400, "invalid_model"),
    (json.dumps({"model": "org/na me"}).encode(), 400, "invalid_model"),
    (json.dumps({"model": " org/name"}).encode(), 400, "invalid_model"),
    (json.dumps({"model": "org/name\r\nX-Injected: 1"}).encode(), 400, "invalid_model"),
    (json.dumps({"model": "a" * 20000}).encode(), 400, "invalid_model"),
    (json.dumps({"model": "a/b/c"}).encode(), 400, "invalid_model"),
    (json.dumps({"model": ""}).encode(), 400, None),
    (b'{"model": "m", "x": "' + b"a" * 200_000 + b'"}', 413, "payload_too_large"),
    (b"[" * 100_000 + b"]" * 100_000, 413, None),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_BODIES)
def test_bad_input_gets_an_openai_error_and_changes_nothing(gateway, body, status, code) -> None:  # type: ignore[no-untyped-def]
    with gateway.client() as c:
        response = c.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"]
        if code:
            assert error["code"] == code
        assert TEST_KEY not in response.text
        statuses = gateway.status()
        assert list(statuses) == ["m"] and statuses["m"]["state"] == "cold"


def test_bad_up_and_down_bodies(gateway) -> None:  # type: ignore[no-untyped-def]
    with gateway.client() as c:
        for body in (
            b"{",
            b"[]",
            b"{}",
            b'{"model_path": 5}',
            b'{"model_path": "m", "wait": -1}',
            b'{"model_path": "m", "wait": "soon"}',
            b'{"model_path": "../x"}',
            b'{"model_path": "m", "wait": "inf"}',
            b'{"model_path": "m", "min_containers": true}',
        ):
            for path in ("/up", "/down"):
                response = c.post(path, content=body, headers={"Content-Type": "application/json"})
                assert response.status_code == 400, (path, body, response.text)
                assert "error" in response.json()
        # Sent the way `curl -d` sends it, a broken body is still said to be broken JSON.
        for body in (b"{bad", b'{"model_path": "m", "wait": NaN}', b"[" * 2000):
            response = c.post("/up", content=body)
            assert response.status_code == 400
            assert "not valid JSON" in response.json()["error"]["message"], response.text
        assert gateway.status()["m"]["state"] == "cold"


def test_inference_routes_take_post_only(gateway) -> None:  # type: ignore[no-untyped-def]
    with gateway.client() as c:
        for method in ("GET", "PUT", "DELETE"):
            for path in ("/v1/chat/completions", "/tokenize"):
                response = c.request(method, path, json={"model": "m", **CHAT})
                assert response.status_code == 405, (method, path, response.text)
                assert response.json()["error"]["code"] == "method_not_allowed"
                assert response.headers["allow"] == "POST"
        assert c.post("/health").status_code == 405
        assert c.get("/health").status_code == 200 and c.head("/health").status_code == 200
        assert gateway.status()["m"]["state"] == "cold"  # nothing was started for them


def test_a_client_default_model_name_is_a_quick_404_and_starts_nothing(gateway) -> None:  # type: ignore[no-untyped-def]
    # What SDKs and tools send when nobody set a model: not a model to start.
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key)
    with pytest.raises(openai.NotFoundError, match="full Hugging Face repo id"):
        sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])  # type: ignore[arg-type]
    assert "gpt-4o-mini" not in gateway.status()


def test_unlisted_model_is_404_when_only_listed_models_are_allowed() -> None:
    cfg = "[gateway]\nallow_unlisted = false\n" + fake_model("m")
    with running_gateway(cfg) as gw, gw.client() as c:
        response = c.post("/v1/chat/completions", json={"model": "org/other", **CHAT})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        assert c.post("/up", json={"model_path": "org/other"}).status_code == 404
        assert list(gw.status()) == ["m"]


def test_upstream_errors_pass_through_unchanged(gateway) -> None:  # type: ignore[no-untyped-def]
    with gateway.client() as c:
        response = c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 10**9, **CHAT})
        assert response.status_code == 400
        assert response.json()["error"] == {
            "message": "max_tokens is too large",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": 400,
        }


def test_gateway_key_is_never_forwarded_and_engine_requires_its_own(gateway) -> None:  # type: ignore[no-untyped-def]
    with gateway.client() as c:
        assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 200
        assert c.post("/v1/embeddings", json={"model": "m", "input": "x"}).status_code == 200
    port = engine_port(gateway)
    stats = httpx.get(f"http://127.0.0.1:{port}/stats").json()
    assert stats["env_gateway_auth"] is None
    assert stats["auth_headers"]
    assert all(TEST_KEY not in h and h.startswith("Bearer ") for h in stats["auth_headers"])
    # Without the engine's key nothing on the host can use the engine.
    direct = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": "m", **CHAT},
        headers={"Authorization": f"Bearer {TEST_KEY}"},
    )
    assert direct.status_code == 401


def test_the_key_as_x_api_key_is_taken_and_not_forwarded(gateway) -> None:  # type: ignore[no-untyped-def]
    # Anthropic's clients send the key as x-api-key; it must not reach the engine either way.
    chat = {"model": "m", **CHAT}
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        assert (
            c.post("/v1/chat/completions", json=chat, headers={"x-api-key": TEST_KEY}).status_code
            == 200
        )
        both = {"Authorization": f"Bearer {TEST_KEY}", "x-api-key": "secret-for-someone-else"}
        assert c.post("/v1/chat/completions", json=chat, headers=both).status_code == 200
    stats = httpx.get(f"http://127.0.0.1:{engine_port(gateway)}/stats").json()
    assert stats["x_api_keys"] == []


@pytest.fixture
def direct_engine() -> Iterator[str]:
    with standalone_fake_engine("--model", "up", "--chunks", "8", "--chunk-delay", "0.25") as url:
        yield url


def test_streams_pass_through_byte_for_byte_and_chunk_by_chunk(direct_engine) -> None:  # type: ignore[no-untyped-def]
    cfg = f'[models."up"]\nurl = "{direct_engine}"\n'
    body = {"model": "up", "stream": True, **CHAT}
    with httpx.Client(timeout=30) as plain:
        with plain.stream("POST", direct_engine + "/v1/chat/completions", json=body) as r:
            direct = b"".join(r.iter_raw())
    with running_gateway(cfg) as gw, gw.client() as c:
        arrivals: list[tuple[float, bytes]] = []
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for chunk in r.iter_raw():
                arrivals.append((time.monotonic(), chunk))
    through = b"".join(chunk for _, chunk in arrivals)
    assert through == direct
    # 8 chunks 0.25 s apart: the first must arrive long before the last (no buffering).
    assert len(arrivals) >= 6
    assert arrivals[-1][0] - arrivals[0][0] > 1.0


def test_modal_style_303_from_the_upstream_is_followed_not_passed_on() -> None:
    cfg = fake_model("slow-call", "--modal-redirect")
    with running_gateway(cfg) as gw, gw.client() as c:
        response = c.post("/v1/chat/completions", json={"model": "slow-call", **CHAT})
        assert response.status_code == 200
        assert response.json()["id"] == "cmpl-redirected"


def test_https_static_upstream_gets_the_engine_key_and_streams(tmp_path: Path) -> None:
    """`url = "https://..."` (a remote engine, or Modal's web URLs): TLS verified against the
    system's trusted CAs (here SSL_CERT_FILE), SNI and Host by name, the engine's own key."""
    ca = trustme.CA()
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(tmp_path / "tls.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    trust = {"SSL_CERT_FILE": str(tmp_path / "ca.pem")}
    port = free_port()
    engine = subprocess.Popen(
        [
            sys.executable,
            str(FAKE_ENGINE),
            "--port",
            str(port),
            "--model",
            "tls",
            "--tls-cert",
            str(tmp_path / "tls.pem"),
        ],
        env={**os.environ, "VLLM_API_KEY": "engine-key"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"https://localhost:{port}"
    try:
        verify = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        wait_for(lambda: _answers(url + "/health", verify), timeout=20, interval=0.05)
        cfg = f'[models."tls"]\nurl = "{url}"\napi_key = "engine-key"\n'
        with running_gateway(cfg, env=trust) as gw, gw.client() as c:
            answer = c.post("/v1/chat/completions", json={"model": "tls", **CHAT})
            assert answer.status_code == 200, answer.text
            with c.stream(
                "POST", "/v1/chat/completions", json={"model": "tls", "stream": True, **CHAT}
            ) as r:
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and len(events) > 2
        # Without the CA the upstream is not trusted: a clear failure, not a hang.
        with running_gateway(cfg + "startup_seconds = 4\n") as untrusting, untrusting.client() as c:
            refused = c.post("/v1/chat/completions", json={"model": "tls", **CHAT})
            assert refused.status_code == 503
            assert "CERTIFICATE_VERIFY_FAILED" in refused.json()["error"]["message"]
    finally:
        engine.terminate()
        engine.wait(10)


def _answers(url: str, verify: ssl.SSLContext) -> bool:
    try:
        return httpx.get(url, verify=verify, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("model", ["m", "m-alias"])
def test_audio_transcription_with_the_official_sdk_is_routed_by_its_form_field(
    gateway,  # type: ignore[no-untyped-def]
    model: str,
) -> None:
    # The SDK sends the form's `model` first and the other fields after it: the gateway must
    # read that one field, not run into the next; an alias goes upstream as the model's name.
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key, max_retries=0)
    audio = b"RIFF" + bytes(range(256)) * 40
    result = client.audio.transcriptions.create(
        model=model, file=("hello.wav", audio, "audio/wav"), language="en"
    )
    assert result.text == f"m heard {len(audio)} bytes in en"


def test_an_alias_in_a_deeply_nested_body_is_a_400_not_a_crash(gateway) -> None:  # type: ignore[no-untyped-def]
    deep = "[" * 1020 + "]" * 1020  # orjson reads it; a recursive parser would not
    # A second "model" key makes the gateway parse the body whole to rename the alias.
    body = '{"model": "m-alias", "messages": [], "meta": {"model": "x"}, "extra": ' + deep + "}"
    with gateway.client() as c:
        response = c.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert c.post("/v1/chat/completions", json={"model": "m-alias", **CHAT}).status_code == 200


def test_a_json_body_that_starts_with_a_byte_order_mark_is_served(gateway) -> None:  # type: ignore[no-untyped-def]
    """Some Windows clients write a UTF-8 BOM before JSON; vLLM reads past it, so must we."""
    body = b"\xef\xbb\xbf" + json.dumps({"model": "m-alias", **CHAT}).encode()
    with gateway.client() as c:
        response = c.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "m"  # the alias replaced, in a body without the mark


class _Hub(http.server.BaseHTTPRequestHandler):
    """The Hugging Face Hub's model API, knowing one model."""

    asked: list[str] = []

    def do_GET(self) -> None:
        self.asked.append(self.path)
        known = self.path == "/api/models/known/model"
        body = b'{"id": "known/model"}' if known else b'{"error": "Repository not found"}'
        self.send_response(200 if known else 404)
        if not known:
            self.send_header("X-Error-Code", "RepoNotFound")  # as the Hub says it
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_an_unlisted_model_the_hub_does_not_know_is_a_quick_404_and_starts_nothing() -> None:
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_HUB_OFFLINE": ""}
    try:
        cfg = "[gateway]\nhold_seconds = 0.2\n" + fake_model("m")
        with running_gateway(cfg, env=env) as gw, gw.client() as c:
            for _ in range(2):  # the second answer comes from what the Hub said first
                typo = c.post("/v1/chat/completions", json={"model": "nown/model", **CHAT})
                assert typo.status_code == 404, typo.text
                assert typo.json()["error"]["code"] == "model_not_found"
                assert "Hugging Face Hub" in typo.json()["error"]["message"]
            up = c.post("/up", json={"model_path": "nown/model"})
            assert up.status_code == 404
            assert "nown/model" not in gw.status() and not gw.engine_pids()
            assert _Hub.asked.count("/api/models/nown/model") == 1
            # A model the Hub knows goes on to its engine (which here cannot start: no vLLM
            # for it, or no network), and a configured one is never asked about.
            known = c.post("/v1/chat/completions", json={"model": "known/model", **CHAT})
            assert known.status_code == 503, known.text
            assert "known/model" in gw.status()
            c.post("/down", json={"model_path": "known/model"})
            assert c.post("/up", json={"model_path": "m", "wait": 15}).json()["status"] == "healthy"
            assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 200
            assert "/api/models/m" not in _Hub.asked
    finally:
        hub.shutdown()


def test_anthropic_clients_get_the_gateways_errors_in_anthropics_shape() -> None:
    """vLLM serves Anthropic's /v1/messages; the Anthropic SDK reads only its own error shape,
    and only an SSE event named ``error``."""
    cfg = fake_model("m") + fake_model("dying", "--die-mid-stream", "2", "--chunks", "5")
    messages = {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    with running_gateway(cfg) as gw, gw.client() as c:
        unknown = c.post("/v1/messages", json={"model": "nobody", **messages})
        assert unknown.status_code == 404
        assert unknown.json()["type"] == "error"
        assert unknown.json()["error"]["type"] == "not_found_error"
        refused = httpx.post(gw.url + "/v1/messages", json={"model": "m", **messages},
                             headers={"x-api-key": "wrong"})
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
        assert "x-api-key" in refused.json()["error"]["message"]
        assert c.post("/up", json={"model_path": "dying", "wait": 15}).json()["status"] == "healthy"
        with c.stream("POST", "/v1/messages",
                      json={"model": "dying", "stream": True, **messages}) as response:
            body = b""
            with pytest.raises(httpx.RemoteProtocolError):  # cut: no final chunk
                for chunk in response.iter_raw():
                    body += chunk
        last = body.rstrip(b"\n").split(b"\n\n")[-1]
        assert last.startswith(b"event: error\ndata: ")
        event = json.loads(last.split(b"data: ", 1)[1])
        assert event["type"] == "error" and event["error"]["type"] == "api_error"
        # OpenAI's routes keep OpenAI's shape.
        assert c.post("/v1/chat/completions", json={"model": "nobody", **CHAT}).json()["error"][
            "code"
        ] == "model_not_found"

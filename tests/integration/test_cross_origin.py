"""Requests from web pages: CORS for configured origins; a keyless gateway refuses others."""

from __future__ import annotations

import httpx

from tests.support.gateway import TEST_KEY, fake_model, running_gateway

APP = "http://app.test:3000"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
KEY = {"Authorization": f"Bearer {TEST_KEY}"}


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(
        url + "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )


def test_a_listed_origin_gets_cors_headers_on_every_answer() -> None:
    config = '[gateway]\ncors_origins = ["http://APP.test:3000"]\n' + fake_model("m")
    with running_gateway(config) as gw:
        preflight = _preflight(gw.url, APP)
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == APP
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert (
            preflight.headers["access-control-allow-headers"]
            == "authorization, content-type, x-stainless-os"
        )

        page = {"Origin": APP, **KEY}
        answer = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=page, timeout=60)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == APP
        assert "Origin" in answer.headers["vary"]
        with httpx.stream(
            "POST", gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=page
        ) as stream:
            assert stream.headers["access-control-allow-origin"] == APP
            assert b"data: [DONE]" in stream.read()
        status = httpx.get(gw.url + "/status", headers=page)
        assert status.headers["access-control-allow-origin"] == APP
        # The page can read the gateway's own errors too.
        refused = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers={"Origin": APP})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == APP

        # Another page: refused preflight, and no header that would let it read an answer.
        other = _preflight(gw.url, "http://other.test")
        assert other.status_code == 403
        assert other.json()["error"]["code"] == "forbidden"
        assert "access-control-allow-origin" not in other.headers
        unlisted = httpx.get(gw.url + "/v1/models", headers={"Origin": "http://other.test", **KEY})
        assert unlisted.status_code == 200
        assert "access-control-allow-origin" not in unlisted.headers


def test_no_origin_is_allowed_by_default_and_star_allows_any() -> None:
    with running_gateway(fake_model("m")) as gw:
        assert _preflight(gw.url, APP).status_code == 403
        answer = httpx.get(gw.url + "/v1/models", headers={"Origin": APP, **KEY})
        assert "access-control-allow-origin" not in answer.headers
    with running_gateway('[gateway]\ncors_origins = ["*"]\n' + fake_model("m")) as gw:
        assert _preflight(gw.url, APP).headers["access-control-allow-origin"] == "*"
        answer = httpx.get(gw.url + "/v1/models", headers={"Origin": APP, **KEY})
        assert answer.headers["access-control-allow-origin"] == "*"


def test_a_keyless_gateway_refuses_other_pages_and_other_host_names() -> None:
    with running_gateway(fake_model("m"), key=None) as gw:
        # What any page the user opens can send without asking: a "simple" POST.
        forged = httpx.post(
            gw.url + "/v1/chat/completions",
            content=b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
            headers={"Origin": "http://evil.test", "Content-Type": "text/plain"},
        )
        assert forged.status_code == 403
        assert "cors_origins" in forged.json()["error"]["message"]
        # DNS rebinding: a page on a name that resolves to 127.0.0.1 is "same-origin".
        port = gw.url.rsplit(":", 1)[1]
        rebound = httpx.post(
            gw.url + "/v1/chat/completions",
            json=CHAT,
            headers={"Host": f"evil.test:{port}", "Origin": f"http://evil.test:{port}"},
        )
        assert rebound.status_code == 403
        assert gw.status()["m"]["state"] == "cold"  # nothing was started

        # Local clients and the gateway's own pages (/docs) are served.
        assert httpx.get(gw.url + "/docs", headers={"Origin": gw.url}).status_code == 200
        local = httpx.get(f"http://localhost:{port}/v1/models")
        assert local.status_code == 200
        for host in ("localhost.", "0.0.0.0", "[::ffff:127.0.0.1]", "[::1]"):
            named = httpx.get(gw.url + "/v1/models", headers={"Host": f"{host}:{port}"})
            assert named.status_code == 200, host
        answer = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=60)
        assert answer.status_code == 200

"""The Hub check refuses only what the Hub says does not exist; anything else starts."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import free_port
from vllm_autoserve.hub import HubCheck


class _Hub(http.server.BaseHTTPRequestHandler):
    """The Hub's model API as huggingface_hub reads it: one private repo, reached with one
    token; a repo it does not show is 401 RepoNotFound; a bad token is named as such."""

    def do_GET(self) -> None:
        token = self.headers.get("Authorization")
        if token == "Bearer expired":
            self._answer(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        elif self.path == "/api/models/me/private" and token == "Bearer secret-token":
            self._answer(200, {})
        elif self.path == "/api/models/no/api-here":  # a mirror without the model API
            self._answer(404, {})
        else:
            self._answer(401, {"X-Error-Code": "RepoNotFound"})

    def _answer(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no token file, an empty cache
    yield tmp_path
    server.shutdown()


def missing(name: str) -> bool:
    async def ask() -> bool:
        check = HubCheck()
        try:
            return await check.missing(name)
        finally:
            await check.close()

    return asyncio.run(ask())


def test_a_private_repo_is_found_with_the_token_hf_auth_login_saved(hub: Path) -> None:
    assert missing("me/private") is True  # no token: the Hub does not show it
    (hub / "token").write_text("secret-token\n")  # as `hf auth login` saves it
    assert missing("me/private") is False
    assert missing("me/typo") is True


def test_a_bad_token_or_a_hub_without_the_api_refuses_nothing(
    hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert missing("no/api-here") is False
    monkeypatch.setenv("HF_TOKEN", "expired")
    assert missing("me/typo") is False  # the engine will say what is wrong with the token


def test_an_unreachable_hub_refuses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert missing("some/model") is False


def test_offline_or_cached_models_are_not_asked_about(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(HubCheck, "_ask", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert missing("some/model") is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--some--model").mkdir()
    assert missing("some/model") is False

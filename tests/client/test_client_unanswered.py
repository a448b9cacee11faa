"""A gateway that takes connections and never answers (a hung process, a wrong port behind a
proxy): the client and the CLI give up as the plain SDK would, bounded by ``timeout`` and
``max_retries``, not by the long waits meant for cold starts."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator

import httpx2
import openai
import pytest

from vllm_autoserve_client import AutoserveClient, ModelStartTimeout, cli


class SilentServer:
    """Accepts connections and reads what they send; answers nothing."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.received: list[bytearray] = []  # per connection
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self._open.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        received = bytearray()
        self.received.append(received)
        with connection:
            while data := connection.recv(65536):
                received += data

    def up_calls(self) -> list[bytes]:
        return [bytes(data) for data in self.received if data.startswith(b"POST /v1/up ")]

    def close(self) -> None:
        self.listener.close()
        for connection in self._open:
            connection.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@pytest.mark.parametrize("max_retries", [0, 2])
def test_the_client_fails_as_the_sdk_would(silent: SilentServer, max_retries: int) -> None:
    client = AutoserveClient(
        model="m", base_url=silent.url, api_key="k", timeout=0.5, max_retries=max_retries
    )
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(messages=[{"role": "user", "content": "hi"}])
    calls = silent.up_calls()
    assert len(calls) == max_retries + 1  # as the SDK tries a request
    # Each asked for an answer at once: nothing was heard from the gateway to long-poll.
    assert all(re.search(rb'"wait": ?0(\.0)?[,}]', call) for call in calls), calls


def test_a_wait_that_never_got_an_answer_says_so(
    silent: SilentServer, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["--base-url", silent.url, "--api-key", "k", "up", "m", "--timeout", "0.5"])
    assert status == 1
    assert "the gateway did not answer /up within" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["status"], ["models"], ["down", "m"]])
def test_quick_commands_give_up_after_their_timeout(
    silent: SilentServer, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    argv = ["--base-url", silent.url, "--api-key", "k", *command, "--timeout", "0.5"]
    assert cli.main(argv) == 1
    assert "did not answer in time" in capsys.readouterr().err


def test_a_gateway_that_answers_only_errors_is_not_said_to_be_unreachable() -> None:
    failing = httpx2.MockTransport(lambda _: httpx2.Response(502, json={"error": {}}))
    client = AutoserveClient(
        model="m",
        base_url="http://gw.test/v1",
        api_key="k",
        up_timeout=0.5,
        http_client=httpx2.Client(transport=failing),
    )
    with pytest.raises(ModelStartTimeout) as info:
        client.wait_until_ready()
    assert "did not answer" not in str(info.value)

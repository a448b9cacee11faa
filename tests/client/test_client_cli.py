"""The ``autoserve`` command against the in-memory gateway (and a closed port)."""

from __future__ import annotations

import io
from typing import Any

import httpx2
import pytest

from vllm_autoserve_client import AutoserveClient, cli

from .fake_gateway import API_KEY, BASE_URL, FakeGateway, pool_json


@pytest.fixture(autouse=True)
def _wide_and_wired(monkeypatch: pytest.MonkeyPatch, gateway: FakeGateway) -> None:
    monkeypatch.setenv("COLUMNS", "200")

    def client(**kwargs: Any) -> AutoserveClient:
        if kwargs.get("base_url") != "http://127.0.0.1:9":
            kwargs["http_client"] = httpx2.Client(transport=gateway.transport())
        return AutoserveClient(**kwargs)

    monkeypatch.setattr(cli, "AutoserveClient", client)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(["--base-url", BASE_URL, "--api-key", API_KEY, *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_up_waits_until_healthy(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    gateway.start_seconds = 0.3
    status, out, err = run(capsys, "up", "Qwen/Qwen3-0.6B")
    assert status == 0, err
    assert "Qwen/Qwen3-0.6B is healthy" in out
    assert gateway.bodies("/v1/up")[0]["model_path"] == "Qwen/Qwen3-0.6B"
    # Not a terminal (a CI log): no spinner, but a line per state, so that it is no hang.
    assert "Qwen/Qwen3-0.6B: starting (0 s)" in err.splitlines()


def test_chat_reads_its_prompt_from_stdin(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Summarise this\nand that\n"))
    status, _, err = run(capsys, "chat", "m")
    assert status == 0, err
    body = gateway.bodies("/v1/chat/completions")[0]
    assert body["messages"] == [{"role": "user", "content": "Summarise this\nand that\n"}]


def test_chat_refuses_an_empty_prompt(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # `autoserve chat m < /dev/null`
    status, _, err = run(capsys, "chat", "m")
    assert status == 1 and "the prompt is empty" in err
    assert gateway.bodies("/v1/chat/completions") == []


@pytest.mark.parametrize("command", [["status"], ["down", "m"], ["up", "m"]])
def test_a_server_that_is_no_gateway_is_told_apart(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    def vllm_itself(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(404, json={"detail": "Not Found"})  # vLLM's 404 for /status

    def client(**kwargs: Any) -> AutoserveClient:
        transport = httpx2.MockTransport(vllm_itself)
        return AutoserveClient(**kwargs, http_client=httpx2.Client(transport=transport))

    monkeypatch.setattr(cli, "AutoserveClient", client)
    status, _, err = run(capsys, *command)
    assert status == 1
    assert "is the base URL that of a vLLM Autoserve gateway?" in err


def test_up_of_a_failed_model(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    gateway.fail = "[m] engine exited: boom message\nmore log"
    status, out, err = run(capsys, "up", "m")
    assert status == 1
    assert "boom message" in err
    assert "Traceback" not in out + err


def test_up_times_out(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    gateway.pending_forever = True
    status, _, err = run(capsys, "up", "m", "--timeout", "0.3")
    assert status == 1
    assert "[m] not healthy after waiting" in err


def test_status_table(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "status")
    assert status == 0, err
    for heading in ("model", "state", "since", "last request", "in flight", "engines", "gpus"):
        assert heading in out
    assert "healthy" in out and "1m ago" in out


def test_status_says_which_starts_wait_for_a_slot_and_which_models_are_pinned(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.pools = [pool_json("queued-model", "starting"), pool_json("pinned-model", "healthy"),
                     pool_json("leaving-model", "healthy")]
    gateway.pools[0]["waiting_for_slot"] = True
    gateway.pools[1]["pinned"] = True
    gateway.pools[2]["making_way"] = True
    status, out, err = run(capsys, "status")
    assert status == 0, err
    queued = next(line for line in out.splitlines() if "queued-model" in line)
    pinned = next(line for line in out.splitlines() if "pinned-model" in line)
    assert "starting (waiting for a slot)" in queued and "yes" not in queued
    assert "waiting" not in pinned and "yes" in pinned
    assert "healthy (making way)" in next(line for line in out.splitlines() if "leaving" in line)


def test_status_piped_keeps_whole_names_on_one_line_each(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    names = ["Qwen/Qwen3-Next-80B-A3B-Instruct", "org/slow2", "org/slow3"]
    gateway.pools = [pool_json(name, "failed") for name in names]
    gateway.pools[0]["error"] = "[Qwen] engine exited with code 1: " + "long log line " * 20
    status, out, err = run(capsys, "status")
    assert status == 0, err
    for name in names:
        assert len([line for line in out.splitlines() if name in line]) == 1, out


def test_down(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "down", "m")
    assert status == 0
    assert "m: down" in out
    assert gateway.bodies("/v1/down") == [{"model_path": "m"}]


def test_chat_streams_tokens(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "chat", "m", "Say hi")
    assert status == 0, err
    assert out == "tok0 tok1 tok2 \n"
    body = gateway.bodies("/v1/chat/completions")[0]
    assert body["messages"] == [{"role": "user", "content": "Say hi"}]
    assert "max_tokens" not in body
    assert body["stream"] is True


def test_chat_broken_off_says_so(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    gateway.break_stream = True
    status, out, err = run(capsys, "chat", "m", "Say hi")
    assert status == 1 and out.startswith("tok0 ")
    assert "the answer broke off before its end" in err and "cannot reach" not in err


def test_a_refused_key(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["status", "--base-url", BASE_URL, "--api-key", "wrong"])
    _, err = capsys.readouterr()
    assert status == 1
    assert "refused the API key" in err


def test_a_refused_connection(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["--base-url", "http://127.0.0.1:9", "--api-key", "k", "up", "m"])
    _, err = capsys.readouterr()
    assert status == 1
    assert "cannot reach the gateway at http://127.0.0.1:9/v1" in err
    assert "Traceback" not in err


def test_piped_errors_stay_on_one_line_and_the_version_is_told(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "40")  # for grep, not for a terminal: no wrapping
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert "AUTOSERVE_BASE_URL" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("autoserve ")


def test_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status"]) == 1
    assert "AUTOSERVE_BASE_URL" in capsys.readouterr().err
    monkeypatch.setenv("AUTOSERVE_BASE_URL", BASE_URL)
    monkeypatch.setenv("VLLM_GATEWAY_AUTH", API_KEY)
    assert cli.main(["status"]) == 0


def test_status_on_a_narrow_terminal_keeps_every_cell_whole(gateway: FakeGateway) -> None:
    import io

    from rich.console import Console

    names = ["Qwen/Qwen3-Next-80B-A3B-Instruct", "org/slow2"]
    gateway.pools = [pool_json(name, "healthy") for name in names]
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=80, color_system=None)
    args = cli._parser().parse_args(["--base-url", BASE_URL, "--api-key", API_KEY, "status"])
    args.timeout = None  # as main() sets it
    cli._status(args, terminal, terminal)
    for name in names:
        assert len([line for line in screen.getvalue().splitlines() if name in line]) == 1
    assert "healthy" in screen.getvalue() and "last request" in screen.getvalue()

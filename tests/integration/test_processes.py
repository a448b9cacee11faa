"""Engine processes: no orphans, disconnects reach the engine, GPU slots, start-up refusals."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.fake_engine import FAKE_ENGINE
from tests.support.gateway import Gateway, fake_model, free_port, running_gateway
from tests.support.waiting import alive, engine_port, wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def engine_pids(pid_file: Path) -> list[int]:
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
    return [int(p) for p in pid_file.read_text().split()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stopping_the_gateway_stops_engines_and_their_children(tmp_path: Path, sig: int) -> None:
    pid_file = tmp_path / "pids"
    cfg = fake_model("m", "--spawn-child", "--pid-file", str(pid_file))
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "m", "wait": 15}).json()["status"] == "healthy"
        pids = engine_pids(pid_file) + gw.engine_pids()
        assert len(alive(pids)) >= 3  # guard, engine, engine's child
        # uvicorn re-raises the signal once shut down cleanly: death by SIGTERM; Ctrl-C
        # (SIGINT) ends quietly with 130, as shells report it.
        assert gw.stop(sig) in ((130,) if sig == signal.SIGINT else (0, -sig))
        # Stopped by the gateway (a closed terminal's SIGHUP too), not by the engine guard
        # noticing that the gateway died.
        assert "[m] pool healthy -> stopping (gateway shutdown)" in gw.log()
    wait_for(lambda: not alive(pids), timeout=15)


def test_a_killed_gateway_leaves_no_engine_behind(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    cfg = fake_model("m", "--spawn-child", "--pid-file", str(pid_file))
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "m", "wait": 15}).json()["status"] == "healthy"
        pids = engine_pids(pid_file) + gw.engine_pids()
        gw.stop(signal.SIGKILL)
    wait_for(lambda: not alive(pids), timeout=15)


def test_engine_killed_by_sigkill_takes_its_children_along_and_restarts(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    cfg = "[gateway]\nfailure_cooldown_seconds = 0\n" + fake_model(
        "m", "--spawn-child", "--pid-file", str(pid_file)
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 200
        engine, child = engine_pids(pid_file)
        pid_file.unlink()
        os.kill(engine, signal.SIGKILL)
        wait_for(lambda: gw.status()["m"]["state"] == "failed")
        assert "exited with code" in gw.status()["m"]["error"]
        wait_for(lambda: not alive([engine, child]), timeout=10)
        assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 200
        assert engine_pids(pid_file)[0] != engine


def test_a_crashed_engine_is_failed_at_once_while_its_stubborn_child_is_cleaned_up(
    tmp_path: Path,
) -> None:
    """A crashed engine's helper ignoring SIGTERM (a stuck EngineCore) held the pool "healthy",
    answering 502s, for the seconds its clean-up took."""
    pid_file = tmp_path / "pids"
    cfg = "[gateway]\nstop_grace_seconds = 4\nfailure_cooldown_seconds = 30\n" + fake_model(
        "m", "--spawn-child", "--stubborn-child", "--pid-file", str(pid_file)
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 200
        engine, child = engine_pids(pid_file)
        os.kill(engine, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: gw.status()["m"]["state"] == "failed", timeout=10)
        assert time.monotonic() - killed < 2  # not after the child's 4 s of grace
        answer = c.post("/v1/chat/completions", json={"model": "m", **CHAT})
        assert answer.status_code == 503 and "retry-after" in answer.headers
        assert answer.json()["error"]["code"] == "model_failed"
        wait_for(lambda: not alive([engine, child]), timeout=15)


def test_down_during_the_clean_up_after_a_crash_starts_nothing(tmp_path: Path) -> None:
    """A start waiting for the crashed engine's clean-up swallowed the cancel of /down (or
    of shutdown), and went on to start an engine."""
    pid_file = tmp_path / "pids"
    cfg = "[gateway]\nstop_grace_seconds = 4\nfailure_cooldown_seconds = 0\n" + fake_model(
        "m", "--spawn-child", "--stubborn-child", "--pid-file", str(pid_file)
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "m", "wait": 15}).json()["status"] == "healthy"
        engine, _ = engine_pids(pid_file)
        os.kill(engine, signal.SIGKILL)
        wait_for(lambda: gw.status()["m"]["state"] == "failed", timeout=10)
        assert c.post("/up", json={"model_path": "m"}).json()["state"] == "starting"
        assert c.post("/down", json={"model_path": "m"}).json()["state"] == "cold"
        time.sleep(5)  # past the clean-up the start was waiting for
        assert gw.log().count("engine started") == 1, gw.log()
        assert gw.status()["m"]["state"] == "cold"


def test_engine_output_cannot_pass_for_the_guards_exit_line() -> None:
    engine = f"{sys.executable} {FAKE_ENGINE} --port $0"
    fake = "echo 'engine_guard: the engine exited with code 0'"
    cfg = (
        f'[models."m"]\ncommand = ["bash", "-c", "(sleep 2; {fake}) & exec {engine}", "{{port}}"]\n'
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "m", "wait": 15}).json()["status"] == "healthy"
        time.sleep(3)  # the line was printed at 2 s
        assert gw.status()["m"]["state"] == "healthy"
        assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 200


def test_a_guard_whose_gateway_died_while_it_started_runs_nothing(tmp_path: Path) -> None:
    """The guard learns the gateway's pid from it: had it died before the guard armed
    PDEATHSIG, its own getppid() would already name init, and the engine live on."""
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    guard = [sys.executable, "-m", "vllm_autoserve.engine_guard", "--parent", str(gone.pid)]
    # In a session of its own, as the gateway starts it: the guard kills its whole group.
    result = subprocess.run([*guard, "--", *command], timeout=30, start_new_session=True)
    assert result.returncode == 1
    assert not marker.exists()
    subprocess.run(
        [*guard[:3], "--parent", str(os.getpid()), "--", *command],
        timeout=30,
        start_new_session=True,
    )
    assert marker.exists()  # with the right parent, it runs


_ENGINE_NOTING_ITS_HELPER = """
import os, signal, subprocess, sys, time
helper = subprocess.Popen(["sleep", "60"])
def stop(*_):
    time.sleep(0.2)  # what a helper told at the same moment would need to die
    done, _ = os.waitpid(helper.pid, os.WNOHANG)
    open(sys.argv[1], "w").write("helper alive" if done == 0 else "helper gone")
    helper.terminate()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("up", flush=True)
time.sleep(60)
"""


def test_a_stopped_engine_hears_of_it_before_its_helpers(tmp_path: Path) -> None:
    """vLLM's API server ends its streams when told to stop, but not if its EngineCore was
    stopped under it at the same moment: its streams then hung until the SIGKILL."""
    seen = tmp_path / "seen"
    guard = [sys.executable, "-m", "vllm_autoserve.engine_guard", "--parent", str(os.getpid())]
    engine = [sys.executable, "-c", _ENGINE_NOTING_ITS_HELPER, str(seen)]
    process = subprocess.Popen(
        [*guard, "--", *engine], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert process.stdout is not None and process.stdout.readline() == "up\n"
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)  # as the gateway stops an engine
    process.wait(timeout=20)
    assert seen.read_text() == "helper alive"
    assert time.monotonic() - started < 2  # the engine's own stop, not the guard's grace


def test_engine_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    cfg = "[gateway]\nstop_grace_seconds = 1\n" + fake_model(
        "stubborn", "--ignore-sigterm", "--pid-file", str(pid_file)
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert (
            c.post("/up", json={"model_path": "stubborn", "wait": 15}).json()["status"] == "healthy"
        )
        pids = engine_pids(pid_file)
        started = time.monotonic()
        assert c.post("/down", json={"model_path": "stubborn"}).json()["state"] == "cold"
        assert time.monotonic() - started < 8
        assert not alive(pids)


def test_client_disconnect_closes_the_upstream_request() -> None:
    cfg = fake_model("m", "--chunks", "200", "--chunk-delay", "0.05")
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "m", "wait": 15}).json()["status"] == "healthy"
        with c.stream(
            "POST", "/v1/chat/completions", json={"model": "m", "stream": True, **CHAT}
        ) as response:
            chunks = response.iter_raw()
            next(chunks)
            next(chunks)
        closed_at = time.monotonic()
        port = engine_port(gw)
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/stats").json()["cancelled"] == 1, timeout=5
        )
        assert time.monotonic() - closed_at < 2.0
        stats = httpx.get(f"http://127.0.0.1:{port}/stats").json()
        assert stats["completed_streams"] == 0
        assert gw.status()["m"]["in_flight"] == 0


def test_an_engine_alive_but_dropping_every_connection_is_stopped_and_started_anew(
    tmp_path: Path,
) -> None:
    """It stayed healthy for good: every request got a 502, and it never went idle."""
    pid_file = tmp_path / "pids"
    cfg = "[gateway]\nfailure_cooldown_seconds = 0\n" + fake_model(
        "m", "--wedge-after", "1", "--pid-file", str(pid_file)
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 200
        first = engine_pids(pid_file)
        assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 502
        wait_for(lambda: gw.status()["m"]["state"] == "failed", timeout=15)
        assert "stopped answering" in str(gw.status()["m"]["error"])
        wait_for(lambda: not alive(first), timeout=15)  # the wedged process is gone
        pid_file.unlink()
        # The next request starts a fresh engine, which answers.
        assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 200
        assert engine_pids(pid_file) != first


def test_engine_dying_mid_stream_is_an_error_not_a_complete_answer() -> None:
    cfg = "[gateway]\nfailure_cooldown_seconds = 0\n" + fake_model(
        "m", "--chunks", "20", "--chunk-delay", "0.05", "--die-mid-stream", "5"
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            with c.stream(
                "POST", "/v1/chat/completions", json={"model": "m", "stream": True, **CHAT}
            ) as response:
                for chunk in response.iter_raw():
                    received += chunk
        assert b"[DONE]" not in received
        assert b'"param":null,"code":"upstream_disconnected"' in received  # OpenAI's format
        assert b"127.0.0.1" not in received  # the engine's address stays in the gateway
        wait_for(lambda: gw.status()["m"]["state"] == "failed")
        log = gw.log()
        assert "broke off its answer" in log
        assert "ASGI callable returned without completing" not in log  # cut on purpose


def test_a_stream_cut_inside_an_event_still_ends_in_an_error_the_sdk_reads() -> None:
    """The error event went out glued to the half event: the SDK raised a JSONDecodeError
    instead of an APIError saying that the engine broke off."""
    cfg = "[gateway]\nfailure_cooldown_seconds = 0\n" + fake_model(
        "m", "--chunks", "6", "--split-events", "--die-mid-stream", "3"
    )
    with running_gateway(cfg) as gw:
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.api_key, max_retries=0)
        pieces: list[str] = []
        with pytest.raises(openai.APIError, match="broke off the stream"):
            for chunk in sdk.chat.completions.create(model="m", stream=True, **CHAT):
                pieces.append(chunk.choices[0].delta.content or "")
        assert len(pieces) == 3  # every whole event before the cut, intact


def test_events_that_arrive_in_pieces_go_out_whole_and_the_stream_ends_complete() -> None:
    with running_gateway(fake_model("m", "--chunks", "4", "--split-events")) as gw:
        chunks: list[bytes] = []
        assert _stream_chat(gw, "m", chunks) == 200
    body = b"".join(chunks)
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") == 5
    assert all(chunk.endswith(b"\n\n") for chunk in chunks if chunk)


def _stream_chat(gateway: Gateway, model: str, chunks: list[bytes]) -> int:
    """A streamed chat answer from ``model``, chunk by chunk into ``chunks``; its status."""
    with (
        gateway.client() as own,
        own.stream(
            "POST", "/v1/chat/completions", json={"model": model, "stream": True, **CHAT}
        ) as response,
    ):
        for chunk in response.iter_raw():
            chunks.append(chunk)
    return response.status_code


@pytest.mark.parametrize(
    ("signals", "exit_codes"),
    [((signal.SIGTERM,), (0, -signal.SIGTERM)), ((signal.SIGINT, signal.SIGINT), (130,))],
    ids=["sigterm", "one-ctrl-c-delivered-twice"],
)
def test_stopping_lets_streams_in_flight_finish_before_engines_stop(
    signals: tuple[int, ...], exit_codes: tuple[int, ...]
) -> None:
    """(Under `uv run`, a SIGINT to the process group reached the gateway twice, the group's
    and uv's copy of it: uvicorn took it for a second Ctrl-C, skipped the drain and the
    engines' stop, and logged a traceback.)"""
    cfg = fake_model("m", "--chunks", "20", "--chunk-delay", "0.1")
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "m", "wait": 15}).json()["status"] == "healthy"
        chunks: list[bytes] = []
        reader = threading.Thread(target=_stream_chat, args=(gw, "m", chunks))
        reader.start()
        time.sleep(0.5)
        for sig in signals:
            gw.process.send_signal(sig)
        reader.join(20)
        assert b"".join(chunks).endswith(b"data: [DONE]\n\n")  # drained, not cut
        assert gw.process.wait(20) in exit_codes
        log = gw.log()
        assert "pool healthy -> stopping" in log and "Traceback" not in log


def test_a_second_ctrl_c_skips_the_drain_but_still_stops_engines(tmp_path: Path) -> None:
    """A second Ctrl-C made uvicorn skip the lifespan shutdown: only the engine guard's
    parent-death signal stopped the engines, and the log had a traceback."""
    pid_file = tmp_path / "pids"
    cfg = fake_model("m", "--chunks", "20", "--chunk-delay", "0.1", "--pid-file", str(pid_file))
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "m", "wait": 15}).json()["status"] == "healthy"

        chunks: list[bytes] = []

        def read_until_cut() -> None:
            with contextlib.suppress(httpx.HTTPError):
                _stream_chat(gw, "m", chunks)

        reader = threading.Thread(target=read_until_cut)
        reader.start()
        time.sleep(0.5)
        gw.process.send_signal(signal.SIGINT)
        time.sleep(0.7)
        gw.process.send_signal(signal.SIGINT)  # a second Ctrl-C: no more waiting
        assert gw.process.wait(20) == 130
        reader.join(20)
        # The stream is told why it ends, as at the end of a drain (it was cut bare).
        assert b'"code":"gateway_shutting_down"' in b"".join(chunks)
        log = gw.log()
        assert "pool healthy -> stopping" in log and "Traceback" not in log
        wait_for(lambda: not alive(engine_pids(pid_file)), timeout=15)


def test_requests_still_running_when_the_drain_ends_get_told_and_nothing_is_left(
    tmp_path: Path,
) -> None:
    """Held for a cold start past drain_seconds, requests got uvicorn's bare 500, and their
    wait started a new engine as the gateway exited, which nothing ever stopped."""
    pid_file = tmp_path / "pids"
    cfg = (
        "[gateway]\ndrain_seconds = 1\nhold_seconds = 60\n"
        + fake_model("cold", "--startup-delay", "30", "--pid-file", str(pid_file))
        + fake_model("warm", "--chunks", "200", "--chunk-delay", "0.05")
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "warm", "wait": 15}).json()["status"] == "healthy"
        answers: list[httpx.Response] = []
        streamed: list[bytes] = []

        def held() -> None:
            with gw.client() as own:
                answers.append(own.post("/v1/chat/completions", json={"model": "cold", **CHAT}))

        def long_poll() -> None:
            with gw.client() as own:
                answers.append(own.post("/up", json={"model_path": "cold", "wait": 60}))

        def stream() -> None:
            with contextlib.suppress(httpx.HTTPError):  # cut, as it must be
                _stream_chat(gw, "warm", streamed)

        threads = [threading.Thread(target=held) for _ in range(2)]
        threads += [threading.Thread(target=stream), threading.Thread(target=long_poll)]
        for thread in threads:
            thread.start()
        engine_pids(pid_file)  # the cold model's engine is starting
        gw.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert gw.process.wait(30) in (0, -signal.SIGTERM)
        assert len(answers) == 3
        for answer in answers:
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "gateway_shutting_down"
            assert "retry-after" in answer.headers
        body = b"".join(streamed)
        assert b"gateway_shutting_down" in body and not body.endswith(b"data: [DONE]\n\n")
        log = gw.log()
        assert log.count("status=503") == 2, log
        assert "Traceback" not in log
        assert " ERROR " not in log  # the drain's end, as configured, is no error
    # Nothing outlives the gateway: not the engine that was starting, nor a new one.
    time.sleep(2)
    assert not alive(engine_pids(pid_file))
    assert "cold -> starting (request)" not in log.split("Shutting down", 1)[1]


def test_at_shutdown_waits_for_a_cold_start_end_at_once_and_generations_finish() -> None:
    """Held requests and /up long-polls waited out drain_seconds (or the engine's start)."""
    cfg = (
        "[gateway]\ndrain_seconds = 60\nhold_seconds = 60\n"
        + fake_model("cold", "--startup-delay", "60")
        + fake_model("warm", "--chunks", "60", "--chunk-delay", "0.1")
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "warm", "wait": 15}).json()["status"] == "healthy"
        events: list[tuple[str, int]] = []
        streamed: list[bytes] = []

        def held() -> None:
            with gw.client() as own:
                answer = own.post("/v1/chat/completions", json={"model": "cold", **CHAT})
                events.append((answer.json()["error"]["code"], answer.status_code))

        def long_poll() -> None:
            with gw.client() as own:
                answer = own.post("/up", json={"model_path": "cold", "wait": 60})
                events.append((answer.json()["error"]["code"], answer.status_code))

        def stream() -> None:
            events.append(("stream finished", _stream_chat(gw, "warm", streamed)))

        threads = [threading.Thread(target=f) for f in (stream, held, long_poll)]
        for thread in threads:
            thread.start()
        wait_for(lambda: streamed and gw.status()["cold"]["state"] == "starting")
        time.sleep(0.3)  # the held request and the long-poll are waiting
        gw.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert gw.process.wait(30) in (0, -signal.SIGTERM)
        log = gw.log()
    # The two waits were let go first; the generation under way was drained to its end.
    assert events[:2] == [("gateway_shutting_down", 503)] * 2
    assert events[2] == ("stream finished", 200)
    assert b"".join(streamed).endswith(b"data: [DONE]\n\n")
    # The start nobody waited for any more was stopped at once, not after the drain.
    stopped = log.index("[cold] pool starting -> stopping (gateway shutdown)")
    assert stopped < log.index("[warm] pool healthy -> stopping (gateway shutdown)")


def test_gpu_slots_are_distinct_and_idle_engines_are_evicted_lru() -> None:
    cfg = "[gateway]\nlocal_gpus = 2\n"
    for name in ("a", "b", "c"):
        cfg += fake_model(name, extra="gpu = 1")
    cfg += fake_model("big", extra="gpu = 3")
    with running_gateway(cfg) as gw, gw.client() as c:
        for name in ("a", "b"):
            assert c.post("/v1/chat/completions", json={"model": name, **CHAT}).status_code == 200
        status = gw.status()
        assert sorted(status["a"]["gpus"] + status["b"]["gpus"]) == [0, 1]
        time.sleep(0.2)
        assert c.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
        # "b" is now the least recently used idle engine: starting "c" evicts it.
        assert c.post("/v1/chat/completions", json={"model": "c", **CHAT}).status_code == 200
        status = gw.status()
        assert status["b"]["state"] == "cold"
        assert status["a"]["state"] == "healthy"
        assert status["c"]["gpus"] == [1 - status["a"]["gpus"][0]]
        big = c.post("/up", json={"model_path": "big", "wait": 5}).json()
        assert big["status"] == "failed" and "needs 3 GPUs" in big["error"]


class _Squatter(http.server.BaseHTTPRequestHandler):
    """Answers 200 to everything, as any server on the host could, and notes what it got."""

    seen: list[tuple[str, str | None]] = []

    def _answer(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def _engine_port_or_none(gateway: Gateway) -> int | None:
    try:
        return engine_port(gateway)
    except AssertionError:
        return None


def test_a_process_that_takes_the_engine_port_first_gets_no_request_and_no_key(
    tmp_path: Path,
) -> None:
    # A vLLM the gateway launches itself (no `command`): its "python" runs the fake engine.
    python = tmp_path / "python"
    python.write_text(
        f"#!{sys.executable}\nimport os, sys\nport = sys.argv[sys.argv.index('--port') + 1]\n"
        f"os.execv(sys.executable, [sys.executable, {str(FAKE_ENGINE)!r}, '--port', port,"
        " '--startup-delay', '8'])\n"
    )
    python.chmod(0o755)
    cfg = f'[gateway]\nhold_seconds = 2\n[models."slow"]\nengine_python = "{python}"\n'
    _Squatter.seen.clear()
    with running_gateway(cfg) as gw, gw.client() as c:
        c.post("/up", json={"model_path": "slow"})
        port = wait_for(lambda: _engine_port_or_none(gw), timeout=10)
        squatter = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Squatter)
        threading.Thread(target=squatter.serve_forever, daemon=True).start()
        try:
            time.sleep(0.5)  # the gateway's health checks reach the squatter
            chat = c.post("/v1/chat/completions", json={"model": "slow", **CHAT})
            assert chat.status_code == 503, chat.text
            assert gw.status()["slow"]["state"] != "healthy"
        finally:
            squatter.shutdown()
            squatter.server_close()
    assert {path for path, _ in _Squatter.seen} == {"/health"}
    assert all(auth is None for _, auth in _Squatter.seen)
    assert "from a process that is not the engine's" in gw.log()


def test_max_engines_stops_the_least_recently_used_idle_engine_without_gpus() -> None:
    cfg = "[gateway]\nlocal_gpus = 0\nmax_engines = 2\n"
    cfg += fake_model("a") + fake_model("b") + fake_model("c")
    with running_gateway(cfg) as gw, gw.client() as c:
        for name in ("a", "b", "a", "c"):
            assert c.post("/v1/chat/completions", json={"model": name, **CHAT}).status_code == 200
        states = {name: gw.status()[name]["state"] for name in "abc"}
        assert states == {"a": "healthy", "b": "cold", "c": "healthy"}


def test_a_host_without_gpus_runs_three_engines_at_most_by_default() -> None:
    """Without a bound, every new name a key holder sent started one more engine."""
    cfg = "[gateway]\nlocal_gpus = 0\n" + "".join(fake_model(name) for name in "abcd")
    with running_gateway(cfg) as gw, gw.client() as c:
        for name in "abcd":
            assert c.post("/v1/chat/completions", json={"model": name, **CHAT}).status_code == 200
        states = {name: gw.status()[name]["state"] for name in "abcd"}
        assert states == {"a": "cold", "b": "healthy", "c": "healthy", "d": "healthy"}
        assert "max_engines = 3" in gw.log()


def test_every_pinned_model_gets_a_slot_on_a_host_without_gpus() -> None:
    pinned = "min_containers = 1"
    cfg = "[gateway]\nlocal_gpus = 0\n" + "".join(fake_model(n, extra=pinned) for n in "abcd")
    with running_gateway(cfg) as gw:
        wait_for(lambda: all(gw.status()[n]["state"] == "healthy" for n in "abcd"), timeout=30)


def test_a_pinned_engine_keeps_its_gpu_until_the_pin_is_lifted() -> None:
    cfg = "[gateway]\nlocal_gpus = 1\nhold_seconds = 1\n"
    cfg += fake_model("a", extra="gpu = 1") + fake_model("b", extra="gpu = 1")
    cfg += fake_model("c", extra="gpu = 1\nstartup_seconds = 1.5")
    with running_gateway(cfg) as gw, gw.client() as c:
        pinned = c.post("/up", json={"model_path": "a", "min_containers": 1, "wait": 10}).json()
        assert pinned["status"] == "healthy" and pinned["pinned"]
        refused = c.post("/v1/chat/completions", json={"model": "b", **CHAT})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_not_ready"
        assert "waiting for GPUs or an engine slot" in refused.json()["error"]["message"]
        assert gw.status()["a"]["state"] == "healthy"
        waiting = gw.status()["b"]
        assert (waiting["state"], waiting["engines"]) == ("starting", 0)  # none launched
        # A start that never got its GPU says so, not that its engine was slow.
        timed_out = c.post("/up", json={"model_path": "c", "wait": 10}).json()
        assert timed_out["status"] == "failed"
        assert "still waiting for GPUs or an engine slot" in timed_out["error"]
        c.post("/up", json={"model_path": "a", "min_containers": 0})
        assert c.post("/up", json={"model_path": "b", "wait": 10}).json()["status"] == "healthy"
        assert gw.status()["a"]["state"] == "cold"


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "VLLM_GATEWAY_AUTH"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "vllm_autoserve.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
    )


def test_serve_refuses_to_start_without_a_key_or_with_no_auth_on_a_public_host() -> None:
    no_key = _serve("--port", str(free_port()))
    assert no_key.returncode != 0 and "VLLM_GATEWAY_AUTH" in no_key.stderr
    public = _serve("--no-auth", "--host", "0.0.0.0", "--port", str(free_port()))
    assert public.returncode != 0 and "loopback" in public.stderr


def test_a_bad_config_file_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[gateway]\nhold_seconds = -1\nidle = 3\n[models."m"]\ngpu = "H100:x"\n')
    result = _serve("--config", str(config), env={"VLLM_GATEWAY_AUTH": "k"})
    assert result.returncode == 2
    assert "gateway.hold_seconds" in result.stderr
    assert "gateway.idle: unknown key" in result.stderr
    assert "models.m.gpu" in result.stderr
    config.write_text("[gateway\n")
    result = _serve("--config", str(config), env={"VLLM_GATEWAY_AUTH": "k"})
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_a_port_already_taken_is_a_clear_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = _serve("--port", str(port), env={"VLLM_GATEWAY_AUTH": "k"})
    assert result.returncode == 1 and "already in use" in result.stderr


def test_engine_answering_garbage_is_a_502_and_the_gateway_keeps_serving() -> None:
    cfg = fake_model("garbage", "--garbage") + fake_model("fine")
    with running_gateway(cfg) as gw, gw.client() as c:
        response = c.post("/v1/chat/completions", json={"model": "garbage", **CHAT})
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_unavailable"
        assert "127.0.0.1" not in response.text and "garbage" in response.text
        assert c.post("/v1/chat/completions", json={"model": "fine", **CHAT}).status_code == 200
        assert httpx.get(gw.url + "/health").status_code == 200


def test_engine_closing_the_connection_early_cuts_the_response_visibly() -> None:
    cfg = fake_model("cut", "--close-early")
    with running_gateway(cfg) as gw, gw.client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            c.post("/v1/chat/completions", json={"model": "cut", **CHAT})
        assert httpx.get(gw.url + "/health").status_code == 200

"""Regression tests: each docstring names the bug it guards against."""

from __future__ import annotations

import asyncio
import http.server
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.integration.test_lifecycle import engine_starts
from tests.support.gateway import Gateway, fake_model, running_gateway
from tests.support.waiting import engine_port, standalone_fake_engine, wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_cancelled_start_never_leaves_the_evicted_pool_stuck_stopping() -> None:
    """A start evicting another pool for its GPU was cancelled (/down) mid-eviction: the
    evicted pool stayed 'stopping' for good, holding its GPU; /down and SIGTERM hung."""
    cfg = ("[gateway]\nlocal_gpus = 1\nstop_grace_seconds = 2\n"
           + fake_model("a", "--ignore-sigterm", extra="gpu = 1")
           + fake_model("b", extra="gpu = 1"))
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "a", "wait": 10}).json()["status"] == "healthy"
        time.sleep(1.2)  # past the second an engine just started is kept for its requests
        assert c.post("/up", json={"model_path": "b"}).json()["status"] == "pending"
        time.sleep(0.3)  # b is now evicting a, which takes the 2 s grace
        assert c.post("/down", json={"model_path": "b"}).json()["state"] == "cold"
        wait_for(lambda: gw.status()["a"]["state"] == "cold", timeout=10)
        assert gw.status()["a"]["gpus"] == []
        assert c.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200


def test_a_start_waiting_for_a_gpu_evicts_the_holder_as_soon_as_it_goes_idle() -> None:
    """A start waiting for GPUs only woke on a release, not when the holder went idle, so it
    waited for the holder's whole idle timeout."""
    cfg = ("[gateway]\nlocal_gpus = 1\nhold_seconds = 20\n"
           + fake_model("a", "--chunks", "15", "--chunk-delay", "0.2", extra="gpu = 1")
           + fake_model("b", extra="gpu = 1"))
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "a", "wait": 10}).json()["status"] == "healthy"

        def stream_a() -> None:
            with gw.client() as own, own.stream(
                "POST", "/v1/chat/completions", json={"model": "a", "stream": True, **CHAT}
            ) as r:
                r.read()

        streamer = threading.Thread(target=stream_a)
        streamer.start()
        time.sleep(0.5)
        started = time.monotonic()
        assert c.post("/v1/chat/completions", json={"model": "b", **CHAT}).status_code == 200
        streamer.join()
        assert time.monotonic() - started < 8  # ~2.5 s of stream left, plus b's start


def test_client_leaving_a_non_streamed_request_cancels_it_upstream() -> None:
    """A client that disconnected before a non-streamed answer began was not noticed until
    the engine had generated the whole answer."""
    cfg = fake_model("slow", "--response-delay", "5")
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "slow", "wait": 10}).json()["status"] == "healthy"
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url + "/v1/chat/completions", json={"model": "slow", **CHAT},
                       headers=gw.headers, timeout=1)
        port = engine_port(gw)
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/stats").json()["cancelled"] == 1,
                 timeout=3)


def test_down_while_a_request_is_held_makes_it_give_up_and_the_model_stays_down() -> None:
    """/down during a held cold start answered 'cold', then the held request started the
    model again at once; later, the held request's 503 was one the OpenAI SDK retries, and
    its retry started the model again a second after the /down."""
    cfg = fake_model("m", "--startup-delay", "3")
    with running_gateway(cfg) as gw, gw.client() as c:
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.api_key, max_retries=2)
        errors: list[Exception] = []

        def held() -> None:
            try:
                sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            except openai.APIStatusError as exc:
                errors.append(exc)

        thread = threading.Thread(target=held)
        thread.start()
        wait_for(lambda: gw.status()["m"]["state"] == "starting")
        assert c.post("/down", json={"model_path": "m"}).json()["state"] == "cold"
        thread.join()
        [error] = errors
        assert isinstance(error, openai.InternalServerError)
        assert error.code == "model_stopped" and "stopped with /down" in error.message
        time.sleep(1.5)  # past any retry the SDK would have made
        assert gw.status()["m"]["state"] == "cold"
        assert engine_starts(c, "m") == 1


def test_down_while_an_up_waits_or_a_request_runs_leaves_the_model_down() -> None:
    """A waiting /up started the model again as soon as a /down had stopped it; a request
    under way that /down cut got a 502, which the OpenAI SDK retries (restarting the model)."""
    cfg = fake_model("m", "--startup-delay", "2") + fake_model("busy", "--response-delay", "10")
    with running_gateway(cfg) as gw, gw.client() as c:
        up = _answer_across_down(
            gw,
            "m",
            lambda: c.post("/up", json={"model_path": "m", "wait": 20}),
            under_way=lambda: gw.status()["m"]["state"] == "starting",
        )
        _assert_stopped_for_good(up)
        time.sleep(2.5)
        assert gw.status()["m"]["state"] == "cold" and engine_starts(c, "m") == 1

        assert c.post("/up", json={"model_path": "busy", "wait": 20}).json()["status"] == "healthy"
        chat = _answer_across_down(
            gw,
            "busy",
            lambda: c.post("/v1/chat/completions", json={"model": "busy", **CHAT}),
            under_way=lambda: gw.status()["busy"]["in_flight"] == 1,
        )
        _assert_stopped_for_good(chat)


def _answer_across_down(
    gw: Gateway,
    model: str,
    request: Callable[[], httpx.Response],
    under_way: Callable[[], bool],
) -> httpx.Response:
    """The answer to ``request`` (run in a thread) when another client calls /down for
    ``model`` once ``under_way()`` holds."""
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(request()))
    thread.start()
    wait_for(under_way)
    with gw.client() as other:
        other.post("/down", json={"model_path": model})
    thread.join()
    return answers[0]


def _assert_stopped_for_good(answer: httpx.Response) -> None:
    """``model_stopped``, which the OpenAI SDKs do not retry (a retry would restart it)."""
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_stopped"
    assert answer.headers["x-should-retry"] == "false"


def test_down_ends_a_stream_under_way_with_model_stopped() -> None:
    """A stream that /down cut ended as the engine's stop made it end: with vLLM, an abort
    that reads as a finished answer, vLLM's own error, or the gateway's
    upstream_disconnected after the engine's stop grace."""
    cfg = fake_model("m", "--chunks", "400", "--chunk-delay", "0.05")
    with running_gateway(cfg) as gw, gw.client() as c:
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.api_key, max_retries=0)
        stream = sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = iter(stream)
        next(chunks)  # under way
        assert c.post("/down", json={"model_path": "m"}).json()["state"] == "cold"
        with pytest.raises(openai.APIError) as info:
            for _ in chunks:
                pass
        assert info.value.code == "model_stopped"
        assert info.value.message == "[m] was stopped with /down while this request ran"
        wait_for(lambda: "upstream_broke=1" in gw.log())  # logged as ended without its end


def test_down_ends_a_request_waiting_for_its_answer_without_waiting_for_the_engine() -> None:
    """vLLM sends a non-streamed answer's head only with the whole answer, and, told to
    stop, waits for the requests it runs: the request and /down waited out the grace."""
    cfg = "[gateway]\nstop_grace_seconds = 6\n" + fake_model(
        "busy", "--response-delay", "30", "--ignore-sigterm"
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "busy", "wait": 20}).json()["status"] == "healthy"
        answered: list[float] = []

        def ask() -> httpx.Response:
            answer = c.post("/v1/chat/completions", json={"model": "busy", **CHAT})
            answered.append(time.monotonic())
            return answer

        # The engine ignores SIGTERM: the /down takes the 6 s grace.
        chat = _answer_across_down(
            gw, "busy", ask, under_way=lambda: gw.status()["busy"]["in_flight"] == 1
        )
        down_done = time.monotonic()
        assert chat.json()["error"]["code"] == "model_stopped"
        assert answered[0] < down_done - 3  # answered at the /down, not at the SIGKILL


def test_concurrent_requests_for_a_broken_model_start_it_once_even_without_cooldown() -> None:
    """With failure_cooldown_seconds = 0 every held request restarted the broken engine."""
    cfg = ("[gateway]\nfailure_cooldown_seconds = 0\n"
           + fake_model("bad", "--startup-delay", "0.5", "--fail-at-start", "boom"))
    with running_gateway(cfg) as gw, gw.client() as c:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            c.post("/v1/chat/completions", json={"model": "bad", **CHAT}).status_code))
            for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [503] * 8
        assert engine_starts(c, "bad") == 1


def test_up_during_a_stop_starts_the_model_once_the_stop_is_done() -> None:
    """/up (wait=0) while the pool was stopping answered 'pending' but never started it.
    (A stop for being idle, that is: one for /down tells the /up so, see below.)"""
    cfg = "[gateway]\nstop_grace_seconds = 1\nidle_seconds = 0.5\n" + fake_model(
        "m", "--ignore-sigterm"
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "m", "wait": 10}).json()["status"] == "healthy"
        wait_for(lambda: gw.status()["m"]["state"] == "stopping", timeout=15)
        assert c.post("/up", json={"model_path": "m"}).json()["status"] == "pending"
        wait_for(lambda: gw.status()["m"]["state"] == "healthy", timeout=15)

    cfg = "[gateway]\nstop_grace_seconds = 1\n" + fake_model("m", "--ignore-sigterm")
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "m", "wait": 10}).json()["status"] == "healthy"
        stopper = threading.Thread(target=lambda: gw.client().post("/down", json={"model_path": "m"}))
        stopper.start()
        wait_for(lambda: gw.status()["m"]["state"] == "stopping")
        during_down = c.post("/up", json={"model_path": "m"})
        assert during_down.status_code == 503
        assert during_down.json()["error"]["code"] == "model_stopped"
        stopper.join()
        assert gw.status()["m"]["state"] == "cold"
        assert c.post("/up", json={"model_path": "m", "wait": 10}).json()["status"] == "healthy"


def test_down_during_an_idle_stop_sticks_and_a_refused_up_leaves_no_pin() -> None:
    """A /down while an idle stop was under way let the /up calls that followed restart the
    model; an /up with min_containers refused for a /down kept its pin all the same."""
    cfg = "[gateway]\nstop_grace_seconds = 1\nidle_seconds = 0.5\n" + fake_model(
        "m", "--ignore-sigterm"
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "m", "wait": 10}).json()["status"] == "healthy"
        wait_for(lambda: gw.status()["m"]["state"] == "stopping", timeout=15)  # idle
        stopper = threading.Thread(target=lambda: gw.client().post("/down", json={"model_path": "m"}))
        stopper.start()
        time.sleep(0.2)  # the /down waits for the stop under way
        pinning = c.post("/up", json={"model_path": "m", "min_containers": 1})
        assert pinning.status_code == 503
        assert pinning.json()["error"]["code"] == "model_stopped"
        stopper.join()
        time.sleep(0.5)
        status = gw.status()["m"]
        assert status["state"] == "cold" and status["pinned"] is False


def test_bodies_of_the_gateway_own_routes_are_limited_too() -> None:
    """A huge body to /up was read whole into memory (only /v1/* had a size limit)."""
    with running_gateway(fake_model("m")) as gw, gw.client() as c:
        big = b'{"model_path": "m", "x": "' + b"a" * 2_000_000 + b'"}'
        response = c.post("/up", content=big, headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"


def test_odd_paths_are_refused_or_passed_on_as_sent() -> None:
    """'/v1/%00' crashed the proxy with a 500 after starting the engine; '%20' reached the
    engine as a malformed request line."""
    with running_gateway(fake_model("m")) as gw, gw.client() as c:
        bad = c.post("/v1/%00", json={"model": "m", **CHAT})
        assert bad.status_code == 400
        assert gw.status()["m"]["state"] == "cold"
        spaced = c.post("/v1/no%20such%20route", json={"model": "m", **CHAT})
        assert spaced.status_code == 404  # the engine's own answer for an unknown route


def test_websocket_upgrades_are_refused_cleanly() -> None:
    """A websocket upgrade got a 500 and an error in the log."""
    with running_gateway(fake_model("m")) as gw:
        port = int(gw.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         b"Sec-WebSocket-Version: 13\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 403")
        assert "Exception" not in gw.log()


def test_down_of_an_unknown_model_does_not_add_it_to_the_model_list() -> None:
    """/down with any valid name created a pool that /v1/models then listed for good."""
    with running_gateway(fake_model("m")) as gw, gw.client() as c:
        down = c.post("/down", json={"model_path": "someone/else"})
        assert down.status_code == 404 and down.json()["error"]["code"] == "model_not_found"
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == ["m"]
        assert list(gw.status()) == ["m"]  # nor to /status, with its metric series


def test_drain_seconds_zero_does_not_make_sigterm_wait_forever() -> None:
    """drain_seconds = 0 became uvicorn's 'no limit' and SIGTERM waited for open streams."""
    cfg = "[gateway]\ndrain_seconds = 0\n" + fake_model("m", "--chunks", "500", "--chunk-delay", "0.1")
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "m", "wait": 10}).json()["status"] == "healthy"
        with c.stream("POST", "/v1/chat/completions",
                      json={"model": "m", "stream": True, **CHAT}) as r:
            next(r.iter_raw())
            started = time.monotonic()
            gw.process.terminate()
            gw.process.wait(20)
        assert time.monotonic() - started < 10



def test_credentials_in_a_static_url_never_reach_clients_or_the_log() -> None:
    """An unreachable `url = "http://user:secret@host"` showed the secret in /up, 503 bodies,
    /status and the log; its address was in the clients' answers too."""
    from tests.support.gateway import free_port

    port = free_port()
    cfg = (f'[gateway]\nstartup_seconds = 2\n[models."s"]\n'
           f'url = "http://svc:s3cr3t-token@127.0.0.1:{port}"\n')
    with running_gateway(cfg) as gw, gw.client() as c:
        up = c.post("/up", json={"model_path": "s", "wait": 15}).json()
        assert up["status"] == "failed" and "not reachable" in up["error"]
        answers = [str(up), c.post("/v1/chat/completions", json={"model": "s", **CHAT}).text,
                   c.get("/status").text]
        assert not [t for t in [*answers, gw.log()] if "s3cr3t-token" in t]
        assert not [t for t in answers if str(port) in t]
        assert f"127.0.0.1:{port}" in gw.log()  # where the operator looks


def test_an_upstream_refusing_the_gateways_key_is_the_gateways_fault_not_the_clients() -> None:
    """A `url` model with a wrong `api_key` passed the engine's 401 on: the client, whose key
    was right, got an AuthenticationError and blamed its own key; the log said nothing."""
    with standalone_fake_engine("--model", "m", env={"VLLM_API_KEY": "engine-key"}) as url:
        cfg = f'[models."m"]\nurl = "{url}"\napi_key = "wrong-key"\n'
        with running_gateway(cfg) as gw:
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.api_key, max_retries=0)
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(model="m", **CHAT)
            assert refused.value.status_code == 502
            assert refused.value.code == "upstream_auth_failed"
            assert refused.value.response.headers["x-should-retry"] == "false"
            assert "wrong-key" not in refused.value.response.text
            log = gw.log()
            assert "refuses the gateway's key" in log  # when the pool turned healthy
            assert "refused the gateway's credentials" in log  # and at the request


def test_a_url_upstreams_key_can_come_from_the_environment() -> None:
    """`api_key` had to be written into the file, which deploy.md ships with the Modal app."""
    with standalone_fake_engine("--model", "m", env={"VLLM_API_KEY": "engine-key"}) as url:
        cfg = f'[gateway]\nfailure_cooldown_seconds = 0\n[models."m"]\nurl = "{url}"\napi_key_env = "M_KEY"\n'
        with running_gateway(cfg, env={"M_KEY": "engine-key"}) as gw, gw.client() as c:
            assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 200
        with running_gateway(cfg) as gw, gw.client() as c:
            refused = c.post("/v1/chat/completions", json={"model": "m", **CHAT})
            assert refused.status_code == 503
            assert "api_key_env names M_KEY, which is not set" in refused.json()["error"]["message"]


def test_one_bad_answer_leaves_a_url_upstream_healthy_but_a_dead_one_goes_cold() -> None:
    """One malformed answer from a `url` upstream turned its pool cold while its other
    requests ran: /status said cold with requests in flight, and under a few bad answers
    the pool flapped cold, starting, healthy, three log lines each time."""
    with standalone_fake_engine("--model", "g", "--garbage") as url:
        cfg = f'[gateway]\nstartup_seconds = 2\n[models."g"]\nurl = "{url}"\n'
        with running_gateway(cfg) as gw, gw.client() as c:
            for _ in range(3):
                assert c.post("/v1/chat/completions", json={"model": "g", **CHAT}).status_code == 502
            time.sleep(0.5)  # what a health check of the upstream takes, and more
            assert gw.status()["g"]["state"] == "healthy"
            assert "upstream unreachable" not in gw.log()
            os.kill(httpx.get(url + "/stats").json()["pid"], signal.SIGKILL)
            assert c.post("/v1/chat/completions", json={"model": "g", **CHAT}).status_code == 502
            wait_for(lambda: gw.status()["g"]["state"] != "healthy", timeout=10)
            assert "(upstream unreachable)" in gw.log()


def test_an_upstream_that_serves_another_name_is_named_in_the_log() -> None:
    """A `url` model named other than the engine serves it turned healthy, and every request
    got the engine's 404 with no word in the gateway's log of why."""
    with standalone_fake_engine("--model", "served-name") as url:
        cfg = f'[models."typo-name"]\nurl = "{url}"\n'
        with running_gateway(cfg) as gw, gw.client() as c:
            assert c.post("/up", json={"model_path": "typo-name", "wait": 10}).json()["status"] == "healthy"
            assert "does not list this name among its models (served-name)" in gw.log()


def test_up_accepts_json_sent_by_curl_d_without_a_content_type() -> None:
    """`curl -d '{"model_path": ...}' /up` (form-urlencoded by default) was a 400."""
    with running_gateway(fake_model("m")) as gw, gw.client() as c:
        response = c.post("/up", content=b'{"model_path": "m", "wait": 10}',
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert response.status_code == 200 and response.json()["status"] == "healthy"


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", None])
def test_chat_sent_by_curl_d_reaches_the_engine_as_json(content_type: str | None) -> None:
    """`curl -d '{...}' /v1/chat/completions` was routed by its JSON body but forwarded as
    form-urlencoded, which vLLM refuses (400) - after starting the engine for it."""
    headers = {"Content-Type": content_type} if content_type else {}
    with running_gateway(fake_model("m")) as gw, gw.client() as c:
        response = c.post("/v1/chat/completions", headers=headers,
                          content=b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]


def test_refused_keys_and_gateway_errors_are_in_the_access_log_and_metrics() -> None:
    """Requests refused for their key left no access line and no count, so failed-key
    attempts were invisible; the gateway's own error answers were logged as 0 bytes."""
    with running_gateway(fake_model("m")) as gw, gw.client() as c:
        refused = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", **CHAT},
                             headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401
        unknown = c.post("/v1/chat/completions", json={"model": "m", "messages": 1, "stream": 2})
        assert unknown.status_code == 400
        wait_for(lambda: "status=400" in gw.log() and "status=401" in gw.log())
        lines = gw.log().splitlines()
        refused_line = next(line for line in lines if "status=401" in line)
        assert "route=/v1/chat/completions" in refused_line
        assert "Bearer" not in refused_line and "wrong" not in refused_line
        bad_line = next(line for line in lines if "status=400" in line)
        assert f"bytes_out={len(unknown.content)}" in bad_line
        scraped = c.get("/metrics").text
        assert 'status="401"' in scraped and 'status="400"' in scraped


def test_opening_the_model_list_opens_its_entries() -> None:
    """With `public_routes = ["/v1/models"]`, `models.list()` worked without a key but
    `models.retrieve()` got a 401; and a retrieved entry lacked the list's `state`."""
    cfg = '[gateway]\npublic_routes = ["/v1/models"]\n' + fake_model("m")
    with running_gateway(cfg) as gw:
        listed = httpx.get(gw.url + "/v1/models").json()["data"]
        one = httpx.get(gw.url + "/v1/models/m")
        assert one.status_code == 200
        assert one.json() == next(entry for entry in listed if entry["id"] == "m")
        assert one.json()["state"] == "cold"
        assert httpx.get(gw.url + "/status").status_code == 401  # the rest stays closed


class _OddModelList(http.server.BaseHTTPRequestHandler):
    """An upstream whose /v1/models no gateway should trust: ids that are not strings."""

    model_list = b'{"data": [{"id": ["m"], "max_model_len": 5}, {"id": {}}, 7]}'

    def do_GET(self) -> None:
        body = b"{}" if self.path == "/health" else self.model_list
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _DeepModelList(_OddModelList):
    """JSON nested past any parser's recursion limit."""

    model_list = b"[" * 200_000 + b"]" * 200_000


def test_odd_model_lists_from_upstreams_do_not_break_the_gateway_list() -> None:
    servers = [
        http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        for handler in (_OddModelList, _DeepModelList)
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    cfg = "".join(
        f'[models."odd{i}"]\nurl = "http://127.0.0.1:{s.server_port}"\n'
        for i, s in enumerate(servers)
    )
    try:
        with running_gateway(cfg) as gw, gw.client() as c:
            for i in range(2):
                up = c.post("/up", json={"model_path": f"odd{i}", "wait": 10}).json()
                assert up["status"] == "healthy"
            listed = c.get("/v1/models")
            assert listed.status_code == 200, listed.text
            assert [m["id"] for m in listed.json()["data"]] == ["odd0", "odd1"]
            assert all("max_model_len" not in m for m in listed.json()["data"])
            assert "Traceback" not in gw.log()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_an_engine_just_started_serves_the_requests_it_was_started_for_before_its_eviction() -> None:
    """Two engine slots, one held by a pinned busy model, two more models asked for in turn:
    an engine was evicted the moment it turned healthy (any engine going idle wakes the
    start waiting for its slot), or when its first answer ended, before the other requests
    held for it were under way. They started it again: every swap cost more cold starts."""
    cfg = ("[gateway]\nlocal_gpus = 0\nmax_engines = 2\nhold_seconds = 60\n"
           + fake_model("p", extra="min_containers = 1")
           + fake_model("a", "--startup-delay", "1") + fake_model("b", "--startup-delay", "1"))

    async def swaps(gw: Gateway) -> tuple[list[int], list[bool]]:
        answers: list[int] = []
        seen_waiting: list[bool] = []
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=gw.url, headers=gw.headers, timeout=60,
                                     limits=limits) as c:
            done = asyncio.Event()

            async def keep_p_busy() -> None:  # each answer's end wakes the waiting start
                while not done.is_set():
                    await c.post("/v1/chat/completions", json={"model": "p", **CHAT})

            async def ask(model: str) -> None:
                answer = await c.post("/v1/chat/completions", json={"model": model, **CHAT})
                answers.append(answer.status_code)

            async def watch_b() -> None:
                while not done.is_set():
                    pools = (await c.get("/status")).json()["pools"]
                    b = next(pool for pool in pools if pool["model"] == "b")
                    seen_waiting.append(b["waiting_for_slot"] and b["held"] > 0)
                    await asyncio.sleep(0.1)

            background = [asyncio.create_task(keep_p_busy()) for _ in range(6)]
            background.append(asyncio.create_task(watch_b()))
            for first, second in [("a", "b"), ("b", "a")]:
                for model in (first, second):  # both cold: every request is held for a start
                    await c.post("/down", json={"model_path": model})
                asked = [asyncio.create_task(ask(first)) for _ in range(30)]
                await asyncio.sleep(0.3)
                asked += [asyncio.create_task(ask(second)) for _ in range(30)]
                await asyncio.gather(*asked)
            done.set()
            await asyncio.gather(*background)
        return answers, seen_waiting

    with running_gateway(cfg) as gw:
        wait_for(lambda: gw.status()["p"]["state"] == "healthy", timeout=20)
        answers, seen_waiting = asyncio.run(swaps(gw))
        assert answers == [200] * 120
        log = gw.log()
        # One start per model and round, never one more.
        assert log.count("[a] pool cold -> starting") == 2, log
        assert log.count("[b] pool cold -> starting") == 2, log
        assert "[b] stopping unused [a] to make room for it" in log
        assert any(seen_waiting)  # /status said so, and how many waited, while b waited


def test_a_steadily_busy_model_makes_way_for_another_at_the_engine_limit() -> None:
    """With one engine slot, a model with requests always under way was never idle, so a
    request for another model waited out hold_seconds and got a 503, however often retried."""
    cfg = ("[gateway]\nlocal_gpus = 0\nmax_engines = 1\nhold_seconds = 30\n"
           + fake_model("busy", "--response-delay", "0.05") + fake_model("other"))
    with running_gateway(cfg) as gw:
        assert httpx.post(gw.url + "/up", json={"model_path": "busy", "wait": 20},
                          headers=gw.headers, timeout=30).json()["status"] == "healthy"
        answers: list[int] = []
        done = threading.Event()

        def keep_busy() -> None:
            with gw.client() as own:
                while not done.is_set():
                    answers.append(own.post("/v1/chat/completions",
                                            json={"model": "busy", **CHAT}).status_code)

        clients = [threading.Thread(target=keep_busy) for _ in range(4)]
        for client in clients:
            client.start()
        try:
            time.sleep(1.5)  # busy has served longer than its start took
            with gw.client() as c:
                other = c.post("/v1/chat/completions", json={"model": "other", **CHAT})
            assert other.status_code == 200, other.text
            time.sleep(1.5)  # and busy's requests, held meanwhile, are served again after
        finally:
            done.set()
            for client in clients:
                client.join()
        assert set(answers) == {200}
        log = gw.log()
        assert "[busy] takes no new requests: it makes way for another model's engine" in log
        assert log.count("[busy] pool cold -> starting") == 2, log


def test_an_engine_making_way_is_shown_serves_again_once_pinned_and_lets_its_held_go() -> None:
    """An engine asked to make way stayed so once pinned (its requests held, /up saying
    healthy), and a request held for it was not watched for its client leaving."""
    cfg = ("[gateway]\nlocal_gpus = 0\nmax_engines = 1\nhold_seconds = 4\n"
           + fake_model("a", "--response-delay", "3") + fake_model("b"))
    with running_gateway(cfg) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "a", "wait": 10}).json()["status"] == "healthy"
        time.sleep(1)  # a has served as long as its start took
        busy = threading.Thread(target=lambda: httpx.post(
            gw.url + "/v1/chat/completions", json={"model": "a", **CHAT}, headers=gw.headers,
            timeout=30))
        busy.start()
        time.sleep(0.3)
        waiting_b = threading.Thread(target=lambda: httpx.post(
            gw.url + "/v1/chat/completions", json={"model": "b", **CHAT}, headers=gw.headers,
            timeout=30))
        waiting_b.start()
        wait_for(lambda: gw.status()["a"]["making_way"], timeout=5)
        with pytest.raises(httpx.ReadTimeout):  # held, and the client gives up
            httpx.post(gw.url + "/v1/chat/completions", json={"model": "a", **CHAT},
                       headers=gw.headers, timeout=0.5)
        wait_for(lambda: gw.status()["a"]["held"] == 0, timeout=1)  # noticed at once
        pinned = c.post("/up", json={"model_path": "a", "min_containers": 1}).json()
        assert pinned["pinned"] and not pinned["making_way"]
        # Served, not held until hold_seconds (a 503).
        assert c.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
        busy.join()
        waiting_b.join()


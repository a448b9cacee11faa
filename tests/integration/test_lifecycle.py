"""Pool lifecycle through the real gateway and real fake-engine processes."""

from __future__ import annotations

import concurrent.futures
import re
import time

import httpx
import openai
import psutil
import pytest

from tests.support.gateway import fake_model, free_port, running_gateway
from tests.support.waiting import wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def chat(client: httpx.Client, model: str, **extra: object) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, **CHAT, **extra})


def engine_starts(gateway_client: httpx.Client, model: str) -> float:
    text = gateway_client.get("/metrics").text
    found = re.search(
        rf'autoserve_engine_starts_total{{model="{re.escape(model)}"}} ([0-9.]+)', text
    )
    return float(found.group(1)) if found else 0.0


def test_cold_request_is_held_until_the_engine_is_healthy() -> None:
    cfg = fake_model("m", "--startup-delay", "1.5")
    with running_gateway(cfg) as gw, gw.client() as c:
        assert gw.status()["m"]["state"] == "cold"
        started = time.monotonic()
        response = chat(c, "m")
        assert response.status_code == 200, response.text
        assert time.monotonic() - started >= 1.4
        assert response.json()["choices"][0]["message"]["content"].startswith("tok0-m")
        assert gw.status()["m"]["state"] == "healthy"


def test_request_past_hold_seconds_gets_503_model_not_ready_with_retry_after() -> None:
    cfg = "[gateway]\nhold_seconds = 0.5\n" + fake_model("slow", "--startup-delay", "4")
    with running_gateway(cfg) as gw, gw.client() as c:
        response = chat(c, "slow")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_not_ready"
        assert int(response.headers["retry-after"]) >= 1
        # The engine keeps starting; a later request is served.
        wait_for(lambda: gw.status()["slow"]["state"] == "healthy")
        assert chat(c, "slow").status_code == 200


def test_concurrent_requests_and_up_calls_start_exactly_one_engine() -> None:
    cfg = fake_model("one", "--startup-delay", "1")
    with running_gateway(cfg) as gw, gw.client() as c:

        def work(i: int) -> int:
            with gw.client() as own:
                if i % 4 == 0:
                    return own.post("/up", json={"model_path": "one", "wait": 10}).status_code
                return chat(own, "one").status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(work, range(16)))
        assert codes == [200] * 16
        assert engine_starts(c, "one") == 1
        assert gw.status()["one"]["engines"] == 1


def test_idle_pool_scales_to_zero_and_the_next_request_starts_it_again() -> None:
    cfg = "[gateway]\nidle_seconds = 1\n" + fake_model("idle")
    with running_gateway(cfg) as gw, gw.client() as c:
        assert chat(c, "idle").status_code == 200
        engines = gw.engine_pids()
        assert engines
        wait_for(lambda: gw.status()["idle"]["state"] == "cold", timeout=10)
        wait_for(lambda: not any(psutil.pid_exists(p) for p in engines), timeout=10)
        assert chat(c, "idle").status_code == 200
        assert engine_starts(c, "idle") == 2


def test_long_stream_is_not_cut_by_the_idle_timeout() -> None:
    cfg = "[gateway]\nidle_seconds = 0.5\n" + fake_model(
        "long", "--chunks", "15", "--chunk-delay", "0.1"
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        with c.stream(
            "POST", "/v1/chat/completions", json={"model": "long", "stream": True, **CHAT}
        ) as response:
            body = b"".join(response.iter_raw())
        assert body.endswith(b"data: [DONE]\n\n")
        assert engine_starts(c, "long") == 1


def test_engine_crash_marks_failed_with_log_tail_then_restarts_after_cooldown() -> None:
    cfg = "[gateway]\nfailure_cooldown_seconds = 0.5\n" + fake_model("crashy", "--die-after", "1")
    with running_gateway(cfg) as gw, gw.client() as c:
        assert chat(c, "crashy").status_code == 200
        broken = chat(c, "crashy")  # the engine exits while answering this one
        assert broken.status_code == 502
        assert broken.json()["error"]["type"] == "engine_error"
        status = wait_for(lambda: (s := gw.status()["crashy"])["state"] == "failed" and s)
        assert "exited with code 3" in status["error"]
        assert "fake engine starting" in status["error"]  # the engine's own output
        time.sleep(0.6)
        assert chat(c, "crashy").status_code == 200
        assert engine_starts(c, "crashy") == 2


def test_engine_that_exits_at_start_fails_fast_with_its_error() -> None:
    cfg = fake_model("broken", "--fail-at-start", "RuntimeError: CUDA out of memory (fake)")
    with running_gateway(cfg) as gw, gw.client() as c:
        started = time.monotonic()
        response = chat(c, "broken")
        assert time.monotonic() - started < 10
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "model_failed"
        assert "CUDA out of memory (fake)" in error["message"]
        assert "exited prematurely" in error["message"]
        up = c.post("/up", json={"model_path": "broken"}).json()
        assert up["status"] == "failed"
        assert "CUDA out of memory (fake)" in up["error"]


def test_the_sdk_does_not_start_a_failed_engine_again_with_its_retries() -> None:
    cfg = "[gateway]\nfailure_cooldown_seconds = 0.2\n" + fake_model("broken", "--fail-at-start", "boom")
    with running_gateway(cfg) as gw, gw.client() as c:
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.api_key)  # max_retries=2
        with pytest.raises(openai.InternalServerError, match="boom"):
            sdk.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
        assert engine_starts(c, "broken") == 1


def test_a_model_that_keeps_failing_to_start_waits_twice_as_long_each_time() -> None:
    cfg = "[gateway]\nfailure_cooldown_seconds = 1\n" + fake_model("bad", "--fail-at-start", "boom")
    with running_gateway(cfg) as gw, gw.client() as c:
        waits = []
        for _ in range(3):
            response = chat(c, "bad")  # a start, which fails
            assert response.json()["error"]["code"] == "model_failed"
            waits.append(int(response.headers["retry-after"]))
            assert chat(c, "bad").headers["retry-after"] == str(waits[-1])  # no start
            time.sleep(waits[-1] + 0.1)
        assert waits == [1, 2, 4]
        assert engine_starts(c, "bad") == 3
        # /down is the operator's turn: the next failure waits the least again.
        c.post("/down", json={"model_path": "bad"})
        assert chat(c, "bad").headers["retry-after"] == "1"
        assert engine_starts(c, "bad") == 4


def test_an_engine_that_keeps_dying_soon_after_it_is_up_backs_off_too() -> None:
    """Out of memory at its first request, say: each restart would load it all again."""
    cfg = "[gateway]\nfailure_cooldown_seconds = 1\n" + fake_model("oom", "--die-after", "1")
    with running_gateway(cfg) as gw, gw.client() as c:
        waits = []
        for _ in range(2):
            assert c.post("/up", json={"model_path": "oom", "wait": 15}).json()["status"] == "healthy"
            assert chat(c, "oom").status_code == 200
            assert chat(c, "oom").status_code == 502  # the engine exits on this one
            failed = wait_for(lambda: (r := chat(c, "oom")).status_code == 503 and r)
            waits.append(int(failed.headers["retry-after"]))
            time.sleep(waits[-1] + 0.1)
        assert waits == [1, 2]


def test_an_upstream_that_keeps_failing_its_check_is_checked_again_without_backing_off() -> None:
    """A url upstream costs nothing to check, and may be back any moment (a restart)."""
    cfg = (
        "[gateway]\nfailure_cooldown_seconds = 1\nstartup_seconds = 1\n"
        f'[models."ext"]\nurl = "http://127.0.0.1:{free_port()}"\n'  # nothing listens
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        for _ in range(3):
            response = chat(c, "ext")
            assert response.json()["error"]["code"] == "model_failed"
            assert response.headers["retry-after"] == "1"
            time.sleep(1.1)


def test_engine_missing_its_startup_deadline_is_failed_and_stopped() -> None:
    cfg = "[gateway]\nstartup_seconds = 1\n" + fake_model("hang", "--hang-at-start")
    with running_gateway(cfg) as gw, gw.client() as c:
        up = c.post("/up", json={"model_path": "hang", "wait": 10}).json()
        assert up["status"] == "failed"
        assert "did not become healthy within 1 s" in up["error"]
        assert "loading weights: stuck (fake)" in up["error"]  # the engine's last words
        wait_for(lambda: not gw.engine_pids(), timeout=15)


def test_up_long_polls_until_healthy_and_down_stops_the_engine() -> None:
    cfg = fake_model("m", "--startup-delay", "1")
    with running_gateway(cfg) as gw, gw.client() as c:
        first = c.post("/up", json={"model_path": "m"}).json()
        assert first["status"] == "pending" and first["model"] == "m"
        ready = c.post("/v1/up", json={"model_path": "m", "wait": 15}).json()
        assert ready["status"] == "healthy"
        pids = gw.engine_pids()
        down = c.post("/down", json={"model_path": "m"}).json()
        assert down["state"] == "cold"
        wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), timeout=10)
        assert gw.status()["m"]["engines"] == 0
        # A name neither configured nor started (a typo of one, say) stops nothing: 404.
        mistyped = c.post("/down", json={"model_path": "M/m"})
        assert mistyped.status_code == 404
        assert mistyped.json()["error"]["code"] == "model_not_found"
        assert c.post("/down", json={"model_path": "m"}).json()["state"] == "cold"  # again


def test_aliases_route_to_one_pool_and_models_are_listed() -> None:
    cfg = fake_model("org/model-a", extra='aliases = ["a", "alpha"]') + fake_model("b")
    with running_gateway(cfg) as gw, gw.client() as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == ["org/model-a", "a", "alpha", "b"]
        response = chat(c, "alpha")
        assert response.status_code == 200
        assert response.json()["model"] == "org/model-a"
        assert chat(c, "a").status_code == 200
        assert engine_starts(c, "org/model-a") == 1
        assert c.get("/v1/models/a").json()["root"] == "org/model-a"


def test_a_local_folder_model_is_listed_by_its_aliases_not_its_path() -> None:
    cfg = fake_model("/srv/models/tiny", extra='aliases = ["tiny", "small"]')
    with running_gateway(cfg) as gw, gw.client() as c:
        listed = c.get("/v1/models").json()["data"]
        assert [(m["id"], m["root"]) for m in listed] == [("tiny", "tiny"), ("small", "tiny")]
        assert listed[0]["state"] == "cold"
        assert chat(c, "small").status_code == 200
        assert chat(c, "/srv/models/tiny").status_code == 200  # the path still routes, unlisted
        assert c.get("/v1/models/tiny").json()["state"] == "healthy"
        # Nor is the path in what clients are told (the gateway's log and /status have it).
        c.post("/down", json={"model_path": "tiny"})
        dying = fake_model("/srv/models/dying", "--die-after", "1", extra='aliases = ["dying"]')
    with running_gateway("[gateway]\nhold_seconds = 0.2\n" + dying) as gw, gw.client() as c:
        slow = chat(c, "dying")  # the fake engine takes longer than 0.2 s to start
        assert slow.status_code == 503 and "[dying] is starting" in slow.text, slow.text
        c.post("/up", json={"model_path": "dying", "wait": 15})
        assert chat(c, "dying").status_code == 200
        broken = chat(c, "dying")  # the engine exits on this one
        assert broken.status_code == 502 and "'dying'" in broken.text
        failed = wait_for(lambda: (r := chat(c, "dying")).status_code == 503 and r)
        assert failed.json()["error"]["message"].startswith("[dying] engine exited")
        for answer in (slow, broken, failed):
            assert "/srv/models" not in answer.text


def test_up_with_min_containers_pins_the_engine_against_idle_stops_until_down() -> None:
    cfg = "[gateway]\nidle_seconds = 0.5\n" + fake_model("warm")
    with running_gateway(cfg) as gw, gw.client() as c:
        up = c.post("/up", json={"model_path": "warm", "wait": 10, "min_containers": 1}).json()
        assert up["status"] == "healthy" and up["pinned"] is True
        time.sleep(2)
        assert gw.status()["warm"]["state"] == "healthy"
        assert c.post("/down", json={"model_path": "warm"}).json()["pinned"] is False
        assert c.post("/up", json={"model_path": "warm", "wait": 10}).json()["status"] == "healthy"
        wait_for(lambda: gw.status()["warm"]["state"] == "cold", timeout=10)
        bad = c.post("/up", json={"model_path": "warm", "min_containers": -1})
        assert bad.status_code == 400


def test_min_containers_in_the_file_starts_the_engine_with_the_gateway_and_keeps_it() -> None:
    cfg = "[gateway]\nidle_seconds = 0.5\n" + fake_model("warm", extra="min_containers = 1")
    cfg += fake_model("other")
    with running_gateway(cfg) as gw, gw.client() as c:
        wait_for(lambda: gw.status()["warm"]["state"] == "healthy", timeout=10)
        assert gw.status()["warm"]["pinned"] and gw.status()["other"]["state"] == "cold"
        time.sleep(1.5)  # three idle periods without a request
        assert gw.status()["warm"]["state"] == "healthy"
        c.post("/down", json={"model_path": "warm"})
        assert gw.status()["warm"]["state"] == "cold"


def test_the_model_list_says_max_model_len_once_the_engine_has_said_it() -> None:
    cfg = "[gateway]\nidle_seconds = 0.5\n" + fake_model(
        "m", "--max-model-len", "3072", extra='aliases = ["m-alias"]'
    )
    with running_gateway(cfg) as gw, gw.client() as c:
        assert "max_model_len" not in c.get("/v1/models/m").json()  # never started: unknown
        assert c.post("/up", json={"model_path": "m", "wait": 10}).json()["status"] == "healthy"
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert listed["m"]["max_model_len"] == listed["m-alias"]["max_model_len"] == 3072
        wait_for(lambda: gw.status()["m"]["state"] == "cold", timeout=10)
        assert c.get("/v1/models/m-alias").json()["max_model_len"] == 3072  # kept while cold

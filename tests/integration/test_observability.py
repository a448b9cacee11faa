"""What operators see: Prometheus metrics, access and state-change log lines, status fields."""

from __future__ import annotations

import re
import time

from tests.support.gateway import fake_model, running_gateway

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{re.escape(name)}{{{re.escape(wanted)}}} ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name}{{{wanted}}} not in metrics"
    return float(found.group(1))


def test_metrics_logs_and_status_tell_what_happened() -> None:
    cfg = ("[gateway]\nfailure_cooldown_seconds = 0\n"
           + fake_model("m", "--startup-delay", "0.5", "--chunks", "3")
           + fake_model("bad", "--fail-at-start", "ValueError: no such architecture"))
    with running_gateway(cfg) as gw, gw.client() as c:
        text = c.get("/metrics").text  # every configured model, before any request
        assert metric(text, "autoserve_pool_state", model="bad", state="cold") == 1
        assert metric(text, "autoserve_pool_state", model="m", state="healthy") == 0
        assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 200
        last_sent = time.time()
        with c.stream("POST", "/v1/chat/completions",
                      json={"model": "m", "stream": True, **CHAT}) as r:
            r.read()
        assert c.post("/v1/chat/completions", json={"model": "bad", **CHAT}).status_code == 503
        assert c.post("/v1/chat/completions", json={"model": "bad", **CHAT}).status_code == 503
        c.post("/v1/chat/completions", content=b"{")

        text = c.get("/metrics").text
        assert metric(text, "autoserve_requests_total",
                      model="m", route="/v1/chat/completions", status="200") == 2
        assert re.search(r'^autoserve_build_info\{version="[^"]+"\} 1\.0$', text, re.M)
        rss = re.search(r"^process_resident_memory_bytes ([0-9.e+]+)$", text, re.M)
        assert rss and float(rss.group(1)) > 10 * 2**20
        assert "_created" not in text
        assert metric(text, "autoserve_requests_total",
                      model="bad", route="/v1/chat/completions", status="503") == 2
        assert metric(text, "autoserve_request_held_seconds_count", model="m") == 1
        assert metric(text, "autoserve_request_held_seconds_count", model="bad") == 2
        assert metric(text, "autoserve_request_held_seconds_sum", model="m") >= 0.5
        assert metric(text, "autoserve_cold_start_seconds_count", model="m") == 1
        assert metric(text, "autoserve_pool_state", model="m", state="healthy") == 1
        assert metric(text, "autoserve_pool_state", model="bad", state="failed") == 1
        assert metric(text, "autoserve_engine_starts_total", model="bad") == 2
        assert metric(text, "autoserve_engine_restarts_total", model="bad") == 1
        assert metric(text, "autoserve_engine_failures_total", model="bad") == 2
        assert metric(text, "autoserve_gateway_overhead_seconds_count",
                      route="/v1/chat/completions") == 2
        assert metric(text, "autoserve_open_streams", model="m") == 0

        status = gw.status()
        assert last_sent <= status["m"]["last_request"] <= time.time()
        assert status["m"]["in_flight"] == 0 and status["m"]["engines"] == 1
        assert status["bad"]["last_request"] is not None  # its requests failed, but came
        # The cause on the first line (what a status table or a one-line error shows), then
        # the engine's log tail.
        first, _, tail = status["bad"]["error"].partition("\n")
        assert re.fullmatch(r"\[bad\] engine exited prematurely with code \d+: "
                            r"ValueError: no such architecture", first), first
        assert "ValueError: no such architecture" in tail

        time.sleep(0.2)
        log = gw.log()
        assert re.search(r"client=127\.0\.0\.1 model=m route=/v1/chat/completions status=200 "
                         r"duration=\S+ held=(?:0\.[5-9]|[1-9])\S* bytes_out=\d+", log)
        # A name that is not served is in the access line (not in the metrics' labels).
        assert c.post("/v1/chat/completions", json={"model": "typo", **CHAT}).status_code == 404
        time.sleep(0.2)
        assert "model=typo route=/v1/chat/completions status=404" in gw.log()
        assert 'model="typo"' not in c.get("/metrics").text
        assert "[m] pool cold -> starting (request)" in log
        assert re.search(r"\[m\] pool starting -> healthy \(engine healthy\) in \d+\.\d s\n", log)
        assert re.search(r"\[bad\] pool starting -> failed \(engine failed\): \[bad\] engine "
                         r"exited prematurely with code \d+: ValueError: no such architecture", log)


def test_json_logs_have_one_object_per_line_with_the_fields_as_keys() -> None:
    import json

    with running_gateway(fake_model("m"), args=["--log-format", "json"]) as gw, gw.client() as c:
        assert c.post("/v1/chat/completions", json={"model": "m", **CHAT}).status_code == 200
        time.sleep(0.2)
        entries = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
    access = [e for e in entries if e["logger"] == "vllm_autoserve.access"]
    assert access and access[0]["model"] == "m" and access[0]["status"] == 200
    assert {"duration", "held", "bytes_out", "route"} <= set(access[0])
    changes = [e for e in entries if e["logger"] == "vllm_autoserve.pools" and "new" in e]
    assert {"old": "cold", "new": "starting", "reason": "request"}.items() <= changes[0].items()


def test_in_flight_and_open_stream_gauges_count_a_live_stream() -> None:
    cfg = fake_model("m", "--chunks", "50", "--chunk-delay", "0.05")
    with running_gateway(cfg) as gw, gw.client() as c:
        with c.stream("POST", "/v1/chat/completions",
                      json={"model": "m", "stream": True, **CHAT}) as r:
            chunks = r.iter_bytes()  # kept: a dropped iterator would close the stream
            next(chunks)
            during = c.get("/metrics").text
        time.sleep(0.2)
        after = c.get("/metrics").text
    assert metric(during, "autoserve_requests_in_flight", model="m") == 1
    assert metric(during, "autoserve_open_streams", model="m") == 1
    assert metric(after, "autoserve_requests_in_flight", model="m") == 0
    assert metric(after, "autoserve_open_streams", model="m") == 0

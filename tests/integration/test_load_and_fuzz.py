"""Load, slow clients and fuzzed input: the gateway keeps serving and gives nothing away."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fake_engine import FAKE_ENGINE
from tests.support.gateway import TEST_KEY, Gateway, running_gateway
from tests.support.waiting import engine_port, standalone_fake_engine, wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with standalone_fake_engine("--model", "up", "--chunks", "20", "--chunk-delay", "0.01") as url:
        yield url


@pytest.fixture(scope="module")
def gateway(upstream: str) -> Iterator[Gateway]:
    # Only listed models: a fuzzed but valid repo id must not start a real engine.
    cfg = f'[gateway]\nmax_body_bytes = 65536\nallow_unlisted = false\n[models."up"]\nurl = "{upstream}"\n'
    with running_gateway(cfg) as gw:
        yield gw


async def _streams(gw: Gateway, count: int) -> list[bytes]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=gw.url, headers=gw.headers, timeout=120,
                                 limits=limits) as client:
        async def one() -> bytes:
            async with client.stream("POST", "/v1/chat/completions",
                                     json={"model": "up", "stream": True, **CHAT}) as r:
                assert r.status_code == 200
                return b"".join([chunk async for chunk in r.aiter_raw()])

        return await asyncio.gather(*(one() for _ in range(count)))


def test_300_concurrent_streams_complete_byte_for_byte(gateway: Gateway, upstream: str) -> None:
    expected = httpx.post(upstream + "/v1/chat/completions",
                          json={"model": "up", "stream": True, **CHAT}).content
    bodies = asyncio.run(_streams(gateway, 300))
    assert len(bodies) == 300
    assert all(body == expected for body in bodies)
    assert gateway.status()["up"]["in_flight"] == 0


def test_a_client_that_reads_nothing_does_not_make_the_gateway_buffer() -> None:
    cfg_model = "[gateway]\n" + "".join([
        '[models."big"]\n',
        f'command = ["{sys.executable}", "{FAKE_ENGINE}", "--port", "{{port}}", '
        '"--chunks", "1000", "--pad", "100000"]\n',
    ])
    with running_gateway(cfg_model) as gw, gw.client() as c:
        assert c.post("/up", json={"model_path": "big", "wait": 15}).json()["status"] == "healthy"
        stats = f"http://127.0.0.1:{engine_port(gw)}/stats"
        # 100 MB are on offer; the client reads one chunk, then nothing for two seconds.
        with c.stream("POST", "/v1/chat/completions",
                      json={"model": "big", "stream": True, **CHAT}) as response:
            chunks = response.iter_raw()
            next(chunks)
            time.sleep(2)
            written = httpx.get(stats).json()["events_written"]
            # The engine is held back, by the socket buffers alone: what the gateway read
            # and kept would have let it write all 1,000 chunks by now.
            assert written < 500, f"the engine wrote {written} of 1,000 chunks of 100 kB"
            # ... and reading again lets the stream run to its end.
            rest = b"".join(chunks)
        assert rest.endswith(b"data: [DONE]\n\n")
        assert httpx.get(stats).json()["events_written"] == 1001


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"model": st.one_of(st.text(max_size=40), json_values)},
        optional={"stream": json_values, "messages": json_values, "wait": json_values,
                  "model_path": st.one_of(st.text(max_size=40), json_values)},
    ).map(lambda v: json.dumps(v).encode()),
)
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
          "/up", "/v1/up", "/down", "/v1/down", "/v1/unknown/route"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES), body=bodies,
       content_type=st.sampled_from(["application/json", "text/plain",
                                     "multipart/form-data; boundary=x", ""]))
def test_fuzzed_bodies_get_openai_errors_and_no_5xx_but_engine_states(gateway: Gateway, route: str, body: bytes,
                                       content_type: str) -> None:
    headers = {**gateway.headers, "Content-Type": content_type}
    response = httpx.post(gateway.url + route, content=body, headers=headers, timeout=30)
    assert response.status_code < 500 or response.json()["error"]["code"] in (
        "model_failed", "model_not_ready", "upstream_unavailable"), response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["type"]
    assert TEST_KEY not in response.text


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
def test_fuzzed_paths_and_methods_never_get_a_5xx(gateway: Gateway, path: str, method: str) -> None:
    response = httpx.request(method, gateway.url + "/" + path.lstrip("/"),
                             headers=gateway.headers, timeout=30)
    assert response.status_code < 500, (method, path, response.text)


def test_gateway_log_never_contains_keys_or_bodies(gateway: Gateway) -> None:
    secret_prompt = "do-not-log-this-prompt"
    with gateway.client() as c:
        c.post("/v1/chat/completions",
               json={"model": "up", "messages": [{"role": "user", "content": secret_prompt}]})
        httpx.get(gateway.url + "/status", headers={"Authorization": "Bearer wrong-key-123"})
    # Access lines are written in batches, at most 0.1 s late.
    time.sleep(0.5)
    log = gateway.log()
    assert TEST_KEY not in log
    assert "wrong-key-123" not in log
    assert secret_prompt not in log
    assert "model=up route=/v1/chat/completions status=200" in log


async def _dropped_streams(gw: Gateway, count: int) -> None:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=gw.url, headers=gw.headers, timeout=30,
                                 limits=limits) as client:
        async def one() -> None:
            async with client.stream("POST", "/v1/chat/completions",
                                     json={"model": "long", "stream": True, **CHAT}) as r:
                async for _ in r.aiter_raw():
                    break

        await asyncio.gather(*(one() for _ in range(count)))


def test_clients_dropping_streams_leave_nothing_behind() -> None:
    """A client that drops its stream ends the engine's stream too, and leaves no connection
    open on either side (once, each dropped stream kept its upstream response alive)."""
    with standalone_fake_engine("--model", "long", "--chunks", "400", "--chunk-delay", "0.05") as url, \
            running_gateway(f'[models."long"]\nurl = "{url}"\n') as gw:
        stats = url + "/stats"
        asyncio.run(_dropped_streams(gw, 10))  # the pool's health check has its connection now
        wait_for(lambda: httpx.get(stats).json()["cancelled"] == 10, timeout=30)
        connections = len(psutil.Process(gw.process.pid).net_connections())
        for _ in range(6):
            asyncio.run(_dropped_streams(gw, 250))
        # Each dropped stream was ended upstream too (vLLM then aborts the generation)...
        wait_for(lambda: httpx.get(stats).json()["cancelled"] == 1510, timeout=30)
        assert httpx.get(stats).json()["completed_streams"] == 0
        # ... and neither its connection to the client nor the one upstream stays open.
        assert gw.status()["long"]["in_flight"] == 0
        wait_for(lambda: len(psutil.Process(gw.process.pid).net_connections()) <= connections,
                 timeout=10)

"""Prometheus metrics of the gateway (served at ``/metrics``)."""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the count
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes...
PlatformCollector(registry=REGISTRY)  # python_info
_STATES = ("cold", "starting", "healthy", "stopping", "failed")
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)
_COLD_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 1200)

REQUESTS = Counter(
    "autoserve_requests_total",
    "Requests answered, by model, route and HTTP status.",
    ["model", "route", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "autoserve_request_duration_seconds",
    "Whole request duration as the client sees it, held time and streaming included.",
    ["model", "route"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
OVERHEAD_SECONDS = Histogram(
    "autoserve_gateway_overhead_seconds",
    "Time the gateway itself spent before sending a request upstream (held time excluded).",
    ["route"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
HELD_SECONDS = Histogram(
    "autoserve_request_held_seconds",
    "Time requests waited for their model's pool to become healthy.",
    ["model"],
    buckets=_COLD_BUCKETS,
    registry=REGISTRY,
)
COLD_START_SECONDS = Histogram(
    "autoserve_cold_start_seconds",
    "From launching an engine to it answering /health.",
    ["model"],
    buckets=_COLD_BUCKETS,
    registry=REGISTRY,
)
POOL_STATE = Gauge(
    "autoserve_pool_state",
    "1 for the state each pool is in, 0 for the others.",
    ["model", "state"],
    registry=REGISTRY,
)
ENGINE_STARTS = Counter(
    "autoserve_engine_starts_total",
    "Engine starts (first starts and restarts).",
    ["model"],
    registry=REGISTRY,
)
ENGINE_RESTARTS = Counter(
    "autoserve_engine_restarts_total",
    "Starts of a model whose previous engine had failed.",
    ["model"],
    registry=REGISTRY,
)
ENGINE_FAILURES = Counter(
    "autoserve_engine_failures_total",
    "Engines that failed to start or died.",
    ["model"],
    registry=REGISTRY,
)
OPEN_STREAMS = Gauge(
    "autoserve_open_streams", "Responses being streamed right now.", ["model"], registry=REGISTRY
)
BUILD_INFO = Gauge(
    "autoserve_build_info", "The gateway's version (always 1).", ["version"], registry=REGISTRY
)
try:
    BUILD_INFO.labels(version("vllm-autoserve")).set(1)
except PackageNotFoundError:  # run from a source tree that is not installed
    BUILD_INFO.labels("unknown").set(1)
IN_FLIGHT = Gauge(
    "autoserve_requests_in_flight",
    "Requests being proxied right now.",
    ["model"],
    registry=REGISTRY,
)
HELD = Gauge(
    "autoserve_requests_held",
    "Requests (and /up calls) waiting for their model's engine to turn healthy.",
    ["model"],
    registry=REGISTRY,
)


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


@functools.lru_cache(maxsize=4096)
def child(metric: _Metric, *labels: str) -> _Metric:
    """``metric.labels(*labels)``, looked up once per label set: ``labels()`` takes a lock
    and builds its key on every call, which the per-request path need not pay."""
    return metric.labels(*labels)


_PER_MODEL = (
    REQUESTS,
    REQUEST_SECONDS,
    HELD_SECONDS,
    COLD_START_SECONDS,
    POOL_STATE,
    ENGINE_STARTS,
    ENGINE_RESTARTS,
    ENGINE_FAILURES,
    OPEN_STREAMS,
    IN_FLIGHT,
    HELD,
)


def forget_model(model: str) -> None:
    """Drop every series of a model whose pool is forgotten."""
    for metric in _PER_MODEL:
        metric.remove_by_labels({"model": model})
    child.cache_clear()  # cached children of removed series would count into the void


def set_pool_state(model: str, state: str) -> None:
    for name in _STATES:
        POOL_STATE.labels(model, name).set(1 if name == state else 0)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

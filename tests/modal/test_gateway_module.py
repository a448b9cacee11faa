"""The Modal app as deployed: module attributes and the settings Modal would receive.

There is no Modal emulator, but the module imports and builds its objects without
credentials. GPU, volumes and secrets are read from each function's spec; timeouts,
concurrency and autoscaling only exist as the arguments Modal's loader will send
(``_load``'s closure in modal 1.6.x), which is what ``options`` reads.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import modal
import pytest
from modal._partial_function import _find_partial_methods_for_user_cls, _PartialFunctionFlags
from modal._utils.async_utils import synchronizer

from vllm_autoserve.config import parse_config
from vllm_autoserve.errors import ConfigError
from vllm_autoserve.modal_engine import ContainerEngine
from vllm_autoserve.modal_layout import class_for, engine_shape

CONFIG = """
[gateway]
hold_seconds = 300
max_up_wait_seconds = 600
idle_seconds = 600
startup_seconds = 900
min_containers = 1

[defaults]
gpu = "H100"
max_inputs = 16

[models."Qwen/Qwen3-Next-80B-A3B-Instruct"]
gpu = "H200:2"
tensor_parallel_size = 2
aliases = ["qwen-next"]
max_containers = 3

[models."Qwen/Qwen3-8B"]
memory_snapshot = true

[models."Qwen/Qwen3-0.6B"]
vllm_args = ["--max-model-len", "8192"]

[models."already-running"]
url = "http://127.0.0.1:9000"

[models."my-cpu-model"]
command = ["python", "-m", "vllm.entrypoints.openai.api_server", "--port", "{port}"]
"""
BIG = "Qwen/Qwen3-Next-80B-A3B-Instruct"


def fresh_import(monkeypatch: pytest.MonkeyPatch, path: Path | None) -> ModuleType:
    if path is None:
        monkeypatch.delenv("AUTOSERVE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("AUTOSERVE_CONFIG", str(path))
    sys.modules.pop("vllm_autoserve.gateway", None)
    return importlib.import_module("vllm_autoserve.gateway")


@pytest.fixture
def load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[[str | None], ModuleType]]:
    def _load(text: str | None) -> ModuleType:
        path = None
        if text is not None:
            path = tmp_path / "autoserve.toml"
            path.write_text(text)
        return fresh_import(monkeypatch, path)

    yield _load
    sys.modules.pop("vllm_autoserve.gateway", None)


def service_function(obj: Any) -> Any:
    impl = synchronizer._translate_in(obj)
    return getattr(impl, "_class_service_function", None) or impl


def options(obj: Any) -> dict[str, Any]:
    """The arguments Modal's loader will send for this function or class."""
    load = service_function(obj)._load
    cells = (cell.cell_contents for cell in load.__closure__)
    return dict(zip(load.__code__.co_freevars, cells, strict=True))


def partials(cls: Any) -> dict[str, Any]:
    return dict(synchronizer._translate_in(cls)._method_partials)


def lifecycle(cls: Any) -> dict[str, str]:
    """Lifecycle hooks of a class: method name -> "enter" / "enter(snap=True)" / "exit"."""
    user_cls = synchronizer._translate_in(cls)._user_cls
    kinds = {
        "enter": _PartialFunctionFlags.ENTER_POST_SNAPSHOT,
        "enter(snap=True)": _PartialFunctionFlags.ENTER_PRE_SNAPSHOT,
        "exit": _PartialFunctionFlags.EXIT,
    }
    return {
        name: kind
        for kind, flag in kinds.items()
        for name in _find_partial_methods_for_user_cls(user_cls, flag)
    }


def test_imports_without_configuration(load: Callable[[str | None], ModuleType]) -> None:
    gateway = load(None)
    assert gateway.app.name == "vllm-autoserve"
    assert list(gateway.ENGINE_CLASSES) == ["Engine"]
    assert gateway.Engine is gateway.ENGINE_CLASSES["Engine"]
    assert options(gateway.Engine)["gpu"] == "H100"
    assert gateway.GATEWAY_CONFIG.gateway.hold_seconds == 120


def test_one_engine_class_per_shape(load: Callable[[str | None], ModuleType]) -> None:
    gateway = load(CONFIG)
    config = gateway.CONFIG
    big, snap = class_for(config, BIG), class_for(config, "Qwen/Qwen3-8B")
    assert set(gateway.ENGINE_CLASSES) == {"Engine", big, snap}
    assert big.startswith("Engine_H200x2_") and snap.startswith("Engine_H100_")
    # The 0.6B model only changes vLLM's arguments: it shares the default class.
    assert class_for(config, "Qwen/Qwen3-0.6B") == "Engine"
    assert class_for(config, "someone/unlisted") == "Engine"
    for name, cls in gateway.ENGINE_CLASSES.items():
        assert getattr(gateway, name) is cls  # how Modal finds it in the container
        assert synchronizer._translate_in(cls)._user_cls.__qualname__ == name


def test_engine_class_settings(load: Callable[[str | None], ModuleType]) -> None:
    gateway = load(CONFIG)
    cls = getattr(gateway, class_for(gateway.CONFIG, BIG))
    spec = service_function(cls)._spec
    assert spec.gpus == "H200:2"
    assert {str(path): repr(vol) for path, vol in spec.volumes.items()} == {
        "/root/.cache/huggingface": "modal.Volume.from_name('huggingface-cache')",
        "/root/.cache/vllm": "modal.Volume.from_name('vllm-cache')",
    }
    assert [repr(s) for s in spec.secrets] == ["modal.Secret.from_name('autoserve-hf-secret')"]
    opts = options(cls)
    assert opts["scaledown_window"] == 600
    assert opts["startup_timeout"] == 960  # the engine's own deadline (900 s) comes first
    assert opts["timeout"] == 60 * 60
    assert opts["max_concurrent_inputs"] == 16
    assert opts["max_containers"] == 3
    assert opts["min_containers"] is None  # warm pinning is per model, at /up (update_autoscaler)
    assert opts["enable_memory_snapshot"] is False

    methods = partials(cls)
    assert set(methods) == {"serve", "boot"}
    assert lifecycle(cls) == {"start": "enter", "stop": "exit"}
    web = methods["serve"].params.webhook_config
    assert (web.web_server_port, web.web_server_startup_timeout) == (8000, 960)
    assert web.requires_proxy_auth is False  # unless [gateway] modal_proxy_auth
    obj = cls(model_path=BIG)  # a parametrized instance: one pool per model
    assert obj.model_path == BIG


def test_memory_snapshot_class(load: Callable[[str | None], ModuleType]) -> None:
    gateway = load(CONFIG)
    cls = getattr(gateway, class_for(gateway.CONFIG, "Qwen/Qwen3-8B"))
    opts = options(cls)
    assert opts["enable_memory_snapshot"] is True
    assert opts["experimental_options"] == {"enable_gpu_snapshot": "True"}
    assert lifecycle(cls) == {"start": "enter(snap=True)", "wake": "enter", "stop": "exit"}


def test_a_gpu_count_modal_cannot_give_is_refused() -> None:
    config = parse_config({"models": {"big/m": {"gpu": 16}}})  # fine on a large local host
    with pytest.raises(ConfigError, match="gpu = 16: Modal gives one container at most 8"):
        engine_shape(config, "big/m")
    config = parse_config({"models": {"big/m": {"tensor_parallel_size": 16}}})
    with pytest.raises(ConfigError, match="tensor_parallel_size = 16 needs 16 GPUs: Modal"):
        engine_shape(config, "big/m")


def test_memory_snapshots_are_off_for_multi_gpu_models() -> None:
    config = parse_config(
        {"defaults": {"memory_snapshot": True}, "models": {BIG: {"gpu": "H200:2"}}}
    )
    assert engine_shape(config, BIG).memory_snapshot is False
    assert engine_shape(config, "other/model").memory_snapshot is True


def test_gateway_function_settings(
    load: Callable[[str | None], ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        gateway = load(CONFIG)
    # Clamped under Modal's 150 s, after which a request is answered with a redirect.
    assert gateway.GATEWAY_CONFIG.gateway.hold_seconds == 140
    assert gateway.GATEWAY_CONFIG.gateway.max_up_wait_seconds == 140
    assert "hold_seconds = 300" in caplog.text
    spec = service_function(gateway.gateway)._spec
    assert [repr(s) for s in spec.secrets] == [
        "modal.Secret.from_name('vllm-gateway-auth')",
        "modal.Secret.from_name('autoserve-hf-secret')",
    ]
    assert spec.gpus is None
    opts = options(gateway.gateway)
    assert opts["webhook_config"].requested_suffix == "gateway"
    assert opts["min_containers"] == 1
    assert opts["max_concurrent_inputs"] == 500
    assert opts["timeout"] == 60 * 60


def test_modal_gpu_specs_with_suffixes_get_classes_of_their_own(
    load: Callable[[str | None], ModuleType],
) -> None:
    from modal._utils.function_utils import parse_gpu_config

    gateway = load(
        '[models."exact/h100"]\ngpu = "H100!"\n'
        '[models."any/b200"]\ngpu = "B200+:8"\ntensor_parallel_size = 8\n'
    )
    exact = getattr(gateway, class_for(gateway.CONFIG, "exact/h100"))
    better = getattr(gateway, class_for(gateway.CONFIG, "any/b200"))
    assert len(gateway.ENGINE_CLASSES) == 3  # Engine (H100), H100! and B200+:8
    assert service_function(exact)._spec.gpus == "H100!"
    assert service_function(better)._spec.gpus == "B200+:8"
    for spec in ("H100!", "B200+:8"):
        parse_gpu_config(spec)  # Modal's own parser takes them


def test_an_idle_time_over_modals_window_is_cut_and_reported(
    load: Callable[[str | None], ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        gateway = load('[models."slow/idle"]\nidle_seconds = 7200\n')
    cls = getattr(gateway, class_for(gateway.CONFIG, "slow/idle"))
    assert options(cls)["scaledown_window"] == 3600
    assert (
        'models."slow/idle": idle_seconds = 7200 is over Modal\'s longest scale-down '
        "window; using 3600" in caplog.text
    )


def test_modals_own_deprecation_of_update_autoscaler_is_not_logged() -> None:
    # Obj.update_autoscaler (one model's pool) is implemented with the deprecated
    # Function.update_autoscaler in modal 1.6; other deprecations still show.
    import subprocess

    script = (
        "import vllm_autoserve.modal_handles\n"
        "from modal._utils.deprecation import deprecation_warning\n"
        "deprecation_warning((2026, 10, 16), '`Function.update_autoscaler()` is deprecated')\n"
        "deprecation_warning((2026, 10, 16), 'Something else is deprecated')\n"
    )
    run = subprocess.run(
        [sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, check=True
    )
    assert "update_autoscaler" not in run.stderr
    assert "Something else is deprecated" in run.stderr


@pytest.mark.parametrize(
    ("model_path", "reason"),
    [
        (
            "someone/unlisted",
            "[someone/unlisted] is refused: [someone/unlisted] is not a configured model",
        ),
        ("../etc", "[../etc] is refused: "),
        ("qwen-next", "[qwen-next] is not a canonical model name"),
    ],
)
def test_an_engine_url_called_with_a_refused_name_fails_with_its_reason(
    load: Callable[[str | None], ModuleType], model_path: str, reason: str
) -> None:
    import asyncio

    from vllm_autoserve.engine import EngineFailed

    gateway = load(CONFIG.replace("[gateway]\n", "[gateway]\nallow_unlisted = false\n", 1))
    engine = synchronizer._translate_in(gateway.Engine)._user_cls()
    engine.model_path = model_path
    with pytest.raises(EngineFailed) as info:
        asyncio.run(engine._start_engine(sleep_mode=False))
    assert str(info.value).startswith(reason)


def test_gateway_body_builds_the_app_over_modal_pools(
    load: Callable[[str | None], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_autoserve.app import GatewayApp
    from vllm_autoserve.modal_handles import LiveDict, LiveEngines
    from vllm_autoserve.pools.modal import ModalPools

    gateway = load(CONFIG)
    monkeypatch.setenv("VLLM_GATEWAY_AUTH", "k1,k2")
    asgi = gateway.gateway.local()  # the factory's body; nothing is sent to Modal yet
    assert isinstance(asgi, GatewayApp)
    assert isinstance(asgi.pools, ModalPools)
    assert isinstance(asgi.pools.state, LiveDict)
    assert isinstance(asgi.pools.engines, LiveEngines)
    assert asgi.config.gateway.hold_seconds == 140


@pytest.mark.parametrize("proxy_auth", [False, True])
def test_a_gateway_with_open_engine_urls_says_so_at_start(
    load: Callable[[str | None], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    proxy_auth: bool,
) -> None:
    setting = f"[gateway]\nmodal_proxy_auth = {str(proxy_auth).lower()}\n"
    gateway = load(CONFIG.replace("[gateway]\n", setting, 1))
    monkeypatch.setenv("VLLM_GATEWAY_AUTH", "k1")
    monkeypatch.setenv("MODAL_PROXY_KEY", "wk-1")
    monkeypatch.setenv("MODAL_PROXY_SECRET", "ws-1")
    with caplog.at_level(logging.WARNING, logger="vllm_autoserve.gateway"):
        gateway.gateway.local()
    warned = "engine URLs answer anyone who guesses them" in caplog.text
    assert warned is not proxy_auth


def test_the_engine_key_is_read_daily_so_that_modal_never_drops_it(
    load: Callable[[str | None], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from tests.modal.fakes import FakeDict

    gateway = load(CONFIG)
    schedule = options(gateway.keep_engine_key)["schedule"]
    assert schedule.proto_message == modal.Period(days=1).proto_message

    state = FakeDict()
    monkeypatch.setattr(gateway, "LiveDict", lambda: state)
    asyncio.run(gateway.keep_engine_key.local())  # the first run creates it
    key = state.data["engine-key"]
    assert isinstance(key, str) and len(key) >= 32
    asyncio.run(gateway.keep_engine_key.local())  # later runs keep it
    assert state.data["engine-key"] == key


def test_proxy_auth_closes_every_engine_url(load: Callable[[str | None], ModuleType]) -> None:
    gateway = load(CONFIG.replace("[gateway]\n", "[gateway]\nmodal_proxy_auth = true\n", 1))
    for cls in gateway.ENGINE_CLASSES.values():
        assert partials(cls)["serve"].params.webhook_config.requires_proxy_auth is True


def test_the_engine_gives_up_before_modal_kills_its_container(
    load: Callable[[str | None], ModuleType],
) -> None:
    # The engine keeps the deadline the user set; Modal's startup_timeout is longer, or the
    # container would die before it can stop vLLM and report the log tail.
    gateway = load("[gateway]\nstartup_seconds = 300\n")
    engine = ContainerEngine(BIG, gateway.CONFIG, api_key="k")
    assert engine.startup_seconds == 300
    assert options(gateway.Engine)["startup_timeout"] > engine.startup_seconds

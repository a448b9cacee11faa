from __future__ import annotations

from pathlib import Path

import pytest

from vllm_autoserve.config import Config, check_model_name, load_config, parse_config
from vllm_autoserve.errors import ConfigError, InvalidModelName, ModelNotFound

FULL_EXAMPLE = """
[gateway]
hold_seconds = 120
idle_seconds = 900
allow_unlisted = true

[defaults]
gpu = "H100"
vllm_args = []
env = {}

[models."Qwen/Qwen3-Next-80B-A3B-Instruct"]
gpu = "H200:2"
tensor_parallel_size = 2
aliases = ["qwen-next"]
vllm_args = ["--max-model-len", "65536"]

[models."my-cpu-model"]
command = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/tiny", "--port", "{port}"]

[models."already-running"]
url = "http://127.0.0.1:9000"
"""


def test_a_config_with_every_kind_of_model_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(FULL_EXAMPLE)
    config = load_config(path)
    assert config.resolve("qwen-next") == "Qwen/Qwen3-Next-80B-A3B-Instruct"
    qwen = config.model("Qwen/Qwen3-Next-80B-A3B-Instruct")
    assert (qwen.gpu, qwen.tensor_parallel_size) == ("H200:2", 2)
    assert config.model("my-cpu-model").gpu == "H100"  # from [defaults]
    assert config.model("already-running").url == "http://127.0.0.1:9000"


def test_no_file_means_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOSERVE_CONFIG", raising=False)
    config = load_config()
    assert config == Config()
    assert config.resolve("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"


def test_env_merges_and_vllm_args_append() -> None:
    config = parse_config(
        {
            "defaults": {"env": {"A": "1", "B": "1"}, "vllm_args": ["--enable-prefix-caching"]},
            "models": {"m": {"env": {"B": "2"}, "vllm_args": ["--max-model-len", "4096"]}},
        }
    )
    model = config.model("m")
    assert model.env == {"A": "1", "B": "2"}
    assert model.vllm_args == ["--enable-prefix-caching", "--max-model-len", "4096"]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"gateway": {"hold_secs": 1}}, "gateway.hold_secs: unknown key; did you mean 'hold_"),
        ({"model": {"a": {}}}, "model: unknown key; did you mean 'models'?"),
        ({"models": {"a": {"alias": ["b"]}}}, "models.a.alias: unknown key; did you mean 'alia"),
        ({"gateway": {"hold_seconds": 0}}, "gateway.hold_seconds"),
        ({"gateway": {"allow_unlisted": "maybe"}}, "gateway.allow_unlisted"),
        ({"models": {"m": {"gpu": "H100:x"}}}, "models.m.gpu"),
        ({"models": {"m": {"command": ["x"], "url": "http://a"}}}, "exclude each other"),
        ({"models": {"m": {"url": "ftp://a"}}}, "must be an http(s) URL"),
        ({"models": {"m": {"command": []}}}, "must not be empty"),
        (
            {"models": {"a": {"aliases": ["x"]}, "b": {"aliases": ["x"]}}},
            """models."b".aliases: 'x' is already used by models."a".aliases""",
        ),
        (
            {"models": {"a": {}, "b": {"aliases": ["a"]}}},
            'models."b".aliases: \'a\' is already used by models."a"',
        ),
        ({"models": {"a": {"aliases": ["a"]}}}, "the model's own name"),
        ({"gateway": {"drain_seconds": float("inf")}}, "gateway.drain_seconds"),
        ({"models": {"-bad": {}}}, "not a usable model name"),
        ({"models": {"m": {"tensor_parallel_size": 0}}}, "models.m.tensor_parallel_size"),
        (
            {"models": {"m": {"url": "http://a", "api_key": "k\r\nX-Evil: 1"}}},
            "'api_key' must be printable ASCII",
        ),
        (
            {"gateway": {"cors_origins": ["https://chat.example.com/"]}},
            "gateway.cors_origins: 'https://chat.example.com/' is not an origin",
        ),
        ({"gateway": {"cors_origins": ["chat.example.com"]}}, "is not an origin"),
        (
            {"models": {"a": {"aliases": ["x"]}, "b": {"lora_modules": {"x": "/l"}}}},
            """models."b".lora_modules: 'x' is already used by models."a".aliases""",
        ),
        ({"models": {"a": {"aliases": [""]}}}, """models."a".aliases: '' is not a usable"""),
        (
            {"models": {"a": {"command": ["serve", "--port", "{prot}"]}}},
            "models.a: 'command' must contain {port}",
        ),
        ({"models": {"a": {"command": ["serve"]}}}, "'command' must contain {port}"),
        (
            {"models": {"a": {"command": ["s", "{port}"], "vllm_args": ["-x"]}}},
            "'vllm_args' do not apply to a 'command'",
        ),
        ({"gateway": {"hold_seconds": "120"}}, "gateway.hold_seconds: Input should be a valid"),
        ({"gateway": {"allow_unlisted": 1}}, "gateway.allow_unlisted: Input should be a valid"),
        ({"models": {"m": {"env": {"X": 1}}}}, "models.m.env.X: Input should be a valid string"),
        ({"models": {"a": {"lora_modules": {"x": " "}}}}, "is not a repo id or path"),
        ({"defaults": {"lora_modules": {"x": "/l"}}}, "defaults.lora_modules: unknown key"),
        (
            {"defaults": {"gpu": "H100"}, "models": {"o/m": {"tensor_parallel_size": 2}}},
            """models."o/m": tensor_parallel_size = 2 needs 2 GPUs, but gpu = 'H100' (from """
            '[defaults]) gives 1; set gpu = "H100:2"',
        ),
        (
            {"defaults": {"gpu": 2, "tensor_parallel_size": 4}},
            "defaults: tensor_parallel_size = 4 needs 4 GPUs, but gpu = 2 gives 2; set gpu = 4",
        ),
        ({"models": {"m": {"gpu": "H100:16"}}}, "models.m.gpu: 'H100:16' is not a GPU spec"),
        ({"defaults": {"gpu": "H100", "tensor_parallel_size": 16}},
         "gives 1; a Modal GPU spec names at most 8 (on a local host: gpu = 16)"),
        ({"gpu": 1}, """gpu: unknown key; 'gpu' is a key of [defaults] or [models."NAME"]"""),
        ({"models": {"m": {"hold_seconds": 5}}},
         "models.m.hold_seconds: unknown key; 'hold_seconds' is a [gateway] key"),
        ({"gateway": {"gpu": 1}}, """'gpu' is a key of [defaults] or [models."NAME"]"""),
        ({"defaults": {"aliases": ["a"]}}, """'aliases' is a key of [models."NAME"]"""),
        ({"models": {"m": {"gpu": "H100!!"}}}, "models.m.gpu: 'H100!!' is not a GPU spec"),
        (
            {"models": {"u": {"url": "http://h", "api_key": "k", "api_key_env": "K"}}},
            "'api_key' and 'api_key_env' exclude each other",
        ),
        (
            {"models": {"u": {"url": "http://h", "api_key_env": "$KEY"}}},
            "'api_key_env' must name an environment variable, not '$KEY'",
        ),
        (
            {"gateway": {"max_engines": 1},
             "models": {"p1": {"min_containers": 1}, "p2": {"min_containers": 1}}},
            "gateway.max_engines = 1, but 2 models are pinned with min_containers (p1, p2)",
        ),
    ],
)
def test_bad_config_names_the_key(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert needle in str(info.value)


def test_cors_origins_are_kept_as_browsers_send_them() -> None:
    config = parse_config({"gateway": {"cors_origins": ["HTTPS://Chat.Example.com", "*"]}})
    assert config.gateway.cors_origins == ["https://chat.example.com", "*"]


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "name",
    ["Qwen/Qwen3-8B", "gpt2", "meta-llama/Llama-3.1-8B-Instruct", "a_b.c-d/e.f_g-1"],
)
def test_valid_repo_ids(name: str) -> None:
    check_model_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "a/../b",
        "/abs/path",
        "-x",
        "--trust-remote-code",
        "a/-b",
        "a b",
        " a",
        "a\nb",
        "a\rb",
        "a\x00b",
        "a/b/c",
        "a" * 257,
        "a/b.git",
        "a--b",
        "",
        ".hidden",
        "owner/name\n",
    ],
)
def test_invalid_repo_ids(name: str) -> None:
    with pytest.raises(InvalidModelName):
        check_model_name(name)


def test_a_command_may_hold_braces_of_its_own() -> None:
    shell = ["bash", "-c", 'exec srv --port {port} --dir "${HF_HOME}/x" --extra \'{"k": 1}\'']
    assert parse_config({"models": {"a": {"command": shell}}}).models["a"].command == shell


def test_adapters_and_aliases_of_started_vllm_keep_their_name_upstream() -> None:
    config = parse_config(
        {
            "models": {
                "base": {"aliases": ["b"], "lora_modules": {"sql": "/l"}},
                "own": {"aliases": ["o"], "command": ["serve", "{port}"]},
                "far": {"aliases": ["f"], "url": "http://x"},
            }
        }
    )
    assert config.resolve("sql") == config.resolve("b") == "base"
    # A command or url upstream does not know the gateway's aliases: those are rewritten.
    assert config.names_sent_as_is() == {"sql", "b"}


def test_answers_of_a_local_folder_model_name_its_alias_not_its_path() -> None:
    config = parse_config(
        {"models": {"/srv/tiny": {"aliases": ["tiny"]}, "org/m": {"aliases": ["m"]}}}
    )
    assert config.served_names("/srv/tiny") == ["tiny", "/srv/tiny"]
    assert config.served_names("org/m") == ["org/m", "m"]


def test_an_unlisted_name_without_an_owner_is_not_started() -> None:
    config = parse_config({"models": {"gpt2-local": {}}})
    assert config.resolve("openai-community/gpt2") == "openai-community/gpt2"
    assert config.resolve("gpt2-local") == "gpt2-local"
    with pytest.raises(ModelNotFound, match="full Hugging Face repo id"):
        config.resolve("gpt-4o-mini")  # a client's default, not a model to start


def test_unlisted_models_refused_when_not_allowed() -> None:
    config = parse_config(
        {"gateway": {"allow_unlisted": False}, "models": {"m": {"aliases": ["x"]}}}
    )
    assert config.resolve("x") == "m"
    with pytest.raises(ModelNotFound, match=r"in its configuration \(configured: m\)$"):
        config.resolve("org/other")
    with pytest.raises(InvalidModelName):  # invalid stays a 400, even when unlisted
        config.resolve("../x")


def test_a_mistyped_name_is_told_the_configured_ones_by_the_names_clients_use() -> None:
    many = {f"org/m{i}": {} for i in range(11)}
    config = parse_config({"models": {"/srv/tiny": {"aliases": ["tiny"]}, **many}})
    with pytest.raises(ModelNotFound) as info:
        config.resolve("tyni")
    assert info.value.message.endswith(
        "(configured: tiny, org/m0, org/m1, org/m2, org/m3, org/m4, org/m5, org/m6, org/m7, "
        "org/m8 and 2 more: see GET /v1/models)"
    )
    assert "/srv" not in info.value.message


def test_check_config_warns_of_programs_this_host_lacks(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "autoserve.toml"
    config.write_text(
        '[defaults]\nengine_python = "/nope/default-python"\n'
        '[models."a"]\ncommand = ["/nonexistent/bin", "--port", "{port}"]\n'
        '[models."b"]\nengine_python = "/nope/python"\n'
        '[models."c"]\ncommand = ["python3", "-m", "http.server", "{port}"]\n'
        '[models."d"]\nurl = "http://127.0.0.1:9"\nengine_python = "/nope/unused"\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "vllm_autoserve.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
    )
    # Valid (it may be meant for another host), but each would fail at its first request.
    assert run.returncode == 0 and run.stdout == "ok: 4 model(s) configured\n"
    assert run.stderr.splitlines() == [  # each where it is written, once; none for a url
        "warning: defaults.engine_python: '/nope/default-python' is not a program on this host",
        "warning: models.\"a\".command: '/nonexistent/bin' is not a program on this host",
        "warning: models.\"b\".engine_python: '/nope/python' is not a program on this host",
    ]

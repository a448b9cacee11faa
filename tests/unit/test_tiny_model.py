"""The tiny model: written offline, deterministic, idempotent, loadable, and well-behaved.

Writing needs ``tokenizers`` (the ``tiny-model`` extra); loading checks use ``transformers``
where it is installed. vLLM serving it is covered by the e2e tier.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import pytest

from vllm_autoserve import cpu_engine, tiny_model
from vllm_autoserve.tiny_model import TinyModelError, write_tiny_model


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def bf16_to_floats(data: bytes) -> array[float]:
    """bfloat16 bytes → floats (each bf16 is the upper half of a float32)."""
    halves = array("H", data)
    return array("f", array("I", [h << 16 for h in halves]).tobytes())


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_files_and_config(model: Path) -> None:
    assert {p.name for p in model.iterdir()} == {*tiny_model.FILES, tiny_model.MARKER}
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (256, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["max_position_embeddings"] == 8192
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    vocab_size = len(tokenizer["model"]["vocab"])
    assert config["vocab_size"] == vocab_size
    assert 500 < vocab_size < 4096
    assert config["eos_token_id"] == tokenizer["model"]["vocab"]["<|im_end|>"]
    generation = json.loads((model / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]
    assert generation["max_new_tokens"] == tiny_model.DEFAULT_MAX_TOKENS
    assert 2_000_000 < (model / "model.safetensors").stat().st_size < 4_000_000


def test_safetensors_is_well_formed(model: Path) -> None:
    header, data = read_safetensors(model / "model.safetensors")
    assert header.pop("__metadata__") == {"format": "pt"}
    offsets = sorted(tuple(t["data_offsets"]) for t in header.values())
    assert offsets[0][0] == 0 and offsets[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(offsets))
    for name, t in header.items():
        count = 1
        for dim in t["shape"]:
            count *= dim
        assert t["dtype"] == "BF16"
        assert t["data_offsets"][1] - t["data_offsets"][0] == 2 * count, name
    assert "lm_head.weight" not in header  # tied to the embeddings
    assert header["model.layers.1.self_attn.k_proj.weight"]["shape"] == [128, 256]
    assert header["model.layers.0.mlp.down_proj.weight"]["shape"] == [256, 512]


def test_only_printable_tokens_are_reachable(model: Path) -> None:
    """Dimension 0 of the embeddings is +2 for ASCII text tokens, -2 for the rest."""
    header, data = read_safetensors(model / "model.safetensors")
    vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    t = header["model.embed_tokens.weight"]
    embed = bf16_to_floats(data[t["data_offsets"][0] : t["data_offsets"][1]])
    hidden = t["shape"][1]
    suppressed = {i for i in range(t["shape"][0]) if embed[i * hidden] < 0}
    assert all(abs(embed[i * hidden]) == tiny_model.STEER for i in range(t["shape"][0]))
    assert {vocab[s] for s in tiny_model.SPECIAL_TOKENS} <= suppressed
    byte_of = {c: b for b, c in tiny_model._bytes_to_unicode().items()}
    for token, token_id in vocab.items():
        if token_id not in suppressed:
            text = bytes(byte_of[c] for c in token).decode("ascii")
            assert text.isprintable() or text.strip(" \n\t") == "", token
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # nothing else writes dimension 0
        t = header[f"model.layers.0.{name}.weight"]
        row0 = bf16_to_floats(data[t["data_offsets"][0] : t["data_offsets"][0] + 2 * t["shape"][1]])
        assert set(row0) == {0.0}


def test_deterministic_per_seed(model: Path, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again")
    assert digest(again) == digest(model)
    other = digest(write_tiny_model(tmp_path / "other", seed=1))
    assert other["model.safetensors"] != digest(model)["model.safetensors"]
    assert other["tokenizer.json"] == digest(model)["tokenizer.json"]


def test_idempotent_and_rewrites_for_another_seed(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m")
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert write_tiny_model(path) == path
    assert weights.stat().st_mtime_ns == before
    write_tiny_model(path, seed=7)
    assert json.loads((path / tiny_model.MARKER).read_text())["seed"] == 7
    weights.unlink()  # an incomplete model is written again
    write_tiny_model(path, seed=7)
    assert weights.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_refuses_to_overwrite_other_things(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "config.json").write_text("{}")
    with pytest.raises(TinyModelError, match="refusing"):
        write_tiny_model(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TinyModelError, match="not a directory"):
        write_tiny_model(tmp_path / "file")
    assert (tmp_path / "real" / "config.json").read_text() == "{}"
    tiny = write_tiny_model(tmp_path / "tiny")
    (tiny / "my-notes.txt").write_text("mine")  # someone's file beside a tiny model
    with pytest.raises(TinyModelError, match=r"my-notes\.txt"):
        write_tiny_model(tiny, seed=7)
    assert (tiny / "my-notes.txt").read_text() == "mine"


def test_runs_as_a_standalone_script(model: Path, tmp_path: Path) -> None:
    script = Path(tiny_model.__file__)
    out = tmp_path / "script"
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(out)], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == str(out)
    assert digest(out) == digest(model)


def test_without_tokenizers_runs_in_the_engine_python(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_model, "_load_tokenizers", lambda: None)
    monkeypatch.setattr(cpu_engine, "cpu_engine_python", lambda: Path(sys.executable))
    out = write_tiny_model(tmp_path / "via-engine")
    assert digest(out) == digest(model)


def test_without_tokenizers_or_engine_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_model, "_load_tokenizers", lambda: None)
    monkeypatch.setattr(cpu_engine, "cpu_engine_python", lambda: None)
    with pytest.raises(TinyModelError, match=r"vllm-autoserve\[tiny-model\]"):
        write_tiny_model(tmp_path / "m")


def test_loads_with_transformers(model: Path) -> None:
    import transformers  # the dev group installs it, with tokenizers

    config = transformers.AutoConfig.from_pretrained(model)
    assert config.model_type == "llama" and config.head_dim == 64
    assert config.tie_word_embeddings is True
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    assert tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) == config.vocab_size
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    text = "The harbour town, 12 gulls, and ünïcödé"
    assert tokenizer.decode(tokenizer(text).input_ids) == text

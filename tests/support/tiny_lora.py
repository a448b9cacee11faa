"""A tiny LoRA adapter (PEFT's file layout) for the tiny model, written offline."""

from __future__ import annotations

import json
import random
from array import array
from pathlib import Path

from vllm_autoserve import tiny_model

RANK = 8


def write_tiny_lora(path: Path, base: Path, *, seed: int = 1) -> Path:
    """Random low-rank updates of every layer's q_proj and v_proj; ``path`` is created."""
    config = json.loads((base / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    outputs = {
        "q_proj": config["num_attention_heads"] * config["head_dim"],
        "v_proj": config["num_key_value_heads"] * config["head_dim"],
    }
    rng = random.Random(seed)

    def matrix(rows: int, cols: int) -> tuple[list[int], bytes]:
        values = array("f", [rng.uniform(-0.05, 0.05) for _ in range(rows * cols)])
        return [rows, cols], tiny_model._bf16(values)

    tensors = {}
    for i in range(layers):
        for module, out in outputs.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = matrix(RANK, hidden)
            tensors[f"{prefix}.lora_B.weight"] = matrix(out, RANK)
    path.mkdir(parents=True, exist_ok=True)
    tiny_model._write_safetensors(path / "adapter_model.safetensors", tensors)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "lora_dropout": 0.0,
        "target_modules": sorted(outputs),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return path

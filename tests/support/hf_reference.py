"""Tiny random transformers models (the reference) and helpers shared by test_models.py and test_hf_io.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

_BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
)

# one config per family; between them they cover QKV bias, q/k norm with a decoupled head_dim, tied and untied
# embeddings, and the default, yarn and llama3 RoPE variants
TINY_CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(**_BASE, rope_theta=10000.0, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(
        **_BASE,
        head_dim=32,
        rope_theta=1e6,
        tie_word_embeddings=False,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128),
    ),
    "llama": lambda: transformers.LlamaConfig(
        **_BASE,
        rope_theta=1e5,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
}


def tiny_hf_model(model_type: str, seed: int = 0):
    """A random transformers model; norms and biases are perturbed too so that none of them is a no-op."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type](), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def hf_logits(model, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    def as_tensor(a):
        return None if a is None else torch.tensor(np.asarray(a), dtype=torch.long)

    with torch.no_grad():
        out = model(
            input_ids=as_tensor(input_ids),
            attention_mask=as_tensor(attention_mask),
            position_ids=as_tensor(position_ids),
        )
    return out.logits.float().numpy()


@nnx.jit
def _forward(model, input_ids, positions, segment_ids):
    return model(input_ids, positions, segment_ids)


def fr_logits(model, mesh, input_ids, positions, segment_ids) -> np.ndarray:
    with jax.set_mesh(mesh):
        out = _forward(model, *(jnp.asarray(np.asarray(a), jnp.int32) for a in (input_ids, positions, segment_ids)))
    logits = np.asarray(out)
    assert np.isfinite(logits).all(), "fr_jax logits hold NaN/Inf (padding rows must stay finite too)"
    return logits


def left_padded_positions(mask: np.ndarray) -> np.ndarray:
    """Per-row positions for a left-padded batch: a row's first real token is position 0."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)

"""Decoder models: config (HF config.json), the Qwen2/Qwen3/Llama decoder, HF safetensors I/O."""

from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import Decoder, KVCache, create_model, logical_axes, param_shardings
from fr_jax.models.hf import load_pretrained, save_pretrained

__all__ = [
    "Decoder",
    "KVCache",
    "ModelConfig",
    "create_model",
    "load_pretrained",
    "logical_axes",
    "param_shardings",
    "save_pretrained",
]

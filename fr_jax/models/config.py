"""ModelConfig: the one description of a Qwen2/Qwen2.5/Qwen3/Llama decoder, read from and written to HF config.json.

Both config.json dialects are read: transformers 4 (`rope_theta` + `rope_scaling`) and transformers 5
(`rope_parameters`). `to_hf` writes the transformers-4 keys, which transformers 5 (and SGLang/vLLM) also read.
Anything the decoder cannot reproduce exactly (another activation, sliding windows, an unsupported RoPE
scaling) is refused with an error naming the key, rather than silently producing different logits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")

_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
# keys of a rope_scaling dict that describe the scaling (rope_theta lives in its own field)
_ROPE_KEYS = (
    "rope_type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "truncate",
    "mscale",
    "mscale_all_dim",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention_chunk: int = 0  # query rows per attention block in the training forward; 0: all rows at once

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r}: expected one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        if self.attention_chunk < 0:
            raise ValueError(f"attention_chunk={self.attention_chunk}: expected 0 (off) or a positive row count")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_proj_bias(self) -> bool:
        """Qwen2's attention_bias covers q/k/v only; Llama's and Qwen3's also covers o_proj."""
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @classmethod
    def from_hf(cls, hf_config: dict, **overrides) -> ModelConfig:
        hf = dict(hf_config)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ValueError(f"config.json ({model_type}) lacks required key {key!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported (full attention only)")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        if hf.get("pretraining_tp", 1) != 1:
            raise ValueError(f"pretraining_tp={hf['pretraining_tp']} is not supported (only 1)")
        heads = hf["num_attention_heads"]
        rope_theta, rope_scaling = _read_rope(hf)
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
        )
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig override(s) {sorted(unknown)}")
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_pretrained(cls, model_dir, **overrides) -> ModelConfig:
        path = pathlib.Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir} (expected {path})")
        return cls.from_hf(json.loads(path.read_text()), **overrides)

    def to_hf(self) -> dict[str, Any]:
        hf = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.attention_bias
        return hf


def _read_rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, normalised rope_scaling or None) from either config.json dialect."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_scaling/rope_parameters must be a dict, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    rope_theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return rope_theta, None
    scaling = {k: params[k] for k in _ROPE_KEYS if k in params}
    scaling["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 32768))
    _check_rope_scaling(scaling)
    return rope_theta, scaling


def _check_rope_scaling(scaling: dict) -> None:
    rope_type = scaling.get("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES} "
            "('dynamic' NTK rescales with the sequence length, which a fixed-shape cache cannot follow)"
        )
    needed = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
        "yarn": ("factor",),
    }.get(rope_type, ())
    missing = [k for k in needed if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")


def rope_inverse_frequencies(cfg: ModelConfig) -> tuple[list[float], float]:
    """(inverse frequencies for head_dim/2 rotary pairs, attention scaling of cos/sin), per cfg.rope_scaling."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    inv = [1.0 / (base ** (2 * i / dim)) for i in range(dim // 2)]
    s = cfg.rope_scaling or {"rope_type": "default"}
    kind = s["rope_type"]
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return [f / s["factor"] for f in inv], 1.0
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old_len / high:
                out.append(f)
            elif wavelen > old_len / low:
                out.append(f / factor)
            else:
                smooth = (old_len / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out, 1.0
    # yarn: interpolate low frequencies, extrapolate high ones, ramp in between; scale attention by mscale
    factor = s["factor"]
    old_len = s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i, f in enumerate(inv):
        extrapolation = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
        out.append((f / factor) * (1 - extrapolation) + f * extrapolation)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    return out, float(attention_factor)

"""Shared by the rollout tests: a tiny random Qwen2 checkpoint with a real tokenizer, an engine on it, transformers'
greedy decoding and the trainer-side log-prob recompute."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from fr_jax.models.hf import load_pretrained
from fr_jax.rollout.engine import Engine
from fr_jax.rollout.server import eos_token_ids
from tests.support.hf_reference import fr_logits


def sglang_missing() -> str | None:
    """Why real SGLang cannot run here (None where it can): the gpu tests skip with this reason."""
    if importlib.util.find_spec("sglang") is None:
        return "sglang is not installed (pip install 'fr_jax[sglang]')"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


# head_dim 64 and a real vocabulary: the same checkpoint must also load in real SGLang (GPU test)
TINY_QWEN2 = dict(
    vocab_size=49152,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def build_tiny_qwen2(out_dir: pathlib.Path, tokenizer_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A random Qwen2 saved by transformers, with SmolLM2's tokenizer (and its EOS) beside it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = transformers.Qwen2Config(
        **TINY_QWEN2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 names the class TokenizersBackend; the generic name also loads under transformers 4 (SGLang)
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2))
    return out_dir


def make_engine(model_dir, mesh, tokenizer, *, dtype: str | None = None, **engine_options):
    """(model, Engine) on a checkpoint directory; the model stays usable (for recomputing log-probs)."""
    overrides = {} if dtype is None else dict(param_dtype=dtype, dtype=dtype)
    model = load_pretrained(model_dir, mesh=mesh, **overrides)
    return model, Engine(
        model,
        mesh=mesh,
        eos_token_ids=eos_token_ids(model_dir, tokenizer),
        detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        **engine_options,
    )


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate for one unpadded prompt; stops after the model's EOS (kept)."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
        )
    return out[0, len(prompt) :].tolist()


def recomputed_logprobs(model, mesh, prompts, outputs, temperature: float) -> list[np.ndarray]:
    """What the trainer computes: one padded batch through model(input_ids, positions, segment_ids), then
    log_softmax(logits / temperature) at each generated token (temperature 0 counts as 1)."""
    seqs = [list(p) + list(o) for p, o in zip(prompts, outputs)]
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int32)
    seg = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        seg[i, : len(s)] = 1
    pos = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape)
    logits = fr_logits(model, mesh, ids, pos, seg)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / (temperature or 1.0), axis=-1))
    result = []
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        steps = np.arange(len(p) - 1, len(p) - 1 + len(o))
        result.append(logp[i, steps, np.asarray(o, np.int64)])
        assert (result[-1] <= 0).all(), f"row {i}: a log-probability above 0"
    return result

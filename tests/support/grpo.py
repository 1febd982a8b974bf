"""Shared by the GRPO tests: a tiny word-level tokenizer whose tokens are pieces of Python, two "return a constant"
tasks scored by the real sandbox, a tiny llama config, and a GRPO config around them.

With this vocabulary a completion is a few tokens: "def f():\\n    return " followed by digits and an end token
gives a function the sandbox can run; anything else is malformed. The task "seven" wants f() == 7, "three" wants
f() == 3, so a policy can be scored, rewarded and improved in seconds on a CPU.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import tokenizers
import transformers
from flax import nnx

from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import create_model
from fr_jax.models.hf import save_pretrained
from fr_jax.parallel.mesh import make_mesh

HEADER = "def f():\n    return "
VOCAB = ["<pad>", "</s>", "<unk>", "three", "seven", HEADER, "1", "3", "5", "7"]
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": len(VOCAB),
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
    "max_position_embeddings": 64,
}
TASKS = [("const/3", "three", 3), ("const/7", "seven", 7)]
DIGITS = ("1", "3", "5", "7")
# A starting policy that knows the answer's format but not the answer: after a task word it mostly writes the
# function header, then one of the four digits with equal odds, then the end token (about 1 in 6 answers are right).
KNOWS_THE_FORMAT = {
    "three": {HEADER: 3.6},
    "seven": {HEADER: 3.6},
    HEADER: {d: 2.6 for d in DIGITS},
    **{d: {"</s>": 3.0} for d in DIGITS},
}


def build_tokenizer(out_dir: pathlib.Path, vocab: list[str] = VOCAB) -> pathlib.Path:
    """A word-level tokenizer over `vocab`: prompts split on whitespace, outputs decode by plain concatenation."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_tasks(path: pathlib.Path) -> pathlib.Path:
    """The constant tasks as a grpo.data.file, the same two in the train and the test split."""
    lines = [
        json.dumps(
            {
                "task_id": f"{task_id}/{split}",
                "split": split,
                "prompt": word,
                "entry_point": "f",
                "tests": [f"assert f() == {value}"],
                "reference_solution": f"{HEADER}{value}",
            }
        )
        for split in ("train", "test")
        for task_id, word, value in TASKS
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def grpo_config(run_dir, model_dir, tasks_file, *, rounds: int, **grpo_overrides) -> dict:
    """A whole `stage: grpo` config: the tiny llama at `model_dir`, local server over HTTP, local sandbox."""
    grpo = {
        "data": {"dataset": "jsonl", "file": str(tasks_file), "train_split": "train", "eval_split": "test"},
        "prompt": {"chat_template": False, "show_public_tests": False, "instruction": ""},
        "rollout": {
            "launch": "local",
            "n": 8,
            "prompts_per_step": 2,
            "max_new_tokens": 4,
            "temperature": 1.0,
            "mesh": "1,1,1",
            "max_running_requests": 16,
        },
        "sandbox": {"launch": "local", "workers": 2, "timeout_s": 5.0},
        "loss": {"agg": "token-mean", "clip_low": 0.2, "clip_high": 0.28},
        "samples_every": 1,
    }
    for key, value in grpo_overrides.items():
        grpo[key] = {**grpo[key], **value} if isinstance(value, dict) and key in grpo else value
    return {
        "stage": "grpo",
        "run_dir": str(run_dir),
        "model": {"pretrained": str(model_dir)},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "optim": {
            "learning_rate": 3e-3,
            "warmup_steps": 0,
            "decay": "constant",
            "clip_grad_norm": 1.0,
            "weight_decay": 0.0,
        },
        "train": {"steps": rounds, "batch_size": 16, "micro_batches": 2, "seed": 0, "export_hf": True},
        "checkpoint": {"every_steps": 1, "keep": 10, "async_save": False},
        "monitor": {"tensorboard": True, "progress_bar": False, "peak_tflops_per_device": 1.0},
        "grpo": grpo,
    }


def write_bigram_model(
    out_dir: pathlib.Path,
    tokenizer_dir: pathlib.Path,
    logits: dict[str, dict[str, float]],
    *,
    seed: int = 0,
    vocab: list[str] = VOCAB,
    **architecture,
) -> pathlib.Path:
    """An HF checkpoint of TINY_LLAMA (plus the tokenizer; `architecture` overrides its keys) whose embeddings and
    output head encode a bigram table over `vocab`: after token a the logit of token b is logits[a][b] (0 when
    absent), up to the small contribution of the randomly initialised layers, which stay trainable."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    config = {**TINY_LLAMA, "vocab_size": len(vocab), **architecture}
    model = create_model(ModelConfig.from_hf(config), mesh=mesh, rngs_seed=seed)
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
    hidden = config["hidden_size"]
    params["embed"] = np.eye(len(vocab), hidden, dtype=np.float32)
    head = np.zeros((hidden, len(vocab)), np.float32)
    for current, following in logits.items():
        for token, logit in following.items():
            head[vocab.index(current), vocab.index(token)] = logit / np.sqrt(hidden)  # RMSNorm scales e_a by sqrt(H)
    params["lm_head"] = head
    nnx.update(model, jax.device_put(params))
    save_pretrained(model, out_dir)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir

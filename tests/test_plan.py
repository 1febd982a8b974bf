"""fr_jax.plan: per-device memory from shapes and the sharding rules, checked against real sharded arrays."""

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from fr_jax import plan
from fr_jax.config import apply_overrides, load_config, parse_config
from fr_jax.models.decoder import abstract_model, create_model
from fr_jax.trainer.optim import build_optimizer
from fr_jax.trainer.runtime import mesh_from_config, model_config
from fr_jax.trainer.sft import sft_loss
from fr_jax.trainer.step import TrainStep

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {
    "stage": "sft",
    "run_dir": "unused",
    "model": {
        "architecture": {
            "model_type": "qwen2",
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    },
    "mesh": {"data": 1, "fsdp": 4, "tensor": 2},
    "train": {"steps": 10, "batch_size": 8, "micro_batches": 2},
    "sft": {"data": {"source": "mbpp", "max_seq_len": 32}},
    "plan": {"device": "cpu", "num_devices": 8},
}


def device_bytes(tree) -> int:
    """Bytes that device 0 really holds for a tree of sharded arrays."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def test_state_bytes_match_real_sharded_arrays():
    cfg = parse_config(TINY)
    mesh = mesh_from_config(cfg.mesh, jax.devices()[:8])
    model_cfg = model_config(cfg.model)
    step = TrainStep(abstract_model(model_cfg), sft_loss, build_optimizer(cfg.optim, cfg.train.steps)[0], mesh=mesh)
    state = step.init_state(nnx.to_pure_dict(nnx.state(create_model(model_cfg, mesh=mesh))), seed=0)
    rows = plan.plan_memory(cfg).rows
    assert rows["parameters (float32)"] == device_bytes(state.params)
    assert rows["optimizer state"] == device_bytes(state.opt_state)
    assert rows["gradients (float32) + accumulator"] == 2 * device_bytes(state.params)
    # and the sharding really splits: device 0 holds less than a replica
    assert device_bytes(state.params) < sum(x.nbytes for x in jax.tree.leaves(state.params)) / 4


def test_qwen_7b_and_14b_configs_on_paper(capsys):
    for name, billions, device in [
        ("sft_7b_h100x8.yaml", 7.616, "h100"),
        ("sft_7b_v5p64.yaml", 7.616, "tpu-v5p"),
        ("sft_14b_h100x8.yaml", 14.770, "h100"),
        ("sft_14b_v5p64.yaml", 14.770, "tpu-v5p"),
    ]:
        cfg = load_config(REPO / "configs" / name)
        p = plan.plan_memory(cfg)
        assert p.num_params / 1e9 == pytest.approx(billions, abs=0.001)
        assert p.device == device and p.seq_len == 16384 and p.fits, p.table()
        assert plan.main(["--config", str(REPO / "configs" / name)]) == 0
        out = capsys.readouterr().out
        assert "fits" in out and "optimizer state" in out and "activations kept for backward (remat full)" in out
    # the 7B without remat and tensor parallelism (full 16k attention scores per layer kept) cannot fit an H100
    path = str(REPO / "configs" / "sft_7b_h100x8.yaml")
    assert plan.main(["--config", path, "model.remat=none", "mesh.fsdp=8", "mesh.tensor=1"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_memory_follows_mesh_and_remat():
    base = load_config(REPO / "configs" / "sft_7b_h100x8.yaml")

    def rows(*overrides):
        return plan.plan_memory(parse_config(apply_overrides(base.model_dump(mode="json"), list(overrides)))).rows

    one_way, eight_way = (
        rows("mesh.fsdp=1", "mesh.tensor=1", "plan.num_devices=1"),
        rows("mesh.fsdp=8", "mesh.tensor=1"),
    )
    assert eight_way["parameters (float32)"] == pytest.approx(one_way["parameters (float32)"] / 8, rel=1e-3)
    assert eight_way["optimizer state"] == pytest.approx(one_way["optimizer state"] / 8, rel=1e-3)
    kept = "activations kept for backward (remat {})"
    short = rows("sft.data.max_seq_len=2048")
    full, none = short[kept.format("full")], rows("sft.data.max_seq_len=2048", "model.remat=none")[kept.format("none")]
    assert full < none / 4  # full remat keeps little more than each layer's input
    shorter, longer = (rows(f"sft.data.max_seq_len={n}")[kept.format("full")] for n in (1024, 4096))
    # and that grows about linearly with the sequence (the [rows, T, T] attention mask adds a small quadratic term)
    assert 1.95 < (longer - full) / (full - shorter) < 2.1
    assert rows("model.param_dtype=bfloat16")["parameters (bfloat16)"] * 2 == pytest.approx(
        rows()["parameters (float32)"], rel=1e-6
    )


def test_flops_per_token_matches_the_transformer_count():
    """For the 7B at 16k the traced matmul count equals 6 x matmul weights + the (full) attention matmuls."""
    cfg = load_config(REPO / "configs" / "sft_7b_h100x8.yaml")
    m = model_config(cfg.model)
    p = plan.plan_memory(cfg)
    d, h, kv, hd, f = m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim, m.intermediate_size
    non_embedding = m.num_hidden_layers * (2 * d * h * hd + 2 * d * kv * hd + 3 * d * f) + d * m.vocab_size
    attention = 2 * 2 * 16384 * m.num_attention_heads * m.head_dim * m.num_hidden_layers  # QK^T and PV per token
    assert p.flops_per_token == pytest.approx(6 * non_embedding + 3 * attention, rel=1e-6)
    assert np.isfinite(p.total) and p.total > 0

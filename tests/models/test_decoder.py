"""The decoder against transformers (logits parity on 1 and 8 devices), cached decoding, remat, dtypes, config."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from fr_jax.models.config import ModelConfig, rope_inverse_frequencies
from fr_jax.models.decoder import create_model, logical_axes, param_shardings, training_attention
from fr_jax.models.hf import load_pretrained
from fr_jax.parallel.mesh import make_mesh
from tests.support.hf_reference import TINY_CONFIGS, fr_logits, hf_logits, left_padded_positions, tiny_hf_model

MODEL_TYPES = tuple(TINY_CONFIGS)


@pytest.fixture(scope="module")
def meshes():
    return {"1dev": make_mesh(1, 1, 1, devices=jax.devices()[:1]), "8dev": make_mesh(1, 4, 2)}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """model_type -> (transformers model, its save_pretrained dir with sharded safetensors)."""
    out = {}
    for model_type in MODEL_TYPES:
        hf = tiny_hf_model(model_type)
        path = tmp_path_factory.mktemp(model_type)
        hf.save_pretrained(path, max_shard_size="100KB")
        out[model_type] = (hf, path)
    return out


def _mixed_batch():
    """Row 0 full, row 1 left-padded, row 2 two packed sequences then one padding token."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 256, (3, 12))
    segments = np.ones((3, 12), np.int64)
    segments[1, :4] = 0
    segments[2] = [1] * 5 + [2] * 6 + [0]
    positions = left_padded_positions(segments[:2] != 0)
    positions = np.concatenate([positions, [list(range(5)) + list(range(6)) + [0]]])
    return ids, positions, segments


@pytest.mark.parametrize("mesh_name", ["1dev", "8dev"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_match_transformers(model_type, mesh_name, references, meshes):
    hf, path = references[model_type]
    mesh = meshes[mesh_name]
    model = load_pretrained(path, mesh=mesh)
    ids, positions, segments = _mixed_batch()
    ours = fr_logits(model, mesh, ids, positions, segments)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()  # padding rows included

    ref_rows = hf_logits(hf, ids[:2], attention_mask=segments[:2] != 0, position_ids=positions[:2])
    real = segments[:2] != 0
    assert np.abs(ours[:2] - ref_rows)[real].max() <= 1e-4
    for seg, span in ((1, slice(0, 5)), (2, slice(5, 11))):  # a packed sequence equals that sequence alone
        ref_seg = hf_logits(hf, ids[2:3, span])
        assert np.abs(ours[2:3, span] - ref_seg).max() <= 1e-4, f"packed segment {seg}"


@pytest.mark.parametrize("layers", ["stacked", "unstacked"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cached_decode_equals_full_forward(model_type, layers, references, meshes):
    """Prefill of a left-padded batch and N one-token steps give the same logits as one forward pass, whether the
    layers are slices of the stacked weights or the separate Blocks that the rollout engine decodes with."""
    mesh = meshes["8dev"]
    stacked = load_pretrained(references[model_type][1], mesh=mesh)
    prompt_len, new_tokens = 6, 4
    total = prompt_len + new_tokens
    ids = np.random.RandomState(1).randint(0, 256, (4, total))
    mask = np.zeros((4, total), bool)
    for row, length in enumerate([6, 2, 4, 1]):
        mask[row, prompt_len - length :] = True
    positions = left_padded_positions(mask)
    full = fr_logits(stacked, mesh, ids, positions, mask.astype(np.int32))
    model = stacked
    if layers == "unstacked":  # consumed: each stacked weight is freed once sliced
        model = stacked.unstacked(consume=True)
        assert all(a.is_deleted() for a in jax.tree.leaves(nnx.state(stacked.layers)))
        assert not any(a.is_deleted() for a in jax.tree.leaves(nnx.state(model)))

    step = nnx.jit(lambda m, *a: m.decode(*a), donate_argnums=(3,))

    def as_jax(a):
        return jnp.asarray(a, jnp.int32)

    with jax.set_mesh(mesh):
        cache = model.init_cache(4, total)
        kv_mask = mask.copy()
        kv_mask[:, prompt_len:] = False
        logits, cache = step(
            model,
            as_jax(ids[:, :prompt_len]),
            as_jax(positions[:, :prompt_len]),
            cache,
            jnp.int32(0),
            jnp.asarray(kv_mask),
        )
        errors = [np.abs(np.asarray(logits) - full[:, :prompt_len])[mask[:, :prompt_len]].max()]
        for slot in range(prompt_len, total):
            kv_mask[:, slot] = True
            logits, cache = step(
                model,
                as_jax(ids[:, slot : slot + 1]),
                as_jax(positions[:, slot : slot + 1]),
                cache,
                jnp.int32(slot),
                jnp.asarray(kv_mask),
            )
            errors.append(np.abs(np.asarray(logits)[:, 0] - full[:, slot]).max())
    assert max(errors) <= 1e-5, errors
    cfg = model.cfg
    assert len(cache.k) == len(cache.v) == cfg.num_hidden_layers
    assert cache.k[0].shape == (4, cfg.num_key_value_heads, total, cfg.head_dim)


@pytest.mark.parametrize("mesh_name", ["1dev", "8dev"])
def test_remat_and_attention_chunks_give_the_same_gradients(mesh_name, references, meshes):
    """Every remat policy and attention chunking (4 divides the 12 tokens; 5 does not: one block) gives the loss
    and gradients of the plain forward, on a batch with padding and packed segments."""
    mesh = meshes[mesh_name]
    ids, positions, segments = (jnp.asarray(a, jnp.int32) for a in _mixed_batch())

    @nnx.jit
    def loss_and_grads(model):
        def loss(m):
            logp = jax.nn.log_softmax(m(ids, positions, segments)[:, :-1])
            picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return -jnp.sum(picked * (segments[:, 1:] != 0)) / jnp.sum(segments[:, 1:] != 0)

        return nnx.value_and_grad(loss)(model)

    results = {}
    for remat, chunk in (("none", 0), ("full", 0), ("dots", 0), ("none", 4), ("full", 4), ("none", 5)):
        model = load_pretrained(references["qwen3"][1], mesh=mesh, remat=remat, attention_chunk=chunk)
        assert (model.cfg.remat, model.cfg.attention_chunk) == (remat, chunk)
        with jax.set_mesh(mesh):
            loss, grads = loss_and_grads(model)
        results[remat, chunk] = (float(loss), jax.tree.leaves(nnx.to_pure_dict(grads)))
    base_loss, base_grads = results.pop(("none", 0))
    assert any(np.abs(g).max() > 0 for g in base_grads)
    for setting, (loss, grads) in results.items():
        assert loss == pytest.approx(base_loss, abs=1e-6), setting
        assert max(float(np.abs(a - b).max()) for a, b in zip(grads, base_grads)) <= 1e-6, setting


def test_attention_chunks_bound_the_backward_memory():
    """The point of chunking: the compiled backward pass of 512-token attention needs far less scratch memory
    when queries go 64 rows at a time (no [T, T] scores kept), with the same values and gradients."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 512, 4, 16), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((1, 512, 2, 16), np.float32)) for _ in range(2))
    segments = jnp.asarray(np.repeat([[1, 2]], 256, axis=1), jnp.int32)  # two packed sequences

    def grads(chunk):
        def loss(q, k, v):
            return jnp.sum(training_attention(q, k, v, segments, chunk) ** 2)

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return fn(q, k, v), fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    (full_loss, full_grads), full_bytes = grads(0)
    (chunked_loss, chunked_grads), chunked_bytes = grads(64)
    assert float(chunked_loss) == pytest.approx(float(full_loss), rel=1e-5)
    for a, b in zip(chunked_grads, full_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    scores_bytes = 4 * 512 * 512 * 4  # one [H, T, T] float32 array
    assert full_bytes >= scores_bytes
    assert chunked_bytes < full_bytes / 3, (chunked_bytes, full_bytes)


def test_compute_and_param_dtypes(references, meshes):
    mesh = meshes["1dev"]
    path = references["qwen2"][1]
    ids, positions, segments = _mixed_batch()
    exact = fr_logits(load_pretrained(path, mesh=mesh), mesh, ids, positions, segments)
    bf16 = load_pretrained(path, mesh=mesh, param_dtype="bfloat16", dtype="bfloat16")
    assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("bfloat16")}
    approx = fr_logits(bf16, mesh, ids, positions, segments)
    assert approx.dtype == np.float32
    real = segments != 0
    assert np.abs(approx - exact)[real].max() < 0.1
    assert np.abs(approx - exact)[real].max() > 0  # it did compute in bfloat16


def test_parameters_carry_logical_axes_and_shard_by_rules(meshes):
    cfg = ModelConfig.from_hf(TINY_CONFIGS["qwen3"]().to_dict())
    mesh = meshes["8dev"]
    model = create_model(cfg, mesh=mesh)
    axes = nnx.to_pure_dict(logical_axes(model))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for name, value in params["layers"].items():
        assert len(axes["layers"][name]) == value.ndim and axes["layers"][name][0] == "layers", name
    assert value.shape[0] == cfg.num_hidden_layers
    assert axes["layers"]["q_proj"] == ("layers", "embed", "heads", "head_dim")
    assert axes["embed"] == ("vocab", "embed")
    assert params["layers"]["q_proj"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert params["layers"]["down_proj"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    q_proj = np.asarray(params["layers"]["q_proj"])
    assert not np.allclose(q_proj[0], q_proj[1])  # each layer drew its own init
    expected = nnx.to_pure_dict(param_shardings(model, mesh))
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert got.sharding.is_equivalent_to(want, got.ndim)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 16,
            "attention_factor": 1.3,
        },
    ],
)
def test_rope_frequencies_match_transformers(scaling):
    hf = transformers.Qwen2Config(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e6,
        max_position_embeddings=4096,
        rope_scaling=dict(scaling) if scaling else None,
    )
    ref = Qwen2RotaryEmbedding(hf)
    ours, factor = rope_inverse_frequencies(ModelConfig.from_hf(hf.to_dict()))
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref.inv_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(ref.attention_scaling)


def test_config_round_trip_and_refusals():
    cfg = ModelConfig.from_hf(TINY_CONFIGS["llama"]().to_dict(), remat="dots")
    assert ModelConfig.from_hf(cfg.to_hf(), remat="dots") == cfg
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.qk_norm, cfg.rope_type) == (True, True, False, "llama3")
    qwen2 = ModelConfig.from_hf(TINY_CONFIGS["qwen2"]().to_dict())
    assert (qwen2.qkv_bias, qwen2.o_proj_bias) == (True, False)
    hf = cfg.to_hf()
    with pytest.raises(ValueError, match="'mistral'"):
        ModelConfig.from_hf({**hf, "model_type": "mistral"})
    with pytest.raises(ValueError, match="'dynamic'"):
        ModelConfig.from_hf({**hf, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="'longrope'"):
        ModelConfig.from_hf({**hf, "rope_scaling": {"type": "longrope", "factor": 2.0}})
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf({**hf, "use_sliding_window": True})
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf({**hf, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="remat"):
        dataclasses.replace(cfg, remat="sometimes")
    with pytest.raises(ValueError, match="unknown ModelConfig override"):
        ModelConfig.from_hf(hf, dtyp="bfloat16")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained("/nonexistent/model")

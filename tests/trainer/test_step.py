"""The jitted sharded train step with the real fr_jax Decoder (tiny, random): sharding invariance, exact
gradient accumulation, non-finite detection, mixed precision, remat, and the optimizer schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fr_jax.config import OptimSection
from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import abstract_model, create_model
from fr_jax.parallel.mesh import make_mesh
from fr_jax.trainer.optim import build_optimizer, decay_mask, learning_rate_schedule
from fr_jax.trainer.sft import sft_loss
from fr_jax.trainer.step import NonFiniteError, TrainStep

TINY = dict(
    model_type="qwen2",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
T = 32


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig.from_hf(TINY, **overrides)


def one_device_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def sgd_recording_grads(lr: float) -> optax.GradientTransformation:
    """Plain SGD whose state is the last gradient it saw, so tests can read the step's exact gradients."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(lambda g: -lr * g, grads), grads),
    )


def random_rows(rng, rows: int, mask_density) -> dict[str, np.ndarray]:
    """Rows of two packed segments each, loss on a `mask_density` fraction of tokens (one density per row)."""
    seg = np.where(np.arange(T) < T // 2 - 3, 1, 2).astype(np.int32)
    seg = np.broadcast_to(seg, (rows, T)).copy()
    seg[:, -2:] = 0  # padding
    positions = np.where(seg == 2, np.arange(T) - (T // 2 - 3), np.arange(T)).astype(np.int32) * (seg > 0)
    density = np.broadcast_to(np.asarray(mask_density, float), (rows,))[:, None]
    mask = ((rng.random((rows, T)) < density) & (seg > 0)).astype(np.float32)
    return {
        "input_ids": rng.integers(0, 256, (rows, T)).astype(np.int32),
        "targets": rng.integers(0, 256, (rows, T)).astype(np.int32),
        "loss_mask": mask,
        "segment_ids": seg,
        "positions": positions,
    }


def as_micro_batches(rows: dict[str, np.ndarray], m: int) -> dict[str, np.ndarray]:
    return {k: v.reshape(m, -1, *v.shape[1:]) for k, v in rows.items()}


@pytest.fixture(scope="module")
def init_params():
    return jax.device_get(nnx.to_pure_dict(nnx.state(create_model(tiny_config(), mesh=one_device_mesh()))))


_STEPS: dict = {}  # compiled steps shared between tests (a compile is most of a test's time)


def train_step(mesh_shape, micro_batches=1, precision="float32") -> TrainStep:
    key = (mesh_shape, micro_batches, precision)
    if key not in _STEPS:
        mesh = one_device_mesh() if mesh_shape == (1, 1, 1) else make_mesh(*mesh_shape)
        if precision == "float32":
            cfg, optimizer = tiny_config(), sgd_recording_grads(0.5)
        else:  # bf16 compute, fp32 master weights, the real AdamW
            cfg = tiny_config(dtype="bfloat16", param_dtype="float32")
            optimizer = build_optimizer(OptimSection(learning_rate=1e-3), total_steps=10)[0]
        _STEPS[key] = TrainStep(abstract_model(cfg), sft_loss, optimizer, mesh=mesh, micro_batches=micro_batches)
    return _STEPS[key]


def run_steps(step: TrainStep, params, batches):
    """Losses and per-step gradients (the recording optimizer's state) of consecutive steps."""
    state = step.init_state(jax.device_put(params, step.param_shardings), seed=0)
    losses, grads = [], []
    for batch in batches:
        state, metrics = step(state, step.put_local_batch(batch))
        step.check_finite(int(state.step), metrics)
        losses.append(float(metrics["loss"]))
        grads.append(jax.device_get(state.opt_state))
    return losses, grads, state, step


def max_abs_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def test_sharded_matches_single_device(init_params):
    rng = np.random.default_rng(0)
    batches = [as_micro_batches(random_rows(rng, 16, 0.6), 1) for _ in range(3)]
    single = run_steps(train_step((1, 1, 1)), init_params, batches)
    sharded = run_steps(train_step((1, 4, 2)), init_params, batches)
    spec = sharded[2].params["layers"]["q_proj"].sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor", None)  # really split over both axes
    assert sharded[2].opt_state["layers"]["q_proj"].sharding.spec == spec  # optimizer state follows its parameter
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5, atol=1e-5)
    for g_sharded, g_single in zip(sharded[1], single[1]):
        assert max_abs_diff(g_sharded, g_single) < 1e-5
    assert single[0][2] < single[0][0]  # and the steps did train


def test_accumulation_is_an_exact_token_mean(init_params):
    """4 micro-batches with very different token counts update exactly like one batch of all their rows."""
    rng = np.random.default_rng(1)
    rows = random_rows(rng, 16, np.repeat([0.05, 0.9, 0.3, 0.6], 4))
    counts = rows["loss_mask"].reshape(4, -1).sum(1)
    assert counts.max() > 5 * counts.min()
    whole_loss, whole_grads, _, _ = run_steps(train_step((1, 4, 2)), init_params, [as_micro_batches(rows, 1)])
    acc_loss, acc_grads, _, _ = run_steps(
        train_step((1, 4, 2), micro_batches=4), init_params, [as_micro_batches(rows, 4)]
    )
    np.testing.assert_allclose(acc_loss, whole_loss, rtol=1e-6)
    assert max_abs_diff(acc_grads[0], whole_grads[0]) < 1e-6
    # the naive alternative (mean of per-micro-batch means) is measurably different on this batch
    per_micro = []
    for m in range(4):
        part = {k: v[m * 4 : (m + 1) * 4][None] for k, v in rows.items()}
        loss_sum, denom, _ = sft_loss(_model(init_params), jax.tree.map(lambda x: x[0], part), None)
        per_micro.append(float(loss_sum / denom))
    assert abs(np.mean(per_micro) - whole_loss[0]) > 100 * abs(acc_loss[0] - whole_loss[0]) + 1e-4


def _model(params):
    graphdef = nnx.graphdef(abstract_model(tiny_config()))
    return nnx.merge(graphdef, params)


def test_non_finite_gradient_names_the_parameter(init_params):
    def poisoned_loss(model, batch, rng):
        loss_sum, denom, metrics = sft_loss(model, batch, rng)
        # sqrt of a negative number: NaN that reaches only final_norm's gradient
        return loss_sum + 0.0 * jnp.sum(jnp.sqrt(model.final_norm[...] - 2.0)), denom, metrics

    mesh = one_device_mesh()
    step = TrainStep(abstract_model(tiny_config()), poisoned_loss, optax.sgd(0.1), mesh=mesh)
    state = step.init_state(jax.device_put(init_params, step.param_shardings), seed=0)
    batch = as_micro_batches(random_rows(np.random.default_rng(2), 2, 0.5), 1)
    _, metrics = step(state, step.put_local_batch(batch))
    with pytest.raises(NonFiniteError, match=r"step 1: loss=nan.*non-finite gradient in 1 parameter\(s\): final_norm$"):
        step.check_finite(1, jax.device_get(metrics))


def test_bf16_compute_keeps_fp32_master_weights(init_params):
    rows = random_rows(np.random.default_rng(3), 4, 0.5)
    loss_sum, denom, _ = sft_loss(_model(init_params), rows, None)
    fp32_loss = float(loss_sum / denom)
    bf16_loss, _, state, _ = run_steps(
        train_step((1, 1, 1), precision="bfloat16"), init_params, [as_micro_batches(rows, 1)]
    )
    assert bf16_loss[0] != fp32_loss and bf16_loss[0] == pytest.approx(fp32_loss, rel=2e-2)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("remat, saved", [("none", False), ("full", True), ("dots", True)])
def test_remat_choice_reaches_the_traced_step(remat, saved):
    model = abstract_model(tiny_config(remat=remat))
    graphdef, params = nnx.split(model)
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random_rows(np.random.default_rng(0), 2, 0.5)
    )
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, b: sft_loss(nnx.merge(graphdef, p), b, None)[0]))(
        nnx.to_pure_dict(params), batch
    )
    assert ("remat" in str(jaxpr) or "checkpoint" in str(jaxpr)) == saved


def test_schedule_warmup_cosine_and_decay_mask():
    cfg = OptimSection(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1)
    lr = learning_rate_schedule(cfg, total_steps=110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4) and float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(0.55e-3, rel=1e-4)  # half-way down the cosine
    assert float(lr(110)) == pytest.approx(1e-4)
    const = learning_rate_schedule(OptimSection(learning_rate=1e-3, decay="constant"), total_steps=50)
    assert float(const(0)) == float(const(49)) == pytest.approx(1e-3)
    params = {"layers": {"q_proj": 1.0, "q_bias": 1.0, "input_norm": 1.0}, "final_norm": 1.0, "lm_head": 1.0}
    assert decay_mask(params, cfg.no_decay) == {
        "layers": {"q_proj": True, "q_bias": False, "input_norm": False},
        "final_norm": False,
        "lm_head": True,
    }


@pytest.mark.parametrize("clip", [1.0, None])
def test_global_norm_clipping(clip):
    """Clipped at 1, gradients of norm 500 and 5 in the same direction become the same gradient, so Adam's
    second update equals its first; unclipped, the 100x smaller second gradient changes the update."""
    opt, _ = build_optimizer(OptimSection(learning_rate=1.0, decay="constant", clip_grad_norm=clip), total_steps=2)
    params = {"w": jnp.zeros(2)}
    state = opt.init(params)
    first, state = opt.update({"w": jnp.array([300.0, 400.0])}, state, params)
    second, state = opt.update({"w": jnp.array([3.0, 4.0])}, state, params)
    same = np.allclose(first["w"], second["w"], rtol=1e-5)
    assert same == (clip is not None)

"""GRPO-family math against hand-computed numbers (fr_jax/rl/grpo.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fr_jax.rl import grpo
from fr_jax.rl.grpo import GRPOLossConfig, MaxStat, MeanStat, MinStat

LOG = math.log


# ------------------------------------------------------------------------------------------- advantages


def test_group_advantages_with_std_by_hand():
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 3.0]])
    adv, degenerate = grpo.group_advantages(rewards, eps=1e-6)
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 2: mean 0.75, unbiased std 1.5
    s = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    np.testing.assert_allclose(adv[0], [s, -s, -s, s], rtol=1e-6)
    np.testing.assert_allclose(adv[2], np.array([-0.75, -0.75, -0.75, 2.25]) / (1.5 + 1e-6), rtol=1e-6)
    assert np.all(np.asarray(adv[1]) == 0.0)
    assert degenerate.tolist() == [False, True, False]
    assert int(degenerate.sum()) == 1


def test_group_advantages_without_std_is_dr_grpo():
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv, degenerate = grpo.group_advantages(rewards, norm_by_std=False)
    np.testing.assert_allclose(adv, [[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]], rtol=1e-6)
    assert not degenerate.any()


def test_all_equal_group_is_exactly_zero_even_when_the_mean_rounds():
    # the float32 mean of three 0.1s is not 0.1, so a plain (r - mean) / std would blow the residue up
    adv, degenerate = grpo.group_advantages(jnp.array([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7]]))
    assert np.all(np.asarray(adv) == 0.0)
    assert degenerate.tolist() == [True, True]


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError, match="groups, samples"):
        grpo.group_advantages(jnp.ones((4,)))
    with pytest.raises(ValueError, match="samples >= 2"):
        grpo.group_advantages(jnp.ones((4, 1)))


def test_informative_groups_keeps_only_groups_with_variance():
    keep = grpo.informative_groups(np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.2, 0.3, 0.2]]))
    assert keep.tolist() == [False, True, False, True]


def test_overlong_penalty_by_hand():
    got = grpo.overlong_penalty(jnp.array([50, 80, 81, 90, 100, 120]), max_len=100, buffer=20)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.05, -0.5, -1.0, -1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="buffer"):
        grpo.overlong_penalty(jnp.array([1]), max_len=10, buffer=0)


# ------------------------------------------------------------------------------------------ policy loss


@functools.partial(jax.jit, static_argnames=("clip_low", "clip_high", "dual_clip"))
def _jitted_loss_and_grad(logp, adv, **clips):
    def total(lp):
        loss, _ = grpo.clipped_policy_loss(lp, jnp.zeros_like(lp), adv, jnp.ones_like(lp), **clips)
        return loss.sum(), loss

    (_, loss), grad = jax.value_and_grad(total, has_aux=True)(logp)
    return loss, grad


def _loss_and_grad(ratios, advantages, **clips):
    """Per-token loss and d(loss)/d(logp) for tokens with the given ratios (old_logp = 0)."""
    logp = np.log(np.asarray(ratios, np.float32))[None]
    loss, grad = _jitted_loss_and_grad(logp, np.asarray(advantages, np.float32)[None], **clips)
    return np.asarray(loss[0]), np.asarray(grad[0])


def test_clip_higher_values_and_gradients_by_hand():
    ratios = [1.0, 1.25, 1.3, 0.5, 0.5, 0.9, 2.0, 1.1]
    advs = [1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 2.0]
    loss, grad = _loss_and_grad(ratios, advs, clip_low=0.2, clip_high=0.28)
    # A>0: clipped only above 1.28; A<0: clipped only below 0.8; clipped tokens have zero gradient
    np.testing.assert_allclose(loss, [-1.0, -1.25, -1.28, -0.5, 0.8, 0.9, 2.0, -2.2], rtol=1e-6)
    np.testing.assert_allclose(grad, [-1.0, -1.25, 0.0, -0.5, 0.0, 0.9, 2.0, -2.2], rtol=1e-6)


def test_clip_just_inside_and_outside_the_bounds():
    hi, lo = 1.28, 0.8
    ratios = [hi * (1 - 1e-4), hi * (1 + 1e-4), lo * (1 + 1e-4), lo * (1 - 1e-4)]
    loss, grad = _loss_and_grad(ratios, [1.0, 1.0, -1.0, -1.0], clip_low=0.2, clip_high=0.28)
    np.testing.assert_allclose(loss, [-ratios[0], -hi, ratios[2], lo], rtol=1e-6)
    assert grad[0] != 0 and grad[1] == 0 and grad[2] != 0 and grad[3] == 0


def test_ratio_exactly_on_the_bound_keeps_its_gradient():
    # with zero clip widths the bounds are exactly 1.0 = exp(0): no rounding can move the ratio off the bound
    loss, grad = _loss_and_grad([1.0, 1.0], [1.0, -1.0], clip_low=0.0, clip_high=0.0)
    np.testing.assert_array_equal(loss, [-1.0, 1.0])
    np.testing.assert_array_equal(grad, [-1.0, 1.0])
    loss, grad = _loss_and_grad([1.001, 0.999], [1.0, -1.0], clip_low=0.0, clip_high=0.0)
    np.testing.assert_array_equal(grad, [0.0, 0.0])


def test_clipped_loss_equals_the_textbook_ppo_formula():
    rng = np.random.default_rng(0)
    ratios = np.exp(rng.normal(0, 0.5, 200)).astype(np.float32)
    advs = rng.normal(0, 1, 200).astype(np.float32)
    loss, _ = _loss_and_grad(ratios, advs, clip_low=0.2, clip_high=0.28)
    r = np.exp(np.log(ratios))
    textbook = np.maximum(-advs * r, -advs * np.clip(r, 0.8, 1.28))
    np.testing.assert_allclose(loss, textbook, rtol=1e-5, atol=1e-6)
    loss, _ = _loss_and_grad(ratios, advs, clip_low=0.2, clip_high=0.28, dual_clip=1.5)
    dual = np.where(advs < 0, np.minimum(textbook, -advs * 1.5), textbook)
    np.testing.assert_allclose(loss, dual, rtol=1e-5, atol=1e-6)


def test_dual_clip_bounds_negative_advantage_tokens():
    loss, grad = _loss_and_grad([2.0, 4.0, 4.0], [-1.0, -1.0, 1.0], clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    np.testing.assert_allclose(loss, [2.0, 3.0, -1.28], rtol=1e-6)
    np.testing.assert_allclose(grad, [2.0, 0.0, 0.0], rtol=1e-6)


def test_clip_diagnostics_count_only_masked_tokens():
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.0, 1.5]]))
    adv = jnp.array([[1.0, -1.0, 1.0, 1.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # the last (clipped) token is padding
    _, metrics = grpo.clipped_policy_loss(logp, jnp.zeros_like(logp), adv, mask, dual_clip=3.0)
    out = grpo.finalize_metrics(metrics)
    assert out["clip/high_frac"] == pytest.approx(1 / 3)
    assert out["clip/low_frac"] == pytest.approx(1 / 3)
    assert out["clip/dual_frac"] == 0.0
    assert out["ratio/mean"] == pytest.approx(1.0, rel=1e-6)
    assert out["ratio/max"] == pytest.approx(1.5, rel=1e-6)
    assert out["ratio/min"] == pytest.approx(0.5, rel=1e-6)


def test_log_ratio_is_clamped():
    logp = jnp.array([[0.0, 0.0]])
    old = jnp.array([[-1000.0, 1000.0]])
    loss, metrics = grpo.clipped_policy_loss(logp, old, jnp.array([-1.0]), jnp.ones((1, 2)), logratio_clamp=20.0)
    assert np.all(np.isfinite(loss))
    np.testing.assert_allclose(loss[0, 0], math.exp(20.0), rtol=1e-5)
    assert float(metrics["ratio/max"].value) == pytest.approx(math.exp(20.0), rel=1e-5)


# ---------------------------------------------------------------------------------------------- KL, IS


def test_kl_estimators_by_hand():
    logp, ref = jnp.array([LOG(0.5), LOG(0.3)]), jnp.array([LOG(0.25), LOG(0.3)])
    np.testing.assert_allclose(grpo.kl_to_reference(logp, ref, "k1"), [LOG(2.0), 0.0], atol=1e-6)
    np.testing.assert_allclose(grpo.kl_to_reference(logp, ref, "k3"), [0.5 + LOG(0.5) * -1 - 1, 0.0], atol=1e-6)


def test_kl_estimators_are_unbiased_and_k3_nonnegative():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    exact_kl = float(np.sum(p * np.log(p / q)))
    for estimator in ("k1", "k3"):
        per_sample = np.asarray(grpo.kl_to_reference(jnp.log(p), jnp.log(q), estimator), np.float64)
        assert float(np.sum(p * per_sample)) == pytest.approx(exact_kl, rel=1e-5)
    assert np.all(np.asarray(grpo.kl_to_reference(jnp.log(p), jnp.log(q), "k3")) >= 0)
    with pytest.raises(ValueError, match="k2"):
        grpo.kl_to_reference(jnp.log(p), jnp.log(q), "k2")


def test_truncated_is_weights_and_mismatch_stats_by_hand():
    old = jnp.array([[0.0, 0.0, 0.0, LOG(3.0), 5.0]])
    rollout = jnp.array([[0.0, LOG(2.0), -LOG(1.5), 0.0, -5.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the wild last token is padding
    weights, metrics = grpo.rollout_correction(old, rollout, mask, cap=2.0)
    np.testing.assert_allclose(weights[0, :4], [1.0, 0.5, 1.5, 2.0], rtol=1e-6)
    out = grpo.finalize_metrics(metrics)
    assert out["mismatch/abs_logp_diff"] == pytest.approx((LOG(2) + LOG(1.5) + LOG(3)) / 4, rel=1e-6)
    assert out["mismatch/abs_logp_diff_max"] == pytest.approx(LOG(3), rel=1e-6)
    assert out["mismatch/capped_frac"] == pytest.approx(0.25)
    assert out["mismatch/is_weight"] == pytest.approx(5.0 / 4, rel=1e-6)
    grad = jax.jit(jax.grad(lambda o: grpo.rollout_correction(o, rollout, mask, cap=2.0)[0].sum()))(old)
    assert np.all(np.asarray(grad) == 0.0)  # weights are constants to the optimiser
    uncapped, metrics = grpo.rollout_correction(old, rollout, mask, cap=None)
    np.testing.assert_allclose(uncapped[0, :4], [1.0, 0.5, 1.5, 3.0], rtol=1e-6)
    assert grpo.finalize_metrics(metrics)["mismatch/capped_frac"] == 0.0


def test_token_entropy_by_hand():
    inf = jnp.inf
    logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [LOG(0.5), LOG(0.25), LOG(0.25), -inf], [0.0, -inf, -inf, -inf]])
    np.testing.assert_allclose(grpo.token_entropy(logits), [LOG(4), 0.5 * LOG(2) + 0.5 * LOG(4), 0.0], atol=1e-6)


# ----------------------------------------------------------------------------------------- aggregation

PER_TOKEN = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [100.0, 100.0, 100.0, 100.0]])
MASK = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # row 2 is a padding row


@pytest.mark.parametrize(
    "mode, expected_sum, expected_denom",
    [
        ("token-mean", 10.0, 4.0),  # (1+2+3+4) / 4 tokens
        ("seq-mean-token-mean", 6.0, 2.0),  # means 2 and 4, over 2 non-empty sequences
        ("seq-mean-token-sum-norm", 2.5, 2.0),  # sums 6 and 4 over L_max=4, over 2 sequences
    ],
)
def test_aggregation_modes_by_hand(mode, expected_sum, expected_denom):
    loss_sum, denom = grpo.aggregate_loss(PER_TOKEN, MASK, mode, max_gen_len=4)
    assert float(loss_sum) == pytest.approx(expected_sum)
    assert float(denom) == expected_denom


def test_aggregation_rejects_unknown_mode_and_missing_length():
    with pytest.raises(ValueError, match="token-mean"):
        grpo.aggregate_loss(PER_TOKEN, MASK, "mean")
    with pytest.raises(ValueError, match="max_gen_len"):
        grpo.aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum-norm")


def _random_batch(seed=0, batch=7, length=6):
    rng = np.random.default_rng(seed)
    per_token = jnp.asarray(rng.normal(size=(batch, length)), jnp.float32)
    lengths = np.array([6, 1, 3, 0, 5, 2, 6])[:batch]
    mask = jnp.asarray(np.arange(length)[None, :] < lengths[:, None], jnp.float32)
    return per_token, mask


@pytest.mark.parametrize("mode", grpo.AGGREGATIONS)
def test_aggregation_is_exact_under_uneven_micro_batches(mode):
    per_token, mask = _random_batch()
    full_sum, full_denom = grpo.aggregate_loss(per_token, mask, mode, max_gen_len=6)
    exact = float(full_sum) / float(full_denom)
    rows = np.arange(per_token.shape[0])
    naive_errors = []
    for cuts in ([2, 3], [1, 2, 6], [4]):
        bounds = [0, *cuts, per_token.shape[0]]
        # each micro-batch is padded back to the full shape with empty rows (fixed shapes, one compile)
        parts = [
            grpo.aggregate_loss(per_token, mask * ((rows >= a) & (rows < b))[:, None], mode, max_gen_len=6)
            for a, b in zip(bounds, bounds[1:])
        ]
        total = sum(float(s) for s, _ in parts) / sum(float(d) for _, d in parts)
        assert total == pytest.approx(exact, rel=1e-6)
        naive_errors.append(abs(np.mean([float(s) / max(float(d), 1.0) for s, d in parts]) - exact))
    # the mean of micro-batch means is a different number (which is what the pairs are for)
    assert max(naive_errors) > 1e-3


def test_grpo_loss_gradient_is_exact_under_accumulation():
    # 7 sequences + 1 padding row, as two fixed-shape micro-batches of 4 (the second ends in the padding row)
    per_token, mask = _random_batch(seed=1)
    per_token, mask = jnp.pad(per_token, ((0, 1), (0, 0))), jnp.pad(mask, ((0, 1), (0, 0)))
    logp = -jnp.abs(per_token)
    old = logp + 0.1 * jnp.sin(jnp.arange(logp.size, dtype=jnp.float32)).reshape(logp.shape)
    ref = logp - 0.05
    adv = jnp.array([1.0, -0.5, 0.3, 2.0, -1.0, 0.7, -0.2, 5.0])
    config = GRPOLossConfig(agg="seq-mean-token-mean", beta=0.04, dual_clip=3.0)

    @jax.jit
    def sum_grad_and_denom(lp, o, r, a, m):
        grad, denom = jax.grad(lambda x: grpo.grpo_loss(x, o, r, a, m, config)[:2], has_aux=True)(lp)
        return grad, denom

    full_grad, full_denom = sum_grad_and_denom(logp, old, ref, adv, mask)
    micro = [sum_grad_and_denom(logp[a:b], old[a:b], ref[a:b], adv[a:b], mask[a:b]) for a, b in ((0, 4), (4, 8))]
    accumulated = jnp.concatenate([g for g, _ in micro]) / sum(d for _, d in micro)
    assert float(full_denom) == 6.0  # 7 rows, one of them empty, plus the padding row
    np.testing.assert_allclose(accumulated, full_grad / full_denom, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(full_grad).max()) > 0


# ------------------------------------------------------------------------------------------ grpo_loss


def test_grpo_loss_composes_the_terms_by_hand():
    logp = jnp.array([[LOG(0.5), LOG(0.5)]])
    ref = jnp.array([[LOG(0.25), LOG(0.5)]])
    config = GRPOLossConfig(beta=0.1, kl_estimator="k3", agg="token-mean")
    loss_sum, denom, metrics = grpo.grpo_loss(logp, None, ref, jnp.array([2.0]), jnp.ones((1, 2)), config)
    k3 = 0.5 + LOG(2) - 1  # exp(ref - logp) - (ref - logp) - 1 on the first token; 0 on the second
    assert float(loss_sum) == pytest.approx(-2.0 + 0.1 * k3 - 2.0, rel=1e-6)
    assert float(denom) == 2.0
    out = grpo.finalize_metrics(metrics)
    assert out["kl"] == pytest.approx(k3 / 2, rel=1e-5)
    assert out["loss/pg"] == pytest.approx(-2.0)
    assert out["loss"] == pytest.approx((-4.0 + 0.1 * k3) / 2, rel=1e-6)
    assert out["response_tokens"] == 2.0


def test_grpo_loss_applies_truncated_is_to_the_policy_term():
    logp = jnp.zeros((1, 3))
    rollout = jnp.array([[0.0, LOG(2.0), -LOG(4.0)]])  # weights 1, 0.5, min(4, 2) = 2
    config = GRPOLossConfig(is_cap=2.0)
    loss_sum, denom, metrics = grpo.grpo_loss(
        logp, None, None, jnp.array([1.0]), jnp.ones((1, 3)), config, rollout_logp=rollout, entropy=jnp.ones((1, 3))
    )
    assert float(loss_sum) / float(denom) == pytest.approx(-(1.0 + 0.5 + 2.0) / 3, rel=1e-6)
    out = grpo.finalize_metrics(metrics)
    assert out["mismatch/capped_frac"] == pytest.approx(1 / 3)
    assert out["entropy"] == 1.0
    assert "kl" not in out


def test_grpo_loss_under_jit_matches_eager():
    per_token, mask = _random_batch(seed=2)
    logp = -jnp.abs(per_token)
    args = (logp, logp + 0.05, logp - 0.1, jnp.linspace(-1, 1, 7), mask)
    config = GRPOLossConfig(agg="seq-mean-token-sum-norm", max_gen_len=6, beta=0.02, dual_clip=2.0)
    eager = grpo.grpo_loss(*args, config)
    jitted = jax.jit(grpo.grpo_loss, static_argnums=5)(*args, config)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
    assert grpo.finalize_metrics(jitted[2]) == pytest.approx(grpo.finalize_metrics(eager[2]), rel=1e-5)


def test_reference_is_needed_only_with_a_kl_weight():
    assert not grpo.needs_reference(0.0)
    assert grpo.needs_reference(0.04)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(jnp.zeros((1, 2)), None, None, jnp.ones(1), jnp.ones((1, 2)), GRPOLossConfig(beta=0.04))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(agg="mean"), "agg"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(kl_estimator="k2"), "kl_estimator"),
        (dict(clip_low=1.0), "clip_low"),
        (dict(agg="seq-mean-token-sum-norm"), "max_gen_len"),
        (dict(is_cap=0.0), "is_cap"),
        (dict(beta=-1.0), "beta"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"GRPOLossConfig.{field}"):
        GRPOLossConfig(**kwargs)


# --------------------------------------------------------------------------------------------- metrics


def test_merged_metrics_equal_the_full_batch_metrics():
    a = {"m": MeanStat(jnp.array(3.0), jnp.array(2.0)), "hi": MaxStat(jnp.array(1.0)), "lo": MinStat(jnp.array(-1.0))}
    b = {"m": MeanStat(jnp.array(7.0), jnp.array(3.0)), "hi": MaxStat(jnp.array(5.0)), "lo": MinStat(jnp.array(0.0))}
    assert grpo.finalize_metrics(grpo.merge_metrics(a, b)) == {"m": 2.0, "hi": 5.0, "lo": -1.0}
    assert math.isnan(grpo.finalize_metrics({"m": MeanStat(jnp.array(0.0), jnp.array(0.0))})["m"])
    with pytest.raises(ValueError, match="'hi'"):
        grpo.merge_metrics(a, {**b, "hi": MinStat(jnp.array(5.0))})
    with pytest.raises(ValueError, match="keys differ"):
        grpo.merge_metrics(a, {"m": b["m"]})

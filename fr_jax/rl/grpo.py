"""GRPO-family math as pure, jit-friendly functions: advantages, clipped policy loss, KL, loss aggregation.

Nothing here knows about models: every function takes arrays (log-probs of the sampled tokens, masks,
rewards) and returns arrays. Shapes: B sequences, T response positions; `mask` [B, T] is 1 on response
tokens that count and 0 on padding (and on prompt tokens if the caller packs them into the same row).

Exactness under gradient accumulation and data parallelism: a loss is returned as a `(loss_sum, denom)`
pair, never as a mean. Sum the pairs over micro-batches (and devices), then divide once. Because `denom`
does not depend on the parameters, accumulating grad(loss_sum) and dividing by the total denom at the end
is the same gradient as one big batch. Metrics follow the same rule (`MeanStat(sum, weight)`, `MaxStat`,
`MinStat`; see `merge_metrics`/`finalize_metrics`).

Which flags give which recipe (see docs/rl.md):
  GRPO (DeepSeekMath): norm_adv_by_std=True, agg="seq-mean-token-mean", clip 0.2/0.2, beta=0.04, k3.
  DAPO: clip_low=0.2, clip_high=0.28, agg="token-mean", beta=0, dynamic sampling, overlong penalty.
  Dr.GRPO: norm_adv_by_std=False, agg="seq-mean-token-sum-norm" with max_gen_len.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax.config import AGGREGATIONS, KL_ESTIMATORS, GRPOLossConfig, check_choice


def needs_reference(beta: float) -> bool:
    """Whether the frozen reference model must be run at all: only when the KL term has weight."""
    return beta != 0.0


# ----------------------------------------------------------------------------------------------- metrics


class MeanStat(NamedTuple):
    """A mean kept as (sum, count) so it stays exact when summed over micro-batches and devices."""

    total: jax.Array
    weight: jax.Array  # what `total` is a sum over (tokens, rows); named so as not to shadow tuple.count


class MaxStat(NamedTuple):
    value: jax.Array


class MinStat(NamedTuple):
    value: jax.Array


Metric = MeanStat | MaxStat | MinStat


def merge_metrics(a: dict[str, Metric], b: dict[str, Metric]) -> dict[str, Metric]:
    """Combine the metrics of two micro-batches (jit-friendly; NamedTuples are pytrees)."""
    if a.keys() != b.keys():
        raise ValueError(f"metric keys differ: {sorted(a.keys() ^ b.keys())}")
    merged: dict[str, Metric] = {}
    for key, x in a.items():
        match x, b[key]:
            case MeanStat(), MeanStat() as y:
                merged[key] = MeanStat(x.total + y.total, x.weight + y.weight)
            case MaxStat(), MaxStat() as y:
                merged[key] = MaxStat(jnp.maximum(x.value, y.value))
            case MinStat(), MinStat() as y:
                merged[key] = MinStat(jnp.minimum(x.value, y.value))
            case _, y:
                raise ValueError(f"metric {key!r} is a {type(x).__name__} here and a {type(y).__name__} there")
    return merged


def finalize_metrics(metrics: dict[str, Metric]) -> dict[str, float]:
    """Host-side: one float per metric. A mean over zero items is NaN (shown, not hidden as 0)."""
    out = {}
    for key, m in metrics.items():
        if isinstance(m, MeanStat):
            count = float(m.weight)
            out[key] = float(m.total) / count if count > 0 else float("nan")
        else:
            out[key] = float(m.value)
    return out


def _masked_mean_stat(values: jax.Array, mask: jax.Array) -> MeanStat:
    return MeanStat(jnp.sum(values * mask), jnp.sum(mask))


# ------------------------------------------------------------------------------------------- advantages


class GroupAdvantages(NamedTuple):
    advantages: jax.Array  # [G, n]
    degenerate: jax.Array  # [G] bool: every reward in the group is equal, so its advantages are exactly 0


def group_advantages(rewards: jax.Array, *, norm_by_std: bool = True, eps: float = 1e-6) -> GroupAdvantages:
    """Group-relative advantages `(r - mean) / (std + eps)` per row of `rewards` [G groups, n samples].

    `std` is the unbiased (n - 1) sample std, as in the DeepSeekMath/verl/TRL implementations.
    `norm_by_std=False` gives Dr.GRPO's `r - mean`. A group whose rewards are all equal carries no signal;
    its advantages are set to exactly 0 (not a rounding residue) and it is flagged in `degenerate`.
    `advantages.reshape(-1)` gives one advantage per sequence for rollouts laid out group by group.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, samples] with samples >= 2, got shape {rewards.shape}")
    degenerate = jnp.all(rewards == rewards[:, :1], axis=1)
    centered = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    if norm_by_std:
        centered = centered / (jnp.std(rewards, axis=1, ddof=1, keepdims=True) + eps)
    return GroupAdvantages(jnp.where(degenerate[:, None], 0.0, centered), degenerate)


def informative_groups(rewards) -> np.ndarray:
    """DAPO dynamic sampling, host side: which groups [G, n] have reward variance (keep these, refill the rest)."""
    rewards = np.asarray(rewards)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, samples] with samples >= 2, got shape {rewards.shape}")
    return np.ptp(rewards, axis=1) > 0


def overlong_penalty(lengths: jax.Array, *, max_len: int, buffer: int) -> jax.Array:
    """DAPO's soft overlong punishment, in tokens: 0 up to max_len - buffer, then linear down to -1 at max_len.

    Lengths beyond max_len (possible only if the sampler allows it) get -1.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    lengths = jnp.asarray(lengths, jnp.float32)
    return jnp.clip((max_len - buffer - lengths) / buffer, -1.0, 0.0)


# ------------------------------------------------------------------------------------------ policy loss


def clipped_policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    logratio_clamp: float = 20.0,
) -> tuple[jax.Array, dict[str, Metric]]:
    """PPO-clip surrogate per token (to minimise), with clip-higher and optional dual-clip.

    The value equals `max(-A*r, -A*clip(r, 1-clip_low, 1+clip_high))` (then `min(., c*|A|)` for A < 0 under
    dual-clip). It is written as an explicit selection so the gradient is unambiguous: a token is clipped
    (zero gradient) only when its ratio is strictly beyond the bound in the direction its advantage pushes;
    a ratio exactly on the bound keeps its full gradient.
    `advantages` is [B] (one per sequence) or [B, T]. Returns the per-token loss [B, T] (not masked) and
    diagnostics over the masked tokens.
    """
    logp = jnp.asarray(logp, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]
    log_ratio = jnp.clip(logp - jnp.asarray(old_logp, jnp.float32), -logratio_clamp, logratio_clamp)
    ratio = jnp.exp(log_ratio)
    clipped_high = (adv > 0) & (ratio > 1.0 + clip_high)
    clipped_low = (adv < 0) & (ratio < 1.0 - clip_low)
    bound = jnp.where(clipped_high, 1.0 + clip_high, 1.0 - clip_low)
    loss = -adv * jnp.where(clipped_high | clipped_low, bound, ratio)
    metrics: dict[str, Metric] = {
        "clip/low_frac": _masked_mean_stat(clipped_low, mask),
        "clip/high_frac": _masked_mean_stat(clipped_high, mask),
        "ratio/mean": _masked_mean_stat(ratio, mask),
        "ratio/max": MaxStat(jnp.max(jnp.where(mask > 0, ratio, -jnp.inf))),
        "ratio/min": MinStat(jnp.min(jnp.where(mask > 0, ratio, jnp.inf))),
    }
    if dual_clip is not None:
        clipped_dual = (adv < 0) & (ratio > dual_clip)
        loss = jnp.where(clipped_dual, -adv * dual_clip, loss)
        metrics["clip/dual_frac"] = _masked_mean_stat(clipped_dual, mask)
    return loss, metrics


def kl_to_reference(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3", *, logratio_clamp: float = 20.0):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    k1 = logp - ref_logp (unbiased, can be negative); k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased,
    always >= 0, lower variance; DeepSeekMath's choice).
    """
    check_choice("kl estimator", estimator, KL_ESTIMATORS)
    log_ratio = jnp.clip(
        jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32), -logratio_clamp, logratio_clamp
    )
    if estimator == "k1":
        return -log_ratio
    return jnp.exp(log_ratio) - log_ratio - 1.0


def rollout_correction(
    old_logp: jax.Array,
    rollout_logp: jax.Array,
    mask: jax.Array,
    *,
    cap: float | None,
    logratio_clamp: float = 20.0,
) -> tuple[jax.Array, dict[str, Metric]]:
    """Truncated importance-sampling weights for the rollout engine / trainer log-prob mismatch.

    The rollout engine (SGLang, bf16 kernels) samples from a slightly different distribution than the one
    the trainer computes. Weights `min(exp(old_logp - rollout_logp), cap)` (per token, no gradient) re-weight
    the policy-gradient term; `cap=None` only measures the mismatch (weights 1).
    """
    mask = jnp.asarray(mask, jnp.float32)
    diff = jnp.asarray(old_logp, jnp.float32) - jnp.asarray(rollout_logp, jnp.float32)
    raw = jnp.exp(jnp.clip(diff, -logratio_clamp, logratio_clamp))
    weights = raw if cap is None else jnp.minimum(raw, cap)
    capped = jnp.zeros_like(raw) if cap is None else (raw > cap).astype(jnp.float32)
    metrics: dict[str, Metric] = {
        "mismatch/abs_logp_diff": _masked_mean_stat(jnp.abs(diff), mask),
        "mismatch/abs_logp_diff_max": MaxStat(jnp.max(jnp.where(mask > 0, jnp.abs(diff), 0.0))),
        "mismatch/capped_frac": _masked_mean_stat(capped, mask),
        "mismatch/is_weight": _masked_mean_stat(weights, mask),
    }
    return jax.lax.stop_gradient(weights), metrics


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of the next-token distribution at each position, [..., V] -> [...] (for logging)."""
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    probs = jnp.exp(log_probs)
    return -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)


# ---------------------------------------------------------------------------------------- aggregation


def aggregate_loss(
    per_token: jax.Array, mask: jax.Array, mode: str, *, max_gen_len: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Reduce a per-token loss [B, T] to `(loss_sum, denom)`; the loss is sum(loss_sum) / sum(denom) over all
    micro-batches and devices.

    - "token-mean" (DAPO): every token of the global batch weighs the same.
      loss_sum = sum of token losses, denom = number of tokens.
    - "seq-mean-token-mean" (GRPO paper): mean over each sequence's tokens, then mean over sequences.
      loss_sum = sum over sequences of that sequence's token mean, denom = number of sequences.
    - "seq-mean-token-sum-norm" (Dr.GRPO): each sequence's token sum divided by the constant max_gen_len,
      then mean over sequences. loss_sum = sum over sequences of (token sum / max_gen_len), denom = sequences.
    Rows without any unmasked token (padding rows that fill a fixed batch shape) count in no denominator.
    """
    check_choice("loss aggregation", mode, AGGREGATIONS)
    mask = jnp.asarray(mask, jnp.float32)
    token_sums = jnp.sum(per_token * mask, axis=-1)
    token_counts = jnp.sum(mask, axis=-1)
    if mode == "token-mean":
        return jnp.sum(token_sums), jnp.sum(token_counts)
    num_sequences = jnp.sum((token_counts > 0).astype(jnp.float32))
    if mode == "seq-mean-token-mean":
        return jnp.sum(token_sums / jnp.maximum(token_counts, 1.0)), num_sequences
    if not (max_gen_len and max_gen_len > 0):
        raise ValueError("seq-mean-token-sum-norm needs a positive max_gen_len")
    return jnp.sum(token_sums) / max_gen_len, num_sequences


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array | None,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    config: GRPOLossConfig,
    *,
    rollout_logp: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, Metric]]:
    """The full GRPO-family loss of one micro-batch as `(loss_sum, denom, metrics)`.

    - `logp` [B, T]: log-probs of the sampled tokens under the current parameters (the only differentiable input).
    - `old_logp`: the trainer's log-probs before this update; None when each rollout batch gets one update
      (then old = stop_gradient(logp) and the ratio is exactly 1).
    - `ref_logp`: the frozen reference's log-probs; required when config.beta > 0, else may be None.
    - `rollout_logp`: the rollout engine's log-probs; when given, mismatch is logged and (is_cap not None)
      truncated-IS weights multiply the policy-gradient term (the KL term is not re-weighted).
    - `entropy` [B, T]: per-token entropy (`token_entropy`) to log, optional.
    Divide the summed loss_sum by the summed denom once, after all micro-batches/devices.
    """
    logp = jnp.asarray(logp, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if logp.shape != mask.shape:
        raise ValueError(f"logp {logp.shape} and mask {mask.shape} must have the same shape")
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    pg_loss, metrics = clipped_policy_loss(
        logp,
        old_logp,
        advantages,
        mask,
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        dual_clip=config.dual_clip,
        logratio_clamp=config.logratio_clamp,
    )
    if rollout_logp is not None:
        weights, mismatch = rollout_correction(
            old_logp, rollout_logp, mask, cap=config.is_cap, logratio_clamp=config.logratio_clamp
        )
        pg_loss = pg_loss * weights
        metrics.update(mismatch)
    loss = pg_loss
    if config.beta > 0 and ref_logp is None:
        raise ValueError(f"GRPOLossConfig.beta={config.beta} > 0 needs ref_logp (the reference model's log-probs)")
    if ref_logp is not None:
        kl = kl_to_reference(logp, ref_logp, config.kl_estimator, logratio_clamp=config.logratio_clamp)
        metrics["kl"] = _masked_mean_stat(kl, mask)
        if config.beta > 0:
            loss = loss + config.beta * kl
    loss_sum, denom = aggregate_loss(loss, mask, config.agg, max_gen_len=config.max_gen_len)
    metrics["loss"] = MeanStat(loss_sum, denom)
    metrics["loss/pg"] = MeanStat(*aggregate_loss(pg_loss, mask, config.agg, max_gen_len=config.max_gen_len))
    metrics["response_tokens"] = MeanStat(jnp.sum(mask), jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)))
    if entropy is not None:
        metrics["entropy"] = _masked_mean_stat(jnp.asarray(entropy, jnp.float32), mask)
    return loss_sum, denom, metrics

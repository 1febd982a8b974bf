"""Update, the third phase of a GRPO round: the loss TrainStep differentiates, the forward-only log-prob passes (old
policy, frozen reference), and the PPO epochs over mini-batches.

The loss follows TrainStep's contract, `(model, micro_batch, rng) -> (loss_sum, denominator, metrics)`, with the
math of fr_jax.rl.grpo: the same update comes out of 1 or 4 micro-batches and 1 or 8 devices. Its metrics are
MeanStat/MaxStat/MinStat, combined over micro-batches with `merge_metrics` (a max is not a sum).

Log-probs are taken under the sampling temperature, log_softmax(logits / T), the convention of the rollout engine
(fr_jax.rollout.sampling) and SGLang, so the trainer's numbers and the server's compare like for like.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fr_jax.rl.grpo import (
    GRPOLossConfig,
    MaxStat,
    MeanStat,
    MinStat,
    finalize_metrics,
    grpo_loss,
    merge_metrics,
    token_entropy,
)
from fr_jax.trainer.step import Batch, LossFn, TrainState, TrainStep


def response_logits(model: nnx.Module, batch: Batch, temperature: float) -> jax.Array:
    """float32 logits / temperature at the positions that predict the R response tokens (fr_jax.rl.batch's layout).

    Only those positions go through the output head: the prompt's logits are never formed (for SmolLM2, whose
    head is a third of its forward FLOPs, that saves 13% of a step at P=112, R=64, and rows x P x V of memory)."""
    hidden = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
    width = batch["targets"].shape[-1]
    start = hidden.shape[1] - width - 1
    return model.logits(hidden[:, start : start + width]).astype(jnp.float32) / temperature


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def grpo_loss_fn(config: GRPOLossConfig, temperature: float) -> LossFn:
    """The GRPO loss of one micro-batch. Batch keys: the rollout rows, `advantages` [rows], and optionally
    `old_logp` (several updates per rollout batch) and `ref_logp` (beta > 0)."""
    if temperature <= 0:
        raise ValueError(f"the sampling temperature must be > 0 for GRPO, got {temperature}")

    def loss_fn(model: nnx.Module, batch: Batch, rng: jax.Array):
        del rng
        logits = response_logits(model, batch, temperature)
        logp = token_logprobs(logits, batch["targets"])
        loss_sum, denom, metrics = grpo_loss(
            logp,
            batch.get("old_logp"),
            batch.get("ref_logp"),
            batch["advantages"],
            batch["mask"],
            config,
            rollout_logp=batch["rollout_logp"],
            entropy=token_entropy(jax.lax.stop_gradient(logits)),
        )
        del metrics["loss"]  # TrainStep reports loss_sum / denominator itself
        return loss_sum, denom, metrics

    return loss_fn


class LogprobPass:
    """Forward-only per-token log-probs of the responses under some parameters, `rows` rows per device call."""

    def __init__(self, step_fn: TrainStep, temperature: float, rows: int):
        self.step_fn = step_fn
        self.temperature = temperature
        self.rows = rows
        self._jitted = jax.jit(self._logprobs, out_shardings=step_fn.replicated)

    def _logprobs(self, params, batch: Batch) -> jax.Array:
        micro = jax.tree.map(lambda x: x[0], batch)
        model = nnx.merge(self.step_fn.graphdef, params)
        return token_logprobs(response_logits(model, micro, self.temperature), micro["targets"])

    def __call__(self, params, batch: dict[str, np.ndarray]) -> np.ndarray:
        keys = ("input_ids", "positions", "segment_ids", "targets")
        total = len(batch["targets"])
        if total % self.rows:
            raise ValueError(f"{total} rows are not a multiple of {self.rows} rows per call")
        out = []
        for start in range(0, total, self.rows):
            chunk = {k: batch[k][None, start : start + self.rows] for k in keys}
            logp = self._jitted(params, self.step_fn.put_global_batch(chunk))
            out.append(np.asarray(logp.addressable_data(0)))
        return np.concatenate(out)


def ppo_update(
    step_fn: TrainStep,
    state: TrainState,
    batch: dict[str, np.ndarray],
    *,
    epochs: int,
    rows_per_step: int,
    micro_batches: int,
    rng: np.random.Generator,
) -> tuple[TrainState, list[dict]]:
    """`epochs` passes over the rollout batch in shuffled mini-batches of `rows_per_step` rows (one optimizer step
    each, split into `micro_batches`). Returns the new state and each step's metrics (on the host)."""
    rows = len(batch["mask"])
    if rows % rows_per_step:
        raise ValueError(f"{rows} rollout rows are not a multiple of {rows_per_step} rows per optimizer step")
    steps_per_epoch = rows // rows_per_step
    history = []
    for _ in range(epochs):
        order = rng.permutation(rows) if epochs * steps_per_epoch > 1 else np.arange(rows)
        for j in range(steps_per_epoch):
            index = order[j * rows_per_step : (j + 1) * rows_per_step]
            mini = {k: v[index].reshape(micro_batches, -1, *v.shape[1:]) for k, v in batch.items()}
            state, metrics = step_fn(state, step_fn.put_global_batch(mini))
            metrics = jax.device_get(metrics)
            step_fn.check_finite(int(state.step), metrics)
            history.append(metrics)
    return state, history


def summarize_updates(history: Sequence[dict]) -> dict[str, float]:
    """One figure per metric for the round: loss-side means over every token of every optimizer step (exact),
    extremes over all of them, and the trainer's own scalars averaged (grad norm also as its max)."""
    stats = [{k: v for k, v in h.items() if isinstance(v, MeanStat | MaxStat | MinStat)} for h in history]
    out = finalize_metrics(functools.reduce(merge_metrics, stats))
    out["loss"] = float(np.mean([h["loss"] for h in history]))
    norms = [float(h["grad_norm"]) for h in history]
    out["grad_norm"], out["grad_norm_max"] = float(np.mean(norms)), max(norms)
    if "learning_rate" in history[-1]:
        out["learning_rate"] = float(history[-1]["learning_rate"])
    out["optimizer_steps"] = float(len(history))
    return out


class RoundUpdate:
    """One round's update: the old policy's log-probs (only when the batch gets several optimizer steps), the frozen
    reference's (only when loss.beta > 0), then ppo_epochs passes of shuffled mini-batches."""

    def __init__(
        self,
        step_fn: TrainStep,
        *,
        temperature: float,
        epochs: int,
        rows_per_step: int,
        micro_batches: int,
        steps_per_round: int,
        seed: int,
        reference_params: dict | None,
    ):
        self.step_fn, self.epochs, self.rows_per_step, self.micro_batches, self.seed = (
            step_fn,
            epochs,
            rows_per_step,
            micro_batches,
            seed,
        )
        self.needs_old = steps_per_round > 1
        self.reference_params = reference_params
        self.logp_pass = LogprobPass(step_fn, temperature, rows_per_step // micro_batches)

    def __call__(self, state: TrainState, batch: dict[str, np.ndarray], round_index: int) -> tuple[TrainState, dict]:
        if self.needs_old:
            batch["old_logp"] = self.logp_pass(state.params, batch)
        if self.reference_params is not None:
            batch["ref_logp"] = self.logp_pass(self.reference_params, batch)
        state, history = ppo_update(
            self.step_fn,
            state,
            batch,
            epochs=self.epochs,
            rows_per_step=self.rows_per_step,
            micro_batches=self.micro_batches,
            rng=np.random.default_rng([self.seed, round_index]),
        )
        return state, summarize_updates(history)

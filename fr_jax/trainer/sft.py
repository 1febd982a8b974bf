"""The SFT stage: token-mean cross-entropy on assistant tokens of packed chat rows, with resume and export."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fr_jax.config import Config, ConfigError
from fr_jax.data.sft import build_sft_data, check_keeps_reasoning
from fr_jax.trainer.metrics import Throughput, measure_peak_flops
from fr_jax.trainer.runtime import Runtime
from fr_jax.trainer.stage import Stage, policy_of, start_stage
from fr_jax.trainer.step import Batch, TrainState, TrainStep

_log = logging.getLogger(__name__)


def sft_loss(model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(summed cross-entropy over loss-masked tokens, their count, {tokens: non-padding tokens})."""
    del rng
    logits = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(jnp.where(mask > 0, ce, 0.0)), jnp.sum(mask), {"tokens": jnp.sum(batch["segment_ids"] != 0)}


def evaluate(step_fn: TrainStep, params: dict, batches: list[Batch]) -> float:
    """Token-mean loss over fixed batches (sums first, one division)."""
    totals = [step_fn.evaluate(params, b) for b in batches]
    return float(sum(t["loss_sum"] for t in totals) / sum(t["denominator"] for t in totals))


def run_sft(rt: Runtime) -> dict[str, Any]:
    """Train (resuming from the run's newest checkpoint if any), evaluate, checkpoint, export to <run_dir>/hf."""
    cfg: Config = rt.cfg
    train = cfg.train
    policy = policy_of(rt)
    try:
        check_keeps_reasoning(policy.tokenizer)
    except ValueError as err:
        raise ConfigError(f"model.chat_template: {err}") from None
    try:
        data = build_sft_data(
            cfg.sft.data,
            policy.tokenizer,
            batch_size=train.batch_size,
            micro_batches=train.micro_batches,
            eval_batches=train.eval_batches,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    stage = start_stage(rt, policy, sft_loss, optimizer_steps=train.steps, desc="sft")
    try:
        state, summary = _train(stage, data)
    finally:
        stage.close()
    export = stage.export(state)
    if export is not None:
        summary["export_dir"] = str(export)
    _log.info("SFT done: %s", summary)
    return summary


def _train(stage: Stage, data) -> tuple[TrainState, dict[str, Any]]:
    cfg, step_fn, start, state, writer = stage.rt.cfg, stage.step_fn, stage.start, stage.state, stage.writer
    train = cfg.train
    if stage.host_states is not None:
        data.train.set_state([h["data"] for h in stage.host_states])
    eval_batches = [step_fn.put_global_batch(b) for b in data.eval_batches]
    summary: dict[str, Any] = {"start_step": start, "train_data": data.train_report.summary()}
    if eval_batches and start == 0:
        summary["eval_loss_before"] = evaluate(step_fn, state.params, eval_batches)
        writer.scalars(0, {"eval/loss": summary["eval_loss_before"]})

    batch = step_fn.put_local_batch(next(data.train))
    if start < train.steps:
        compile_s = step_fn.precompile(state, batch)
        peak = cfg.monitor.peak_tflops_per_device * 1e12 if cfg.monitor.peak_tflops_per_device else measure_peak_flops()
        flops = step_fn.model_flops_per_step(batch)
        _log.info("step compiled in %.1fs; %.3g model FLOPs/step; peak %.3g FLOP/s per device", compile_s, flops, peak)
        throughput = Throughput(flops, peak, stage.rt.mesh.size)

    for step in range(start, train.steps):
        state, metrics = step_fn(state, batch)
        data_state = data.train.get_state()  # the position a resumed run continues from
        if step + 1 < train.steps:
            batch = step_fn.put_local_batch(next(data.train))  # host work overlaps the device step
        metrics = jax.device_get(metrics)
        step_fn.check_finite(step + 1, metrics)
        scalars = {k: metrics[k] for k in ("loss", "grad_norm", "learning_rate", "tokens", "denominator")}
        scalars.update(throughput.step(float(metrics["tokens"])))
        done = step + 1
        if train.eval_every and eval_batches and done % train.eval_every == 0 and done < train.steps:
            scalars["eval/loss"] = evaluate(step_fn, state.params, eval_batches)
            throughput.reset()
        writer.scalars(done, scalars)
        writer.progress(done, loss=scalars["loss"], tok_s=scalars["tokens_per_s"])
        if stage.ckpt.due(done) or done == train.steps:
            stage.ckpt.save(done, state, {"data": data_state})
            throughput.reset()
        summary["final_loss"] = float(metrics["loss"])

    if eval_batches:
        summary["eval_loss_after"] = evaluate(step_fn, state.params, eval_batches)
        writer.scalars(train.steps, {"eval/loss": summary["eval_loss_after"]})
    return state, summary

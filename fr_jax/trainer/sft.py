"""The SFT stage: token-mean cross-entropy on assistant tokens of packed chat rows, with resume and export."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fr_jax.config import Config, ConfigError
from fr_jax.data.sft import build_sft_data
from fr_jax.models.decoder import abstract_model
from fr_jax.trainer.checkpoint import Checkpointer
from fr_jax.trainer.metrics import MetricsWriter, Throughput, measure_peak_flops
from fr_jax.trainer.optim import build_optimizer
from fr_jax.trainer.runtime import Runtime, export_hf, load_model, load_tokenizer, model_config
from fr_jax.trainer.step import Batch, TrainStep

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
    model_cfg = model_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_cfg.vocab_size}"
        )
    try:
        data = build_sft_data(
            cfg.sft.data,
            tokenizer,
            batch_size=train.batch_size,
            micro_batches=train.micro_batches,
            eval_batches=train.eval_batches,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    optimizer, schedule = build_optimizer(cfg.optim, train.steps)
    step_fn = TrainStep(
        abstract_model(model_cfg),
        sft_loss,
        optimizer,
        mesh=rt.mesh,
        micro_batches=train.micro_batches,
        learning_rate_fn=schedule,
    )
    ckpt = Checkpointer(
        rt.run_dir / "checkpoints",
        every_steps=cfg.checkpoint.every_steps,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    start = ckpt.latest_step()
    if start is not None:
        state, host_states = ckpt.restore(step_fn.abstract_state())
        data.train.set_state([h["data"] for h in host_states])
        _log.info("resuming at step %d", start)
    else:
        start = 0
        state = step_fn.init_state(nnx.to_pure_dict(nnx.state(load_model(cfg.model, rt.mesh))), train.seed)

    writer = MetricsWriter(
        rt.run_dir,
        total_steps=train.steps,
        start_step=start,
        tensorboard=cfg.monitor.tensorboard,
        progress_bar=cfg.monitor.progress_bar,
        desc="sft",
    )
    writer.text("config", cfg.to_yaml())
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
        throughput = Throughput(flops, peak, rt.mesh.size)

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
        if ckpt.due(done) or done == train.steps:
            ckpt.save(done, state, {"data": data_state})
            throughput.reset()
        summary["final_loss"] = float(metrics["loss"])

    if eval_batches:
        summary["eval_loss_after"] = evaluate(step_fn, state.params, eval_batches)
        writer.scalars(train.steps, {"eval/loss": summary["eval_loss_after"]})
    ckpt.close()
    writer.close()
    if train.export_hf:
        summary["export_dir"] = str(export_hf(rt, step_fn.model(state.params), tokenizer))
    _log.info("SFT done: %s", summary)
    return summary

"""The start-up and the finish every training stage shares (SFT, GRPO, the pipeline's stages).

Start: the policy's tokenizer and architecture with the vocabulary check; the optimizer and the jitted sharded
step; the checkpointer (checkpoint.dir: local or gs://), then restore-or-init (a resumed run never materialises
initial weights); the metrics writer (TensorBoard, local or gs://, and W&B). Finish: close the checkpointer and
the writer (also on failure), then the HF export of the final weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import pathlib
from collections.abc import Callable
from typing import Any

from flax import nnx

from fr_jax.config import Config, ConfigError
from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import abstract_model
from fr_jax.models.hf import save_pretrained
from fr_jax.models.loading import load_model, load_tokenizer, model_config, pretrained_dir
from fr_jax.trainer.checkpoint import Checkpointer
from fr_jax.trainer.metrics import MetricsWriter
from fr_jax.trainer.optim import build_optimizer
from fr_jax.trainer.runtime import Runtime
from fr_jax.trainer.step import LossFn, TrainState, TrainStep

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Policy:
    """The model a stage trains, before any weight is loaded."""

    tokenizer: Any
    config: ModelConfig


def policy_of(rt: Runtime) -> Policy:
    """The configured tokenizer and architecture; a tokenizer larger than the embedding table is refused."""
    tokenizer, config = load_tokenizer(rt.cfg.model), model_config(rt.cfg.model)
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}"
        )
    return Policy(tokenizer, config)


def check_optional_packages(cfg: Config) -> None:
    """The packages the config asks for beyond the core (the gcs and wandb extras), named in one line before any
    weight is loaded. gs:// needs gcsfs (etils.epath's backend for orbax) and google-cloud-storage (orbax's bucket
    checks, tensorboardX's writer)."""
    places = {"checkpoint.dir": cfg.checkpoint.dir}
    if cfg.monitor.tensorboard:
        places["monitor.tensorboard_dir"] = cfg.monitor.tensorboard_dir
    needs = [
        (key, "gcs", ("gcsfs", "google.cloud.storage")) for key, v in places.items() if v and v.startswith("gs://")
    ]
    if cfg.monitor.wandb.enabled:
        needs.append(("monitor.wandb.enabled", "wandb", ("wandb",)))
    for key, extra, modules in needs:
        missing = [name for name in modules if not _importable(name)]
        if missing:
            raise ConfigError(f"{key} needs {' and '.join(missing)}: pip install -e '.[{extra}]'")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (google.cloud)
        return False


@dataclasses.dataclass
class Stage:
    rt: Runtime
    policy: Policy
    step_fn: TrainStep
    ckpt: Checkpointer
    writer: MetricsWriter
    start: int  # progress steps (SFT steps, GRPO rounds) already done: the newest checkpoint's step, or 0
    state: TrainState
    host_states: list[dict[str, Any]] | None  # what the checkpoint holds beside the state, per process (None: fresh)

    def initial_params(self) -> dict:
        """The configured model's weights, freshly loaded (e.g. the frozen reference of a KL term)."""
        return nnx.to_pure_dict(nnx.state(load_model(self.rt.cfg.model, self.rt.mesh)))

    def close(self) -> None:
        """Wait for the last checkpoint to be written and close the writer (also when the stage failed)."""
        self.ckpt.close()
        self.writer.close()

    def export(self, state: TrainState) -> pathlib.Path | None:
        """<run_dir>/hf (train.export_hf): the final weights as an HF checkpoint with the tokenizer and, for a
        pretrained model, its generation settings (special token ids, generation_config.json). Every process calls
        it (saving gathers shards)."""
        if not self.rt.cfg.train.export_hf:
            return None
        out, section = self.rt.run_dir / "hf", self.rt.cfg.model
        source = pretrained_dir(section.pretrained) if section.pretrained else None
        save_pretrained(self.step_fn.model(state.params), out, source_dir=source)
        if self.rt.is_main:
            self.policy.tokenizer.save_pretrained(out)
        return out


def start_stage(
    rt: Runtime,
    policy: Policy,
    loss_fn: LossFn,
    *,
    optimizer_steps: int,
    desc: str,
    combine_metrics: Callable[[dict, dict], dict] | None = None,
) -> Stage:
    """Build the step for `loss_fn`, restore the newest checkpoint or start from the configured weights, and open
    the metrics writer (train.steps progress steps; the learning-rate schedule spans `optimizer_steps`)."""
    cfg = rt.cfg
    optimizer, schedule = build_optimizer(cfg.optim, optimizer_steps)
    step_fn = TrainStep(
        abstract_model(policy.config),
        loss_fn,
        optimizer,
        mesh=rt.mesh,
        micro_batches=cfg.train.micro_batches,
        learning_rate_fn=schedule,
        combine_metrics=combine_metrics,
    )
    check_optional_packages(cfg)
    c, m = cfg.checkpoint, cfg.monitor
    ckpt = Checkpointer(
        c.dir or rt.run_dir / "checkpoints", every_steps=c.every_steps, keep=c.keep, async_save=c.async_save
    )
    start, host_states = ckpt.latest_step(), None
    if start is None:
        start = 0
        params = nnx.to_pure_dict(nnx.state(load_model(cfg.model, rt.mesh)))
        state = step_fn.init_state(params, cfg.train.seed)
    else:
        state, host_states = ckpt.restore(step_fn.abstract_state())
        _log.info("resuming at step %d (%s)", start, desc)
    writer = MetricsWriter(
        rt.run_dir,
        total_steps=cfg.train.steps,
        start_step=start,
        tensorboard_dir=(m.tensorboard_dir or rt.run_dir / "tensorboard") if m.tensorboard else None,
        wandb=m.wandb,
        config=cfg.model_dump(mode="json"),
        progress_bar=m.progress_bar,
        desc=desc,
    )
    return Stage(rt, policy, step_fn, ckpt, writer, start, state, host_states)

"""Monitoring: per-step scalars to metrics.jsonl, TensorBoard and W&B, a tqdm bar, and the FLOP figures behind MFU.

MFU = model FLOPs per step / step time / (peak FLOP/s per device x devices). Model FLOPs are counted from the
loss function's jaxpr (every dot_general, scan bodies times their length), times 3 for forward + backward,
so they follow the real shapes and the real model code rather than a per-architecture formula; recomputation
under remat is not counted, as is usual for MFU. The peak is configured, or measured once at start-up with a
matmul running on all local devices at once.
"""

from __future__ import annotations

import html
import json
import math
import os
import pathlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.extend import core as jex_core
from tqdm import tqdm

from fr_jax.config import WandbSection

METRICS_FILE = "metrics.jsonl"


def _dot_general_flops(eqn) -> int:
    lhs = eqn.invars[0].aval
    (contract_lhs, _), _ = eqn.params["dimension_numbers"]
    k = math.prod(lhs.shape[d] for d in contract_lhs)
    return 2 * k * math.prod(eqn.outvars[0].aval.shape)


def jaxpr_matmul_flops(jaxpr) -> int:
    """Multiply-add FLOPs (2 per MAC) of every dot_general in a (closed) jaxpr, sub-jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            total += _dot_general_flops(eqn)
            continue
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        subs = []
        for value in eqn.params.values():
            if isinstance(value, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
                subs.append(jaxpr_matmul_flops(value))
            elif (
                isinstance(value, (tuple, list))
                and value
                and all(isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr)) for v in value)
            ):
                subs.append(max(jaxpr_matmul_flops(v) for v in value))  # cond branches: the costliest
        total += times * sum(subs)
    return total


def forward_flops(fn: Callable, *args) -> int:
    """Matmul FLOPs of one call of `fn(*args)` (args may be ShapeDtypeStructs: nothing runs)."""
    return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args))


def measure_peak_flops(dtype=None, size: int | None = None, repeats: int = 5) -> float:
    """Achieved matmul FLOP/s per device, all local devices busy at once (so fake CPU devices share cores)."""
    devices = jax.local_devices()
    platform = devices[0].platform
    dtype = dtype or (jnp.float32 if platform == "cpu" else jnp.bfloat16)
    size = size or (1024 if platform == "cpu" else 8192)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    x = jax.device_put(jnp.ones((len(devices), size, size), dtype), sharding)
    matmul = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a))
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class Throughput:
    """Step time, tokens/s and MFU from the wall time between consecutive finished steps."""

    def __init__(self, flops_per_step: float, peak_flops_per_device: float, num_devices: int):
        self.flops_per_step = flops_per_step
        self.peak = peak_flops_per_device * num_devices
        self.reset()

    def reset(self) -> None:
        """Start timing afresh (after an evaluation or a checkpoint, whose time is not a step's)."""
        self._last = time.perf_counter()

    def step(self, tokens: float) -> dict[str, float]:
        now = time.perf_counter()
        dt, self._last = max(now - self._last, 1e-9), now
        return {"step_time_s": dt, "tokens_per_s": tokens / dt, "mfu": self.flops_per_step / dt / self.peak}


class WandbRun:
    """A Weights & Biases run (monitor.wandb) beside TensorBoard: scalars, text samples as HTML, the resolved config.

    Every scalar is plotted against the run's own `step` metric rather than wandb's internal counter, which drops a
    step lower than one already logged: steps redone after a resume are logged again, not lost. A resumed run
    continues the W&B run of its run directory (offline, each start writes its own folder under that run's id)."""

    ID_FILE = "wandb_run_id"

    def __init__(self, section: WandbSection, run_dir: pathlib.Path, config: dict[str, Any], start_step: int):
        import wandb  # the wandb extra; fr_jax.trainer.stage names it when missing

        self._html = wandb.Html
        id_file = run_dir / self.ID_FILE
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self._run = wandb.init(
            project=section.project,
            entity=section.entity,
            name=section.name or run_dir.name,
            mode=section.mode,
            dir=run_dir,
            config=config,
            id=run_id,
            resume="allow",
        )
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._run.log({"step": step, **values})

    def text(self, tag: str, text: str, step: int) -> None:
        self._run.log({"step": step, tag: self._html(f"<pre>{html.escape(text)}</pre>")})

    def close(self) -> None:
        self._run.finish()


class MetricsWriter:
    """Scalars to <run_dir>/metrics.jsonl, TensorBoard and W&B, and the progress bar; only process 0 writes.

    metrics.jsonl stays in the (local) run directory; TensorBoard's directory may be a gs:// URL, which tensorboardX
    writes with google-cloud-storage (each flush uploads the whole event file, about every 2 minutes).
    On resume from step s, lines for steps after s (from a run that died after its last checkpoint) are
    dropped and TensorBoard purges them, so the logs read as one uninterrupted run.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard_dir: str | os.PathLike | None = None,
        wandb: WandbSection | None = None,
        config: dict[str, Any] | None = None,
        progress_bar: bool = True,
        enabled: bool | None = None,
        desc: str = "train",
    ):
        """`tensorboard_dir` None: no TensorBoard; `wandb` None or not enabled: no W&B; `config`: the resolved
        config, as TensorBoard text and as the W&B run's config."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = pathlib.Path(run_dir) / METRICS_FILE
        self._tb = None
        self._wandb = None
        self._bar = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir), purge_step=start_step + 1)
            if config is not None:
                self._tb.add_text("config", f"```\n{yaml.safe_dump(config, sort_keys=False)}\n```", 0)
        if wandb is not None and wandb.enabled:
            self._wandb = WandbRun(wandb, self.path.parent, config or {}, start_step)
        if progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Text shown verbatim (sample completions, ...) in TensorBoard and W&B."""
        if self._tb is not None:
            self._tb.add_text(tag, f"```\n{text}\n```", step)
        if self._wandb is not None:
            self._wandb.text(tag, text, step)

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.scalars(step, values)

    def progress(self, step: int, **postfix: float) -> None:
        """Move the bar to `step` and show `postfix` (loss, tokens/s, ...); tqdm adds the ETA."""
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None  # tensorboardX's gs:// writer uploads once more when collected: let that happen now
        if self._wandb is not None:
            self._wandb.close()
        if self._bar is not None:
            self._bar.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The records of <run_dir>/metrics.jsonl, in order."""
    path = pathlib.Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

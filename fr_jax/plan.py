"""CLI: python -m fr_jax.plan --config X.yaml [key=value ...] -- per-device memory of a training config, on paper.

Nothing is allocated: the model, the optimizer state and the backward pass are traced with jax.eval_shape,
and each array's per-device share comes from the logical-axis rules (fr_jax.parallel.rules) on an abstract
mesh of the configured size, so the same code plans a 1-device CPU run and a 64-chip pod slice.

Activations are the residuals the backward pass keeps (traced under the configured remat policy at the
micro-batch rows one (data, fsdp) group computes, so "full" keeps each layer's input and "none" keeps
everything), plus, with remat, one layer's full working set while it is recomputed, plus the largest single
activation again for its gradient. A residual dimension equal to a tensor-parallel size of the model (heads, kv
heads, MLP width, vocabulary: the logical axes the rules send to "tensor") is split over tensor. That part is an
estimate (XLA may fuse some residuals away or keep extra buffers); parameters, gradients and optimizer state
are exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections import Counter

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from fr_jax.config import DEVICE_HBM_GIB, Config, ConfigError, load_config
from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import abstract_model
from fr_jax.parallel.mesh import resolve_axis_sizes
from fr_jax.parallel.rules import MESH_AXES
from fr_jax.trainer.metrics import forward_flops
from fr_jax.trainer.optim import build_optimizer
from fr_jax.trainer.runtime import model_config
from fr_jax.trainer.sft import sft_loss
from fr_jax.trainer.step import TrainStep

GIB = 2**30
HEADROOM = 0.9  # leave 10% of HBM for XLA scratch, fragmentation and the runtime


@dataclasses.dataclass
class MemoryPlan:
    model: str
    num_params: int
    mesh: dict[str, int]
    device: str
    device_bytes: int
    rows_per_device: int
    seq_len: int
    rows: dict[str, int]  # name -> per-device bytes, in print order
    flops_per_token: float

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.total <= HEADROOM * self.device_bytes

    def table(self) -> str:
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"model {self.model}: {self.num_params / 1e9:.3f}B parameters, "
            f"{self.flops_per_token / 1e9:.1f} GFLOP/token for training at {self.seq_len} tokens",
            f"mesh {mesh} ({math.prod(self.mesh.values())} x {self.device}); micro-batch per device: "
            f"{self.rows_per_device} row(s) x {self.seq_len} tokens",
            f"{'per device':<52}{'GiB':>10}",
        ]
        lines += [f"  {name:<50}{b / GIB:>10.2f}" for name, b in self.rows.items()]
        lines.append(f"  {'total':<50}{self.total / GIB:>10.2f}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(
            f"{self.device} HBM {self.device_bytes / GIB:.0f} GiB (planning to {HEADROOM:.0%}): {verdict} "
            f"({self.total / self.device_bytes:.0%} used)"
        )
        return "\n".join(lines)


def _device_bytes(abstract_tree) -> int:
    """Per-device bytes of ShapeDtypeStructs that carry shardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_tree)
    )


def sequence_length(cfg: Config) -> int:
    if cfg.stage == "sft":
        return cfg.sft.data.max_seq_len
    raise ConfigError(f"fr_jax.plan does not know the sequence length of stage {cfg.stage!r} yet")


def _sft_batch(rows: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        k: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32)
        for k in ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
    }


def _residuals(cfg: ModelConfig, rows: int, seq_len: int) -> list[jax.ShapeDtypeStruct]:
    """What the SFT loss's backward pass keeps from its forward pass (abstract; parameters included)."""
    graphdef, params = nnx.split(abstract_model(cfg))

    def backward_fn(params, batch):
        return jax.vjp(lambda p: sft_loss(nnx.merge(graphdef, p), batch, None)[0], params)[1]

    vjp_fn = jax.eval_shape(backward_fn, nnx.to_pure_dict(params), _sft_batch(rows, seq_len))
    return jax.tree.leaves(vjp_fn)


@dataclasses.dataclass(frozen=True)
class _ActivationSharding:
    """Per-device share of residuals traced at the per-device micro-batch (see the module docstring)."""

    num_layers: int
    tensor_ways: int
    tensor_sizes: frozenset[int]
    params: tuple[jax.ShapeDtypeStruct, ...]  # with shardings

    def device_bytes(self, residuals) -> tuple[int, int]:
        """(total, largest non-stacked) per-device bytes of the residuals that are not the parameters themselves."""
        own = Counter((p.shape, jnp.dtype(p.dtype)) for p in self.params)
        # a parameter's copy (a cast, maybe reshaped) has its element count and leading dim; it is sharded like it
        param_share = {
            (math.prod(p.shape), p.shape[0]): math.prod(p.sharding.shard_shape(p.shape)) for p in self.params
        }
        total = largest = 0
        for r in residuals:
            key = (tuple(r.shape), jnp.dtype(r.dtype))
            if own[key]:
                own[key] -= 1  # the parameter itself, counted with the parameters
                continue
            n = math.prod(r.shape)
            if r.ndim and (n, r.shape[0]) in param_share:
                n = param_share[(n, r.shape[0])]
            elif any(d in self.tensor_sizes and d % self.tensor_ways == 0 for d in r.shape):
                n //= self.tensor_ways
            b = n * jnp.dtype(r.dtype).itemsize
            total += b
            if not (
                r.ndim > 1 and r.shape[0] == self.num_layers
            ):  # a scan-stacked residual: its gradient comes per layer
                largest = max(largest, b)
        return total, largest


def plan_memory(cfg: Config, num_devices: int | None = None) -> MemoryPlan:
    """Per-device bytes of params, grads, optimizer state and activations for `cfg` on its mesh."""
    num_devices = num_devices or cfg.plan.num_devices or jax.device_count()
    try:
        sizes = resolve_axis_sizes(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, num_devices)
    except ValueError as err:
        raise ConfigError(f"{err} (plan.num_devices={num_devices})") from None
    mesh = AbstractMesh(sizes, MESH_AXES)
    model_cfg = model_config(cfg.model)
    model = abstract_model(model_cfg)
    optimizer, _ = build_optimizer(cfg.optim, cfg.train.steps)
    micro_batches = cfg.train.micro_batches
    state = TrainStep(model, sft_loss, optimizer, mesh=mesh, micro_batches=micro_batches).abstract_state()
    params = jax.tree.leaves(state.params)
    grads = [jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding) for p in params]

    seq_len = sequence_length(cfg)
    rows = cfg.train.batch_size // micro_batches
    local_rows = max(rows // (sizes[0] * sizes[1]), 1)  # the rows each (data, fsdp) group computes
    tensor_sizes = frozenset(
        d
        for p in params
        for d, entry in zip(p.shape, p.sharding.spec)
        if entry is not None and "tensor" in ((entry,) if isinstance(entry, str) else entry)
    )
    shard = _ActivationSharding(model_cfg.num_hidden_layers, sizes[2], tensor_sizes, tuple(params))
    saved, largest = shard.device_bytes(_residuals(model_cfg, local_rows, seq_len))
    table = {
        f"parameters ({model_cfg.param_dtype})": _device_bytes(params),
        "gradients (float32)" + (" + accumulator" if micro_batches > 1 else ""): _device_bytes(grads)
        * (2 if micro_batches > 1 else 1),
        "optimizer state": _device_bytes(state.opt_state),
        f"activations kept for backward (remat {model_cfg.remat})": saved,
    }
    if model_cfg.remat != "none":

        def layers_bytes(n: int) -> int:
            return shard.device_bytes(
                _residuals(dataclasses.replace(model_cfg, num_hidden_layers=n, remat="none"), local_rows, seq_len)
            )[0]

        table["one layer recomputed in backward"] = layers_bytes(2) - layers_bytes(1)
    table["largest activation, again as its gradient"] = largest

    graphdef, abstract_params = nnx.split(model)
    fwd = forward_flops(
        lambda p, b: sft_loss(nnx.merge(graphdef, p), b, None)[0],
        nnx.to_pure_dict(abstract_params),
        _sft_batch(rows, seq_len),
    )
    return MemoryPlan(
        model=f"{model_cfg.model_type} L{model_cfg.num_hidden_layers} d{model_cfg.hidden_size}",
        num_params=sum(math.prod(p.shape) for p in params),
        mesh=dict(zip(MESH_AXES, sizes)),
        device=cfg.plan.device,
        device_bytes=DEVICE_HBM_GIB[cfg.plan.device] * GIB,
        rows_per_device=local_rows,
        seq_len=seq_len,
        rows=table,
        flops_per_token=3 * fwd / (rows * seq_len),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fr_jax.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    try:
        plan = plan_memory(load_config(args.config, args.overrides))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(plan.table())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())

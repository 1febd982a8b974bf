"""The jitted, sharded optimizer step, shared by every stage (SFT, GRPO): one loss function in, one update out.

A loss function returns sums, not means: `loss_fn(model, micro_batch, rng) -> (loss_sum, denominator, metric_sums)`.
The step accumulates loss_sum, its gradient, the denominator and the metric sums over the micro-batches
(lax.scan) and divides once at the end, so a token-mean over micro-batches of uneven token counts is exactly
the token-mean over the whole batch (the bug verl #906 / TRL #3021 fixed). A sequence-mean or a constant
normaliser (Dr.GRPO) is the same contract with another denominator. Metrics are summed over micro-batches
unless the caller passes `combine_metrics` (e.g. to keep maxima as maxima).

Everything is explicit about placement: parameters follow the model's logical axes through
fr_jax.parallel.rules, optimizer moments follow their parameters, batches are split over (data, fsdp) along
rows, and the state buffers are donated so a step updates them in place.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fr_jax.models.decoder import param_shardings
from fr_jax.parallel.rules import named_sharding
from fr_jax.trainer.metrics import forward_flops

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient; the message names the step and the culprit parameters."""


@flax.struct.dataclass
class TrainState:
    # Any: the same tree also holds the state's shardings and abstract shapes
    step: Any  # int32 scalar: optimizer steps taken
    params: dict  # nested dict of parameter arrays (nnx pure-dict layout)
    opt_state: Any
    rng: Any  # uint32 raw key data; step s uses fold_in(key, s)


def param_paths(params: dict) -> list[str]:
    """Dotted names of the parameter leaves, in tree-flatten order."""
    return [
        ".".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]


class TrainStep:
    """Owns the model structure, the optimizer and the compiled step for one loss function.

    `model` may be abstract (`fr_jax.models.decoder.abstract_model`): only its structure and each parameter's
    logical axes are used, so a resumed run never materialises initial weights.
    """

    def __init__(
        self,
        model: nnx.Module,
        loss_fn: LossFn,
        optimizer: optax.GradientTransformation,
        *,
        mesh: Mesh,
        micro_batches: int = 1,
        learning_rate_fn: optax.Schedule | None = None,
        combine_metrics: Callable[[dict, dict], dict] | None = None,
        donate: bool = True,
    ):
        """`combine_metrics(a, b)` merges two micro-batches' metrics (default: add, for sums); a max is no sum."""
        self.mesh = mesh
        self.combine_metrics = combine_metrics or functools.partial(jax.tree.map, jnp.add)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.micro_batches = micro_batches
        self.learning_rate_fn = learning_rate_fn
        self.graphdef, abstract_params = nnx.split(model)
        self.abstract_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract_params)
        )
        self.param_shardings = nnx.to_pure_dict(param_shardings(model, mesh))
        self.param_names = param_paths(self.abstract_params)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        abstract_opt = jax.eval_shape(optimizer.init, self.abstract_params)
        opt_shardings = optax.tree_map_params(
            optimizer,
            lambda _, s: s,
            abstract_opt,
            self.param_shardings,
            transform_non_params=lambda _: self.replicated,
        )
        self.state_shardings = TrainState(
            step=self.replicated, params=self.param_shardings, opt_state=opt_shardings, rng=self.replicated
        )
        self._abstract_opt = abstract_opt
        self._donate = donate
        self._jitted: dict[Any, Any] = {}  # jitted or compiled steps by batch layout

    # ------------------------------------------------------------------ state

    def init_state(self, params: dict, seed: int) -> TrainState:
        """Step 0: the given parameters (consumed: their buffers become the state's), fresh moments, the rng."""

        @functools.partial(jax.jit, out_shardings=self.state_shardings, donate_argnums=0)
        def init(params):
            key = jax.random.key_data(jax.random.key(seed))
            return TrainState(
                step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params), rng=key
            )

        return init(params)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for a checkpointed TrainState."""
        key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        shapes = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params, opt_state=self._abstract_opt, rng=key
        )
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.state_shardings
        )

    def model(self, params: dict) -> nnx.Module:
        """An nnx model viewing `params` (for export, evaluation or rollout weight sync)."""
        return nnx.merge(self.graphdef, params)

    # ------------------------------------------------------------------ batches

    def batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """[micro_batches, rows, ...]: rows over the batch mesh axes (data, fsdp), the rest replicated."""
        return named_sharding(self.mesh, shape, (None, "batch") + (None,) * (len(shape) - 2))

    def put_local_batch(self, local: dict[str, np.ndarray]) -> Batch:
        """Global arrays from this process's rows (each process passes its own, same shapes everywhere)."""
        out = {}
        for k, v in local.items():
            shape = (v.shape[0], v.shape[1] * jax.process_count(), *v.shape[2:])
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding(shape), v, shape)
        return out

    def put_global_batch(self, batch: dict[str, np.ndarray]) -> Batch:
        """Global arrays from a batch every process holds whole (e.g. fixed evaluation batches)."""
        return {
            k: jax.make_array_from_callback(v.shape, self.batch_sharding(v.shape), v.__getitem__)
            for k, v in batch.items()
        }

    # ------------------------------------------------------------------ the step

    def _sums(self, params, batch: Batch, rng, with_grad: bool):
        """Sum over micro-batches of (loss_sum, grad of loss_sum, denominator, metric sums)."""

        def one(params, micro, key):
            loss_sum, denom, metrics = self.loss_fn(nnx.merge(self.graphdef, params), micro, key)
            return loss_sum.astype(jnp.float32), (jnp.asarray(denom, jnp.float32), metrics)

        grad_fn = jax.value_and_grad(one, has_aux=True)

        def micro_step(micro, i):
            key = jax.random.fold_in(rng, i)
            if with_grad:
                (loss, (denom, metrics)), grads = grad_fn(params, micro, key)
                grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            else:
                loss, (denom, metrics) = one(params, micro, key)
                grads = None
            return loss, grads, denom, metrics

        first = jax.tree.map(lambda x: x[0], batch)
        if self.micro_batches == 1:
            return micro_step(first, 0)

        def body(carry, xs):
            micro, i = xs
            out = micro_step(micro, i)
            # metrics: the first micro-batch's own, then combined (combine_metrics needs no identity element)
            metrics = jax.tree.map(
                lambda merged, own: jnp.where(i == 0, own, merged), self.combine_metrics(carry[3], out[3]), out[3]
            )
            carry = (*jax.tree.map(jnp.add, carry[:3], out[:3]), metrics)
            if with_grad:
                carry = (carry[0], jax.lax.with_sharding_constraint(carry[1], self.param_shardings), *carry[2:])
            return carry, None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(micro_step, first, 0))
        if with_grad:
            zeros = (zeros[0], jax.lax.with_sharding_constraint(zeros[1], self.param_shardings), *zeros[2:])
        sums, _ = jax.lax.scan(body, zeros, (batch, jnp.arange(self.micro_batches)))
        return sums

    def _train_step(self, state: TrainState, batch: Batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss_sum, grad_sum, denom, metric_sums = self._sums(state.params, batch, rng, with_grad=True)
        grads = jax.tree.map(lambda g: g / denom, grad_sum)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metric_sums,
            "loss": loss_sum / denom,
            "denominator": denom,
            "grad_norm": optax.tree.norm(grads),
            "grads_finite": jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]),
        }
        if self.learning_rate_fn is not None:
            metrics["learning_rate"] = self.learning_rate_fn(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics

    def _eval_sums(self, params, batch: Batch):
        loss_sum, _, denom, metric_sums = self._sums(params, batch, jax.random.key(0), with_grad=False)
        return {**metric_sums, "loss_sum": loss_sum, "denominator": denom}

    def _compiled(self, kind: str, batch: Batch) -> Callable:
        return self._lookup(kind, batch)[1]

    def _lookup(self, kind: str, batch: Batch) -> tuple[Any, Any]:
        """The jitted step or evaluation for this batch layout, with every input and output placement explicit."""
        key = (kind, jax.tree.structure(batch), tuple(x.shape for x in jax.tree.leaves(batch)))
        if key not in self._jitted:
            batch_shardings = jax.tree.map(lambda x: self.batch_sharding(x.shape), batch)
            if kind == "train":
                self._jitted[key] = jax.jit(
                    self._train_step,
                    in_shardings=(self.state_shardings, batch_shardings),
                    out_shardings=(self.state_shardings, self.replicated),
                    donate_argnums=(0,) if self._donate else (),
                )
            else:
                self._jitted[key] = jax.jit(
                    self._eval_sums, in_shardings=(self.param_shardings, batch_shardings), out_shardings=self.replicated
                )
        return key, self._jitted[key]

    def precompile(self, state: TrainState, batch: Batch) -> float:
        """Compile the step for this batch layout now (seconds taken), so the first step's timing is clean."""
        start = time.perf_counter()
        key, jitted = self._lookup("train", batch)
        self._jitted[key] = jitted.lower(state, batch).compile()
        return time.perf_counter() - start

    def model_flops_per_step(self, batch: Batch) -> int:
        """Matmul FLOPs of one step on this batch layout: 3 x forward (forward + backward), remat not counted."""
        micro = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)

        def loss(params, micro):
            return self.loss_fn(nnx.merge(self.graphdef, params), micro, jax.random.key(0))[0]

        return 3 * self.micro_batches * forward_flops(loss, self.abstract_params, micro)

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on a global batch [micro_batches, rows, ...]; `state` is donated."""
        return self._compiled("train", batch)(state, batch)

    def evaluate(self, params: dict, batch: Batch) -> dict[str, jax.Array]:
        """Forward only: {"loss_sum", "denominator", metric sums} of the batch (divide after summing batches)."""
        return self._compiled("eval", batch)(params, batch)

    def check_finite(self, step: int, metrics: dict[str, Any]) -> None:
        """Raise NonFiniteError naming the step and the parameters whose gradients are NaN/Inf."""
        loss, grad_norm, denom = float(metrics["loss"]), float(metrics["grad_norm"]), float(metrics["denominator"])
        if denom == 0:
            raise NonFiniteError(f"step {step}: the batch has no loss tokens (denominator 0)")
        if np.isfinite(loss) and np.isfinite(grad_norm):
            return
        bad = [name for name, ok in zip(self.param_names, np.asarray(metrics["grads_finite"])) if not ok]
        culprit = (
            f"non-finite gradient in {len(bad)} parameter(s): {', '.join(bad[:8])}" if bad else "all gradients finite"
        )
        raise NonFiniteError(f"step {step}: loss={loss}, grad_norm={grad_norm}; {culprit}")

"""python -m fr_jax.plan --config FILE.yaml [key.sub=value ...]

Per-device memory of a training config (`stage: sft` or `stage: grpo`), on paper, for the device named by
plan.device (plan.num_devices of them): what to read before renting a pod. Exit status: 0 it fits, 1 it does not
(the last line says why), 2 a mistake in the config (one line names it, e.g. a config that is not a training config).

Nothing is allocated: the model, the optimizer state and the backward pass are traced with jax.eval_shape, and each
array's per-device share comes from the logical-axis rules (fr_jax.parallel.rules) on an abstract mesh of the
configured size, so the same code plans a 1-device CPU run and a 64-chip pod slice.

What is counted, per device:
- Both stages: the policy's parameters, gradients (and the accumulator with micro-batches) and optimizer state, all
  exact; the activations the backward pass keeps, traced under the configured remat at the micro-batch's rows; with
  remat, one layer's full working set while it is recomputed; the largest activation again as its gradient.
- GRPO adds the frozen reference model when grpo.loss.beta > 0, the forward-only log-prob pass (old policy when a
  round makes several optimizer steps, reference when beta > 0; at another time than the update, so the larger of
  the two counts), at grpo.data.max_prompt_tokens + grpo.rollout.max_new_tokens per row; and, with
  grpo.rollout.launch: local on GPU or CPU, the rollout server: a second process on the same devices (one per
  grpo.rollout.replicas) holding the engine's weights (in fr_jax.serve's default dtype), its KV cache for
  grpo.rollout.max_running_requests rows of prompt + new tokens (both rounded up to powers of two, as the engine
  buckets them), and during a weight sync the new weights beside the old. The engine's smaller buffers (prefill
  chunks, a prefix cache) are not counted.

Activations are split over the mesh by their logical axes, found by tracing twice: once as configured, once with
every size (layers, rows, tokens, hidden, heads, ...) multiplied by its own prime. How a dimension grows between the
two traces names the sizes it is made of, and so its logical axis, whatever the sizes happen to equal (28 layers and
28 heads are told apart). That part is an estimate (XLA may fuse some residuals away or keep extra buffers);
parameters, gradients and optimizer state are exact.

On GPU a JAX process preallocates a fraction of each GPU (0.75 by default, XLA_CLIENT_MEM_FRACTION or the older
XLA_PYTHON_CLIENT_MEM_FRACTION to change it; XLA_PYTHON_CLIENT_PREALLOCATE=false allocates on demand under the same
cap), and a local rollout server is a second process with the trainer's environment: the plan checks each process
against that fraction and the two fractions against the whole GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import yaml
from flax import nnx
from jax.sharding import AbstractMesh

from fr_jax import cli
from fr_jax.config import (
    PLAN_DEVICES,
    Config,
    ConfigError,
    Device,
    GRPOLossConfig,
    load_config,
    parse_config,
    read_yaml,
    stage_of,
)
from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import CACHE_AXES, abstract_model, param_shardings
from fr_jax.models.loading import model_config
from fr_jax.parallel.mesh import resolve_axis_sizes
from fr_jax.parallel.rules import (
    DEFAULT_RULES,
    MESH_AXES,
    Rules,
    active_rules,
    logical_to_spec,
    named_sharding,
    set_active_rules,
)
from fr_jax.pipeline import PipelineConfig, load_pipeline_config, stage_configs
from fr_jax.rl.batch import Layout, row_fields
from fr_jax.rl.update import grpo_loss_fn
from fr_jax.rollout.engine import bucket
from fr_jax.trainer.metrics import forward_flops
from fr_jax.trainer.optim import build_optimizer
from fr_jax.trainer.sft import sft_loss
from fr_jax.trainer.step import LossFn, TrainStep

GIB = 2**30
HEADROOM = 0.9  # plan to 90% of a process's memory: XLA scratch, fragmentation and the runtime take the rest
JAX_GPU_MEM_FRACTION = 0.75  # JAX's default preallocation (docs.jax.dev, "GPU memory allocation")
TRAINER, SERVER = "trainer", "rollout server"

# Each size a trace depends on, and the prime it is multiplied by in the probe trace.
PROBE_PRIMES = {
    "layers": 3,
    "batch": 5,
    "length": 7,
    "embed": 11,
    "kv_heads": 13,
    "group": 17,  # query heads per KV head
    "head_dim": 19,
    "mlp": 23,
    "vocab": 29,
}
# (axis of an activation, axis of a parameter, the sizes it is made of), outermost first: a dimension that merges
# several (a reshape) is split like its outermost named part. The axis names are fr_jax.parallel.rules'.
AXES = (
    ("layers", "layers", ("layers",)),
    ("batch", "batch", ("batch",)),
    ("length", "length", ("length",)),
    ("act_heads", "heads", ("kv_heads", "group")),
    ("act_kv_heads", "kv_heads", ("kv_heads",)),
    ("head_dim", "head_dim", ("head_dim",)),
    ("act_embed", "embed", ("embed",)),
    ("act_mlp", "mlp", ("mlp",)),
    ("act_vocab", "vocab", ("vocab",)),
)


def size_factors(base: int, probe: int) -> Counter | None:
    """The probe sizes a dimension is made of, from its size in the two traces; None if its growth is not a product
    of PROBE_PRIMES (e.g. a sum of two lengths that grew differently)."""
    if probe % base:
        return None
    ratio, factors = probe // base, Counter()
    for name, prime in PROBE_PRIMES.items():
        while ratio % prime == 0:
            ratio //= prime
            factors[name] += 1
    return factors if ratio == 1 else None


def axis_name(factors: Counter | None, *, activation: bool) -> str | None:
    """The logical axis of a dimension made of `factors`: the first entry of AXES it contains; None if none."""
    for act, param, parts in AXES:
        if factors and all(factors[p] for p in parts):
            return act if activation else param
    return None


def kl_beta(grpo) -> float:
    """grpo.loss.beta, whether grpo.loss is a mapping of GRPOLossConfig fields or a typed section; 0 when unset."""
    loss = grpo.loss
    beta = loss.get("beta") if isinstance(loss, Mapping) else getattr(loss, "beta", None)
    return 0.0 if beta is None else float(beta)


def gpu_mem_fraction(cfg: Config, environ: Mapping[str, str] = os.environ) -> tuple[float, str]:
    """The fraction of each GPU one JAX process takes, and where that figure comes from."""
    if cfg.plan.gpu_mem_fraction is not None:
        return cfg.plan.gpu_mem_fraction, "plan.gpu_mem_fraction"
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        if environ.get(name):
            try:
                return float(environ[name]), f"${name}"
            except ValueError:
                raise ConfigError(f"${name}={environ[name]!r} is not a number (e.g. 0.9)") from None
    return JAX_GPU_MEM_FRACTION, "JAX's default preallocation"


# ------------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class Term:
    process: str  # TRAINER or SERVER
    name: str
    bytes: int
    phase: str = ""  # "": held throughout; else live only during this phase (a process's phases take turns)


@dataclasses.dataclass
class MemoryPlan:
    model: str
    num_params: int
    mesh: dict[str, int]
    device: str
    spec: Device
    fraction: float  # of each device one process may use
    fraction_source: str
    rows_per_device: int
    row_layout: str  # e.g. "16384 tokens", "512 prompt + 256 response tokens"
    tokens_per_row: int
    terms: list[Term]
    flops_per_token: float
    notes: list[str]

    @property
    def rows(self) -> dict[str, int]:
        """Per-device bytes by term name."""
        return {t.name: t.bytes for t in self.terms}

    @property
    def processes(self) -> list[str]:
        return list(dict.fromkeys(t.process for t in self.terms))

    def peak(self, process: str) -> int:
        """What the process holds throughout plus its most demanding phase."""
        terms = [t for t in self.terms if t.process == process]
        phases = Counter()
        for t in terms:
            phases[t.phase] += t.bytes if t.phase else 0
        return sum(t.bytes for t in terms if not t.phase) + max(phases.values(), default=0)

    @property
    def total(self) -> int:
        return sum(self.peak(p) for p in self.processes)

    @property
    def process_budget(self) -> float:
        return HEADROOM * self.fraction * self.spec.memory_bytes

    def problems(self) -> list[str]:
        """Why it does not fit (empty when it does)."""
        out = [
            f"the {p} needs {self.peak(p) / GIB:.2f} GiB, over its {self.process_budget / GIB:.2f} GiB"
            for p in self.processes
            if self.peak(p) > self.process_budget
        ]
        shares = len(self.processes) * self.fraction
        if self.spec.kind == "gpu" and shares > 1:
            out.append(
                f"{len(self.processes)} JAX processes each preallocate {self.fraction:.0%} of the GPU "
                f"({shares:.0%} in all): set XLA_CLIENT_MEM_FRACTION <= {0.95 / len(self.processes):.2f} "
                f"(every process inherits it; plan.gpu_mem_fraction plans it)"
            )
        if len(self.processes) > 1 and self.total > HEADROOM * self.spec.memory_bytes:
            out.append(f"together {self.total / GIB:.2f} GiB, over {HEADROOM:.0%} of the device")
        return out

    @property
    def fits(self) -> bool:
        return not self.problems()

    def table(self) -> str:
        devices = math.prod(self.mesh.values())
        hosts = math.ceil(devices / self.spec.chips_per_host)
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"model {self.model}: {self.num_params / 1e9:.3f}B parameters, "
            f"{self.flops_per_token / 1e9:.1f} GFLOP/token for training at {self.tokens_per_row} tokens",
            f"mesh {mesh} ({devices} x {self.device}, {hosts} host(s) of up to {self.spec.chips_per_host}); "
            f"micro-batch per device: {self.rows_per_device} row(s) x {self.row_layout}",
            f"{'per device':<62}{'GiB':>10}",
        ]
        for process in self.processes:
            lines.append(f"{process}")
            for t in (t for t in self.terms if t.process == process):
                lines.append(f"  {(t.phase + ': ' if t.phase else '') + t.name:<60}{t.bytes / GIB:>10.2f}")
            lines.append(f"  {'peak (held throughout + the largest phase)':<60}{self.peak(process) / GIB:>10.2f}")
        lines.append(f"{'total':<62}{self.total / GIB:>10.2f}")
        memory = self.spec.memory_bytes
        lines.append(f"{self.device}: {memory / 1e9:.0f} GB = {memory / GIB:.1f} GiB per chip ({self.spec.source})")
        if self.spec.kind == "gpu":
            lines += [
                f"GPU: each JAX process takes {self.fraction:.2f} of a GPU ({self.fraction_source}): "
                f"{self.fraction * memory / GIB:.1f} GiB per process",
                "  (XLA_CLIENT_MEM_FRACTION, formerly XLA_PYTHON_CLIENT_MEM_FRACTION, sets the fraction; "
                "XLA_PYTHON_CLIENT_PREALLOCATE=false takes it on demand, under the same cap)",
            ]
        lines += [f"note: {n}" for n in self.notes]
        used = f"{self.total / memory:.0%} of the device used"
        problems = self.problems()
        if problems:
            lines.append(f"verdict: DOES NOT FIT ({used}): " + "; ".join(problems))
        else:
            lines.append(f"verdict: fits, planning to {HEADROOM:.0%} of each process's memory ({used})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ what one step computes


@dataclasses.dataclass(frozen=True)
class Workload:
    """One micro-batch of a stage: its loss, its rows and the token lengths of a row's layout."""

    loss_fn: LossFn
    rows: int
    lengths: tuple[int, ...]
    make_batch: Callable[[int, tuple[int, ...]], dict[str, jax.ShapeDtypeStruct]]
    row_layout: str

    def batch(self, scale_rows: int = 1, scale_lengths: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
        return self.make_batch(self.rows * scale_rows, tuple(n * scale_lengths for n in self.lengths))


def _sft_batch(rows: int, lengths: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
    (seq_len,) = lengths
    return {
        k: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32)
        for k in ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
    }


def _grpo_batch(extra: tuple[str, ...]) -> Callable[[int, tuple[int, ...]], dict[str, jax.ShapeDtypeStruct]]:
    """The update's rows (fr_jax.rl.batch), plus the `extra` per-token log-probs (old_logp, ref_logp)."""

    def make(rows: int, lengths: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
        layout = Layout(*lengths)
        fields = {**row_fields(layout), **{k: ((layout.response_len,), jnp.float32) for k in extra}}
        return {k: jax.ShapeDtypeStruct((rows, *shape), dtype) for k, (shape, dtype) in fields.items()}

    return make


def _steps_per_round(cfg: Config) -> int:
    """Optimizer steps per GRPO round."""
    g = cfg.grpo
    return g.ppo_epochs * g.rollout.prompts_per_step * g.rollout.n // cfg.train.batch_size


def workload(cfg: Config) -> Workload:
    rows = cfg.train.batch_size // cfg.train.micro_batches
    if cfg.stage == "sft":
        seq_len = cfg.sft.data.max_seq_len
        return Workload(sft_loss, rows, (seq_len,), _sft_batch, f"{seq_len} tokens")
    if cfg.stage == "grpo":
        g = cfg.grpo
        extra = (("old_logp",) if _steps_per_round(cfg) > 1 else ()) + (("ref_logp",) if kl_beta(g) > 0 else ())
        # the loss at its default knobs and the configured beta: the other knobs change no array's size
        loss = grpo_loss_fn(GRPOLossConfig(beta=kl_beta(g)), g.rollout.temperature)
        lengths = (g.data.max_prompt_tokens, g.rollout.max_new_tokens)
        return Workload(
            loss, rows, lengths, _grpo_batch(extra), f"({lengths[0]} prompt + {lengths[1]} response) tokens"
        )
    raise ConfigError(f"fr_jax.plan does not plan stage {cfg.stage!r}")


# ------------------------------------------------------------------------------------- activations, by axis


def _sizes(model_cfg: ModelConfig, work: Workload) -> dict[str, int]:
    """The sizes of PROBE_PRIMES for this model and micro-batch."""
    return {
        "layers": model_cfg.num_hidden_layers,
        "batch": work.rows,
        "length": min(work.lengths),
        "embed": model_cfg.hidden_size,
        "kv_heads": model_cfg.num_key_value_heads,
        "group": model_cfg.num_attention_heads // model_cfg.num_key_value_heads,
        "head_dim": model_cfg.head_dim,
        "mlp": model_cfg.intermediate_size,
        "vocab": model_cfg.vocab_size,
    }


def _residuals(model_cfg: ModelConfig, work: Workload, scale: Mapping[str, int]) -> list[jax.ShapeDtypeStruct]:
    """What the loss's backward pass keeps from its forward pass (abstract; parameters included), with each size of
    PROBE_PRIMES multiplied by `scale`."""
    scaled = dataclasses.replace(
        model_cfg,
        num_hidden_layers=model_cfg.num_hidden_layers * scale["layers"],
        hidden_size=model_cfg.hidden_size * scale["embed"],
        num_key_value_heads=model_cfg.num_key_value_heads * scale["kv_heads"],
        num_attention_heads=model_cfg.num_attention_heads * scale["kv_heads"] * scale["group"],
        head_dim=model_cfg.head_dim * scale["head_dim"],
        intermediate_size=model_cfg.intermediate_size * scale["mlp"],
        vocab_size=model_cfg.vocab_size * scale["vocab"],
        # scaled like the rows' length, so chunked attention stays chunked (or not) exactly as configured
        attention_chunk=model_cfg.attention_chunk * scale["length"],
    )
    graphdef, params = nnx.split(abstract_model(scaled))

    def backward_fn(params, batch):
        return jax.vjp(lambda q: work.loss_fn(nnx.merge(graphdef, q), batch, None)[0], params)[1]

    batch = work.batch(scale["batch"], scale["length"])
    return jax.tree.leaves(jax.eval_shape(backward_fn, nnx.to_pure_dict(params), batch))


@dataclasses.dataclass(frozen=True)
class Activations:
    total: int  # per-device bytes of the residuals that are not the parameters themselves
    largest: int  # the largest of them that is not stacked over layers (its gradient comes whole)
    per_layer: int  # the stacked ones, for one layer


def activation_bytes(model_cfg: ModelConfig, work: Workload, mesh: AbstractMesh, params) -> Activations:
    """Per-device bytes of the backward pass's residuals, each split over the mesh by its logical axes.

    Both traces double the sizes that are 1 (jax.numpy treats a dimension of 1 specially, e.g. in gathers, so a trace
    at 1 row may keep other arrays than one at 5); the arrays' own sizes are then divided back."""
    lift = {name: 2 if size == 1 else 1 for name, size in _sizes(model_cfg, work).items()}
    base = _residuals(model_cfg, work, lift)
    probe = _residuals(model_cfg, work, {name: lift[name] * prime for name, prime in PROBE_PRIMES.items()})
    if [(r.ndim, r.dtype) for r in base] != [(r.ndim, r.dtype) for r in probe]:
        raise RuntimeError("fr_jax.plan: the probe trace keeps other arrays than the configured one")
    own = Counter((tuple(p.shape), jnp.dtype(p.dtype)) for p in params)
    total = largest = stacked = 0
    for r, q in zip(base, probe):
        factors = [size_factors(b, s) for b, s in zip(r.shape, q.shape)]
        shape = tuple(n // math.prod(lift[k] ** e for k, e in (f or {}).items()) for n, f in zip(r.shape, factors))
        activation = any(f and (f["batch"] or f["length"]) for f in factors)
        key = (shape, jnp.dtype(r.dtype))
        if not activation and own[key]:
            own[key] -= 1  # a parameter itself, counted with the parameters
            continue
        names = _distinct_mesh_axes([axis_name(f, activation=activation) for f in factors])
        b = math.prod(named_sharding(mesh, shape, names).shard_shape(shape)) * jnp.dtype(r.dtype).itemsize
        total += b
        if names and names[0] == "layers":
            stacked += b
        else:
            largest = max(largest, b)
    return Activations(total, largest, stacked // model_cfg.num_hidden_layers)


def _distinct_mesh_axes(names: list[str | None]) -> list[str | None]:
    """Drop the later of two dimensions the rules send to the same mesh axis (an array uses a mesh axis once)."""
    used: set[str] = set()
    out = []
    for name, entry in zip(names, logical_to_spec(names)):
        axes = {entry} if isinstance(entry, str) else set(entry or ())
        out.append(None if axes & used else name)
        used |= axes
    return out


# ------------------------------------------------------------------------------------------------ trainer


def _device_bytes(abstract_tree) -> int:
    """Per-device bytes of ShapeDtypeStructs that carry shardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_tree)
    )


def _trainer_terms(cfg: Config, model_cfg: ModelConfig, mesh: AbstractMesh, work: Workload):
    """The trainer's terms, its parameters (abstract, sharded) and its forward FLOPs per micro-batch."""
    model = abstract_model(model_cfg)
    optimizer, _ = build_optimizer(cfg.optim, cfg.train.steps)
    micro_batches = cfg.train.micro_batches
    state = TrainStep(model, work.loss_fn, optimizer, mesh=mesh, micro_batches=micro_batches).abstract_state()
    params = jax.tree.leaves(state.params)
    param_bytes = _device_bytes(params)
    grads = _device_bytes([jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding) for p in params])
    acts = activation_bytes(model_cfg, work, mesh, params)
    no_remat = dataclasses.replace(model_cfg, remat="none")
    per_layer = (
        acts.per_layer if model_cfg.remat == "none" else activation_bytes(no_remat, work, mesh, params).per_layer
    )
    update = "update" if cfg.stage == "grpo" else ""
    terms = [
        Term(TRAINER, f"parameters ({model_cfg.param_dtype})", param_bytes),
        Term(TRAINER, "optimizer state", _device_bytes(state.opt_state)),
        Term(
            TRAINER,
            "gradients (float32)" + (" + accumulator" if micro_batches > 1 else ""),
            grads * (2 if micro_batches > 1 else 1),
            update,
        ),
        Term(TRAINER, f"activations kept for backward (remat {model_cfg.remat})", acts.total, update),
    ]
    if model_cfg.remat != "none":
        terms.append(Term(TRAINER, "one layer recomputed in backward", per_layer, update))
    terms.append(Term(TRAINER, "largest activation, again as its gradient", acts.largest, update))
    if cfg.stage == "grpo":
        beta = kl_beta(cfg.grpo)
        if beta > 0:
            terms.insert(2, Term(TRAINER, f"reference model (grpo.loss.beta {beta:g}): frozen parameters", param_bytes))
        passes = [n for n, on in (("old policy", _steps_per_round(cfg) > 1), ("reference", beta > 0)) if on]
        if passes:
            # forward only: one layer's working set, the response logits and their log-softmax
            forward = per_layer + 2 * acts.largest
            terms.append(Term(TRAINER, "forward: one layer + logits and log-softmax", forward, "log-prob pass"))
    graphdef, abstract_params = nnx.split(model)
    flops = forward_flops(
        lambda p, b: work.loss_fn(nnx.merge(graphdef, p), b, None)[0], nnx.to_pure_dict(abstract_params), work.batch()
    )
    return terms, params, flops


# --------------------------------------------------------------------------------------- rollout server


def _served_config(model_cfg: ModelConfig) -> ModelConfig:
    """The rollout launcher starts fr_jax.serve without --dtype/--param-dtype: it serves at ModelConfig's defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in ("param_dtype", "dtype")}
    return dataclasses.replace(model_cfg, **defaults)


def _server_terms(cfg: Config, model_cfg: ModelConfig, num_devices: int, spec: Device) -> list[Term]:
    """A local fr_jax.serve on the devices of one host: its weights, its KV cache while generating, a second copy of
    the weights while swapping them (fr_jax.rollout.engine). The engine's smaller buffers are not counted."""
    g = cfg.grpo
    try:
        data, fsdp, tensor = (int(x) for x in g.rollout.mesh.split(","))
        sizes = resolve_axis_sizes(data, fsdp, tensor, min(num_devices, spec.chips_per_host))
    except ValueError as err:
        raise ConfigError(f"grpo.rollout.mesh={g.rollout.mesh!r}: {err} (expected data,fsdp,tensor)") from None
    mesh = AbstractMesh(sizes, MESH_AXES)
    served = _served_config(model_cfg)
    model = abstract_model(served)
    shardings = nnx.to_pure_dict(param_shardings(model, mesh))
    weights = _device_bytes(
        jax.tree.map(
            lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
            nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            shardings,
        )
    )
    # rows and length rounded up to powers of two, as the engine buckets its cache
    rows = bucket(g.rollout.max_running_requests)
    length = bucket(g.data.max_prompt_tokens + max(g.rollout.max_new_tokens, g.eval.max_new_tokens or 0))
    cache = jax.eval_shape(lambda: model.init_cache(rows, length))
    cache_bytes = sum(
        math.prod(named_sharding(mesh, x.shape, CACHE_AXES).shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(cache)
    )
    mesh_text = " x ".join(f"{k}={v}" for k, v in zip(MESH_AXES, sizes))
    return [
        Term(SERVER, f"engine weights ({served.param_dtype}, mesh {mesh_text})", weights),
        Term(SERVER, f"KV cache: {rows} rows x {length} tokens ({served.dtype})", cache_bytes, "generate"),
        Term(SERVER, "the new weights beside the served ones", weights, "weight sync"),
    ]


def _server_notes(cfg: Config, spec: Device) -> tuple[bool, list[str]]:
    """Whether the rollout server shares the planned devices, and what the plan says about it."""
    if cfg.stage != "grpo" or cfg.grpo.rollout.launch == "none":
        return False, []
    if cfg.grpo.rollout.launch == "sglang":
        return False, [
            "grpo.rollout.launch: sglang starts SGLang on these GPUs; its memory (--mem-fraction-static) is not "
            "planned here and comes out of what the trainer's fraction leaves"
        ]
    if spec.kind == "tpu":
        return False, [
            "grpo.rollout.launch: local on TPU: a chip is opened by one process only (libtpu), so the rollout "
            "server cannot use the trainer's chips (it falls back to the host CPU); not planned here"
        ]
    return True, []


# ---------------------------------------------------------------------------------------------- plan_memory


@contextlib.contextmanager
def _rules_in_force(rules: Rules) -> Iterator[None]:
    """The parameters' shardings (decoder.param_shardings, TrainStep) follow the active table: plan under `rules`,
    then put back whatever was in force."""
    previous = active_rules()
    set_active_rules(rules)
    try:
        yield
    finally:
        set_active_rules(previous)


def plan_memory(cfg: Config, num_devices: int | None = None) -> MemoryPlan:
    """Per-device memory of `cfg` on its mesh: every term with the phase it lives in."""
    num_devices = num_devices or cfg.plan.num_devices or jax.device_count()
    try:
        sizes = resolve_axis_sizes(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, num_devices)
    except ValueError as err:
        raise ConfigError(f"{err} (plan.num_devices={num_devices})") from None
    mesh = AbstractMesh(sizes, MESH_AXES)
    spec = PLAN_DEVICES[cfg.plan.device]
    fraction, source = gpu_mem_fraction(cfg) if spec.kind == "gpu" else (1.0, "")
    model_cfg = model_config(cfg.model)
    work = workload(cfg)
    with _rules_in_force(cfg.mesh.sharding_rules()):  # the run's table (mesh.rules), as start_runtime sets it
        terms, params, fwd = _trainer_terms(cfg, model_cfg, mesh, work)
        rows_per_device = named_sharding(mesh, (work.rows,), ("batch",)).shard_shape((work.rows,))[0]
    shares_devices, notes = _server_notes(cfg, spec)
    if shares_devices:
        with _rules_in_force(DEFAULT_RULES):  # fr_jax.serve is not given the run's mesh.rules
            server = _server_terms(cfg, model_cfg, num_devices, spec)
        replicas = cfg.grpo.rollout.replicas  # each a process of its own on the same devices
        terms += (
            server
            if replicas == 1
            else [dataclasses.replace(t, process=f"{SERVER} {i}") for i in range(replicas) for t in server]
        )
    return MemoryPlan(
        model=f"{model_cfg.model_type} L{model_cfg.num_hidden_layers} d{model_cfg.hidden_size}",
        num_params=sum(math.prod(p.shape) for p in params),
        mesh=dict(zip(MESH_AXES, sizes)),
        device=cfg.plan.device,
        spec=spec,
        fraction=fraction,
        fraction_source=source,
        rows_per_device=rows_per_device,
        row_layout=work.row_layout,
        tokens_per_row=sum(work.lengths),
        terms=terms,
        flops_per_token=3 * fwd / (work.rows * sum(work.lengths)),
        notes=notes,
    )


def _not_a_training_config(path: str) -> str | None:
    """One line for a YAML file that is no training config (another command's, e.g. fr_jax.flow.optimize's)."""
    try:
        with open(path) as f:
            tree = read_yaml(f.read())
    except (OSError, yaml.YAMLError):
        return None
    if isinstance(tree, dict) and "stage" not in tree:
        return (
            f"{path} is not a training config (it has no `stage:`): fr_jax.plan plans the configs of "
            f"python -m fr_jax.train (stage: sft or grpo)"
        )
    return None


def plan_command(args: argparse.Namespace) -> int:
    if not args.debug:  # the probe traces would log each dimension the mesh does not divide; the table says enough
        for name in ("fr_jax.parallel.rules", "jax"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if stage_of(args.config) == "pipeline":
        return plan_pipeline(load_pipeline_config(args.config, args.overrides))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise ConfigError(_not_a_training_config(args.config) or str(err)) from None
    memory = plan_memory(cfg)
    print(memory.table())
    return 0 if memory.fits else 1


def plan_pipeline(cfg: PipelineConfig) -> int:
    """A pipeline's two training stages, each on its own devices: SFT, then GRPO on the SFT'd model (the same
    architecture as the SFT stage's model, which the GRPO stage loads from the SFT export)."""
    *_, sft, grpo = stage_configs(cfg, "http://worker.not-started/v1")
    grpo["model"] = {**sft["model"], **{k: v for k, v in grpo["model"].items() if k != "pretrained"}}
    fits = True
    for name, tree in (("sft", sft), ("grpo", grpo)):
        memory = plan_memory(parse_config(tree))
        print(f"== pipeline stage {name}\n{memory.table()}")
        fits = fits and memory.fits
    return 0 if fits else 1


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m fr_jax.plan", __doc__)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    return cli.run(plan_command, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

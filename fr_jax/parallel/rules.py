"""THE logical-axis table: every sharding decision in fr_jax comes from here.

Models name their parameter and activation axes logically ("embed", "mlp", ...). This table maps each
logical name to mesh axes (data, fsdp, tensor), so that changing the parallelism is a config change,
never a model change (MaxText's idea).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalAxes = Sequence[str | None]
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# logical axis -> mesh axis (or axes, or None = replicated)
DEFAULT_RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # KV cache
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)

_log = logging.getLogger(__name__)
_active: Rules = DEFAULT_RULES  # the table in force; a run may override entries (mesh.rules in the config)


def with_overrides(overrides: Mapping[str, str | Sequence[str] | None], base: Rules = DEFAULT_RULES) -> Rules:
    """`base` with some logical axes mapped elsewhere (MaxText's per-run rules): sharding variants without code
    edits. An unknown logical axis or mesh axis is an error naming the known ones."""
    table = dict(base)
    for name, entry in overrides.items():
        if name not in table:
            raise ValueError(f"mesh.rules: logical axis {name!r} is unknown; known: {sorted(table)}")
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"mesh.rules.{name}: mesh axes {unknown} are unknown; known: {list(MESH_AXES)}")
        table[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return tuple(table.items())


def set_active_rules(rules: Rules) -> None:
    """Make `rules` the table every sharding decision of this process uses from now on."""
    global _active
    _active = rules


def active_rules() -> Rules:
    return _active


def logical_to_spec(logical_axes: LogicalAxes, rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec for logical axes under `rules` (default: the active table); an unknown logical name is an
    error, not silent replication."""
    table = dict(rules if rules is not None else _active)
    spec: list[str | tuple[str, ...] | None] = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        spec.append(table[name])
    return PartitionSpec(*spec)


def _axis_size(mesh: Mesh, entry) -> int:
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    size = 1
    for n in names:
        size *= mesh.shape[n]
    return size


def fit_spec(shape: Sequence[int], spec: PartitionSpec, mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide a dimension (e.g. 3 KV heads over tensor=2), replicating it instead.

    Small checkpoints have head counts that real meshes do not divide; replicating that one dimension
    keeps the model runnable and is logged, instead of failing deep inside XLA.
    """
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is not None and dim % _axis_size(mesh, entry) != 0:
            _log.info(
                "replicating dim of size %d: mesh axes %s (size %d) do not divide it",
                dim,
                entry,
                _axis_size(mesh, entry),
            )
            entry = None
        fitted.append(entry)
    return PartitionSpec(*fitted)


def named_sharding(
    mesh: Mesh, shape: Sequence[int], logical_axes: LogicalAxes, rules: Rules | None = None
) -> NamedSharding:
    """The NamedSharding for an array of `shape` whose axes carry `logical_axes`."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match rank of shape {tuple(shape)}")
    return NamedSharding(mesh, fit_spec(shape, logical_to_spec(logical_axes, rules), mesh))


def constrain(x: jax.Array, logical_axes: LogicalAxes, rules: Rules | None = None) -> jax.Array:
    """with_sharding_constraint by logical axes, under the mesh set by `jax.set_mesh`; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(x.shape, logical_to_spec(logical_axes, rules), mesh))

"""Start-up shared by every stage: the processes, the device mesh and its sharding rules, the run directory."""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
from jax.sharding import Mesh

from fr_jax.config import Config, ConfigError, MeshSection, TrainSection
from fr_jax.parallel.mesh import initialize_distributed, make_mesh
from fr_jax.parallel.rules import set_active_rules

_log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"


@dataclasses.dataclass(frozen=True)
class Runtime:
    cfg: Config
    mesh: Mesh
    run_dir: pathlib.Path

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def mesh_from_config(mesh_cfg: MeshSection, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all); an impossible shape is a ConfigError."""
    devices = jax.devices() if devices is None else devices
    try:
        return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices=devices)
    except ValueError as err:
        raise ConfigError(f"{err} (set mesh.data/mesh.fsdp/mesh.tensor; -1 on one axis takes the rest)") from None


def check_batch_layout(train: TrainSection, mesh: Mesh) -> None:
    """Rows of each micro-batch must split evenly over the batch axes (data x fsdp) and the processes."""
    rows = train.batch_size // train.micro_batches
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % ways:
        raise ConfigError(
            f"train.batch_size / train.micro_batches = {rows} rows per micro-batch must be divisible by "
            f"mesh.data x mesh.fsdp = {ways}"
        )
    if rows % jax.process_count():
        raise ConfigError(
            f"{rows} rows per micro-batch cannot be split over {jax.process_count()} processes "
            "(train.batch_size / train.micro_batches)"
        )


def start_runtime(cfg: Config) -> Runtime:
    """Join the other processes, build the mesh, create the run directory and record the resolved config."""
    d = cfg.distributed
    initialize_distributed(d.coordinator, d.num_processes, d.process_id, d.local_device_count)
    mesh = mesh_from_config(cfg.mesh)
    set_active_rules(cfg.mesh.sharding_rules())
    check_batch_layout(cfg.train, mesh)
    run_dir = pathlib.Path(cfg.run_dir).absolute()
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
    _log.info("process %d/%d, mesh %s, run dir %s", jax.process_index(), jax.process_count(), dict(mesh.shape), run_dir)
    return Runtime(cfg, mesh, run_dir)

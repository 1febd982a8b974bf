"""Start-up shared by every stage: processes, mesh, run directory, model and tokenizer from the config."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
from jax.sharding import Mesh

from fr_jax.config import Config, ConfigError, MeshSection, ModelSection, TrainSection
from fr_jax.models.config import ModelConfig
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


def pretrained_dir(name: str) -> pathlib.Path:
    if name == "smollm2":
        from fr_jax.models.gguf import smollm2_hf_dir

        return smollm2_hf_dir()
    path = pathlib.Path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.pretrained={name!r}: not a demo name (smollm2) nor a directory with config.json")
    return path


def _compute_choices(section: ModelSection) -> dict:
    """The section's choices of how to compute (not what): dtypes, remat, attention chunking."""
    return dict(
        dtype=section.dtype,
        param_dtype=section.param_dtype,
        remat=section.remat,
        attention_chunk=section.attention_chunk,
    )


def model_config(section: ModelSection) -> ModelConfig:
    """The architecture the section names, with its compute choices applied."""
    overrides = _compute_choices(section)
    if section.pretrained is not None:
        key, hf = "model.pretrained", json.loads((pretrained_dir(section.pretrained) / "config.json").read_text())
    elif section.config_json is not None:
        path = pathlib.Path(section.config_json)
        if not path.is_file():
            raise ConfigError(f"model.config_json={section.config_json!r}: file not found")
        key, hf = "model.config_json", json.loads(path.read_text())
    else:
        key, hf = "model.architecture", dict(section.architecture)
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{key}: {err}") from None


def load_model(section: ModelSection, mesh: Mesh):
    """The Decoder the section names: pretrained weights, or a random init from `init_seed`, sharded over `mesh`."""
    from fr_jax.models.decoder import create_model
    from fr_jax.models.hf import load_pretrained

    cfg = model_config(section)
    if section.pretrained is not None:
        return load_pretrained(pretrained_dir(section.pretrained), mesh=mesh, **_compute_choices(section))
    return create_model(cfg, mesh=mesh, rngs_seed=section.init_seed)


def load_tokenizer(section: ModelSection):
    """The tokenizer with the chat template: model.tokenizer if given, else the pretrained model's."""
    from fr_jax.models.tokenizer import load_tokenizer as load_dir
    from fr_jax.models.tokenizer import qwen_tokenizer

    name = section.tokenizer or section.pretrained
    if name is None:
        raise ConfigError("model.tokenizer is required when the model is not pretrained (a dir, 'smollm2' or 'qwen')")
    if name == "qwen":
        return qwen_tokenizer()
    return load_dir(pretrained_dir(name) if name == "smollm2" else name)


def export_hf(rt: Runtime, model, tokenizer) -> pathlib.Path:
    """<run_dir>/hf: the model as an HF checkpoint with the tokenizer and, for a pretrained model, its generation
    settings (special token ids, generation_config.json). Every process calls it (saving gathers shards)."""
    from fr_jax.models.hf import save_pretrained

    out = rt.run_dir / "hf"
    section = rt.cfg.model
    save_pretrained(model, out, source_dir=pretrained_dir(section.pretrained) if section.pretrained else None)
    if rt.is_main:
        tokenizer.save_pretrained(out)
    return out

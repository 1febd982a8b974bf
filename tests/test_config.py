"""The config tree: YAML + overrides into typed objects; bad configs refused with the key named."""

import pathlib

import jax
import pytest
import yaml

from fr_jax import train
from fr_jax.config import Config, ConfigError, apply_overrides, load_config, parse_config
from fr_jax.models.loading import model_config
from fr_jax.trainer.runtime import check_batch_layout, mesh_from_config

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = {
    "stage": "sft",
    "run_dir": "runs/x",
    "model": {
        "architecture": {
            "model_type": "llama",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    },
    "train": {"steps": 3, "batch_size": 8},
    "sft": {"data": {"source": "mbpp", "max_seq_len": 64}},
}


def refused(overrides, tree=BASE) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(apply_overrides(tree, overrides))
    return str(info.value)


def test_yaml_and_typed_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(
        path, ["train.steps=7", "optim.learning_rate=3e-4", "mesh.tensor=2", "model.remat=full", "sft.data.shards=2"]
    )
    assert isinstance(cfg, Config)
    assert (cfg.train.steps, cfg.optim.learning_rate, cfg.mesh.tensor, cfg.model.remat) == (7, 3e-4, 2, "full")
    assert cfg.sft.data.shards == 2 and cfg.mesh.fsdp == -1  # defaults fill the rest
    assert parse_config(yaml.safe_load(cfg.to_yaml())) == cfg  # the resolved config written to the run dir reloads


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.stesp=3"], "train.stesp: unknown key; allowed here: batch_size"),
        (["sft.data.max_seq_lenn=3"], "sft.data.max_seq_lenn: unknown key"),
        (["train.steps=abc"], "train.steps: Input should be a valid integer"),
        (["sft.data.max_seq_len=1.5"], "sft.data.max_seq_len: Input should be a valid integer"),
        (["optim.learning_rate=-1"], "optim.learning_rate: Input should be greater than 0"),
        (["model.remat=sometimes"], "model.remat: Input should be 'none', 'full' or 'dots'"),
        (["stage=ppo"], "stage: Input should be 'sft' or 'grpo'"),
        (["stage=grpo"], "stage: 'grpo'"),
        (["mesh.fsdp=0"], "mesh.fsdp=0: must be a positive integer or -1"),
        (["mesh.data=-1"], "only one axis may be -1"),
        (["train.micro_batches=3"], "train.batch_size=8 is not divisible by train.micro_batches=3"),
        (["model.config_json=x.json"], "give exactly one of model.pretrained, model.config_json, model.architecture"),
        (["sft.data.source=jsonl"], "sft.data.train_file is required"),
        (["plan.device=tpu-v9"], "plan.device: unknown device 'tpu-v9'"),
        (["sft.data.on_malformed=ignore"], "sft.data.on_malformed: Input should be 'skip' or 'stop'"),
    ],
)
def test_bad_values_name_the_key(overrides, expected):
    assert expected in refused(overrides)


def test_missing_keys_and_sections():
    tree = {k: v for k, v in BASE.items() if k != "sft"}
    assert "stage: 'sft' needs a `sft:` section" in refused([], tree)
    tree = dict(BASE, train={"batch_size": 8})
    assert "train.steps: required key is missing" in refused([], tree)
    with pytest.raises(ConfigError, match="override 'train.steps': expected key.sub=value"):
        apply_overrides(BASE, ["train.steps"])
    with pytest.raises(ConfigError, match="train.steps is a value, not a section"):
        apply_overrides(BASE, ["train.steps.x=1"])


def test_impossible_mesh_and_batch_layout():
    devices = jax.devices()[:8]
    for overrides, expected in [
        (["mesh.data=3"], "8 devices are not divisible by the fixed axes"),
        (["mesh.fsdp=2", "mesh.tensor=2"], r"data\*fsdp\*tensor = 4 .* but there are 8 devices"),
    ]:
        cfg = parse_config(apply_overrides(BASE, overrides))
        with pytest.raises(ConfigError, match=expected) as info:
            mesh_from_config(cfg.mesh, devices)
        assert "mesh." in str(info.value)
    cfg = parse_config(apply_overrides(BASE, ["train.batch_size=12", "train.micro_batches=2"]))
    mesh = mesh_from_config(cfg.mesh, devices)  # fsdp=-1 -> 8
    with pytest.raises(ConfigError, match="6 rows per micro-batch must be divisible by mesh.data x mesh.fsdp = 8"):
        check_batch_layout(cfg.train, mesh)


def test_model_section_errors_name_the_key(tmp_path):
    cfg = parse_config(apply_overrides(BASE, ["model.architecture.model_type=gpt2"]))
    with pytest.raises(ConfigError, match="model.architecture: model_type 'gpt2' is not supported"):
        model_config(cfg.model)
    tree = dict(BASE, model={"config_json": str(tmp_path / "missing.json")})
    with pytest.raises(ConfigError, match="model.config_json=.*file not found"):
        model_config(parse_config(tree).model)


def test_cli_refuses_bad_config_with_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert train.main(["--config", str(path), "train.stesp=1", "optim.b1=yes", "train.seed=0.5"]) == 2
    err = capsys.readouterr().err
    assert (
        "train.stesp: unknown key" in err
        and "optim.b1: Input should be a valid number" in err
        and "train.seed: Input should be a valid integer" in err
    )
    assert train.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("sft_*.yaml")))
def test_shipped_sft_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.stage == "sft"
    if cfg.model.pretrained is None:
        assert model_config(cfg.model).num_hidden_layers > 0


def test_monitor_rollouts_off_survives_yaml(tmp_path):
    """YAML reads a bare `off` as false; the record policy still means off (and a typo is named)."""
    path = tmp_path / "c.yaml"
    path.write_text((REPO / "configs" / "grpo_demo.yaml").read_text() + "\n")
    assert load_config(path, ["monitor.rollouts=off"]).monitor.rollouts == "off"
    assert load_config(path, ["monitor.rollouts=sample:8"]).monitor.rollouts == "sample:8"
    with pytest.raises(ConfigError, match="monitor.rollouts"):
        load_config(path, ["monitor.rollouts=some"])


def test_rollout_fleet_keys():
    """grpo.rollout: one server by default; replicas or urls make a fleet, which needs the router."""
    tree = yaml.safe_load((REPO / "configs" / "grpo_demo.yaml").read_text())
    rollout = parse_config(tree).grpo.rollout
    assert (rollout.replicas, rollout.urls, rollout.router, rollout.servers) == (1, [], "none", 1)
    fleet = parse_config(apply_overrides(tree, ["grpo.rollout.replicas=2", "grpo.rollout.router=sglang-router"]))
    assert fleet.grpo.rollout.servers == 2 and fleet.grpo.rollout.router_policy == "cache_aware"
    urls = ["grpo.rollout.launch=none", "grpo.rollout.urls=[http://a:1, http://b:2]"]
    assert parse_config(apply_overrides(tree, [*urls, "grpo.rollout.router=sglang-router"])).grpo.rollout.servers == 2
    assert "set grpo.rollout.router to 'sglang-router'" in refused(["grpo.rollout.replicas=2"], tree)
    assert "grpo.rollout has 2 servers" in refused(urls, tree)
    assert "needs grpo.rollout.launch 'local'" in refused(
        ["grpo.rollout.launch=sglang", "grpo.rollout.replicas=2", "grpo.rollout.router=sglang-router"], tree
    )
    assert "grpo.rollout.router_policy: Input should be" in refused(["grpo.rollout.router_policy=fastest"], tree)
    assert "give grpo.rollout.url or grpo.rollout.urls" in refused(
        [*urls, "grpo.rollout.url=http://c:3", "grpo.rollout.router=sglang-router"], tree
    )

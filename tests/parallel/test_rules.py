"""Per-run overrides of the logical-axis table (mesh.rules), as the model's parameters see them."""

import jax
import pytest

from fr_jax.config import ConfigError, parse_config
from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import create_model, param_shardings
from fr_jax.parallel.mesh import make_mesh
from fr_jax.parallel.rules import DEFAULT_RULES, active_rules, set_active_rules, with_overrides

TINY = ModelConfig.from_hf(
    dict(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
)


def test_overrides_change_only_the_named_axes():
    rules = dict(with_overrides({"embed": None, "mlp": ["fsdp", "tensor"], "heads": "fsdp"}))
    assert rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor") and rules["heads"] == "fsdp"
    assert {k: v for k, v in rules.items() if k not in ("embed", "mlp", "heads")} == {
        k: v for k, v in DEFAULT_RULES if k not in ("embed", "mlp", "heads")
    }
    with pytest.raises(ValueError, match="logical axis 'embd' is unknown"):
        with_overrides({"embd": None})
    with pytest.raises(ValueError, match=r"mesh.rules.mlp: mesh axes \['model'\] are unknown"):
        with_overrides({"mlp": "model"})


def test_a_config_override_reshards_the_model():
    cfg = {
        "stage": "sft",
        "run_dir": "r",
        "model": {"architecture": {}},
        "train": {"steps": 1, "batch_size": 8},
        "sft": {"data": {"source": "mbpp", "max_seq_len": 64}},
    }
    with pytest.raises(ConfigError, match="mesh.rules: logical axis 'embd' is unknown"):
        parse_config({**cfg, "mesh": {"rules": {"embd": None}}})
    rules = parse_config({**cfg, "mesh": {"rules": {"embed": None}}}).mesh.sharding_rules()
    mesh = make_mesh(1, -1, 1, devices=jax.devices())
    try:
        set_active_rules(rules)
        replicated = param_shardings(create_model(TINY, mesh=mesh), mesh)
    finally:
        set_active_rules(DEFAULT_RULES)
    assert active_rules() == DEFAULT_RULES
    default = param_shardings(create_model(TINY, mesh=mesh), mesh)

    def embedding_spec(shardings) -> tuple:
        leaves = jax.tree_util.tree_leaves_with_path(shardings)
        return next(tuple(s.spec) for path, s in leaves if jax.tree_util.keystr(path).startswith("['embed']"))

    assert "fsdp" in embedding_spec(default)  # the embedding's "embed" axis is split over fsdp by default
    assert "fsdp" not in embedding_spec(replicated)

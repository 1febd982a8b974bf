"""HF checkpoint I/O both ways with transformers (sharded safetensors + index), and clear errors on bad checkpoints."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from fr_jax.models.hf import SAFE_INDEX, SAFE_SINGLE, load_pretrained, save_pretrained
from fr_jax.parallel.mesh import make_mesh
from tests.support.hf_reference import TINY_CONFIGS, fr_logits, hf_logits, left_padded_positions, tiny_hf_model


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(1, 4, 2)


@pytest.fixture(scope="module")
def qwen2_single_file(tmp_path_factory):
    """A tiny Qwen2 saved by transformers as one model.safetensors."""
    path = tmp_path_factory.mktemp("qwen2_single")
    tiny_hf_model("qwen2").save_pretrained(path)
    assert (path / SAFE_SINGLE).is_file() and not (path / SAFE_INDEX).exists()
    return path


def _batch():
    ids = np.random.RandomState(2).randint(0, 256, (2, 10))
    mask = np.ones((2, 10), bool)
    mask[1, :3] = False
    return ids, mask


@pytest.mark.parametrize("model_type", tuple(TINY_CONFIGS))
def test_round_trip_with_transformers(model_type, mesh, tmp_path):
    """transformers save (sharded) -> fr_jax load -> same logits; fr_jax save (sharded) -> transformers load -> same."""
    hf = tiny_hf_model(model_type, seed=3)
    hf.generation_config.eos_token_id = 7  # generation settings, which the export must keep
    hf.generation_config.bos_token_id = 5
    hf.save_pretrained(tmp_path / "from_hf", max_shard_size="100KB")
    assert (tmp_path / "from_hf" / SAFE_INDEX).is_file()
    ids, mask = _batch()
    positions = left_padded_positions(mask)
    reference = hf_logits(hf, ids, attention_mask=mask, position_ids=positions)

    model = load_pretrained(tmp_path / "from_hf", mesh=mesh)
    ours = fr_logits(model, mesh, ids, positions, mask.astype(np.int32))
    assert np.abs(ours - reference)[mask].max() <= 1e-4

    save_pretrained(model, tmp_path / "ours", max_shard_size="100KB", source_dir=tmp_path / "from_hf")
    index = json.loads((tmp_path / "ours" / SAFE_INDEX).read_text())
    shard_files = sorted(p.name for p in (tmp_path / "ours").glob("model-*.safetensors"))
    assert len(shard_files) > 1 and sorted(set(index["weight_map"].values())) == shard_files
    assert not (tmp_path / "ours" / SAFE_SINGLE).exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    assert (reloaded.generation_config.eos_token_id, reloaded.generation_config.bos_token_id) == (7, 5)
    expected = hf.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == expected[name].dtype and bool((tensor == expected[name]).all()), name
    assert np.abs(hf_logits(reloaded, ids, attention_mask=mask, position_ids=positions) - reference).max() == 0.0


def test_bfloat16_save_and_reload_is_exact(qwen2_single_file, mesh, tmp_path):
    model = load_pretrained(qwen2_single_file, mesh=mesh, param_dtype="bfloat16")
    save_pretrained(model, tmp_path)
    assert (tmp_path / SAFE_SINGLE).is_file() and not (tmp_path / SAFE_INDEX).exists()
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = load_file(tmp_path / SAFE_SINGLE)
    assert "lm_head.weight" not in tensors  # tied: the head is the embedding, as transformers saves it
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    again = load_pretrained(tmp_path, mesh=mesh, param_dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        assert a.sharding == b.sharding and bool((np.asarray(a) == np.asarray(b)).all())


def _copy_checkpoint(src, dst, edit_config=None, edit_tensors=None):
    dst.mkdir(exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    tensors = load_file(src / SAFE_SINGLE)
    save_file(edit_tensors(tensors) if edit_tensors else tensors, dst / SAFE_SINGLE, metadata={"format": "pt"})
    return dst


def test_load_errors_name_the_problem(qwen2_single_file, mesh, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere", mesh=mesh)

    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((qwen2_single_file / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(empty, mesh=mesh)

    mistral = _copy_checkpoint(
        qwen2_single_file, tmp_path / "mistral", edit_config=lambda c: {**c, "model_type": "mistral"}
    )
    with pytest.raises(ValueError, match="model_type 'mistral' is not supported"):
        load_pretrained(mistral, mesh=mesh)

    narrower = _copy_checkpoint(
        qwen2_single_file, tmp_path / "narrower", edit_config=lambda c: {**c, "intermediate_size": 96}
    )
    shape_error = r"'model\.layers\.0\.mlp\.down_proj\.weight'.*shape \(64, 128\), expected \(64, 96\)"
    with pytest.raises(ValueError, match=shape_error):
        load_pretrained(narrower, mesh=mesh)

    missing = "model.layers.1.self_attn.k_proj.weight"
    holed = _copy_checkpoint(
        qwen2_single_file, tmp_path / "holed", edit_tensors=lambda t: {k: v for k, v in t.items() if k != missing}
    )
    with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
        load_pretrained(holed, mesh=mesh)

    broken_index = _copy_checkpoint(qwen2_single_file, tmp_path / "broken_index")
    names = load_file(broken_index / SAFE_SINGLE).keys()
    (broken_index / SAFE_INDEX).write_text(
        json.dumps({"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}})
    )
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        load_pretrained(broken_index, mesh=mesh)

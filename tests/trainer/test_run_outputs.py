"""Where a run's outputs go (issue 16): checkpoints and TensorBoard at a local path or a gs:// URL, metrics.jsonl in
the local run directory, and Weights & Biases in offline mode.

The gs:// runs are real `python -m fr_jax.train` runs against fake-gcs-server on loopback (tests/support/gcs.py):
orbax writes the sharded arrays through tensorstore's gcs driver and its metadata through etils.epath (gcsfs),
tensorboardX its event file through google-cloud-storage, as on a TPU VM against a real bucket."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fr_jax.config import ConfigError, WandbSection, parse_config, read_yaml
from fr_jax.trainer.metrics import METRICS_FILE, MetricsWriter, WandbRun, read_metrics
from fr_jax.trainer.runtime import CONFIG_FILE
from fr_jax.trainer.stage import check_optional_packages
from tests.support import wandb_records
from tests.support.gcs import client_env, fake_gcs

FIRST_STEPS, STEPS = 2, 4  # a run of 2 steps, then the same run continued to 4: it resumes from step 2
MINIMAL = {
    "stage": "sft",
    "run_dir": "r",
    "model": {"pretrained": "smollm2"},
    "train": {"steps": 1, "batch_size": 1},
    "sft": {"data": {"source": "mbpp", "max_seq_len": 64}},
}


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    turns = [("Be brief.", f"{a} + {b} = ?", str(a + b)) for a in range(12) for b in range(0, 60, 7)]
    path.write_text(
        "".join(
            json.dumps({"messages": [{"role": r, "content": c} for r, c in zip(("system", "user", "assistant"), t)]})
            + "\n"
            for t in turns
        )
    )
    return path


def run_config(run_dir, data_file, *, checkpoint_dir, tensorboard_dir, steps, wandb=None) -> dict:
    return {
        "stage": "sft",
        "run_dir": str(run_dir),
        "model": {
            "architecture": {
                "model_type": "llama",
                "vocab_size": 49152,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "tie_word_embeddings": True,
            },
            "tokenizer": "smollm2",
        },
        "mesh": {"data": 1, "fsdp": 4, "tensor": 2},  # every array sharded: each shard is its own object
        "distributed": {"local_device_count": 8},
        "optim": {"learning_rate": 3e-3, "decay": "constant"},  # the same schedule for 2 steps and for 4
        "train": {"steps": steps, "batch_size": 8, "micro_batches": 2, "eval_batches": 0, "export_hf": False},
        "checkpoint": {"every_steps": FIRST_STEPS, "keep": 5, "dir": checkpoint_dir},
        "monitor": {
            "tensorboard_dir": tensorboard_dir,
            "progress_bar": False,
            "peak_tflops_per_device": 1.0,
            "wandb": wandb or {},
        },
        "sft": {"data": {"train_file": str(data_file), "max_seq_len": 64, "shards": 2, "packing_bins": 8}},
    }


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache shared by the runs: all four compile the same step."""
    return tmp_path_factory.mktemp("xla_cache")


def train(cfg: dict, log_path, env: dict[str, str]) -> str:
    """One `python -m fr_jax.train` run to its end; its log."""
    config_path = log_path.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(cfg))
    run_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # devices: distributed.local_device_count
    run_env.update(JAX_PLATFORMS="cpu", WANDB_SILENT="true", **env)
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "fr_jax.train", "--config", str(config_path)],
            env=run_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=400,
        )
    text = log_path.read_text()
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{text[-4000:]}"
    return text


def train_and_resume(tmp_path, chats, env, **places) -> tuple[str, list[dict]]:
    """A 2-step run, then the same run continued to 4 steps; (the second run's log, metrics.jsonl)."""
    run_dir = tmp_path / "run"
    train(run_config(run_dir, chats, steps=FIRST_STEPS, **places), tmp_path / "first.log", env)
    resumed = train(run_config(run_dir, chats, steps=STEPS, **places), tmp_path / "resumed.log", env)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "tensorboard").exists()  # they went elsewhere
    return resumed, read_metrics(run_dir)


def tensorboard_losses(logdir) -> dict[int, float]:
    events = EventAccumulator(str(logdir))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == sorted(set(steps)), steps  # each step once: the resumed run's writer purged nothing it kept
    return {e.step: e.value for e in events.Scalars("loss")}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, chats, compile_cache):
    """Checkpoints in a local folder outside the run directory, TensorBoard at a file:// URL, W&B offline."""
    base = tmp_path_factory.mktemp("local")
    places = {"checkpoint_dir": str(base / "store" / "ckpt"), "tensorboard_dir": f"file://{base}/store/tb"}
    wandb = {"enabled": True, "mode": "offline", "project": "fr-jax-test", "name": "local-run"}
    env = {"JAX_COMPILATION_CACHE_DIR": str(compile_cache)}
    log, metrics = train_and_resume(base, chats, env, wandb=wandb, **places)
    return base, log, metrics


def test_local_places_save_resume_and_log(local_run):
    base, log, metrics = local_run
    assert f"resuming at step {FIRST_STEPS}" in log
    assert sorted(p.name for p in (base / "store" / "ckpt").iterdir() if p.name.isdigit()) == ["2", "4"]
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert list(losses) == [1, 2, 3, 4]
    assert tensorboard_losses(base / "store" / "tb") == pytest.approx(losses, rel=1e-6)


def test_the_fake_gcs_keeps_answering_past_a_full_log_pipe():
    """A run makes hundreds of GCS requests; the server logs each one, and stopped answering once 64 KiB of log
    filled its unread pipe (about 430 requests)."""
    with fake_gcs("fr-test") as bucket:
        for _ in range(600):
            assert bucket.names("runs/") == []


def test_gs_places_save_resume_and_log_as_locally(tmp_path, chats, local_run, compile_cache):
    with fake_gcs("fr-test") as bucket:
        places = {"checkpoint_dir": "gs://fr-test/runs/a/ckpt", "tensorboard_dir": "gs://fr-test/runs/a/tb"}
        env = {**client_env(bucket.url), "JAX_COMPILATION_CACHE_DIR": str(compile_cache)}
        log, metrics = train_and_resume(tmp_path, chats, env, **places)
        names = bucket.names("runs/a/")
        tensorboard = bucket.download("runs/a/tb", tmp_path / "tb")
    assert f"resuming at step {FIRST_STEPS}" in log
    for step in ("2", "4"):
        assert f"runs/a/ckpt/{step}/commit_success.txt" in names  # orbax's mark of a complete checkpoint on GCS
        assert any(n.startswith(f"runs/a/ckpt/{step}/state/") for n in names)
        assert f"runs/a/ckpt/{step}/host/process_0-of-1.json" in names
    # restored from the bucket exactly as from a local folder: the same losses, bit for bit, before and after resume
    local_losses = {m["step"]: m["loss"] for m in local_run[2] if "loss" in m}
    assert {m["step"]: m["loss"] for m in metrics if "loss" in m} == local_losses
    assert tensorboard_losses(tensorboard) == pytest.approx(local_losses, rel=1e-6)


def test_wandb_offline_gets_the_scalars_and_resolved_config_of_the_run(local_run):
    base, _, metrics = local_run
    run_dir = base / "run"
    run_id = (run_dir / WandbRun.ID_FILE).read_text()
    runs = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 2  # the first run and its resumption, one W&B run id
    logged = [row for path in runs for row in wandb_records.history(path)]
    assert logged == metrics  # the same records, in the same order, as metrics.jsonl
    resolved = parse_config(read_yaml((run_dir / CONFIG_FILE).read_text()))
    assert wandb_records.config(runs[-1]) == resolved.model_dump(mode="json")


def test_writer_sends_text_samples_to_tensorboard_and_wandb(tmp_path):
    config = {"stage": "grpo", "grpo": {"rollout": {"n": 4}}}
    section = WandbSection(enabled=True, mode="offline", project="fr-jax-test")
    writer = MetricsWriter(
        tmp_path, total_steps=3, tensorboard_dir=tmp_path / "tb", wandb=section, config=config, progress_bar=False
    )
    sample = "def f(x):\n    return x < 2 and x & 1  # <b>not html</b>"
    writer.scalars(1, {"reward/total": 0.5})
    writer.text("samples", sample, 1)
    writer.close()
    run_id = (tmp_path / WandbRun.ID_FILE).read_text()
    path = wandb_records.run_file(tmp_path, run_id)
    rows = wandb_records.written_history(path, rows=2)
    assert rows[0] == {"step": 1, "reward/total": 0.5}
    assert rows[1]["step"] == 1 and rows[1]["samples/_type"] == "html-file"
    page = (path.parent / "files" / rows[1]["samples/path"]).read_text()
    assert "x &lt; 2 and x &amp; 1  # &lt;b&gt;not html&lt;/b&gt;" in page  # shown verbatim, not as markup
    assert wandb_records.config(path) == config
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert sample in texts["samples/text_summary"] and "stage: grpo" in texts["config/text_summary"]
    assert json.loads((tmp_path / METRICS_FILE).read_text()) == {"step": 1, "reward/total": 0.5}


def test_storage_keys_take_local_paths_and_gs_urls_only():
    def monitor(**keys):
        return parse_config({**MINIMAL, **keys})

    cfg = monitor(checkpoint={"dir": "file:///data/ckpt"}, monitor={"tensorboard_dir": "gs://bucket/run/tb"})
    assert (cfg.checkpoint.dir, cfg.monitor.tensorboard_dir) == ("/data/ckpt", "gs://bucket/run/tb")
    assert monitor(checkpoint={"dir": "relative/ckpt"}).checkpoint.dir == "relative/ckpt"
    for key, value in (
        ("checkpoint", "s3://bucket/ckpt"),
        ("checkpoint", "gs:///no-bucket"),
        ("monitor", "memory://x"),
    ):
        field = "dir" if key == "checkpoint" else "tensorboard_dir"
        with pytest.raises(ConfigError) as err:
            monitor(**{key: {field: value}})
        assert f"{key}.{field}: {value!r} is neither a local path nor gs://bucket/path" in str(err.value)
    with pytest.raises(ConfigError, match=r"monitor\.wandb\.mode"):
        monitor(monitor={"wandb": {"enabled": True, "mode": "cloud"}})


class Uninstalled:
    """A meta-path finder that makes the named top-level packages absent, as if never installed."""

    def __init__(self, *names: str):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


def test_missing_extras_are_named_in_one_line(monkeypatch):
    gs = parse_config({**MINIMAL, "monitor": {"tensorboard_dir": "gs://b/tb"}})
    wandb = parse_config({**MINIMAL, "monitor": {"wandb": {"enabled": True}}})
    check_optional_packages(gs)  # installed here: nothing to say
    check_optional_packages(wandb)
    for name in [m for m in sys.modules if m.split(".")[0] in ("gcsfs", "wandb")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Uninstalled("gcsfs", "wandb"), *sys.meta_path])
    with pytest.raises(ConfigError) as err:
        check_optional_packages(gs)
    assert str(err.value) == "monitor.tensorboard_dir needs gcsfs: pip install -e '.[gcs]'"
    with pytest.raises(ConfigError) as err:
        check_optional_packages(wandb)
    assert str(err.value) == "monitor.wandb.enabled needs wandb: pip install -e '.[wandb]'"
    check_optional_packages(parse_config({**MINIMAL, "monitor": {"tensorboard_dir": "/local/tb"}}))  # needs neither

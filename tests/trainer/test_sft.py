"""SFT of the real SmolLM2-135M-Instruct on MBPP reference solutions lowers its loss on held-out MBPP tasks,
through the whole stage: config -> mesh -> data -> sharded steps -> checkpoint -> metrics -> HF export."""

import json

import transformers
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fr_jax.config import parse_config, read_yaml
from fr_jax.models.loading import pretrained_dir
from fr_jax.models.tokenizer import load_tokenizer
from fr_jax.trainer.metrics import read_metrics
from fr_jax.trainer.runtime import start_runtime
from fr_jax.trainer.sft import run_sft

STEPS = 2


def test_sft_on_mbpp_lowers_held_out_loss(tmp_path, benchmark_dir):
    cfg = parse_config(
        {
            "stage": "sft",
            "run_dir": str(tmp_path / "run"),
            "model": {"pretrained": "smollm2"},
            "mesh": {"data": 1, "fsdp": 4, "tensor": 2},
            "optim": {"learning_rate": 2e-4, "warmup_steps": 0, "decay": "constant", "weight_decay": 0.01},
            "train": {"steps": STEPS, "batch_size": 4, "micro_batches": 1, "eval_batches": 1},
            "checkpoint": {"every_steps": STEPS, "keep": 1},
            "monitor": {"tensorboard": True, "progress_bar": False, "peak_tflops_per_device": 1.0},
            "sft": {"data": {"source": "mbpp", "max_seq_len": 128, "too_long": "truncate", "packing_bins": 8}},
        }
    )
    summary = run_sft(start_runtime(cfg))
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.03, summary
    run_dir = tmp_path / "run"
    records = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in records] == list(range(1, STEPS + 1))
    for m in records:
        assert m["tokens_per_s"] > 0 and m["step_time_s"] > 0 and 0 < m["mfu"] and m["grad_norm"] > 0
        assert abs(m["learning_rate"] - 2e-4) < 1e-9
    assert parse_config(read_yaml((run_dir / "config.yaml").read_text())) == cfg  # the resolved config, reloadable
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "eval/loss"} <= set(
        events.Tags()["scalars"]
    )
    assert [e.step for e in events.Scalars("loss")] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / str(STEPS)).is_dir()
    export = run_dir / "hf"
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert transformers.AutoConfig.from_pretrained(export).hidden_size == 576
    source = pretrained_dir("smollm2")  # the generation settings carry over: generation stops
    original = json.loads((source / "config.json").read_text())
    assert [config.get(k) for k in ("bos_token_id", "eos_token_id")] == [
        original["bos_token_id"],
        original["eos_token_id"],
    ]
    assert original["eos_token_id"] is not None
    assert load_tokenizer(export).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

"""FlowReasoner's recipe as one command (fr_jax.pipeline) at toy scale: the offline teacher distils records, a tiny
random llama (SmolLM2's tokenizer) is SFT'd on them, GRPO'd on workflows and evaluated beside a fixed workflow, all
through the session's real SmolLM2 worker and real sandboxes. The pipeline is SIGKILLed inside its SFT stage and
run again: the finished stage is not redone, the SFT resumes from its checkpoint, and the report has every row."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from fr_jax import cli
from fr_jax.pipeline import _run_child
from fr_jax.rl.setup import server_env

TINY = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
}
TASKS = [(f"toy/{value}", split, value) for split in ("train", "validation", "test") for value in (3, 7)]


def write_tasks(path):
    lines = [
        json.dumps(
            {
                "task_id": f"{task_id}/{split}",
                "split": split,
                "entry_point": "f",
                "prompt": f'def f():\n    """Return the number {value}."""\n',
                "tests": [f"assert f() == {value}"],
                "reference_solution": f"def f():\n    return {value}",
            }
        )
        for task_id, split, value in TASKS
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def pipeline_config(run_dir, tasks, worker_url) -> dict:
    data = {"dataset": "jsonl", "file": str(tasks)}
    return {
        "stage": "pipeline",
        "run_dir": str(run_dir),
        "worker": {"launch": "none", "url": worker_url, "name": "local"},
        "distil": {
            "tasks": {**data, "split": "train"},
            "designer": {"kind": "search"},
            "worker": {"max_tokens": 24, "temperature": 0.0},
            "loop": {"rounds": 2, "validation_runs": 1, "concurrency": 2},
            "sandbox": {"workers": 4},
            "best_fixed": {"candidates": 2},
        },
        "sft": {
            "model": {"architecture": TINY, "tokenizer": "smollm2"},
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
            "optim": {"learning_rate": 1e-3},
            "train": {"steps": 4, "batch_size": 2, "eval_batches": 0},
            "checkpoint": {"every_steps": 1, "keep": 4, "async_save": False},
            "monitor": {"tensorboard": False, "progress_bar": False, "peak_tflops_per_device": 1.0},
            "sft": {"data": {"max_seq_len": 2048, "packing_bins": 2}},
        },
        "grpo": {
            "model": {},
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
            "train": {"steps": 1, "batch_size": 2},
            "monitor": {"tensorboard": False, "progress_bar": False},
            "grpo": {
                "data": {**data, "train_split": "train", "eval_split": "test", "max_prompt_tokens": 1400},
                "rollout": {"n": 2, "prompts_per_step": 1, "max_new_tokens": 8, "mesh": "1,1,1"},
                "sandbox": {"workers": 4},
                "workflow": {"max_tokens": 24},
            },
        },
        "best_fixed": {"split": "validation", "limit": 2, "rounds": 2},
        "evaluate": {"split": "test", "limit": 1, "methods": ["meta-agent", "io", "best_fixed"]},
    }


def start(cfg: dict, path):
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen(
        [sys.executable, "-m", "fr_jax.train", "--config", str(path)],
        env=server_env(),
        stdout=path.with_suffix(".log").open("w"),
        stderr=subprocess.STDOUT,
    )


def test_the_recipe_runs_and_resumes_after_a_kill_inside_a_stage(tmp_path, workflow_worker):
    run = tmp_path / "run"
    cfg = pipeline_config(run, write_tasks(tmp_path / "tasks.jsonl"), f"{workflow_worker.url}/v1")
    first = start(cfg, tmp_path / "first.yaml")
    deadline = time.monotonic() + 900
    while not (run / "sft" / "checkpoints" / "1").is_dir():  # inside SFT, after its first checkpoint
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (run / "distil" / "DONE").is_file() and not (run / "sft" / "DONE").exists()
    distilled = (run / "distil" / "rounds.jsonl").read_text()

    second = start(cfg, tmp_path / "second.yaml")
    assert second.wait(timeout=1500) == 0, (tmp_path / "second.log").read_text()[-4000:]
    log = (tmp_path / "second.log").read_text()
    assert "distil: done before" in log  # the finished stage was not redone ...
    assert (run / "distil" / "rounds.jsonl").read_text() == distilled
    assert "resuming at step" in (run / "sft.log").read_text()  # ... and the killed one resumed
    assert "resuming at step" in log  # the stage's output also reached the console
    report = json.loads((run / "report.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["meta-agent", "io", "best_fixed"]
    chosen = json.loads((run / "best_fixed" / "best_fixed.json").read_text())
    assert sorted(chosen["scores"]) == ["toy/3/validation", "toy/7/validation"]  # searched on validation queries
    io = report["rows"][1]
    assert io["format_ok"] == 1.0 and io["worker_calls"] == 1.0  # the fixed design ran through the worker
    assert report["sft"]["queries"] == 2 and report["sft"]["records"] >= 1
    assert report["grpo"]["rounds"] == 1
    assert "| meta-agent |" in (run / "report.md").read_text()


def test_a_stage_is_shown_as_it_runs_logged_and_its_failure_named(tmp_path, capsys):
    log = tmp_path / "stage.log"
    stage = "import sys; print('step 1 of 2', flush=True); sys.stderr.write('bar \u2588\\r'); sys.exit(3)"
    with pytest.raises(cli.CommandFailed, match=r"stage failed with exit status 3: .*\(whole log: .*stage.log\)"):
        _run_child([sys.executable, "-c", stage], log, "stage")
    assert capsys.readouterr().err == "step 1 of 2\nbar \u2588\r"
    assert log.read_bytes().decode() == "step 1 of 2\nbar \u2588\r"

"""Whole runs of `python -m fr_jax.train` in subprocesses (tiny random model, the SmolLM2 tokenizer, short
arithmetic chats): resume after kill -9 reproduces the uninterrupted run exactly, and 2 processes x 4 devices
match 1 process x 8 devices."""

import json
import signal
import socket
import subprocess
import time

import pytest

from fr_jax.trainer.metrics import read_metrics
from tests.support.runs import start_train

STEPS = 8
CHECKPOINT_EVERY = 2


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": f"{a} + {b} = ?"},
                        {"role": "assistant", "content": str(a + b)},
                    ]
                }
            )
            + "\n"
            for a in range(12)
            for b in range(0, 60, 7)
        )
    )
    return path


def run_config(run_dir, data_file, **distributed) -> dict:
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
        "mesh": {"data": 1, "fsdp": 4, "tensor": 2},
        "distributed": {"local_device_count": 8, **distributed},
        "optim": {"learning_rate": 3e-3, "warmup_steps": 2},
        "train": {"steps": STEPS, "batch_size": 8, "micro_batches": 2, "eval_batches": 0, "export_hf": False},
        "checkpoint": {"every_steps": CHECKPOINT_EVERY, "keep": 5},
        "monitor": {"tensorboard": False, "progress_bar": False, "peak_tflops_per_device": 1.0},
        "sft": {"data": {"train_file": str(data_file), "max_seq_len": 64, "shards": 2, "packing_bins": 8}},
    }


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache shared by the runs: the killed and resumed runs reuse the reference's compiles."""
    return tmp_path_factory.mktemp("xla_cache")


def finish(proc: subprocess.Popen, log_path, timeout=300) -> str:
    proc.wait(timeout=timeout)
    log = log_path.read_text()
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{log[-4000:]}"
    return log


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, chats, compile_cache):
    """The uninterrupted single-process run on 8 devices."""
    base = tmp_path_factory.mktemp("reference")
    finish(start_train(run_config(base / "run", chats), base / "log", compile_cache), base / "log")
    got = losses(base / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def test_resume_after_kill_9_reproduces_losses_exactly(tmp_path, chats, reference, compile_cache):
    run_dir = tmp_path / "run"
    cfg = run_config(run_dir, chats)
    proc = start_train(cfg, tmp_path / "killed.log", compile_cache)
    deadline = time.time() + 300

    # kill -9 as soon as a checkpoint is complete (orbax renames it into place when done), mid-run
    def complete_checkpoints():
        ckpt_dir = run_dir / "checkpoints"
        return [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.is_dir() else []

    while not complete_checkpoints():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    logged = losses(run_dir)
    assert max(logged) < STEPS, "the run finished before it was killed; nothing was tested"
    log = finish(start_train(cfg, tmp_path / "resumed.log", compile_cache), tmp_path / "resumed.log")
    resumed_from = int(log.split("resuming at step ")[1].split()[0])
    assert CHECKPOINT_EVERY <= resumed_from < STEPS and resumed_from % CHECKPOINT_EVERY == 0
    assert losses(run_dir) == reference  # every step, bit for bit
    # and the log reads as one run: the killed run's steps after its checkpoint were dropped, not duplicated
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == list(range(1, STEPS + 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, chats, reference, compile_cache):
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(2):
        cfg = run_config(
            tmp_path / "run", chats, coordinator=coordinator, num_processes=2, process_id=i, local_device_count=4
        )
        cfg["checkpoint"]["every_steps"] = STEPS  # one (multi-process) checkpoint, at the end
        procs.append(start_train(cfg, tmp_path / f"process{i}.log", compile_cache))
    logs = [finish(p, tmp_path / f"process{i}.log") for i, p in enumerate(procs)]
    assert "process 1/2" in logs[1]
    got = losses(tmp_path / "run")
    assert sorted(got) == sorted(reference)
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert (tmp_path / "run" / "checkpoints" / str(STEPS) / "host" / "process_1-of-2.json").is_file()

"""Multi-host GRPO on CPU: two `jax.distributed` processes x 4 devices give the run of one process x 8 devices.

Process 0 alone talks to the rollout server and the sandbox and broadcasts the round's rows; every process trains its
shard and helps write the weights; checkpoints hold both processes' host states, the HF export is written once."""

import os
import socket
import subprocess
import sys

import pytest
import yaml

from fr_jax.trainer.metrics import read_metrics
from tests.support.grpo import KNOWS_THE_FORMAT, build_tokenizer, grpo_config, write_bigram_model, write_tasks

ROUNDS = 2
FIGURES = ("reward/total", "pass_rate", "train/loss", "train/grad_norm", "train/entropy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cfg: dict, name: str, tmp_path) -> tuple[subprocess.Popen, object]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # devices from distributed.local_device_count
    env["JAX_PLATFORMS"] = "cpu"
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fr_jax.train", "--config", str(path)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    return proc, log


def finish(proc: subprocess.Popen, log) -> str:
    proc.wait(timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def rounds(run_dir) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(run_dir) if "reward/total" in m}


def test_two_processes_train_the_run_of_one(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    model = write_bigram_model(tmp_path / "prior", tokenizer, KNOWS_THE_FORMAT)
    tasks = write_tasks(tmp_path / "tasks.jsonl")

    def config(run_dir, **distributed) -> dict:
        cfg = grpo_config(run_dir, model, tasks, rounds=ROUNDS)
        cfg["mesh"] = {"data": 1, "fsdp": 4, "tensor": 2}
        cfg["distributed"] = {"local_device_count": 8, **distributed}
        cfg["checkpoint"]["every_steps"] = ROUNDS
        return cfg

    finish(*start(config(tmp_path / "one"), "one", tmp_path))
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [
        start(
            config(tmp_path / "two", coordinator=coordinator, num_processes=2, process_id=i, local_device_count=4),
            f"process{i}",
            tmp_path,
        )
        for i in range(2)
    ]
    logs = [finish(*p) for p in procs]
    assert "process 1/2" in logs[1] and "starting fr_jax.serve" not in logs[1]  # only process 0 has services
    one, two = rounds(tmp_path / "one"), rounds(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, ROUNDS + 1))
    for r in one:
        for key in FIGURES:
            assert two[r][key] == pytest.approx(one[r][key], rel=1e-4, abs=1e-5), (r, key)
    host = tmp_path / "two" / "checkpoints" / str(ROUNDS) / "host"
    assert sorted(p.name for p in host.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert (tmp_path / "two" / "hf" / "config.json").is_file()
    assert len(list((tmp_path / "two" / "hf").glob("*.safetensors"))) >= 1

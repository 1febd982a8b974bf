"""A training command run as a child process, as a user starts it: for the tests that kill, resume and compare runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml


def start_train(cfg: dict, log_path: Path, cache_dir: Path) -> subprocess.Popen:
    """`python -m fr_jax.train` on `cfg` (written beside the log), output to `log_path`, sharing an XLA cache.
    Its devices come from the config (distributed.local_device_count), not from the test's XLA_FLAGS."""
    # the kill/resume tests find the run's checkpoints and metrics under its run_dir
    assert cfg.get("stage") in ("sft", "grpo") and cfg.get("run_dir"), "start_train runs a training stage in a run_dir"
    path = log_path.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir))
    return subprocess.Popen(
        [sys.executable, "-m", "fr_jax.train", "--config", str(path)],
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )

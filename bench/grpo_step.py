"""Where a GRPO round's time goes on this machine: rollout, sandbox, train and weight sync, side by side.

Runs the demo config (SmolLM2-135M-Instruct on easy MBPP tasks, the local rollout server over HTTP, the local
sandbox) for --rounds rounds and reports the split of the last one (the first pays the compiles; the last says how
many programs the rollout server still compiled in it): each phase in seconds and as a share of the round, and the
slowest phase named. Weight sync is also put against a baseline measured in the same run: writing the same number
of bytes with numpy to the same folder (what any sync to disk must at least pay). The machine's load average is
printed: other processes on these cores slow every phase.

    python bench/grpo_step.py                       # configs/grpo_demo.yaml, 2 rounds
    python bench/grpo_step.py --config my.yaml --rounds 3 grpo.rollout.prompts_per_step=4
    python bench/grpo_step.py --config configs/flow_demo.yaml grpo.rollout.scheduling=static   # the baseline

Every round's rollout time is printed too, with what the rollout server compiled in it, its reward and its answers'
length: two runs compare round by round only where their answers are the same. Seeded samples do not depend on the
scheduler, but the reward's efficiency term reads wall times, so two runs' round 1 rewards, updates and later
answers differ; set grpo.reward.w_efficiency=0 to compare schedulers.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

from fr_jax.cli import MODES
from fr_jax.config import load_config
from fr_jax.rl.loop import run_grpo
from fr_jax.trainer.metrics import read_metrics
from fr_jax.trainer.runtime import start_runtime

REPO = pathlib.Path(__file__).resolve().parents[1]
PHASES = ("rollout", "sandbox", "train", "sync")


def raw_write_s_per_gb(folder: pathlib.Path, gigabytes: float) -> float:
    """Seconds per GB to write `gigabytes` of float32 with numpy (fsync'd) into `folder`."""
    data = np.ones(int(gigabytes * 1e9 / 4), np.float32)
    path = folder / "raw_write_baseline.bin"
    started = time.perf_counter()
    with open(path, "wb") as f:
        data.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed / gigabytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "grpo_demo.yaml"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print("$ python bench/grpo_step.py " + " ".join(sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="grpo_bench-") as tmp:
        cfg = load_config(
            args.config,
            [
                f"run_dir={tmp}/run",
                f"train.steps={args.rounds}",
                "train.export_hf=false",
                "grpo.data.eval_limit=2",
                "monitor.progress_bar=false",
                f"checkpoint.every_steps={args.rounds + 1}",
                *args.overrides,
            ],
        )
        started = time.perf_counter()
        run_grpo(start_runtime(cfg), MODES)
        total = time.perf_counter() - started
        rounds = [m for m in read_metrics(cfg.run_dir) if "time/round_s" in m]
        last = rounds[-1]
        sync_dir = pathlib.Path(cfg.grpo.rollout.sync_dir or "/dev/shm")
        synced = "sync/gigabytes" in last  # a round without an optimizer step (zero-variance groups) syncs nothing
        if synced:
            baseline = raw_write_s_per_gb(sync_dir if sync_dir.is_dir() else pathlib.Path(tmp), last["sync/gigabytes"])
    phases = {name: last.get(f"time/{name}_s", 0.0) for name in PHASES}
    round_s = last["time/round_s"]
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; whole run {total:.0f} s "
        f"({len(rounds)} rounds, first round {rounds[0]['time/round_s']:.1f} s with compiles)"
    )
    for r in rounds:
        compiled = (
            f"compiled {int(r['rollout/compiles'])} programs ({r['rollout/compile_s']:.1f} s)"
            if "rollout/compiles" in r
            else "the rollout server does not count its compiles"
        )
        print(
            f"  round {int(r['step'])}: rollout {r.get('time/rollout_s', 0.0):6.2f} s, {compiled}; sandbox "
            f"{r.get('time/sandbox_s', 0.0):6.2f} s; reward {r['reward/total']:.3f}, "
            f"{r['response/length_mean']:.0f} tokens per answer"
        )
    print(
        f"round {int(last['step'])}: {round_s:.1f} s, {int(cfg.grpo.rollout.prompts_per_step)} prompts x "
        f"{cfg.grpo.rollout.n} samples"
    )
    for name, seconds in phases.items():
        print(f"  {name:8s} {seconds:7.2f} s  {seconds / round_s:6.1%} of the round")
    other = round_s - sum(phases.values())
    print(f"  {'other':8s} {other:7.2f} s  {other / round_s:6.1%} (batch building, metrics)")
    slowest = max(phases, key=phases.get)
    print(f"slowest: {slowest} ({phases[slowest] / round_s:.0%} of the round)")
    if not synced:
        print(f"weight sync: none in round {int(last['step'])} (no optimizer step: every group had zero variance)")
        return
    sync = last["sync/seconds_per_gb"]
    print(
        f"weight sync: {last['sync/gigabytes']:.3f} GB at {sync:.2f} s/GB (write + server load) vs raw numpy write "
        f"{baseline:.2f} s/GB: {sync / baseline:.1f}x the baseline"
    )


if __name__ == "__main__":
    main()

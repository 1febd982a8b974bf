"""Writing rollout records must not slow a GRPO round by more than 2%: the writer's cost against a real round.

1. A real GRPO run (configs/grpo_demo.yaml by default: SmolLM2 on easy MBPP tasks, the local rollout server and
   sandbox), --rounds rounds, with monitor.rollouts=all: the time of its rounds (time/round_s, the first round,
   which pays the compiles, left out) and the records it wrote.
2. The same run with monitor.rollouts=off: its rounds' time. On a machine shared with other work the difference
   between 1 and 2 is mostly noise; it is printed beside the writer's own cost, which is what the goal is about.
3. The writer's own cost, with the run's real records replayed round by round through RecordWriter: the time
   inside write_round (what the loop waits for: the checks and a queue put) with the policy all and with off, and
   the time until the background thread has encoded, compressed and written the round's file (CPU the loop may
   lose to it: a thread shares the interpreter). The same for records of workflow-mode size (bench/view.py's
   shapes: traces with worker prompts and replies), as many per round.
Each figure is a share of the real round's time (with records off); goal: the calls under 2%.

    python bench/records.py [--config configs/grpo_demo.yaml] [--rounds 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import statistics
import tempfile
import time

import yaml
from view import workflow_record  # bench/view.py: records in the shapes of a workflow-mode run

from fr_jax import train
from fr_jax.trainer.metrics import read_metrics
from fr_jax.trainer.records import STAMPED_FIELDS, RecordWriter, read_prompts, read_records, record_files

REPO = pathlib.Path(__file__).resolve().parents[1]


def real_run(config: str, run_dir: pathlib.Path, rounds: int, policy: str, overrides: list[str]) -> list[float]:
    """The round times (s) of a real GRPO run, the first round left out."""
    cfg = yaml.safe_load(pathlib.Path(config).read_text())
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = [
        "--config",
        str(path),
        f"run_dir={run_dir}",
        f"train.steps={rounds}",
        f'monitor.rollouts="{policy}"',  # quoted: YAML reads a bare off as false
        "monitor.progress_bar=false",
        "monitor.tensorboard=false",
        "train.export_hf=false",
        "grpo.data.eval_limit=2",
        f"checkpoint.every_steps={rounds + 1}",
        *overrides,
    ]
    if train.main(argv) != 0:
        raise SystemExit(f"the GRPO run with monitor.rollouts={policy} failed")
    return [m["time/round_s"] for m in read_metrics(run_dir) if "time/round_s" in m][1:]


def as_handed_over(record: dict, prompts: dict[str, str]) -> dict:
    """A written record as the loop gave it to the writer: without what the writer adds, with the prompt's text."""
    given = {k: v for k, v in record.items() if k not in STAMPED_FIELDS}
    given["prompt"] = prompts.get(record["prompt_sha"])
    return given


def writer_cost(rounds: list[list[dict]], policy: str, folder: pathlib.Path) -> tuple[float, float]:
    """Mean seconds per round inside write_round, and until the round's file is on disk."""
    calls, flushed = [], []
    for k, records in enumerate(rounds, 1):
        writer = RecordWriter(folder, policy)
        started = time.perf_counter()
        writer.write_round(k, records)
        calls.append(time.perf_counter() - started)
        writer.close()
        flushed.append(time.perf_counter() - started)
    return statistics.mean(calls), statistics.mean(flushed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "grpo_demo.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="records_bench-") as tmp:
        root = pathlib.Path(tmp)
        with_records = real_run(args.config, root / "all", args.rounds, "all", args.overrides)
        without = real_run(args.config, root / "off", args.rounds, "off", args.overrides)
        files = [p for p in record_files(root / "all") if p.parent.name == "rollouts"]
        prompts = read_prompts(root / "all")
        real = [[as_handed_over(r, prompts) for r in read_records(p)] for p in files]
        round_s = statistics.mean(without)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(
            f"real rounds: {statistics.mean(with_records):.2f} s with records (all), {round_s:.2f} s without (off); "
            f"{len(real[0])} samples per round, {sum(p.stat().st_size for p in files) / len(files) / 1e3:.1f} kB "
            f"gzipped per round file"
        )
        rng = random.Random(0)
        workflow_prompts = ["a workflow-mode prompt " * 150]
        workflow = [
            [workflow_record(rng, workflow_prompts, 0, i // 8, i % 8, "0") for i in range(len(real[0]))] for _ in real
        ]
        for name, rounds in (("the run's records", real), ("workflow-size records", workflow)):
            for policy in ("all", "off"):
                calls, flushed = writer_cost(rounds, policy, root / "replay" / policy)
                print(
                    f"{name}, policy {policy}: write_round {calls * 1e3:.3f} ms ({calls / round_s:.4%} of a round); "
                    f"on disk after {flushed * 1e3:.1f} ms ({flushed / round_s:.3%})"
                )


if __name__ == "__main__":
    main()

"""How long the run viewer takes on a large run, against the time just to read its records, and what a browser
has to load.

A synthetic run of --samples workflow-mode samples (default 10,000: 20 rounds of 64 groups of 8 less the remainder),
written with the real RecordWriter in the shapes a real run has: a reasoning + design completion of about 3 kB, a
trace of 1 to 4 operator calls, each with a worker prompt and reply, 3 to 10 tests with messages, every reward term;
plus metrics.jsonl and an eval report. Then:

1. `python -m fr_jax.view`'s build (ReportBuilder.build), against the baseline of reading every record file
   (read_records), measured in the same run: the ratio is what the viewer adds to the I/O floor. Goal: the
   10,000-sample build in under a minute.
2. What pages lazily: the size of index.html (opened at once) against all the samples' data (loaded one file
   at a time, when a sample's page is opened).
3. With Debian's chromium (if installed): the time to open index.html and list the samples, and to open one
   sample's page, in headless Chromium.

    python bench/view.py [--samples 10000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import shutil
import sys
import tempfile
import time

from fr_jax.flow.prompt import SEED_GRAPH, SEED_PROMPT
from fr_jax.sandbox.client import (
    Evaluation,
    OperatorCall,
    TestOutcome,
    TestRun,
    WorkerCall,
    WorkerUsage,
    WorkflowFailure,
    WorkflowRun,
)
from fr_jax.trainer.metrics import METRICS_FILE
from fr_jax.trainer.records import RecordWriter, read_records, record_files
from fr_jax.view.report import ReportBuilder

REPO = pathlib.Path(__file__).resolve().parents[1]
GROUP = 8
GROUPS_PER_ROUND = 64
OPERATORS = ("CustomCodeGenerate", "Custom", "ScEnsemble", "Test")
FAILURES = ("workflow_exception", "budget_exceeded", "timeout", "no_solution")
WORDS = "the worker writes a solution then the test operator runs public tests and repairs what fails".split()


def _text(rng: random.Random, chars: int) -> str:
    words = []
    while sum(map(len, words)) + len(words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def _evaluation(rng: random.Random, tests: int, passed: int) -> Evaluation:
    outcomes = tuple(
        TestOutcome(
            f"test_{k}",
            k < passed,
            "Passed" if k < passed else rng.choice(("Failed", "Error", "TimeLimitExceeded")),
            None if k < passed else "AssertionError",
            None if k < passed else f"assert f({k}) == {k * 3}: got {k * 2}",
            rng.uniform(0.5, 30.0),
        )
        for k in range(tests)
    )
    return Evaluation("Finished", outcomes, time_ms=rng.uniform(20, 300))


def _workflow_run(rng: random.Random, solution: str, evaluation: Evaluation) -> WorkflowRun:
    calls, started = [], 0.0
    for index in range(rng.randint(1, 4)):
        operator = rng.choice(OPERATORS)
        duration = rng.uniform(0.2, 4.0)
        worker = WorkerCall(
            "local", _text(rng, 1500), _text(rng, 800), rng.randint(300, 900), rng.randint(50, 400), duration, "stop"
        )
        tests = (TestRun(3, rng.randint(0, 3), rng.random() < 0.5, ("assert f(2) == 6",), 40.0),) * (operator == "Test")
        calls.append(
            OperatorCall(
                index,
                operator,
                "local",
                {"problem": _text(rng, 400), "entry_point": "f", "instruction": _text(rng, 120)},
                started,
                duration,
                {"response": solution},
                None,
                (worker,),
                tests,
            )
        )
        started += duration
    failure = WorkflowFailure(rng.choice(FAILURES), _text(rng, 80), None) if rng.random() < 0.1 else None
    tokens = sum(c.worker_calls[0].prompt_tokens for c in calls)
    return WorkflowRun(
        failure,
        solution,
        evaluation,
        evaluation,
        {c.operator: 1 for c in calls},
        WorkerUsage(len(calls), tokens, 200 * len(calls), started),
        sum(len(c.test_runs) for c in calls),
        tuple(calls),
        started,
    )


def workflow_record(rng: random.Random, prompts: list[str], task: int, group: int, sample: int, version: str) -> dict:
    tests = rng.randint(3, 10)
    passed = rng.randint(0, tests)
    solution = f"def f(x):\n    return x * {rng.randint(1, 5)}\n"
    evaluation = _evaluation(rng, tests, passed)
    run = _workflow_run(rng, solution, evaluation)
    modification = _text(rng, 60)
    return {
        "task_id": f"Mbpp/{task}",
        "dataset": "mbpp",
        "mode": "workflow",
        "group": group,
        "sample": sample,
        "prompt": prompts[task],
        "completion": f"<think>{_text(rng, 1200)}</think>\n<modification>{modification}</modification>\n"
        f"<graph>\n{SEED_GRAPH}</graph>\n<prompt>\n{SEED_PROMPT}</prompt>",
        "design": {"modification": modification, "graph": SEED_GRAPH, "prompt": SEED_PROMPT, "error": None},
        "solution": solution,
        "weight_version": version,
        "seed": rng.getrandbits(31),
        "finish_reason": "stop",
        "response_tokens": rng.randint(300, 1200),
        "well_formed": True,
        "passed": passed,
        "total": tests,
        "worker_calls": run.worker.calls,
        "worker_tokens": run.worker.prompt_tokens + run.worker.completion_tokens,
        "sandbox": evaluation,
        "workflow": run,
        "reward": {
            "performance": passed / tests,
            "complexity": -0.1,
            "efficiency": -0.2,
            "format": 0.0,
            "overlong": 0.0,
            "total": passed / tests - 0.05 * rng.random(),
        },
        "advantage": rng.gauss(0, 1),
        "group_has_variance": True,
    }


def synthetic_run(run_dir: pathlib.Path, samples: int, seed: int = 0) -> int:
    """A workflow-mode GRPO run of about `samples` records (whole groups; module docstring), its metrics, and a
    standalone evaluation of 50 tasks with its report. Returns the number of GRPO samples."""
    rng = random.Random(seed)
    prompts = [f"Write a workflow for task {t}.\n{_text(rng, 3000)}" for t in range(200)]
    metrics = []
    groups_left, round_index, written = -(-samples // GROUP), 0, 0
    with RecordWriter(run_dir, "all", seed=seed) as writer:
        while groups_left:
            round_index += 1
            groups = min(GROUPS_PER_ROUND, groups_left)
            tasks = [rng.randrange(len(prompts)) for _ in range(groups)]
            records = [
                workflow_record(rng, prompts, task, g, i, str(round_index - 1))
                for g, task in enumerate(tasks)
                for i in range(GROUP)
            ]
            writer.write_round(round_index, records)
            groups_left -= groups
            written += len(records)
            metrics.append(
                {
                    "step": round_index,
                    "reward/total": sum(r["reward"]["total"] for r in records) / len(records),
                    "pass_rate": sum(r["passed"] / r["total"] for r in records) / len(records),
                    "well_formed": 1.0,
                    "time/round_s": rng.uniform(20, 40),
                }
            )
        held_out = [workflow_record(rng, prompts, t, t, 0, "eval") for t in range(50)]
        writer.write_eval("test", "workflow", held_out)
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in metrics))
    correct = {r["task_id"]: int(r["passed"] == r["total"]) for r in held_out}
    report = {"mode": "workflow", "split": "test", "n": 1, "pass_at_k": {"pass@1": sum(correct.values()) / 50}}
    (run_dir / "eval" / "test.json").write_text(json.dumps({**report, "per_task": correct, "tasks": 50}))
    return written


def browser_timings(index: pathlib.Path) -> dict[str, float] | None:
    """Seconds to open the report and list the samples, and to open the last sample's page (None: no chromium)."""
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        return None
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sys.path.insert(0, str(REPO))  # the tests' browser helper (Debian's chromium, no download, no network)
    from tests.support.browser import headless_chromium

    with headless_chromium() as driver:
        wait = WebDriverWait(driver, 120)
        started = time.perf_counter()
        driver.get(index.as_uri() + "#samples")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.sample-row"))
        listed = time.perf_counter() - started
        count = driver.execute_script("return document.getElementById('match-count').textContent")
        started = time.perf_counter()
        driver.get(index.as_uri() + f"#sample/{int(count) - 1}")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tests tr.test-row"))
        return {"list_s": listed, "sample_page_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--keep", default=None, help="build here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="view_bench-"))
    run_dir, out = root / "run", root / "view"
    started = time.perf_counter()
    samples = synthetic_run(run_dir, args.samples) + 50
    print(
        f"synthetic run: {samples} samples (50 of them an evaluation) written in {time.perf_counter() - started:.1f} s"
    )

    started = time.perf_counter()
    read = sum(len(read_records(path)) for path in record_files(run_dir))
    read_s = time.perf_counter() - started
    done = ReportBuilder([run_dir], out).build()
    assert done["samples"] == read == samples, (done["samples"], read, samples)
    records_mb = sum(p.stat().st_size for p in record_files(run_dir)) / 1e6
    index_mb = done["index"].stat().st_size / 1e6
    data = list((out / "data").rglob("*.js"))
    data_mb = sum(p.stat().st_size for p in data) / 1e6
    print(
        f"build: {done['seconds']:.1f} s for {done['samples']} samples (goal: under 60 s); baseline, reading the "
        f"records ({records_mb:.1f} MB gzipped): {read_s:.1f} s; ratio {done['seconds'] / read_s:.2f}x"
    )
    print(
        f"paging: index.html {index_mb:.1f} MB opened at once; samples' data {data_mb:.1f} MB in {len(data)} files "
        f"of up to {max(p.stat().st_size for p in data) / 1e6:.1f} MB, each loaded when one of its samples is opened"
    )
    timings = browser_timings(done["index"])
    if timings is None:
        print("browser: chromium/chromedriver not installed (bash scripts/setup.sh installs them)")
    else:
        print(
            f"browser (headless chromium): index opened and samples listed in {timings['list_s']:.2f} s, "
            f"a sample's page in {timings['sample_page_s']:.2f} s"
        )
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

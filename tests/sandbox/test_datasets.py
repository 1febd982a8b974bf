"""Real benchmarks through the real service: every HumanEval canonical solution passes and a wrong variant of
each fails; every MBPP reference solution whose own asserts pass in plain python passes in the sandbox too."""

from __future__ import annotations

import asyncio
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

from fr_jax.sandbox.client import AssertTests, EvalItem, HumanEvalTests


def _load(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def _evaluate_all(sandbox, items: list[EvalItem]):
    async with sandbox.client(max_concurrency=4, batch_size=16) as client:
        return await client.evaluate_batch(items)


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(sandbox, benchmark_dir):
    problems = _load(benchmark_dir / "HumanEval.jsonl")
    assert len(problems) == 164
    tests = [HumanEvalTests(p["test"], p["entry_point"]) for p in problems]
    right = [EvalItem(p["prompt"] + p["canonical_solution"], t) for p, t in zip(problems, tests)]
    wrong = [EvalItem(p["prompt"] + "    return None\n", t) for p, t in zip(problems, tests)]
    results = asyncio.run(_evaluate_all(sandbox, right + wrong))
    assert not [r.message for r in results if r.sandbox_error]
    failed_right = [
        (p["task_id"], [t for t in r.tests if not t.passed][:1])
        for p, r in zip(problems, results[:164])
        if not r.passed_all
    ]
    assert failed_right == []
    passed_wrong = [p["task_id"] for p, r in zip(problems, results[164:]) if r.passed_all]
    assert passed_wrong == []
    assert all(r.tests and r.load_error is None for r in results)


def _passes_plain(problem: dict) -> bool:
    program = "\n".join([problem["code"], problem["test_setup_code"], *problem["test_list"]])
    try:
        return subprocess.run(["/usr/bin/python3", "-c", program], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_mbpp_reference_solutions_that_pass_plainly_pass_in_the_sandbox(sandbox, benchmark_dir):
    problems = _load(benchmark_dir / "mbpp.jsonl")
    with ThreadPoolExecutor(2) as pool:
        plain = list(pool.map(_passes_plain, problems))
    assert sum(plain) >= 950, "the reference data should almost all pass plainly"
    chosen = [p for p, ok in zip(problems, plain) if ok]
    items = [
        EvalItem(p["code"], AssertTests(p["test_list"], setup_code=p["test_setup_code"]), timeout_s=20) for p in chosen
    ]
    results = asyncio.run(_evaluate_all(sandbox, items))
    failures = [
        (p["task_id"], r.status, r.message, r.load_error, [t for t in r.tests if not t.passed][:1])
        for p, r in zip(chosen, results)
        if not r.passed_all
    ]
    assert failures == []

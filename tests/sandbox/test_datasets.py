"""Real benchmarks through the real service: every HumanEval canonical solution passes and a wrong variant of
each fails; every MBPP reference solution whose own asserts pass in plain python passes in the sandbox too; a fixed
sample of standard-library BigCodeBench tasks passes every test method with its canonical solution, and fails with
a wrong one."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

from fr_jax.data.tasks import Task, load_tasks
from fr_jax.sandbox.client import AssertTests, EvalItem, HumanEvalTests
from fr_jax.sandbox.suites import suite_tests


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


def _entry_point(problem: dict) -> str:
    """The function an MBPP problem's tests call that its reference solution defines (task 126's is `sum`)."""
    with warnings.catch_warnings():  # some solutions' strings hold invalid escape sequences
        warnings.simplefilter("ignore")
        defined = {node.name for node in ast.parse(problem["code"]).body if isinstance(node, ast.FunctionDef)}
    called = [
        node.func.id
        for node in ast.walk(ast.parse(problem["test_list"][0]))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    ]
    return next(name for name in called if name in defined)


def test_mbpp_reference_solutions_that_pass_plainly_pass_in_the_sandbox(sandbox, benchmark_dir):
    problems = _load(benchmark_dir / "mbpp.jsonl")
    with ThreadPoolExecutor(2) as pool:
        plain = list(pool.map(_passes_plain, problems))
    assert sum(plain) >= 950, "the reference data should almost all pass plainly"
    chosen = [p for p, ok in zip(problems, plain) if ok]
    items = [
        EvalItem(
            p["code"],
            AssertTests(p["test_list"], setup_code=p["test_setup_code"], entry_point=_entry_point(p)),
            timeout_s=20,
        )
        for p in chosen
    ]
    results = asyncio.run(_evaluate_all(sandbox, items))
    failures = [
        (p["task_id"], r.status, r.message, r.load_error, [t for t in r.tests if not t.passed][:1])
        for p, r in zip(chosen, results)
        if not r.passed_all
    ]
    assert failures == []


# Modules the jail has no use for (no network, no `python` on PATH, no display): tasks importing them are left out.
_NEEDS_MORE_THAN_THE_JAIL = {"socket", "urllib", "http", "smtplib", "ftplib", "ssl", "subprocess", "requests", "email"}
_NEEDS_MORE_THAN_THE_JAIL |= {"ctypes", "multiprocessing", "tkinter", "turtle", "mimetypes"}
# Its tests pass the name 'numpy' to the solution, which imports it: a third-party library the import scan cannot see.
_IMPORTS_BY_NAME = {"BigCodeBench/541"}


def _imports(code: str) -> set[str]:
    names = set()
    with warnings.catch_warnings():  # some tasks' strings hold invalid escape sequences
        warnings.simplefilter("ignore")
        tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _bigcodebench_stdlib_sample() -> list[Task]:
    """Every 4th task (by number) whose solution and test module import only the standard library, none of it
    what the jail lacks."""
    chosen = []
    for task in load_tasks("bigcodebench", "all"):
        used = _imports(task.reference_solution) | _imports(task.hidden_tests.cases[0])
        if used <= sys.stdlib_module_names and not used & _NEEDS_MORE_THAN_THE_JAIL:
            chosen.append(task)
    return [task for task in chosen[::4] if task.task_id not in _IMPORTS_BY_NAME]


def test_bigcodebench_canonical_solutions_pass_every_method_and_wrong_ones_fail(sandbox):
    tasks = _bigcodebench_stdlib_sample()
    assert len(tasks) == 60
    tests = [suite_tests(task.hidden_tests, task.entry_point) for task in tasks]
    # BigCodeBench/0's permutation test takes about 20 s on a loaded 2-core machine
    right = [EvalItem(task.reference_solution, test, timeout_s=60) for task, test in zip(tasks, tests)]
    wrong = [EvalItem(task.prompt + "    return None\n", test, timeout_s=60) for task, test in zip(tasks, tests)]
    results = asyncio.run(_evaluate_all(sandbox, right + wrong))
    assert not [r.message for r in results if r.sandbox_error]
    failed_right = [
        (task.task_id, r.load_error, [(t.name, t.status, t.error_message) for t in r.tests if not t.passed][:2])
        for task, r in zip(tasks, results[: len(tasks)])
        if not r.passed_all
    ]
    assert failed_right == []
    assert all(len(r.tests) >= 2 for r in results[: len(tasks)]), "each test method is one test"
    passed_wrong = [task.task_id for task, r in zip(tasks, results[len(tasks) :]) if r.passed_all]
    assert passed_wrong == []

"""Coding tasks from a JSONL file of your own (grpo.data.dataset: jsonl), in MBPP's shape.

One task per line:

    {"task_id": "const/7", "split": "train", "prompt": "...", "entry_point": "f",
     "tests": ["assert f() == 7"],            # hidden tests: each its own case
     "public_tests": ["assert f() == 7"],     # optional; default: the first of `tests`
     "prelude": "import math",                # optional: runs before the solution
     "setup": "",                             # optional: runs after the solution, before each test
     "reference_solution": "def f():\\n    return 7"}   # optional

Every problem is reported with its line number; nothing is skipped silently.
"""

from __future__ import annotations

import json
import pathlib

from fr_jax.data.tasks import Task, TestSuite, load_tasks

_REQUIRED = ("task_id", "split", "prompt", "entry_point", "tests")
_OPTIONAL = ("public_tests", "prelude", "setup", "reference_solution")


def load_task_file(path, split: str) -> list[Task]:
    """The tasks of `split` in file order."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grpo.data.file: {path} does not exist")
    tasks, splits, seen = [], set(), {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from None
        missing = [k for k in _REQUIRED if k not in record]
        unknown = sorted(set(record) - set(_REQUIRED) - set(_OPTIONAL))
        if missing or unknown:
            raise ValueError(
                f"{where}: missing fields {missing}, unknown fields {unknown}; allowed: {list(_REQUIRED + _OPTIONAL)}"
            )
        tests = record["tests"]
        if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise ValueError(f"{where}: `tests` must be a non-empty list of test programs")
        if record["task_id"] in seen:
            raise ValueError(f"{where}: task_id {record['task_id']!r} was used before (line {seen[record['task_id']]})")
        seen[record["task_id"]] = line_no
        splits.add(record["split"])
        if record["split"] != split:
            continue
        prelude, setup = record.get("prelude", ""), record.get("setup", "")
        tasks.append(
            Task(
                task_id=record["task_id"],
                dataset="jsonl",
                prompt=record["prompt"],
                entry_point=record["entry_point"],
                public_tests=TestSuite(tuple(record.get("public_tests", tests[:1])), prelude=prelude, setup=setup),
                hidden_tests=TestSuite(tuple(tests), prelude=prelude, setup=setup),
                reference_solution=record.get("reference_solution"),
            )
        )
    if not tasks:
        raise ValueError(f"{path} has no task of split {split!r} (its splits: {sorted(splits)})")
    return tasks


def load_task_set(dataset: str, split: str, *, file: str | None = None, data_dir: str | None = None) -> list[Task]:
    """A config's task set: a benchmark of fr_jax.data.tasks, or (dataset "jsonl") the tasks of `file`."""
    if dataset == "jsonl":
        if file is None:
            raise ValueError("dataset 'jsonl' needs a file")
        return load_task_file(file, split)
    return load_tasks(dataset, split, data_dir=data_dir)

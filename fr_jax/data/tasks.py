"""Coding queries with public and hidden tests: HumanEval, MBPP (full and sanitized), AFlow's MBPP split and
BigCodeBench, read from the benchmark files fr_jax ships (fr_jax/data/benchmarks, provenance in its README.md).

Every query becomes a `Task`: the prompt the meta-agent (or a plain coder) sees, the function it must define
(`entry_point`), the *public* tests (the Test operator and per-query validation may run them) and the *hidden*
tests (only the final score runs them), and the reference solution. `fr_jax.sandbox.suites` turns a suite and a
solution into the sandbox's `/evaluate` request.

Data sets and splits (deterministic: fixed files and id ranges, no randomness; tasks sorted by numeric id):

- "humaneval": HumanEval.jsonl. Splits test (131) and validate (33) are AFlow's 1:4 split (membership from
  aflow/humaneval_{test,validate}.jsonl), as used by FlowReasoner; all (164).
- "mbpp": mbpp.jsonl (full). Official task_id ranges: prompt 1-10 (10), test 11-510 (500),
  validation 511-600 (90), train 601-974 (374); all (974).
- "mbpp-sanitized": mbpp_sanitized.jsonl, the same id ranges: prompt (7), test (257), validation (43),
  train (120); all (427).
- "aflow-mbpp": aflow/mbpp_{test,validate}.jsonl, AFlow's split of the sanitized set as used by FlowReasoner:
  test (341), validate (86); all (427).
- "bigcodebench" (the "complete" prompt: imports, signature and docstring) and "bigcodebench-instruct" (the
  natural-language prompt): bigcodebench/BigCodeBench.jsonl.gz, 1140 tasks. BigCodeBench has no official split;
  the ids are shuffled once with random.Random(0) and cut into test (the first 300: FlowReasoner reports 300 test
  queries), validate (the next 75: AFlow's 1:4 validation/test practice) and train (the other 765); all (1140).

Public and hidden tests:
- HumanEval: hidden = the original `check(candidate)` program, run as `check(entry_point)` (one all-or-nothing
  case, the official metric). Public = AFlow's humaneval_public_test entries (the docstring examples as
  asserts, `candidate` renamed to the entry point), less 12 asserts in 6 tasks that the canonical solution
  fails (`_HUMANEVAL_WRONG_PUBLIC_TESTS`) and one blank entry (HumanEval/148). HumanEval/32, 38, 50, 83 and
  105 have no entry there and every entry of 41, 53 and 116 is wrong, so these 8 tasks have an empty public
  suite. The prompt is the prelude of every program, so the imports and helper functions it defines (e.g.
  `poly` in HumanEval/32) exist, as in the official harness (a solution's own definitions come after it).
- MBPP (all three): hidden = every assert of `test_list` (each its own case; `challenge_test_list` is not
  used); public = the first assert. AFlow's mbpp_public_test file agrees with this on 414 of 427 tasks; the
  other 13 entries are defective (rewritten calls such as `candidate(common_in_nested_lists(...))`, or keyed
  by an entry point shared by two tasks), so it is not read. Prompt = problem text + the reference's
  signature (AFlow's files already append it). `test_imports` go before the solution, `test_setup_code`
  (full MBPP 367 and 927) between the solution and each assert.
- BigCodeBench: hidden = the task's `unittest.TestCase` module (format "unittest": each test method is one test);
  public = the same module with only the first test method of TestCases (setUp, fixtures and helper classes kept).
  The prelude is the code prompt's import lines, so a solution that forgets an import the prompt gave still
  runs, as with HumanEval's prompt. `Task.requires` lists the third-party modules the task needs (import names:
  "sklearn", "PIL"): BigCodeBench's `libs` and whatever the prompt, the canonical solution and the test module
  import or patch by name (`patch("requests.get")` imports requests), less the standard library. `libs` alone
  misses what only the tests use (faker, pytz, requests_mock, pyfakefs, ...). tkinter counts too (Debian ships it
  apart from python3; turtle needs it). 841 tasks need some (813 by `libs`), which the sandbox finds only in a
  python that has them (scripts/setup.sh --bcb).
- AFlow's copy of task 630 has a broken reference (`adjac`'s signature was rewritten); its reference solution
  is taken from mbpp_sanitized.jsonl instead (the tests are the same).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gzip
import json
import os
import pathlib
import random
import re
import sys
import warnings
from collections.abc import Iterator

from fr_jax.data.jsonl import read_jsonl

BENCHMARK_DIR = pathlib.Path(__file__).resolve().parent / "benchmarks"  # package data
HUMANEVAL, MBPP, MBPP_SANITIZED, AFLOW_MBPP, BIGCODEBENCH, BIGCODEBENCH_INSTRUCT = (
    "humaneval",
    "mbpp",
    "mbpp-sanitized",
    "aflow-mbpp",
    "bigcodebench",
    "bigcodebench-instruct",
)
MBPP_ID_RANGES = {
    "prompt": range(1, 11),
    "test": range(11, 511),
    "validation": range(511, 601),
    "train": range(601, 975),
}
SPLITS = {
    HUMANEVAL: ("test", "validate", "all"),
    MBPP: (*MBPP_ID_RANGES, "all"),
    MBPP_SANITIZED: (*MBPP_ID_RANGES, "all"),
    AFLOW_MBPP: ("test", "validate", "all"),
    BIGCODEBENCH: ("train", "validate", "test", "all"),
    BIGCODEBENCH_INSTRUCT: ("train", "validate", "test", "all"),
}
BIGCODEBENCH_SPLIT_SIZES = {"test": 300, "validate": 75}  # train: the rest; see the module docstring
# AFlow-copy tasks whose `code` does not run; their reference comes from mbpp_sanitized.jsonl.
_AFLOW_MBPP_BROKEN_REFERENCES = frozenset({630})
# AFlow public HumanEval asserts that the canonical solution fails (wrong docstring examples, or wrong extraction).
# A wrong public test would mislead the Test operator and the validation score, so they are dropped.
_HUMANEVAL_WRONG_PUBLIC_TESTS = {
    "HumanEval/33": ("assert candidate([5, 6, 3, 4, 8, 9, 2]) == [2, 6, 3, 4, 8, 9, 5",),  # truncated
    "HumanEval/41": tuple(f"assert candidate({n}) == 0" for n in (1, 2, 3, 10)),  # the answer is n**2
    "HumanEval/47": ("assert candidate([-10, 4, 6, 1000, 10, 20]) == 15.0",),  # the docstring's example is wrong
    "HumanEval/53": ("assert candidate([2, 3]) == 5", "assert candidate([5, 7]) == 12"),  # add(x, y) called with a list
    "HumanEval/116": (  # the docstring's examples contradict its own rule
        "assert candidate([1, 5, 2, 3, 4]) == [1, 2, 3, 4, 5]",
        "assert candidate([-2, -3, -4, -5, -6]) == [-6, -5, -4, -3, -2]",
        "assert candidate([1, 0, 2, 3, 4]) == [0, 1, 2, 3, 4]",
    ),
    "HumanEval/148": ("assert candidate('Earth', 'Mercury') == ('Venus')",),  # ('Venus') is a str, not a tuple
}


# The end of a "unittest" program: BigCodeBench's harness runs the TestCases class; exit status 1 on any failure.
@dataclasses.dataclass(frozen=True)
class TestSuite:
    """Test cases of one visibility. Each case is run alone after `prelude`, the solution and `setup`."""

    __test__ = False  # not a pytest test class, despite the name
    cases: tuple[str, ...]
    # "asserts": a case is assert statements; "humaneval": a case defines check(candidate); "unittest": a case is a
    # module with unittest.TestCase classes, each test method one test
    format: str = "asserts"
    prelude: str = ""  # before the solution: imports/helpers the solution may rely on
    setup: str = ""  # after the solution, before each case: objects the tests use


@dataclasses.dataclass(frozen=True)
class Task:
    task_id: str  # "HumanEval/0", "Mbpp/11"
    dataset: str
    prompt: str
    entry_point: str
    public_tests: TestSuite
    hidden_tests: TestSuite
    reference_solution: str | None = None  # a complete program that passes every hidden test
    requires: tuple[str, ...] = ()  # modules (import names) beyond the standard library the task uses (BigCodeBench)


def default_data_dir() -> pathlib.Path:
    """$FR_JAX_DATA if set, else the benchmark files installed with fr_jax."""
    return pathlib.Path(os.environ.get("FR_JAX_DATA") or BENCHMARK_DIR)


def load_tasks(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> list[Task]:
    """Tasks of one split, sorted by numeric id; `limit` keeps the first `limit`. data_dir: default_data_dir()."""
    if name not in SPLITS:
        raise ValueError(f"unknown task set {name!r}; known: {sorted(SPLITS)}")
    if split not in SPLITS[name]:
        raise ValueError(f"unknown split {split!r} for {name!r}; known: {list(SPLITS[name])}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    data_dir = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
    loader = {
        HUMANEVAL: _humaneval,
        MBPP: functools.partial(_mbpp_official, sanitized=False),
        MBPP_SANITIZED: functools.partial(_mbpp_official, sanitized=True),
        AFLOW_MBPP: _aflow_mbpp,
        BIGCODEBENCH: functools.partial(_bigcodebench, instruct=False),
        BIGCODEBENCH_INSTRUCT: functools.partial(_bigcodebench, instruct=True),
    }[name]
    tasks = sorted(loader(data_dir, split), key=_numeric_id)
    return tasks if limit is None else tasks[:limit]


def _numeric_id(task: Task) -> int:
    return int(task.task_id.rsplit("/", 1)[1])


def _field(record: dict, key: str, path: pathlib.Path):
    if key not in record:
        raise KeyError(f"{path}: record {record.get('task_id', record.get('problem_id', '?'))} has no field {key!r}")
    return record[key]


# ------------------------------------------------------------------------------------------- HumanEval


def _humaneval(data_dir: pathlib.Path, split: str) -> list[Task]:
    path = data_dir / "HumanEval.jsonl"
    records = read_jsonl(path)
    if split != "all":
        wanted = {_field(r, "task_id", path) for r in read_jsonl(data_dir / "aflow" / f"humaneval_{split}.jsonl")}
        records = [r for r in records if r["task_id"] in wanted]
        missing = wanted - {r["task_id"] for r in records}
        if missing:
            raise ValueError(f"aflow/humaneval_{split}.jsonl names tasks absent from {path}: {sorted(missing)}")
    public = _humaneval_public_tests(data_dir / "aflow" / "humaneval_public_test.jsonl")
    tasks = []
    for r in records:
        task_id, entry_point, prompt = (_field(r, k, path) for k in ("task_id", "entry_point", "prompt"))
        public_cases = tuple(re.sub(r"\bcandidate\b", entry_point, t) for t in public.get(task_id, ()))
        tasks.append(
            Task(
                task_id=task_id,
                dataset=HUMANEVAL,
                prompt=prompt,
                entry_point=entry_point,
                public_tests=TestSuite(public_cases, prelude=prompt),
                hidden_tests=TestSuite((_field(r, "test", path),), format="humaneval", prelude=prompt),
                reference_solution=prompt + _field(r, "canonical_solution", path),
            )
        )
    return tasks


def _humaneval_public_tests(path: pathlib.Path) -> dict[str, list[str]]:
    """AFlow's public asserts per task, without the known-wrong ones (which must still be there to be dropped)
    and without blank ones (an empty program would always pass)."""
    public = {_field(r, "problem_id", path): list(_field(r, "test", path)) for r in read_jsonl(path)}
    for task_id, wrong in _HUMANEVAL_WRONG_PUBLIC_TESTS.items():
        absent = [t for t in wrong if t not in public.get(task_id, ())]
        if absent:
            raise ValueError(f"{path}: known-wrong public tests of {task_id} not found (data changed?): {absent}")
        public[task_id] = [t for t in public[task_id] if t not in wrong]
    return {task_id: [t for t in cases if t.strip()] for task_id, cases in public.items()}  # one entry is ""


# ------------------------------------------------------------------------------------------------ MBPP


def _in_split(task_id: int, split: str) -> bool:
    return split == "all" or task_id in MBPP_ID_RANGES[split]


def _mbpp_task(
    dataset: str,
    task_id: int,
    text: str,
    code: str,
    asserts: list[str],
    *,
    prelude: str = "",
    setup: str = "",
    entry_point: str | None = None,
    text_has_signature: bool = False,
    reference: str | None = None,
) -> Task:
    if not asserts:
        raise ValueError(f"{dataset} task {task_id} has an empty test_list")
    entry_point = entry_point or _called_definition(code, asserts[0], f"{dataset} task {task_id}")
    return Task(
        task_id=f"Mbpp/{task_id}",
        dataset=dataset,
        prompt=text if text_has_signature else f"{text}\n\n{_signature(code, entry_point)}",
        entry_point=entry_point,
        public_tests=TestSuite((asserts[0],), prelude=prelude, setup=setup),
        hidden_tests=TestSuite(tuple(asserts), prelude=prelude, setup=setup),
        reference_solution=code if reference is None else reference,
    )


def _called_definition(code: str, test: str, where: str) -> str:
    """The entry point of an MBPP task: the first function the test calls that the reference defines."""
    defined = {n.name for n in ast.walk(_parse(code)) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    for node in ast.walk(_parse(test)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in defined:
            return node.func.id
    raise ValueError(f"{where}: its first test calls no function that its reference code defines")


def _parse(code: str) -> ast.Module:
    """Parse without the invalid-escape warnings that MBPP's regex-heavy sources would print on every load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(code)


def _signature(code: str, entry_point: str) -> str:
    for node in ast.walk(_parse(code)):
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            return f"def {entry_point}({ast.unparse(node.args)}){returns}:"
    return f"class {entry_point}:"


def _mbpp_official(data_dir: pathlib.Path, split: str, *, sanitized: bool) -> list[Task]:
    """Google's full set (text, test_setup_code) or its sanitized subset (prompt, test_imports)."""
    path = data_dir / ("mbpp_sanitized.jsonl" if sanitized else "mbpp.jsonl")
    return [
        _mbpp_task(
            MBPP_SANITIZED if sanitized else MBPP,
            r["task_id"],
            _field(r, "prompt" if sanitized else "text", path),
            _field(r, "code", path),
            _field(r, "test_list", path),
            prelude="\n".join(_field(r, "test_imports", path)) if sanitized else "",
            setup="" if sanitized else _field(r, "test_setup_code", path),
        )
        for r in read_jsonl(path)
        if _in_split(_field(r, "task_id", path), split)
    ]


def _aflow_mbpp(data_dir: pathlib.Path, split: str) -> list[Task]:
    splits = ("test", "validate") if split == "all" else (split,)
    paths = [data_dir / "aflow" / f"mbpp_{s}.jsonl" for s in splits]
    sanitized_code = {r["task_id"]: r["code"] for r in read_jsonl(data_dir / "mbpp_sanitized.jsonl")}
    tasks = []
    for path in paths:
        for r in read_jsonl(path):
            task_id = _field(r, "task_id", path)
            tasks.append(
                _mbpp_task(
                    AFLOW_MBPP,
                    task_id,
                    _field(r, "prompt", path),
                    _field(r, "code", path),
                    _field(r, "test_list", path),
                    prelude="\n".join(_field(r, "test_imports", path)),
                    entry_point=_field(r, "entry_point", path),
                    text_has_signature=True,
                    reference=sanitized_code[task_id] if task_id in _AFLOW_MBPP_BROKEN_REFERENCES else None,
                )
            )
    return tasks


# ---------------------------------------------------------------------------------------- BigCodeBench


def _bigcodebench_split(task_ids: list[str], split: str) -> set[str]:
    if split == "all":
        return set(task_ids)
    order = sorted(task_ids, key=lambda t: int(t.rsplit("/", 1)[1]))
    random.Random(0).shuffle(order)
    test, validate = BIGCODEBENCH_SPLIT_SIZES["test"], BIGCODEBENCH_SPLIT_SIZES["validate"]
    bounds = {"test": (0, test), "validate": (test, test + validate), "train": (test + validate, len(order))}
    start, stop = bounds[split]
    return set(order[start:stop])


def _first_test_only(module: str, where: str) -> str:
    """The test module with only the first test method of TestCases (the public test of a BigCodeBench task)."""
    tree = _parse(module)
    cases = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TestCases"]
    if len(cases) != 1:
        raise ValueError(f"{where}: its test has no single `class TestCases`")
    tests = [
        n for n in cases[0].body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test")
    ]
    if not tests:
        raise ValueError(f"{where}: TestCases has no test method")
    kept = [n for n in tests if n.name == tests[0].name][-1]  # a name defined twice: the later one is what runs
    lines = module.splitlines(keepends=True)
    for node in reversed([n for n in tests if n is not kept]):
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
        del lines[first : node.end_lineno]
    return "".join(lines)


def _import_lines(code_prompt: str) -> str:
    """The code prompt up to its `def task_func`: the imports and constants the task gives."""
    head, sep, _ = code_prompt.partition("\ndef ")
    return head.strip() if sep else ""


# A mock.patch target imports its module: patch("requests.get"), mock.patch.dict("os.environ"), patch.multiple("m").
_PATCH_TARGET = re.compile(r"""\bpatch(?:\.dict|\.multiple)?\(\s*(?:target\s*=\s*)?[rbu]?['"]([A-Za-z_]\w*)\.""")


def _statements(nodes) -> Iterator[ast.AST]:
    """Every statement in `nodes` and in the blocks nested in them. Imports are statements, so expressions (the
    tests' large literals) are not entered: a quarter of ast.walk's time."""
    for node in nodes:
        yield node
        for block in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _statements(getattr(node, block, ()))


def _modules_used(code: str) -> set[str]:
    """Top-level modules `code` imports (absolute imports, in any block) or names as a mock.patch target."""
    names = {target for target in _PATCH_TARGET.findall(code) if target != "__main__"}
    for node in _statements(_parse(code).body):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


# Standard-library modules that Debian and Ubuntu package apart from python3 (python3-tk): a task that uses one needs
# tkinter as it would a third-party library (BigCodeBench/220 draws with turtle).
_NEEDS_TKINTER = frozenset({"tkinter", "turtle", "turtledemo", "idlelib"})


def _bigcodebench_requires(record: dict, path: pathlib.Path, where: str) -> tuple[str, ...]:
    """The third-party modules a task needs: its `libs` and what its reference solution (prompt included) and its
    test module use, less the standard library (but tkinter, which distributions ship apart)."""
    try:
        used = set(ast.literal_eval(_field(record, "libs", path)))
        used |= _modules_used(_field(record, "complete_prompt", path) + _field(record, "canonical_solution", path))
        used |= _modules_used(_field(record, "test", path))
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"{where}: its libs, reference or test do not parse ({e}); use the shipped file") from e
    tkinter = {"tkinter"} if used & _NEEDS_TKINTER else set()
    return tuple(sorted({name for name in used if name not in sys.stdlib_module_names} | tkinter))


def _bigcodebench(data_dir: pathlib.Path, split: str, *, instruct: bool) -> list[Task]:
    path = data_dir / "bigcodebench" / "BigCodeBench.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"BigCodeBench file not found: {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    wanted = _bigcodebench_split([_field(r, "task_id", path) for r in records], split)
    tasks = []
    for r in records:
        if r["task_id"] not in wanted:
            continue
        where = f"{path}: {r['task_id']}"
        complete, test = _field(r, "complete_prompt", path), _field(r, "test", path)
        prelude = _import_lines(_field(r, "code_prompt", path))
        tasks.append(
            Task(
                task_id=r["task_id"],
                dataset=BIGCODEBENCH_INSTRUCT if instruct else BIGCODEBENCH,
                prompt=_field(r, "instruct_prompt", path) if instruct else complete,
                entry_point=_field(r, "entry_point", path),
                public_tests=TestSuite((_first_test_only(test, where),), format="unittest", prelude=prelude),
                hidden_tests=TestSuite((test,), format="unittest", prelude=prelude),
                reference_solution=complete + _field(r, "canonical_solution", path),
                requires=_bigcodebench_requires(r, path, where),
            )
        )
    return tasks

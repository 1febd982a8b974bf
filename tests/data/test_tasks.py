"""Task loaders over the benchmark data fr_jax ships (fr_jax/data/tasks.py)."""

import ast
import gzip
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from fr_jax.data import tasks
from fr_jax.data.tasks import load_tasks

DATASETS = ("humaneval", "mbpp", "mbpp-sanitized", "aflow-mbpp")
EXPECTED_COUNTS = {
    "humaneval": {"test": 131, "validate": 33, "all": 164},
    "mbpp": {"prompt": 10, "test": 500, "validation": 90, "train": 374, "all": 974},
    "mbpp-sanitized": {"prompt": 7, "test": 257, "validation": 43, "train": 120, "all": 427},
    "aflow-mbpp": {"test": 341, "validate": 86, "all": 427},
    "bigcodebench": {"train": 765, "validate": 75, "test": 300, "all": 1140},
    "bigcodebench-instruct": {"train": 765, "validate": 75, "test": 300, "all": 1140},
}

# Runs (key, program) pairs, each in a fresh namespace, and prints the keys whose program raised. The programs
# are the data sets' own reference solutions and stubs, so no jail is needed; a subprocess keeps their globals,
# recursion limits and prints out of the test process.
RUNNER = """
import contextlib, io, json, sys
failed = []
for key, program in json.load(sys.stdin):
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(program, key, "exec"), {"__name__": "__main__"})
    except SystemExit as stop:  # a unittest program exits 0 when every test passed
        if stop.code not in (0, None):
            failed.append(key)
    except BaseException:
        failed.append(key)
print(json.dumps(failed))
"""


_RUN_TEST_CASES = """

import sys as _sys, unittest as _unittest
_result = _unittest.TextTestRunner(verbosity=0).run(_unittest.TestLoader().loadTestsFromTestCase(TestCases))
_sys.exit(0 if _result.wasSuccessful() else 1)
"""


def plain_programs(task, solution: str, *, hidden: bool) -> tuple[str, ...]:
    """One plain Python program per case of the hidden (or public) suite, exit status 0 if it passed: the data
    checked on its own, outside the sandbox (prelude, solution, setup, case, then check() or the unittest run)."""
    suite = task.hidden_tests if hidden else task.public_tests
    call = {"humaneval": f"\n\ncheck({task.entry_point})\n", "unittest": _RUN_TEST_CASES}.get(suite.format, "\n")
    return tuple(
        "\n\n".join(part for part in (suite.prelude, solution, suite.setup, case) if part) + call
        for case in suite.cases
    )


def _failing_cases(programs: list[tuple[str, str]], workers: int = 2) -> set[str]:
    """Keys of the programs that raise, run by `workers` subprocesses side by side (interleaved shares), each in a
    working directory of its own (BigCodeBench tests write and remove files relative to it)."""
    scratch = [tempfile.TemporaryDirectory() for _ in range(workers)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=d.name
        )
        for d in scratch
    ]
    failed = set()
    for i, proc in enumerate(procs):
        proc.stdin.write(json.dumps(programs[i::workers]))
        proc.stdin.close()
    for proc in procs:
        stdout = proc.stdout.read()
        assert proc.wait(timeout=300) == 0, "the program runner crashed"
        failed |= set(json.loads(stdout))
    for d in scratch:
        d.cleanup()
    return failed


@pytest.fixture(scope="module")
def all_tasks(benchmark_dir):
    return {name: load_tasks(name, "all", data_dir=benchmark_dir) for name in DATASETS}


@pytest.fixture(scope="module")
def bigcodebench():
    return load_tasks("bigcodebench", "all")


@pytest.mark.parametrize(
    "name, split, count", [(n, s, c) for n, splits in EXPECTED_COUNTS.items() for s, c in splits.items()]
)
def test_split_sizes(benchmark_dir, name, split, count):
    assert len(load_tasks(name, split, data_dir=benchmark_dir)) == count


@pytest.mark.parametrize("name", DATASETS)
def test_splits_partition_the_whole_set_exactly(benchmark_dir, all_tasks, name):
    parts = [{t.task_id for t in load_tasks(name, s, data_dir=benchmark_dir)} for s in tasks.SPLITS[name] if s != "all"]
    assert sum(len(p) for p in parts) == len(set().union(*parts))  # pairwise disjoint
    assert set().union(*parts) == {t.task_id for t in all_tasks[name]}
    assert len({t.task_id for t in all_tasks[name]}) == len(all_tasks[name])


@pytest.mark.parametrize("name", ["mbpp", "mbpp-sanitized"])
def test_mbpp_splits_follow_the_official_id_ranges(benchmark_dir, name):
    for split, ids in tasks.MBPP_ID_RANGES.items():
        got = [int(t.task_id.split("/")[1]) for t in load_tasks(name, split, data_dir=benchmark_dir)]
        assert got and all(i in ids for i in got) and got == sorted(got)


def test_humaneval_splits_are_aflows_files(benchmark_dir):
    validate = {json.loads(line)["task_id"] for line in open(benchmark_dir / "aflow" / "humaneval_validate.jsonl")}
    assert {t.task_id for t in load_tasks("humaneval", "validate", data_dir=benchmark_dir)} == validate


def test_loading_is_deterministic_and_limit_takes_a_prefix(benchmark_dir, all_tasks):
    again = load_tasks("aflow-mbpp", "all", data_dir=benchmark_dir)
    assert again == all_tasks["aflow-mbpp"]
    assert load_tasks("aflow-mbpp", "all", data_dir=benchmark_dir, limit=5) == again[:5]
    assert load_tasks("humaneval", "test", data_dir=benchmark_dir, limit=0) == []


@pytest.mark.parametrize("name", ["mbpp", "mbpp-sanitized", "aflow-mbpp"])
def test_mbpp_public_tests_are_the_first_hidden_assert(all_tasks, name):
    for t in all_tasks[name]:
        assert t.public_tests.cases == t.hidden_tests.cases[:1]
        assert set(t.public_tests.cases) <= set(t.hidden_tests.cases)
        assert len(t.hidden_tests.cases) >= 3
        assert t.entry_point in t.public_tests.cases[0]
        assert t.public_tests.prelude == t.hidden_tests.prelude and t.public_tests.setup == t.hidden_tests.setup


def test_humaneval_public_asserts_and_hidden_check_program(all_tasks):
    with_public = 0
    for t in all_tasks["humaneval"]:
        assert t.hidden_tests.format == "humaneval" and len(t.hidden_tests.cases) == 1
        assert "def check(candidate)" in t.hidden_tests.cases[0]
        assert t.public_tests.format == "asserts"
        assert all(c.startswith("assert ") and "candidate" not in c for c in t.public_tests.cases)
        with_public += bool(t.public_tests.cases)
        assert t.reference_solution.startswith(t.prompt)
    empty = {t.task_id for t in all_tasks["humaneval"] if not t.public_tests.cases}
    assert empty == {f"HumanEval/{i}" for i in (32, 38, 41, 50, 53, 83, 105, 116)}
    assert with_public == 156


def test_mbpp_prompts_end_with_the_signature(all_tasks):
    first = all_tasks["mbpp"][0]
    assert first.task_id == "Mbpp/1" and first.entry_point == "min_cost"
    assert first.prompt.endswith("and a position (m, n) in cost[][].\n\ndef min_cost(cost, m, n):")
    for name in ("mbpp", "mbpp-sanitized", "aflow-mbpp"):
        for t in all_tasks[name]:
            assert re.search(rf"(def|class)\s+{t.entry_point}\b", t.prompt), t.task_id


def test_derived_entry_points_agree_with_aflows(all_tasks):
    derived = {t.task_id: t.entry_point for t in all_tasks["mbpp-sanitized"]}
    aflow = {t.task_id: t.entry_point for t in all_tasks["aflow-mbpp"]}
    disagree = {k: (derived[k], aflow[k]) for k in derived if derived[k] != aflow[k]}
    assert disagree == {"Mbpp/56": ("check", "check_answer")}  # AFlow renamed it to dodge its check() wrapper


def test_program_layout(all_tasks):
    by_id = {t.task_id: t for t in all_tasks["mbpp"]}
    t = by_id["Mbpp/367"]  # its test_setup_code builds trees with the solution's Node class
    program = plain_programs(t, "SOLUTION", hidden=True)[0]
    assert program.index("SOLUTION") < program.index("root = Node(1)") < program.index("assert is_tree_balanced")
    he = all_tasks["humaneval"][0]
    program = plain_programs(he, "SOLUTION", hidden=True)[0]
    assert program.startswith(he.prompt) and program.rstrip().endswith("check(has_close_elements)")
    assert len(plain_programs(he, "SOLUTION", hidden=False)) == len(he.public_tests.cases) == 2


def test_reference_solutions_pass_and_stubs_fail(all_tasks):
    """Runs every public and hidden program of every task with its reference solution (all must pass) and with a
    stub that returns None (no task may pass all its hidden tests): the programs are runnable and can fail."""
    reference, stub = [], []
    for name, task_list in all_tasks.items():
        for t in task_list:
            for hidden in (False, True):
                for i, program in enumerate(plain_programs(t, t.reference_solution, hidden=hidden)):
                    reference.append((f"{name}:{t.task_id}:{hidden}:{i}", program))
            none_stub = f"def {t.entry_point}(*args, **kwargs):\n    return None\n"
            stub += [(f"{name}:{t.task_id}:{i}", p) for i, p in enumerate(plain_programs(t, none_stub, hidden=True))]
    assert len(reference) > 8000
    reference = list(dict((program, key) for key, program in reference).items())  # the same program runs once
    assert _failing_cases([(key, program) for program, key in reference]) == set()
    stub_failures = _failing_cases(stub)
    passed_all = [key for key, _ in stub if key.rsplit(":", 1)[0] not in {f.rsplit(":", 1)[0] for f in stub_failures}]
    assert passed_all == []


# ------------------------------------------------------------------------------------------- bad input


def test_unknown_name_and_split_list_the_allowed_ones(benchmark_dir):
    with pytest.raises(ValueError, match=r"unknown task set 'apps'.*'humaneval'.*'mbpp'"):
        load_tasks("apps", "test", data_dir=benchmark_dir)
    with pytest.raises(ValueError, match=r"unknown split 'train' for 'humaneval'.*'test', 'validate', 'all'"):
        load_tasks("humaneval", "train", data_dir=benchmark_dir)
    with pytest.raises(ValueError, match="limit"):
        load_tasks("humaneval", "test", data_dir=benchmark_dir, limit=-1)


def test_bigcodebench_record_that_does_not_parse_is_named(tmp_path, benchmark_dir):
    with gzip.open(benchmark_dir / "bigcodebench" / "BigCodeBench.jsonl.gz", "rt") as f:
        record = json.loads(f.readline())
    record["canonical_solution"] = "    return (\n"
    (tmp_path / "bigcodebench").mkdir()
    with gzip.open(tmp_path / "bigcodebench" / "BigCodeBench.jsonl.gz", "wt") as f:
        f.write(json.dumps(record) + "\n")
    with pytest.raises(
        ValueError, match=r"BigCodeBench/0: its libs, reference or test do not parse .*use the shipped file"
    ):
        load_tasks("bigcodebench", "all", data_dir=tmp_path)


def test_bigcodebench_names_the_file_it_would_read(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"bigcodebench/BigCodeBench\.jsonl\.gz"):
        load_tasks("bigcodebench", "test", data_dir=tmp_path)


def test_data_dir_defaults_to_the_shipped_files_or_fr_jax_data(monkeypatch, tmp_path):
    assert tasks.default_data_dir() == tasks.BENCHMARK_DIR
    assert tasks.BENCHMARK_DIR.is_relative_to(pathlib.Path(tasks.__file__).parent)
    monkeypatch.setenv("FR_JAX_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "HumanEval.jsonl")):
        load_tasks("humaneval", "all")


def test_missing_and_broken_data_files_are_named(tmp_path, benchmark_dir):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "mbpp.jsonl")):
        load_tasks("mbpp", "all", data_dir=tmp_path)
    lines = (benchmark_dir / "mbpp.jsonl").read_text().splitlines()
    (tmp_path / "mbpp.jsonl").write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"mbpp\.jsonl:2: not valid JSON"):
        load_tasks("mbpp", "all", data_dir=tmp_path)
    record = json.loads(lines[0])
    del record["test_list"]
    (tmp_path / "mbpp.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(KeyError, match="record 1 has no field 'test_list'"):
        load_tasks("mbpp", "all", data_dir=tmp_path)


def test_changed_humaneval_public_tests_are_reported(tmp_path, benchmark_dir):
    shutil.copytree(benchmark_dir, tmp_path / "data")
    public = tmp_path / "data" / "aflow" / "humaneval_public_test.jsonl"
    public.chmod(0o644)
    public.write_text(public.read_text().replace("== 15.0", "== 8.0"))  # someone fixed HumanEval/47's example
    with pytest.raises(ValueError, match="known-wrong public tests of HumanEval/47 not found"):
        load_tasks("humaneval", "all", data_dir=tmp_path / "data")


# ---------------------------------------------------------------------------------------------- BigCodeBench


def test_bigcodebench_prompt_styles_and_fields(bigcodebench):
    instruct = {t.task_id: t for t in load_tasks("bigcodebench-instruct", "all")}
    for t in bigcodebench:
        other = instruct[t.task_id]
        assert t.entry_point == "task_func" and "def task_func" in t.prompt
        assert other.prompt != t.prompt and other.hidden_tests == t.hidden_tests
        assert t.hidden_tests.format == t.public_tests.format == "unittest"
        assert t.reference_solution.startswith(t.prompt)
    assert sum(1 for t in bigcodebench if not t.requires) == 299  # the standard-library-only tasks
    assert {"pandas", "numpy", "matplotlib"} <= {lib for t in bigcodebench for lib in t.requires}


def test_bigcodebench_requires_what_the_tests_import_too(bigcodebench, benchmark_dir):
    """`requires` holds BigCodeBench's `libs` (less the standard library) and what only the tests import or patch."""
    path = benchmark_dir / "bigcodebench" / "BigCodeBench.jsonl.gz"
    with gzip.open(path, "rt") as f:
        libs = {r["task_id"]: set(ast.literal_eval(r["libs"])) - sys.stdlib_module_names for r in map(json.loads, f)}
    by_id = {t.task_id: t for t in bigcodebench}
    assert all(libs[i] <= set(t.requires) for i, t in by_id.items())
    assert {name for t in bigcodebench for name in t.requires} & sys.stdlib_module_names == {"tkinter"}
    assert by_id["BigCodeBench/220"].requires == ("tkinter",)  # turtle, which Debian's python3 lacks
    assert not libs["BigCodeBench/270"] and by_id["BigCodeBench/270"].requires == ("faker",)  # its test imports faker
    assert by_id["BigCodeBench/272"].requires == ("requests", "requests_mock")
    assert by_id["BigCodeBench/719"].requires == ("pyfakefs",)
    assert by_id["BigCodeBench/256"].requires == ("pytz",)
    assert "matplotlib" not in libs["BigCodeBench/614"]  # but its test patches matplotlib.pyplot.show
    assert "matplotlib" in by_id["BigCodeBench/614"].requires
    more = sorted((i for i, t in by_id.items() if set(t.requires) != libs[i]), key=lambda i: int(i.split("/")[1]))
    assert len(more) == 210  # tasks whose reference or tests use more than `libs` says
    assert sum(1 for i in more if not libs[i]) == 28  # `libs` calls them standard-library-only


def test_modules_used_reads_imports_in_any_block_and_patch_targets():
    code = """
import os.path, numpy as np
from pandas.api import types
from . import sibling
def f():
    try:
        import yaml
    except ImportError:
        from scipy import stats
class T:
    @patch("requests.get")
    def test(self, get):
        with mock.patch.dict("faker.config", {}), patch("__main__.x"), patch.object(os, "sep", "/"):
            lambda: __import__("hidden")
"""
    assert tasks._modules_used(code) == {"os", "numpy", "pandas", "yaml", "scipy", "requests", "faker"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the tests' regex strings
def test_bigcodebench_public_test_is_the_first_test_method(bigcodebench):
    def methods(module: str) -> list[str]:
        (cases,) = [n for n in ast.parse(module).body if isinstance(n, ast.ClassDef) and n.name == "TestCases"]
        return [n.name for n in cases.body if isinstance(n, ast.FunctionDef)]

    for t in bigcodebench:
        hidden, public = methods(t.hidden_tests.cases[0]), methods(t.public_tests.cases[0])
        first = next(m for m in hidden if m.startswith("test"))
        assert [m for m in public if m.startswith("test")] == [first], t.task_id
        assert [m for m in public if not m.startswith("test")] == [m for m in hidden if not m.startswith("test")]


def test_bigcodebench_splits_are_fixed(bigcodebench):
    test_ids = [t.task_id for t in load_tasks("bigcodebench", "test")]
    assert test_ids == [t.task_id for t in load_tasks("bigcodebench", "test")]  # no hidden randomness
    assert test_ids[:3] == sorted(test_ids, key=lambda i: int(i.split("/")[1]))[:3]


# standard-library tasks whose canonical solution needs no network, display or slow work (a fixed sample)
BCB_SAMPLE = ("BigCodeBench/1", "BigCodeBench/7", "BigCodeBench/14", "BigCodeBench/19", "BigCodeBench/24")


def test_bigcodebench_references_pass_and_stubs_fail(bigcodebench):
    by_id = {t.task_id: t for t in bigcodebench}
    sample = [by_id[i] for i in BCB_SAMPLE]
    assert all(not t.requires for t in sample)
    reference = [
        (f"{t.task_id}:{hidden}", plain_programs(t, t.reference_solution, hidden=hidden)[0])
        for t in sample
        for hidden in (False, True)
    ]
    assert _failing_cases(reference) == set()
    stubs = [
        (t.task_id, plain_programs(t, "def task_func(*args, **kwargs):\n    return None\n", hidden=True)[0])
        for t in sample
    ]
    assert _failing_cases(stubs) == set(BCB_SAMPLE)

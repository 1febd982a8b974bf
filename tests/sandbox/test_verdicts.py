"""Verdicts a solution cannot forge (issue 14), against the real service: the exploits that used to score a wrong
solution 1.0 or stop the grader now fail the solution, while honest answers, in every form Python's own `==`
accepts, still pass.

Judged tests (an assert the judge splits) are decided in the service on plain values; the others run in the
solution's process and are marked `judged_in_process`. Hostile programs run only behind the jail probe.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from fr_jax.sandbox.local import LocalSandbox
from sandbox_service.plans import build_plan
from sandbox_service.schemas import AssertTests, HumanEvalTests
from tests.support.sandbox import health, post, require_jail


def _asserts(code: str, tests: list[str], **fields) -> dict:
    return {"code": code, "tests": {"kind": "asserts", "test_list": tests, **fields.pop("kinds", {})}, **fields}


def _unittest(code: str, body: str) -> dict:
    test = "import unittest\n\nclass TestCases(unittest.TestCase):\n" + "".join(
        f"    {line}\n" for line in body.strip("\n").splitlines()
    )
    return {"code": code, "tests": {"kind": "unittest", "test": test}}


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]
ADD_UNITTEST = "def test_add(self):\n    self.assertEqual(add(1, 2), 3)\n    self.assertEqual(add(2, 2), 4)"
HALF_TESTS = ["assert abs(half(3) - 1.5) < 1e-9", "assert math.isclose(half(5), 2.5)"]


# -------------------------------------------------------------------------------------------------- the exploits


def test_patching_the_harness_no_longer_passes(jail_check, api):
    require_jail(jail_check)
    code = "import __main__\n__main__._timed = lambda f, t: (None, 0.0)\ndef add(a, b):\n    return 0\n"
    judged = post(api, "/evaluate", _asserts(code, ADD_TESTS))
    assert judged["status"] == "Finished" and judged["num_passed"] == 1  # add(-1, 1) == 0 is right by chance
    assert [t["judged_in_process"] for t in judged["tests"]] == [False, False, False]
    in_process = post(api, "/evaluate", _unittest(code, ADD_UNITTEST))
    assert in_process["num_passed"] == 0 and in_process["tests"][0]["judged_in_process"]
    # the harness is out of reach by name and through sys.modules
    probe = (
        "import sys, __main__\n"
        "SEEN = sorted(n for n in vars(__main__) if not n.startswith('__'))\n"
        "MODULES = sorted(n for n, m in list(sys.modules.items()) if hasattr(m, '_Runner') or hasattr(m, '_timed'))\n"
        "def add(a, b):\n    return (SEEN, MODULES)\n"
    )
    seen = post(api, "/evaluate", _asserts(probe, ["assert add(1, 2) == ([], [])"]))
    assert seen["passed_all"], seen["tests"][0]["error_message"]


def test_an_object_equal_to_everything_no_longer_passes(jail_check, api):
    require_jail(jail_check)
    code = (
        "class A:\n"
        "    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n    __hash__ = lambda s: 0\n"
        "    __lt__ = __le__ = __gt__ = __ge__ = lambda s, o: True\n    __bool__ = lambda s: True\n"
        "class I(int):\n    __eq__ = lambda s, o: True\n    __hash__ = int.__hash__\n"
        "class T(tuple):\n    __eq__ = lambda s, o: True\n"
        "def add(a, b):\n    return A()\n"
        "def inc(a):\n    return I(0)\n"
        "def pair(a):\n    return T((0, 0))\n"
    )
    tests = [
        "assert add(1, 2) == 3",
        "assert add(1, 2) != 4",
        "assert add(1, 2)",
        "assert inc(1) == 2",
        "assert pair(1) == (1, 1)",
        "assert [add(1, 2)] == [3]",
    ]
    answer = post(api, "/evaluate", _asserts(code, tests))
    assert answer["num_passed"] == 0, [t["error_message"] for t in answer["tests"]]
    statuses = [(t["status"], t["error_type"]) for t in answer["tests"]]
    assert statuses[:3] == [("Failed", "NotPlainData")] * 3 and statuses[5] == ("Failed", "NotPlainData")
    assert statuses[3:5] == [("Failed", "AssertionError")] * 2  # subclasses of int and tuple: read as such
    assert "add(1, 2) returned <A object>" in answer["tests"][0]["error_message"]
    assert "inc(1) returned 0" in answer["tests"][3]["error_message"]


def test_a_shadowed_builtin_no_longer_passes(jail_check, api):
    require_jail(jail_check)
    for shadow in ("abs = lambda *a: 0", "def abs(x):\n    return 0", "import builtins\nbuiltins.abs = lambda *a: 0"):
        code = f"import math\n{shadow}\nmath.isclose = lambda *a, **k: True\ndef half(x):\n    return 0\n"
        judged = post(api, "/evaluate", _asserts(code, HALF_TESTS))
        assert judged["num_passed"] == 0 and not any(t["judged_in_process"] for t in judged["tests"]), shadow
        in_process = post(
            api, "/evaluate", _unittest(code, "def test_half(self):\n    assert abs(half(3) - 1.5) < 1e-9")
        )
        assert in_process["num_passed"] == 0, shadow  # the tests' builtins are a copy taken before the solution ran


POISON = """
import os, stat
for fd in range(3, 64):
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode): os.write(fd, b"[" * 60000 + b"\\n")
    except OSError: pass
def add(a, b):
    return a + b
"""
POISON_EVERY_FD = POISON.replace("if stat.S_ISSOCK(os.fstat(fd).st_mode): ", "")


def test_poisoning_the_channel_never_stops_the_grader(jail_check, api):
    require_jail(jail_check)
    for kind in ("asserts", "unittest"):
        request = _asserts(POISON, ADD_TESTS) if kind == "asserts" else _unittest(POISON, ADD_UNITTEST)
        answer = post(api, "/evaluate", request)
        assert answer["status"] == "Finished" and answer["passed_all"], answer  # it cannot even reach the channel
        every_fd = post(api, "/evaluate", {**request, "code": POISON_EVERY_FD})
        assert every_fd["status"] == "Finished" and every_fd["num_passed"] == 0
        assert every_fd["load_error"]["type"] == "HarnessTampered"
    poison_in_a_test = (
        "import os\ndef add(a, b):\n    for fd in range(64):\n        try:\n"
        "            os.write(fd, b'[' * 60000 + b'\\n')\n        except OSError:\n            pass\n    return a + b\n"
    )
    answer = post(api, "/evaluate", _asserts(poison_in_a_test, ADD_TESTS))
    assert answer["status"] == "Finished" and answer["num_passed"] == 0
    assert {t["error_type"] for t in answer["tests"]} == {"HarnessTampered"} and answer["restarts"] == 2
    assert health(api)["status"] == "ok"


def test_the_jail_never_holds_the_expected_values(jail_check, api):
    require_jail(jail_check)
    # a solution that looks for the answer everywhere in its process: containers, functions' constants, frames
    code = """
import gc, sys
TARGET = str(123456789 * 8 + 9)  # the expected value, never spelled out in this source
def _mentions(value):
    try:
        return value is not TARGET and (value == int(TARGET) or isinstance(value, str) and TARGET in value)
    except Exception:
        return False
def _find():
    for obj in gc.get_objects():
        if isinstance(obj, dict):
            items = list(obj.values())
        elif isinstance(obj, (list, tuple)):
            items = list(obj)
        else:
            items = list(getattr(getattr(obj, "__code__", None), "co_consts", ()))
        if any(_mentions(item) for item in items):
            return int(TARGET)
    frame = sys._getframe()
    while frame is not None:
        if any(_mentions(value) for value in frame.f_locals.values()):
            return int(TARGET)
        frame = frame.f_back
    return 0
def add(a, b):
    return _find()
"""
    answer = post(api, "/evaluate", _asserts(code, ["assert add(1, 2) == 987654321"]))
    assert not answer["passed_all"] and answer["tests"][0]["error_message"] == "add(1, 2) returned 0"
    humaneval = {
        "kind": "humaneval",
        "entry_point": "add",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 987654321\n",
    }
    assert not post(api, "/evaluate", {"code": code, "tests": humaneval})["passed_all"]


# ---------------------------------------------------------------------------------------------------- controls


def test_honest_answers_pass_in_every_form_python_accepts(api):
    code = """
import collections, math
Point = collections.namedtuple("Point", "x y")
def ordered():
    return collections.OrderedDict([("b", 2), ("a", 1)])
def counts(text):
    found = collections.defaultdict(int)
    for c in text:
        found[c] += 1
    return found
def point():
    return Point(1, 2)
def half(x):
    return x / 2
def third(x):
    return x / 3
def squares(n):
    return (i * i for i in range(n))
def nothing():
    return None
def big():
    return 2 ** 5000
def raw():
    return b"\\x00\\xff"
def both():
    return {1, 2}, frozenset({3}), 1 + 2j, range(3), float("inf")
"""
    tests = [
        "assert ordered() == {'a': 1, 'b': 2}",
        "assert counts('aab') == {'a': 2, 'b': 1}",
        "assert point() == (1, 2)",
        "assert point()[0] == 1 and len(point()) == 2",
        "assert isinstance(point(), tuple)",
        "assert math.isclose(third(1), 0.3333333, rel_tol=1e-6)",
        "assert abs(half(3) - 1.5) < 1e-9",
        "assert round(third(1), 3) == 0.333",
        "assert list(squares(4)) == [0, 1, 4, 9]",
        "assert sorted(squares(3), reverse=True) == [4, 1, 0]",
        "assert squares(2) != [0, 1]",  # as in Python: a generator equals no list
        "assert nothing() is None",
        "assert big() == 2 ** 5000 and big() % 7 == pow(2, 5000, 7)",
        "assert raw() == bytes([0, 255])",
        "assert both() == ({2, 1}, frozenset([3]), complex(1, 2), range(0, 3), math.inf)",
        "assert not (third(3) > 1)",
    ]
    answer = post(api, "/evaluate", _asserts(code, tests))
    assert [t["error_message"] for t in answer["tests"] if not t["passed"]] == []
    assert answer["passed_all"] and not any(t["judged_in_process"] for t in answer["tests"])


def test_which_tests_run_in_process_is_said(api):
    code = "def add(a, b):\n    return a + b\n"
    mixed = _asserts(
        code,
        ["assert add(1, 2) == 3", "assert all(add(i, 0) == i for i in range(3))", "assert add(X, 1) == 3"],
        kinds={"test_setup_code": "X = 2"},
    )
    answer = post(api, "/evaluate", mixed)
    assert answer["passed_all"] and [t["judged_in_process"] for t in answer["tests"]] == [False, True, True]
    assert post(api, "/evaluate", _unittest(code, ADD_UNITTEST))["tests"][0]["judged_in_process"]


def test_a_builtin_named_entry_point_is_the_solutions_only_when_declared(api):
    code = "def sum(a, b):\n    return sum_of_divisors(a, b)\n\ndef sum_of_divisors(a, b):\n    return 6\n"
    tests = ["assert sum(10, 15) == 6"]
    assert post(api, "/evaluate", _asserts(code, tests, kinds={"entry_point": "sum"}))["passed_all"]
    undeclared = post(api, "/evaluate", _asserts(code, tests))
    assert not undeclared["passed_all"] and undeclared["tests"][0]["error_type"] == "TypeError"  # the builtin


@pytest.fixture(scope="module")
def with_numpy():
    """A service with a `venv` python that has numpy: a virtual environment in a world-readable directory with a
    copy of this run's numpy (the jail's uid may not reach this checkout's own .venv)."""
    import numpy

    root = Path(tempfile.mkdtemp(prefix="fr_sandbox_numpy-"))
    root.chmod(0o755)
    try:
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(root / "venv")], check=True)
        (site,) = (root / "venv" / "lib").glob("python3*/site-packages")
        source = Path(numpy.__file__).parent
        for name in ("numpy", "numpy.libs"):
            if (source.parent / name).is_dir():
                shutil.copytree(source.parent / name, site / name)
        with LocalSandbox(workers=2, extra_args=["--python", f"venv={root}/venv/bin/python"]) as service:
            with httpx.Client(base_url=service.url, timeout=120) as api:
                yield api
    finally:
        shutil.rmtree(root)


def test_numpy_scalars_and_arrays_are_compared_as_plain_values(with_numpy):
    code = (
        "import numpy as np\n"
        "def mean(xs):\n    return np.mean(xs)\n"
        "def doubled(xs):\n    return np.array(xs) * 2\n"
        "def count(xs):\n    return np.int64(len(xs))\n"
        "def flags(xs):\n    return np.array(xs) > 1\n"
    )
    tests = [
        "assert mean([1, 2, 3]) == 2.0",
        "assert doubled([1, 2]) == [2, 4]",
        "assert count([1, 2]) == 2",
        "assert flags([1, 2]) == [False, True]",
        "assert abs(mean([1, 2]) - 1.5) < 1e-12",
    ]
    answer = post(with_numpy, "/evaluate", {**_asserts(code, tests), "python": "venv"})
    assert [t["error_message"] for t in answer["tests"] if not t["passed"]] == []


# -------------------------------------------------------------------------- the plan: what the jail is sent


def test_judged_tests_send_only_their_probes_to_the_jail():
    plan = build_plan(
        AssertTests(
            kind="asserts",
            test_list=["assert abs(half(3) - 1.5) < 1e-9", "assert sorted(f([3, 1])) == [1, 3], 'sorted'"],
        )
    )
    spec = repr([step.to_spec() for step in plan.steps])
    assert [step.payload for step in plan.steps if step.kind == "probe"] == [("half(3)",), ("f([3, 1])",)]
    assert "1.5" not in spec and "1, 3]" not in spec and "sorted" not in spec
    humaneval = build_plan(
        HumanEvalTests(
            kind="humaneval",
            entry_point="inc",
            test="def check(candidate):\n    assert candidate(1) == 424242\n"
            "    for x in range(2):\n        assert candidate(x) > x\n",
        )
    )
    spec = repr([step.to_spec() for step in humaneval.steps])
    assert "424242" not in spec and "candidate(x) > x" in spec  # the loop runs in process
    assert sorted(humaneval.checks) == [0] and ast.unparse(humaneval.checks[0].expression).endswith("== 424242")

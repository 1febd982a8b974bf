"""The `unittest` test kind of POST /evaluate over real HTTP: one test per test method of TestCases, fixtures as
unittest runs them, a failing or hanging method never hiding the next."""

from __future__ import annotations

import time

import pytest

from tests.support.sandbox import post

SOLUTION = "def add(a, b):\n    return a + b if a != 7 else 0\n"


def _evaluate(api, test: str, code: str = SOLUTION, **fields) -> dict:
    return post(api, "/evaluate", {"code": code, "tests": {"kind": "unittest", "test": test}, **fields})


def _statuses(answer: dict) -> dict[str, str]:
    return {t["name"]: t["status"] for t in answer["tests"]}


MIXED = """
import unittest

class TestCases(unittest.TestCase):
    def test_b_passes(self):
        self.assertEqual(add(2, 3), 5)

    def test_a_fails(self):
        self.assertEqual(add(7, 1), 8, "seven")

    def test_c_errors(self):
        add(1)

    def helper(self):  # not a test: no `test` prefix
        raise AssertionError("never run")

    def test_d_subtests(self):
        for a in (1, 7, 2):
            with self.subTest(a=a):
                self.assertEqual(add(a, 1), a + 1)

    def test_e_skipped(self):
        self.skipTest("no network here")

    @unittest.expectedFailure
    def test_f_expected_failure(self):
        self.assertEqual(add(7, 1), 8)

    @unittest.expectedFailure
    def test_g_unexpected_success(self):
        self.assertEqual(add(1, 1), 2)
"""


def test_each_test_method_is_one_test_in_unittests_order(api):
    answer = _evaluate(api, MIXED)
    assert answer["status"] == "Finished" and answer["load_error"] is None
    assert [t["name"] for t in answer["tests"]] == [
        "test_a_fails",
        "test_b_passes",
        "test_c_errors",
        "test_d_subtests",
        "test_e_skipped",
        "test_f_expected_failure",
        "test_g_unexpected_success",
    ]
    tests = {t["name"]: t for t in answer["tests"]}
    assert _statuses(answer) == {
        "test_a_fails": "Failed",
        "test_b_passes": "Passed",
        "test_c_errors": "Error",
        "test_d_subtests": "Failed",
        "test_e_skipped": "Failed",
        "test_f_expected_failure": "Passed",
        "test_g_unexpected_success": "Failed",
    }
    assert tests["test_a_fails"]["error_type"] == "AssertionError"
    assert tests["test_a_fails"]["error_message"].startswith("0 != 8 : seven")
    assert tests["test_c_errors"]["error_type"] == "TypeError" and "argument" in tests["test_c_errors"]["error_message"]
    assert "(a=7)" in tests["test_d_subtests"]["error_message"]
    assert (
        tests["test_e_skipped"]["error_type"] == "SkipTest"
        and "no network here" in tests["test_e_skipped"]["error_message"]
    )
    assert tests["test_g_unexpected_success"]["error_type"] == "UnexpectedSuccess"
    assert answer["num_tests"] == 7 and answer["num_passed"] == 2 and answer["pass_rate"] == pytest.approx(2 / 7)
    assert all(t["time_ms"] is not None and t["time_ms"] >= 0 for t in answer["tests"])


FIXTURES = """
import unittest

EVENTS = []  # module-level code runs once, in the solution's namespace
EVENTS.append("module")

def setUpModule():
    EVENTS.append("setUpModule")

class TestCases(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        EVENTS.append("setUpClass")
        cls.shared = add(1, 1)

    @classmethod
    def tearDownClass(cls):
        raise RuntimeError("tearDownClass ran: " + ",".join(EVENTS))

    def setUp(self):
        EVENTS.append("setUp")
        self.local = [add(2, 2)]

    def tearDown(self):
        EVENTS.append("tearDown")

    def test_1(self):
        self.assertEqual((self.shared, self.local), (2, [4]))
        self.assertEqual(EVENTS, ["module", "setUpModule", "setUpClass", "setUp"])

    def test_2(self):
        self.assertEqual(EVENTS[-3:], ["setUp", "tearDown", "setUp"])
        self.assertEqual(EVENTS.count("setUpClass"), 1)

    def test_3(self):
        self.assertEqual(EVENTS.count("module"), 1)
"""


def test_fixtures_run_as_unittest_runs_them(api):
    answer = _evaluate(api, FIXTURES)
    assert _statuses(answer) == {"test_1": "Passed", "test_2": "Passed", "test_3": "Error"}
    # tearDownClass runs once, after the last test, which carries its failure
    last = answer["tests"][2]
    assert last["error_type"] == "RuntimeError"
    assert last["error_message"].startswith("tearDownClass (tests.TestCases): tearDownClass ran: module,")
    assert last["error_message"].endswith("setUp,tearDown,setUp,tearDown,setUp,tearDown")


def test_a_failing_setupclass_fails_every_test_of_the_class_with_its_error(api):
    test = """
import unittest

class TestCases(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        add(1, 2, 3)

    def test_one(self):
        pass

    def test_two(self):
        pass
"""
    answer = _evaluate(api, test)
    assert answer["load_error"] is None and answer["num_passed"] == 0
    for result in answer["tests"]:
        assert result["status"] == "Error" and result["error_type"] == "TypeError"
        assert result["error_message"].startswith("setUpClass (tests.TestCases): ")


def test_hanging_and_dying_methods_never_hide_the_next(api):
    test = """
import os, time, unittest

class TestCases(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pid = os.getpid()

    def test_1_hangs(self):
        while True:
            pass

    def test_2_passes(self):
        self.assertEqual(add(1, 1), 2)

    def test_3_swallows_the_alarm(self):
        while True:
            try:
                time.sleep(5)
            except BaseException:
                pass

    def test_4_passes_in_a_new_process(self):
        self.assertEqual(add(2, 2), 4)

    def test_5_dies(self):
        os._exit(3)

    def test_6_passes(self):
        self.assertEqual(add(3, 3), 6)
"""
    started = time.monotonic()
    answer = _evaluate(api, test, timeout_s=1.0)
    assert [t["status"] for t in answer["tests"]] == [
        "TimeLimitExceeded",
        "Passed",
        "TimeLimitExceeded",
        "Passed",
        "Crashed",
        "Passed",
    ]
    assert answer["restarts"] == 2
    assert time.monotonic() - started < 20


def test_load_errors_are_reported_as_such(api):
    syntax = _evaluate(api, MIXED, code="def add(a, b)\n    return a + b\n")
    assert syntax["load_error"]["type"] == "SyntaxError" and syntax["load_error"]["step"] == "<solution>"
    # until the harness has listed them, the tests are the methods TestCases defines
    assert [t["name"] for t in syntax["tests"]][:2] == ["test_a_fails", "test_b_passes"]
    assert {t["error_type"] for t in syntax["tests"]} == {"SyntaxError"} and syntax["pass_rate"] == 0.0
    missing = _evaluate(
        api,
        "import no_such_module_xyz\nimport unittest\n\nclass TestCases(unittest.TestCase):\n"
        "    def test_x(self):\n        pass\n",
    )
    assert missing["load_error"] == {
        "type": "ModuleNotFoundError",
        "message": "No module named 'no_such_module_xyz'",
        "step": "test module",
    }
    empty = _evaluate(
        api, "import unittest\n\nclass TestCases(unittest.TestCase):\n    def helper(self):\n        pass\n"
    )
    assert empty["load_error"]["type"] == "TestModuleError" and "no unittest.TestCase" in empty["load_error"]["message"]
    assert empty["num_tests"] == 0 and empty["pass_rate"] == 0.0 and not empty["passed_all"]


def test_inherited_test_methods_count_and_test_imports_run_first(api):
    test = """
import unittest

class Checks:
    def test_inherited(self):
        self.assertEqual(add(1, 2), 3)

class TestCases(Checks, unittest.TestCase):
    def test_own(self):
        self.assertEqual(MAGIC, 42)
"""
    answer = post(
        api,
        "/evaluate",
        {"code": SOLUTION, "tests": {"kind": "unittest", "test": test, "test_imports": ["MAGIC = 42"]}},
    )
    assert _statuses(answer) == {"test_inherited": "Passed", "test_own": "Passed"} and answer["passed_all"]


@pytest.mark.parametrize(
    "tests, field",
    [
        ({"kind": "unittest", "test": "import unittest\nclass Other(unittest.TestCase):\n    pass"}, "TestCases"),
        ({"kind": "unittest", "test": "class TestCases(:\n    pass"}, "not valid Python"),
        ({"kind": "unittest", "test": "class TestCases: pass", "test_imports": ["import ("]}, "test_imports"),
        ({"kind": "unittest"}, "test"),
    ],
)
def test_malformed_unittest_requests_get_422_naming_the_problem(api, tests, field):
    response = api.post("/evaluate", json={"code": SOLUTION, "tests": tests})
    assert response.status_code == 422
    assert field in response.json()["message"], response.json()


def test_batches_mix_unittest_with_the_other_kinds(api):
    items = [
        {"code": SOLUTION, "tests": {"kind": "unittest", "test": MIXED}},
        {"code": SOLUTION, "tests": {"kind": "asserts", "test_list": ["assert add(1, 2) == 3"]}},
    ]
    results = post(api, "/evaluate/batch", {"items": items})["results"]
    assert [r["num_tests"] for r in results] == [7, 1] and [r["num_passed"] for r in results] == [2, 1]

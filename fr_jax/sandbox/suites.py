"""A task's test suite as a sandbox request: the one conversion every caller (direct mode, workflows, eval) uses.

The suite's prelude runs before the solution as a test import, so a solution (written by the policy or returned
by a workflow) is sent as it is. HumanEval's check() becomes one all-or-nothing assert-style test that keeps the
prelude (the prompt's imports and helpers, e.g. `poly` of HumanEval/32); BigCodeBench's unittest module is one
test per test method.
"""

from __future__ import annotations

from fr_jax.data.tasks import TestSuite
from fr_jax.sandbox.client import AssertTests, EvalItem, Tests, UnitTests


def humaneval_check(suite: TestSuite) -> str:
    """The one check() program of a humaneval-format suite (all-or-nothing: it counts as one test)."""
    if len(suite.cases) != 1 or suite.setup:
        raise ValueError(
            f"a humaneval suite holds one check() program and no setup, got {len(suite.cases)} "
            f"cases and setup {suite.setup!r}"
        )
    return suite.cases[0]


def suite_tests(suite: TestSuite, entry_point: str) -> Tests | None:
    """The sandbox's form of `suite` (None for an empty suite)."""
    if not suite.cases:
        return None
    imports = (suite.prelude,) if suite.prelude else ()
    if suite.format == "humaneval":
        return AssertTests([f"{humaneval_check(suite)}\n\ncheck({entry_point})"], imports=imports)
    if suite.format == "unittest":
        if len(suite.cases) != 1 or suite.setup:
            raise ValueError(f"a unittest suite holds one test module and no setup, got {len(suite.cases)} cases")
        return UnitTests(suite.cases[0], imports=imports)
    if suite.format != "asserts":
        raise ValueError(f"unknown test suite format {suite.format!r}")
    return AssertTests(list(suite.cases), setup_code=suite.setup, imports=imports, entry_point=entry_point)


def suite_item(
    suite: TestSuite,
    entry_point: str,
    solution: str,
    *,
    timeout_s: float,
    memory_limit_mb: int,
    python: str | None = None,
) -> EvalItem:
    """The /evaluate request that runs `solution` against a non-empty `suite` (with the sandbox's named `python`)."""
    tests = suite_tests(suite, entry_point)
    if tests is None:
        raise ValueError("an empty test suite cannot be evaluated")
    return EvalItem(solution, tests, timeout_s=timeout_s, memory_limit_mb=memory_limit_mb, python=python)


def counted_tests(suite: TestSuite) -> int:
    """The tests a suite counts as, before the sandbox reports them (a check() program is one; a unittest module
    counts its test methods once it has run)."""
    return 1 if suite.format in ("humaneval", "unittest") else len(suite.cases)

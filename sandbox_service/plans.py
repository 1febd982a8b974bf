"""A request's tests as the harness's steps: which code runs first, what counts as one test, and its name.

HumanEval: the check(candidate) body is split into one test per top-level statement that contains an
assert; other statements run in order as setup steps. When the body cannot be split (it returns, yields,
or rebinds names with global/nonlocal, or `split_asserts` is false) check(candidate) is one test.
MBPP asserts: each entry of test_list is one test, after the imports and setup code. stdio: one test per case.
unittest: each test method of TestCases is one test; the harness reports the names unittest's loader finds (with
inherited methods, in its sorted order), and until it has, the plan names the methods TestCases defines itself.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from sandbox_service.schemas import AssertTests, HumanEvalTests, StdioTests, UnitTests

_NAME_CHARS = 200


@dataclass(frozen=True)
class Plan:
    mode: str  # "function" | "stdio" | "unittest"
    names: list[str]  # one per test, in order
    prelude: list[tuple[str, str]]
    steps: list[tuple[str, str, str]]  # (kind "setup" | "test", name, code)
    cases: list[tuple[str, str]]  # (stdin, expected stdout)

    @property
    def timed_steps(self) -> int:
        """Steps the harness runs under a timeout each: the prelude, the solution, then steps, cases or tests."""
        tests = max(1, len(self.names)) if self.mode == "unittest" else 0
        return len(self.prelude) + 1 + len(self.steps) + len(self.cases) + tests


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _NAME_CHARS else text[: _NAME_CHARS - 3] + "..."


def _scope_nodes(node: ast.AST):
    """The nodes of a statement that belong to check()'s own scope (not to functions or classes inside it)."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            yield child
            yield from _scope_nodes(child)


def _splittable_check(test: str) -> ast.FunctionDef | None:
    """check(candidate) when its statements can run one by one at module level."""
    for node in ast.parse(test).body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            args = node.args
            if len(args.args) != 1 or args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs:
                return None
            for statement in node.body:
                if any(
                    isinstance(n, (ast.Return, ast.Yield, ast.YieldFrom, ast.Global, ast.Nonlocal, ast.Await))
                    for n in (statement, *_scope_nodes(statement))
                ):
                    return None
            return node
    return None


def _humaneval_plan(tests: HumanEvalTests) -> Plan:
    entry = tests.entry_point
    bind = (
        f"try:\n    candidate = {entry}\nexcept NameError:\n"
        f'    raise NameError("entry point {entry!r} is not defined by the solution") from None\n'
    )
    steps = [("setup", "test module", tests.test), ("setup", "entry point", bind)]
    check = _splittable_check(tests.test) if tests.split_asserts else None
    if check is None:
        steps.append(("test", "check(candidate)", "check(candidate)"))
    else:
        argument = check.args.args[0].arg
        if argument != "candidate":
            steps.append(("setup", "check argument", f"{argument} = candidate"))
        for statement in check.body:
            code = ast.unparse(statement)
            has_assert = any(isinstance(n, ast.Assert) for n in ast.walk(statement))
            steps.append(("test" if has_assert else "setup", _short(code), code))
    names = [name for kind, name, _ in steps if kind == "test"]
    return Plan("function", names, [], steps, [])


def _unittest_plan(tests: UnitTests) -> Plan:
    classes = [n for n in ast.parse(tests.test).body if isinstance(n, ast.ClassDef) and n.name == "TestCases"]
    methods = (n for n in classes[-1].body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    names = sorted({n.name for n in methods if n.name.startswith("test")})
    prelude = [(f"test_imports[{i}]", line) for i, line in enumerate(tests.test_imports)]
    return Plan("unittest", names, prelude, [("setup", "test module", tests.test)], [])


def build_plan(tests: HumanEvalTests | AssertTests | StdioTests | UnitTests) -> Plan:
    if isinstance(tests, HumanEvalTests):
        return _humaneval_plan(tests)
    if isinstance(tests, UnitTests):
        return _unittest_plan(tests)
    if isinstance(tests, AssertTests):
        prelude = [(f"test_imports[{i}]", line) for i, line in enumerate(tests.test_imports)]
        steps = [("setup", "test_setup_code", tests.test_setup_code)] if tests.test_setup_code.strip() else []
        steps += [("test", _short(t), t) for t in tests.test_list]
        return Plan("function", [_short(t) for t in tests.test_list], prelude, steps, [])
    cases = [(case.stdin, case.expected_stdout) for case in tests.cases]
    return Plan("stdio", [f"case {i}" for i in range(len(cases))], [], [], cases)

"""A request's tests as the harness's steps, and which of them the judge decides on plain values.

A test is *judged* when it is one `assert` whose expression splits into probes, the subexpressions that call the
solution (`add(1, 2)`, `candidate([3, 1])`), and a rest the judge evaluates itself (verdicts.py): comparisons,
arithmetic, displays, and a fixed set of builtins and `math` functions. The jail evaluates only the probes and
never sees the rest (the expected values stay here). A probe holds no comparison, boolean operator, conditional,
lambda or comprehension (a comparison inside the jail could be answered by an object equal to everything), and
refers to no name the test code binds (that would be an expected value computed in the jail). Every other test,
and the unittest kind, runs *in process*: in the solution's process, in a namespace with pristine builtins, and is
marked so in the response.

HumanEval: the check(candidate) body is one test per top-level statement that contains an assert; other statements
run in order as setup steps. When the body cannot be split (it returns, yields, or rebinds names with
global/nonlocal, or `split_asserts` is false) check(candidate) is one in-process test.
MBPP asserts: each entry of test_list is one test, after the imports and setup code. stdio: one test per case, the
output compared here. unittest: each test method of TestCases is one test; the harness reports the names
unittest's loader finds (with inherited methods, in its sorted order), and until it has, the plan names the methods
TestCases defines itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field

from sandbox_service.schemas import AssertTests, HumanEvalTests, StdioTests, UnitTests
from sandbox_service.verdicts import JUDGE_MODULES, JUDGE_NAMES, Check, Probe

_NAME_CHARS = 200
# Never inside a probe: each could compare or branch on a value of the solution's inside the jail.
_NOT_IN_PROBES = (
    ast.Compare,
    ast.BoolOp,
    ast.IfExp,
    ast.Lambda,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
    ast.NamedExpr,
    ast.Await,
    ast.Yield,
    ast.YieldFrom,
)
_JUDGE_NODES = (
    ast.Constant,
    ast.Tuple,
    ast.List,
    ast.Set,
    ast.Dict,
    ast.Slice,
    ast.Subscript,
    ast.UnaryOp,
    ast.BinOp,
    ast.BoolOp,
    ast.IfExp,
    ast.Compare,
    ast.Call,
    ast.Name,
    ast.Attribute,
)
# Nodes the judge takes apart when a probe lies below them.
_STRUCTURAL = (
    ast.Compare,
    ast.BoolOp,
    ast.UnaryOp,
    ast.BinOp,
    ast.IfExp,
    ast.Tuple,
    ast.List,
    ast.Set,
    ast.Dict,
    ast.Subscript,
    ast.Slice,
)
_CONTEXTS_AND_OPERATORS = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.keyword)


@dataclass(frozen=True)
class Step:
    """One thing the harness does: `kind` (prelude | solution | setup | probe | inproc | case | discover), the
    name it reports under, what it runs (code, probe sources or a case's stdin) and the test it decides (-1: none)."""

    kind: str
    name: str
    payload: str | tuple[str, ...]
    test: int = -1

    def to_spec(self) -> tuple:
        """What the harness gets: a judged test's name (its whole assert) stays here."""
        return (self.kind, f"<test {self.test}>" if self.kind == "probe" else self.name, self.payload, self.test)


@dataclass(frozen=True)
class Plan:
    mode: str  # "function" | "stdio" | "unittest"
    names: list[str]  # one per test, in order
    steps: list[Step]
    entry_point: str | None = None  # the solution's name the tests use even where it shadows a builtin
    checks: dict[int, Check] = field(default_factory=dict)  # judged tests (by index): what the judge evaluates
    expected: list[str] = field(default_factory=list)  # stdio: each case's expected output (never sent to the jail)

    def judged(self, test: int) -> bool:
        """Whether the judge decides this test (else it ran in process)."""
        return test in self.checks or self.mode == "stdio"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _NAME_CHARS else text[: _NAME_CHARS - 3] + "..."


def _bound_names(sources: Iterable[str]) -> set[str]:
    """Every name the test code binds anywhere (over-approximated: a local of a test helper counts too)."""
    bound: set[str] = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                bound.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                bound.update(node.names)
    return bound


class _Unsplittable(Exception):
    pass


class _Splitter:
    """Splits assert expressions into probes and a judged rest, given the names the test code binds (`bound`,
    never the solution's) and the solution's names that shadow judge builtins (`solution_builtins`)."""

    def __init__(self, bound: set[str], solution_builtins: set[str]):
        self.bound = bound
        self.judge_names = {name for name in JUDGE_NAMES if name not in solution_builtins}

    def _solution_name(self, name: str) -> bool:
        return name not in self.bound and name not in self.judge_names and name not in JUDGE_MODULES

    def _refers_to_solution(self, node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and self._solution_name(n.id) for n in ast.walk(node))

    def _evaluable(self, node: ast.AST) -> bool:
        """Whether the judge's interpreter evaluates `node` on its own."""
        for n in ast.walk(node):
            if isinstance(n, _CONTEXTS_AND_OPERATORS):
                if isinstance(n, ast.MatMult) or (isinstance(n, ast.keyword) and n.arg is None):
                    return False
                continue
            if not isinstance(n, _JUDGE_NODES):
                return False
            if isinstance(n, ast.Name) and n.id not in self.judge_names and n.id not in JUDGE_MODULES:
                return False
            if isinstance(n, ast.Attribute) and not (
                isinstance(n.value, ast.Name) and n.attr in JUDGE_MODULES.get(n.value.id, {})
            ):
                return False
            if isinstance(n, ast.Dict) and None in n.keys:
                return False
            if isinstance(n, ast.Call) and any(isinstance(a, ast.Starred) for a in n.args):
                return False
        return True

    def split(self, node: ast.expr, probes: list[str]) -> ast.expr:
        """`node` with the parts that call the solution replaced by Probes; _Unsplittable when the rest is not
        something the judge evaluates."""
        if not self._refers_to_solution(node):
            if self._evaluable(node):
                return node
            raise _Unsplittable
        if isinstance(node, ast.Call):
            if not self._evaluable(node.func):  # the solution's own function (or a method): the jail calls it
                return self._probe(node, probes)
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                raise _Unsplittable
            return self._rebuild(node, probes)  # a judge builtin applied to what the solution returns
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            return self._probe(node, probes)
        if isinstance(node, _STRUCTURAL) and not (isinstance(node, ast.Dict) and None in node.keys):
            return self._rebuild(node, probes)
        return self._probe(node, probes)

    def _rebuild(self, node: ast.expr, probes: list[str]) -> ast.expr:
        fields = {}
        for name, value in ast.iter_fields(node):
            if isinstance(value, ast.expr):
                value = self.split(value, probes)
            elif isinstance(value, list):
                value = [self.split(v, probes) if isinstance(v, ast.expr) else self._keyword(v, probes) for v in value]
            fields[name] = value
        return type(node)(**fields)

    def _keyword(self, value: ast.AST, probes: list[str]) -> ast.AST:
        if isinstance(value, ast.keyword):
            return ast.keyword(arg=value.arg, value=self.split(value.value, probes))
        return value  # operators of a Compare, and the like

    def _probe(self, node: ast.expr, probes: list[str]) -> Probe:
        for n in ast.walk(node):
            if isinstance(n, _NOT_IN_PROBES):
                raise _Unsplittable
            if isinstance(n, ast.Name) and n.id in self.bound:
                raise _Unsplittable
        probes.append(ast.unparse(node))
        return Probe(index=len(probes) - 1)

    def check(self, source: str) -> Check | None:
        """The judged form of one test (a single assert statement), or None when it runs in process."""
        body = ast.parse(source).body
        if len(body) != 1 or not isinstance(body[0], ast.Assert):
            return None
        statement = body[0]
        probes: list[str] = []
        try:
            expression = self.split(statement.test, probes)
        except _Unsplittable:
            return None
        message = statement.msg if statement.msg is not None and self._evaluable(statement.msg) else None
        if message is not None and self._refers_to_solution(message):
            message = None
        return Check(expression, message, tuple(probes))


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


def _without_body(test: str, check: ast.FunctionDef) -> str:
    """The test module with check()'s body emptied: its statements go to the jail one by one, judged asserts never."""
    module = ast.parse(test)
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            node.body = [ast.Pass()]
    return ast.unparse(module)


class _Builder:
    """Steps in order, each test numbered as it is added; judged tests keep their Check."""

    def __init__(self, splitter: _Splitter | None = None):
        self.splitter = splitter
        self.steps: list[Step] = []
        self.names: list[str] = []
        self.checks: dict[int, Check] = {}

    def step(self, kind: str, name: str, payload: str) -> None:
        self.steps.append(Step(kind, name, payload))

    def test(self, name: str, code: str) -> None:
        index = len(self.names)
        check = self.splitter.check(code) if self.splitter is not None else None
        if check is None:
            self.steps.append(Step("inproc", name, code, index))
        else:
            self.checks[index] = check
            self.steps.append(Step("probe", name, check.probes, index))
        self.names.append(name)


def _humaneval_plan(tests: HumanEvalTests) -> Plan:
    entry = tests.entry_point
    check = _splittable_check(tests.test) if tests.split_asserts else None
    alias = check.args.args[0].arg if check is not None else "candidate"
    sources = [tests.test] + ([ast.unparse(s) for s in check.body] if check is not None else [])
    splitter = _Splitter(_bound_names(sources) - {alias, entry}, {entry} if entry in JUDGE_NAMES else set())
    builder = _Builder(splitter)
    bind = (
        f"try:\n    {alias} = {entry}\nexcept NameError:\n"
        f'    raise NameError("entry point {entry!r} is not defined by the solution") from None\n'
    )
    builder.step("setup", "test module", tests.test if check is None else _without_body(tests.test, check))
    builder.step("setup", "entry point", bind)
    if check is None:
        builder.test("check(candidate)", f"check({alias})")
    else:
        for statement in check.body:
            code = ast.unparse(statement)
            if any(isinstance(n, ast.Assert) for n in ast.walk(statement)):
                builder.test(_short(code), code)
            else:
                builder.step("setup", _short(code), code)
    steps = [Step("solution", "<solution>", "")] + builder.steps
    return Plan("function", builder.names, steps, entry, builder.checks)


def _asserts_plan(tests: AssertTests) -> Plan:
    entry = tests.entry_point
    sources = [*tests.test_imports, tests.test_setup_code]
    bound = _bound_names(sources) - {entry}
    builder = _Builder(_Splitter(bound, {entry} if entry in JUDGE_NAMES else set()))
    if tests.test_setup_code.strip():
        builder.step("setup", "test_setup_code", tests.test_setup_code)
    for test in tests.test_list:
        builder.test(_short(test), test)
    steps = _prelude(tests.test_imports) + [Step("solution", "<solution>", "")] + builder.steps
    return Plan("function", builder.names, steps, entry, builder.checks)


def _prelude(imports: Iterable[str]) -> list[Step]:
    return [Step("prelude", f"test_imports[{i}]", line) for i, line in enumerate(imports)]


def _unittest_plan(tests: UnitTests) -> Plan:
    classes = [n for n in ast.parse(tests.test).body if isinstance(n, ast.ClassDef) and n.name == "TestCases"]
    methods = (n for n in classes[-1].body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    names = sorted({n.name for n in methods if n.name.startswith("test")})
    steps = _prelude(tests.test_imports) + [
        Step("solution", "<solution>", ""),
        Step("setup", "test module", tests.test),
        Step("discover", "test methods", ""),
    ]
    return Plan("unittest", names, steps)


def build_plan(tests: HumanEvalTests | AssertTests | StdioTests | UnitTests) -> Plan:
    if isinstance(tests, HumanEvalTests):
        return _humaneval_plan(tests)
    if isinstance(tests, UnitTests):
        return _unittest_plan(tests)
    if isinstance(tests, AssertTests):
        return _asserts_plan(tests)
    steps = [Step("case", f"case {i}", case.stdin, i) for i, case in enumerate(tests.cases)]
    expected = [case.expected_stdout for case in tests.cases]
    return Plan("stdio", [f"case {i}" for i in range(len(steps))], steps, expected=expected)

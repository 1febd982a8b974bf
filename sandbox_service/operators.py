"""The operator library a jailed Workflow composes: FlowReasoner's (AFlow's) code operators.

Each operator is a class built on the run's services (`operator.Custom(self.llm)` in a graph) and awaited with
keyword arguments. They run in the service process, never in the jail: the graph's proxy sends the call over
the run's channel and the service binds it here, so arguments are checked against these very signatures.

What the meta-agent is told about the operators (`describe_operators`, GET /workflow/operators) is generated
from these classes' signatures and docstrings, so it cannot drift from what runs.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import string
import typing
from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Any, Protocol, TypedDict

from pydantic import Field, TypeAdapter, ValidationError

MAX_TEST_LOOP = 10
MAX_ENSEMBLE = len(string.ascii_uppercase)


class OperatorError(Exception):
    """A call the library refuses (unknown operator, bad arguments): the graph sees it as an exception."""


@dataclasses.dataclass(frozen=True)
class TestFeedback:
    """The public tests' verdict on one solution, as the Test operator's repair prompt shows it."""

    passed: bool
    num_tests: int
    num_passed: int
    failures: tuple[str, ...]  # one line per failed test: its name and what went wrong


class Services(Protocol):
    """What operators may do; the run that owns them does the accounting and enforces the budgets."""

    async def ask_worker(self, prompt: str) -> str: ...

    async def run_public_tests(self, solution: str) -> TestFeedback | None:
        """None when the query has no public tests."""


class Response(TypedDict):
    response: str


class TestVerdict(TypedDict):
    result: bool
    solution: str


class Operator:
    """Base of the library. `await op(**arguments)` runs the operator."""

    def __init__(self, services: Services):
        self.services = services


class Custom(Operator):
    """Generates anything: one worker call on `instruction + input` (concatenated, no placeholders); the
    response is the worker's reply."""

    async def __call__(self, input: str, instruction: str) -> Response:  # noqa: A002 - FlowReasoner's name
        return {"response": await self.services.ask_worker(instruction + input)}


class CustomCodeGenerate(Operator):
    """Writes code: one worker call on `instruction + problem`, then the function `entry_point` is extracted
    from the reply with the imports and helpers it uses; the response is that code."""

    async def __call__(self, problem: str, entry_point: str, instruction: str) -> Response:
        reply = await self.services.ask_worker(
            f"{instruction}{problem}\n\nReply with the complete Python code of `{entry_point}` in one ```python block."
        )
        return {"response": extract_code(reply, entry_point)}


class ScEnsemble(Operator):
    """Self-consistency: the worker sees the solutions as A, B, C, ... and picks the most consistent one by
    letter; the response is the chosen solution (the most frequent one if the reply names no valid letter)."""

    async def __call__(
        self, solutions: Annotated[list[str], Field(min_length=1, max_length=MAX_ENSEMBLE)], problem: str
    ) -> Response:
        letters = string.ascii_uppercase[: len(solutions)]
        listing = "\n\n".join(f"{letter}:\n{solution}" for letter, solution in zip(letters, solutions))
        reply = await self.services.ask_worker(
            f"Problem:\n{problem}\n\nCandidate solutions:\n\n{listing}\n\nCompare the candidates and find the "
            "solution most consistent with the others (the answer most of them agree on). Think briefly, then "
            f"give its letter as <solution_letter>X</solution_letter>, one of {', '.join(letters)}."
        )
        chosen = chosen_solution(reply, len(solutions))
        if chosen is None:
            return {"response": Counter(solutions).most_common(1)[0][0]}
        return {"response": solutions[chosen]}


class Test(Operator):
    """Runs the query's public tests on `solution`; while some fail, the worker reflects on the failures and
    writes a repaired solution, up to `test_loop` times. `result` says whether the returned solution passes."""

    async def __call__(
        self,
        problem: str,
        solution: str,
        entry_point: str,
        test_loop: Annotated[int, Field(ge=0, le=MAX_TEST_LOOP)] = 3,
    ) -> TestVerdict:
        for _ in range(test_loop):
            feedback = await self.services.run_public_tests(solution)
            if feedback is None or feedback.passed:
                return {"result": True, "solution": solution}
            failures = "\n".join(f"- {line}" for line in feedback.failures)
            reply = await self.services.ask_worker(
                f"Problem:\n{problem}\n\nSolution:\n```python\n{solution}\n```\n\nThis solution fails "
                f"{feedback.num_tests - feedback.num_passed} of {feedback.num_tests} tests:\n{failures}\n\nReflect on "
                f"why it fails, then write the corrected, complete code of `{entry_point}` in one ```python block."
            )
            solution = extract_code(reply, entry_point)
        feedback = await self.services.run_public_tests(solution)
        return {"result": feedback is None or feedback.passed, "solution": solution}


OPERATORS: dict[str, type[Operator]] = {op.__name__: op for op in (Custom, CustomCodeGenerate, ScEnsemble, Test)}


# -------------------------------------------------------------------------------------- calling an operator


@dataclasses.dataclass(frozen=True)
class _Binding:
    signature: inspect.Signature  # without self
    adapters: dict[str, TypeAdapter]  # per parameter, from its annotation (with constraints)
    display: str  # "Name(param: type = default, ...) -> {key: type, ...}"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if typing.get_origin(tp) is not None:
        return f"{typing.get_origin(tp).__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return tp.__name__


def _binding(op: type[Operator]) -> _Binding:
    hints = typing.get_type_hints(op.__call__, include_extras=True)
    signature = inspect.signature(op.__call__)
    params = [p for p in signature.parameters.values() if p.name != "self"]
    shown = ", ".join(
        f"{p.name}: {_type_name(hints[p.name])}" + ("" if p.default is p.empty else f" = {p.default!r}") for p in params
    )
    result = ", ".join(f"{key}: {_type_name(tp)}" for key, tp in typing.get_type_hints(hints["return"]).items())
    return _Binding(
        signature.replace(parameters=params),
        {p.name: TypeAdapter(hints[p.name]) for p in params},
        f"{op.__name__}({shown}) -> {{{result}}}",
    )


_BINDINGS = {name: _binding(op) for name, op in OPERATORS.items()}


def bind_arguments(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, checked against the operator's signature (strictly: no coercion)."""
    if name not in _BINDINGS:
        raise OperatorError(f"unknown operator {name!r}; the library has {sorted(OPERATORS)}")
    binding = _BINDINGS[name]
    try:
        bound = binding.signature.bind(*args, **kwargs)
    except TypeError as e:
        raise OperatorError(f"{binding.display}: {e}") from None
    bound.apply_defaults()
    for param, value in bound.arguments.items():
        try:
            binding.adapters[param].validate_python(value, strict=True)
        except ValidationError as e:
            problem = "; ".join(error["msg"] for error in e.errors())
            raise OperatorError(f"{name}: argument {param!r} is invalid: {problem}") from None
    return dict(bound.arguments)


async def call_operator(name: str, services: Services, arguments: dict[str, Any]) -> dict[str, Any]:
    """Run one operator on arguments returned by `bind_arguments`."""
    return dict(await OPERATORS[name](services)(**arguments))


# ------------------------------------------------------------------------------------------- descriptions


def describe_operators() -> list[dict[str, str]]:
    """One entry per operator: name, signature (with its result's keys), description and a usage line."""
    described = []
    for name, op in OPERATORS.items():
        binding = _BINDINGS[name]
        attribute = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
        keywords = ", ".join(f"{p}=..." for p in binding.signature.parameters)
        described.append(
            {
                "name": name,
                "signature": binding.display,
                "description": " ".join(inspect.getdoc(op).split()),
                "usage": f"self.{attribute} = operator.{name}(self.llm); result = await self.{attribute}({keywords})",
            }
        )
    return described


def operators_text() -> str:
    """The descriptions as the meta-agent's prompt shows them (the usage lines stay in the JSON: the prompt says
    once how every operator is built and called, which keeps it short for small meta-agents)."""
    return "\n".join(
        f"{i}. {d['signature']}\n   {d['description']}" for i, d in enumerate(describe_operators(), start=1)
    )


# ------------------------------------------------------------------------------------------ reading replies

_FENCE = "```"
_LETTER_TAG = re.compile(r"<solution_letter>\s*([A-Za-z])\s*</solution_letter>")


def _answer(reply: str) -> str:
    """A reasoning worker's reply without its <think> block."""
    return reply.rsplit("</think>", 1)[1] if "</think>" in reply else reply


def chosen_solution(reply: str, count: int) -> int | None:
    """The index a ScEnsemble reply picks (its last <solution_letter>, reasoning ignored), None if no valid one."""
    found = _LETTER_TAG.findall(_answer(reply))
    index = string.ascii_uppercase.index(found[-1].upper()) if found else None
    return index if index is not None and index < count else None


def extract_code(reply: str, entry_point: str) -> str:
    """The code defining `entry_point` in a worker's reply, reduced to the imports and the top-level definitions
    it depends on (tests, prints and example calls dropped). A reply with no such definition gives its first
    code block (or the whole answer) as is, so the graph always gets a string."""
    answer = _answer(reply)
    pieces = [_drop_language_line(piece) for piece in answer.split(_FENCE)]
    # Fenced blocks first; small models also open fences they never close, so every piece is a candidate.
    candidates = [*pieces[1::2], *pieces[0::2], answer]
    for candidate in candidates:
        module = _parse(candidate)
        if module is not None and entry_point in _definitions(module):
            return _reduce(candidate, module, entry_point)
    return (pieces[1] if len(pieces) > 1 else answer).strip("\n")


def _drop_language_line(piece: str) -> str:
    """'python\ncode' (what follows an opening fence) -> 'code'."""
    first, newline, rest = piece.partition("\n")
    return rest if newline and re.fullmatch(r"[\w+.-]*\s*", first) else piece


def _parse(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _definitions(module: ast.Module) -> dict[str, ast.stmt]:
    """Top-level names a solution defines (functions, classes, simple assignments), the last binding winning."""
    found: dict[str, ast.stmt] = {}
    for node in module.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node
    return found


def _reduce(code: str, module: ast.Module, entry_point: str) -> str:
    definitions = _definitions(module)
    keep: set[int] = set()
    pending = [entry_point]
    while pending:
        node = definitions.get(pending.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        pending += [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
    lines = code.splitlines()
    kept = []
    for node in module.body:
        if isinstance(node, ast.Import | ast.ImportFrom) or id(node) in keep:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())])
            kept.append("\n".join(lines[first - 1 : node.end_lineno]))
    return "\n\n".join(kept) + "\n"

"""The judge of an assert-style test, in the service process: the assert's expression, its probes (the parts that
call the solution, plans.py) replaced by the plain values they produced in the jail (values.py), evaluated here by
a small interpreter of built-in operations on built-in values, with the real builtins.

The interpreter knows constants, displays, comparisons, boolean and arithmetic operators, subscripts, and calls of
a fixed set of pure builtins and `math` functions (JUDGE_NAMES); nothing else, so no code the solution wrote runs
here and no object of its classes takes part: a value that is not plain data fails its test (NotPlainData). Work
is bounded (sizes of sequences and ints built here), so a crafted value cannot stall the service.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sandbox_service.values import Opaque, Yielded, show

MAX_ITEMS = 1_000_000  # elements of a sequence (or characters of a string) the judge builds
MAX_BITS = 1 << 17  # bits of an int the judge builds


class Probe(ast.expr):
    """A subexpression the jail evaluates: its value is `values[index]`."""

    _fields = ("index",)


@dataclass(frozen=True)
class Check:
    """A judged test: the assert's expression and message with Probe nodes, and each probe's source."""

    expression: ast.expr
    message: ast.expr | None
    probes: tuple[str, ...]


@dataclass(frozen=True)
class ProbeFailed:
    """A probe that raised in the jail (or timed out): the test ends as it did."""

    status: str
    error_type: str
    message: str


class NotPlainData(Exception):
    pass


class _Limit(Exception):
    """An operation the judge does not perform on values this large."""


def _plain(value: Any, budget: int = MAX_ITEMS) -> Any:
    """`value` if no Opaque lies inside it (checked without recursion); NotPlainData otherwise."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, Opaque):
            raise NotPlainData(f"a {item.type_name} object ({item.why})")
        if isinstance(item, (list, tuple, set, frozenset, Yielded)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        budget -= 1
        if budget < 0:
            raise _Limit("a value with more than a million items")
    return value


def _size(value: Any) -> int:
    if isinstance(value, range):
        return len(value)
    if isinstance(value, Yielded):
        return len(value.items)
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) else 0


def _round(number: Any, ndigits: int | None = None) -> Any:
    if ndigits is not None and abs(ndigits) > 1000:
        raise _Limit("round() to more than 1000 digits")
    return round(number, ndigits) if ndigits is not None else round(number)


def _bounded_int_function(function: Callable, limit: int) -> Callable:
    def call(*args: Any) -> Any:
        if any(isinstance(a, int) and abs(a) > limit for a in args):
            raise _Limit(f"{function.__name__}() of numbers over {limit}")
        return function(*args)

    call.__name__ = function.__name__
    return call


def _power(base: Any, exponent: Any, modulus: Any = None) -> Any:
    if modulus is None and isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if abs(base) > 1 and max(1, abs(base).bit_length()) * exponent > MAX_BITS:
            raise _Limit(f"an int power of more than {MAX_BITS} bits")
    return pow(base, exponent) if modulus is None else pow(base, exponent, modulus)


_FUNCTIONS: dict[str, Any] = {
    f.__name__: f
    for f in (abs, all, any, bool, chr, complex, dict, divmod, float, frozenset, int, isinstance, len, list, max, min)
    + (ord, set, sorted, str, sum, tuple, type, reversed, enumerate, zip, repr, bytes, range)
}
_FUNCTIONS.update(round=_round, pow=_power, NoneType=type(None))
_MATH = {
    name: getattr(math, name)
    for name in (
        "isclose fabs sqrt floor ceil trunc isnan isinf isfinite log log2 log10 exp gcd lcm prod fsum hypot sin cos "
        "tan asin acos atan atan2 radians degrees copysign pi e inf nan tau isqrt dist"
    ).split()
}
_MATH.update({f.__name__: _bounded_int_function(f, 5000) for f in (math.factorial, math.comb, math.perm)})
JUDGE_NAMES = {**_FUNCTIONS, "True": True, "False": False, "None": None}
JUDGE_MODULES = {"math": _MATH}


def _arithmetic(op: ast.operator, left: Any, right: Any) -> Any:
    _plain(left)
    _plain(right)
    numbers = all(isinstance(v, (int, float, complex)) for v in (left, right))
    if isinstance(op, ast.Mult):
        if numbers and all(isinstance(v, int) for v in (left, right)):
            if left.bit_length() + right.bit_length() > MAX_BITS:
                raise _Limit(f"an int product of more than {MAX_BITS} bits")
        elif not numbers:
            count = right if isinstance(right, int) else left if isinstance(left, int) else 0
            other = left if count is right else right
            if isinstance(count, int) and _size(other) * max(0, count) > MAX_ITEMS:
                raise _Limit(f"a sequence of more than {MAX_ITEMS} items")
        return left * right
    if isinstance(op, ast.Add) and not numbers and _size(left) + _size(right) > MAX_ITEMS:
        raise _Limit(f"a sequence of more than {MAX_ITEMS} items")
    if isinstance(op, ast.Pow):
        return _power(left, right)
    if isinstance(op, ast.LShift) and isinstance(left, int) and isinstance(right, int):
        if right > 0 and left.bit_length() + right > MAX_BITS:
            raise _Limit(f"a shift to more than {MAX_BITS} bits")
    if isinstance(op, ast.Mod) and isinstance(left, (str, bytes)):
        raise _Limit("%-formatting")  # a format with a width taken from a value could build anything
    function = _BINARY.get(type(op))
    if function is None:
        raise _Limit(f"the operator {type(op).__name__}")
    return function(left, right)


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}


class _Interpreter:
    def __init__(self, values: Sequence[Any]):
        self.values = values

    def truth(self, value: Any) -> bool:
        return bool(_plain(value))

    def eval(self, node: ast.AST) -> Any:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise _Limit(f"the judge does not evaluate {type(node).__name__}")
        return method(node)

    def _Probe(self, node: Probe) -> Any:
        value = self.values[node.index]
        if isinstance(value, ProbeFailed):
            raise _ProbeRaised(value)
        return value

    def _Constant(self, node: ast.Constant) -> Any:
        return node.value

    def _Name(self, node: ast.Name) -> Any:
        if node.id in JUDGE_NAMES:
            return JUDGE_NAMES[node.id]
        raise _Limit(f"the name {node.id!r}")

    def _Attribute(self, node: ast.Attribute) -> Any:
        if isinstance(node.value, ast.Name) and node.value.id in JUDGE_MODULES:
            found = JUDGE_MODULES[node.value.id].get(node.attr)
            if found is not None:
                return found
        raise _Limit(f"the attribute {ast.unparse(node)}")

    def _Tuple(self, node: ast.Tuple) -> tuple:
        return tuple(self.eval(e) for e in node.elts)

    def _List(self, node: ast.List) -> list:
        return [self.eval(e) for e in node.elts]

    def _Set(self, node: ast.Set) -> set:
        return {_plain(self.eval(e)) for e in node.elts}

    def _Dict(self, node: ast.Dict) -> dict:
        if any(key is None for key in node.keys):
            raise _Limit("dict unpacking")
        return {_plain(self.eval(k)): self.eval(v) for k, v in zip(node.keys, node.values)}

    def _Slice(self, node: ast.Slice) -> slice:
        return slice(*(None if part is None else self.eval(part) for part in (node.lower, node.upper, node.step)))

    def _Subscript(self, node: ast.Subscript) -> Any:
        return _plain(self.eval(node.value))[_plain(self.eval(node.slice))]

    def _UnaryOp(self, node: ast.UnaryOp) -> Any:
        operand = self.eval(node.operand)
        if isinstance(node.op, ast.Not):
            return not self.truth(operand)
        return _UNARY[type(node.op)](_plain(operand))

    def _BinOp(self, node: ast.BinOp) -> Any:
        return _arithmetic(node.op, self.eval(node.left), self.eval(node.right))

    def _BoolOp(self, node: ast.BoolOp) -> Any:
        value = None
        for operand in node.values:
            value = self.eval(operand)
            if self.truth(value) == isinstance(node.op, ast.Or):
                return value
        return value

    def _IfExp(self, node: ast.IfExp) -> Any:
        return self.eval(node.body) if self.truth(self.eval(node.test)) else self.eval(node.orelse)

    def _Compare(self, node: ast.Compare) -> bool:
        left = self.eval(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = self.eval(comparator)
            if not isinstance(op, (ast.Is, ast.IsNot)):
                _plain(left)
                _plain(right)
            if not self.truth(_COMPARE[type(op)](left, right)):
                return False
            left = right
        return True

    def _Call(self, node: ast.Call) -> Any:
        function = self.eval(node.func)
        if not callable(function):
            raise TypeError(f"{ast.unparse(node.func)} is not callable")
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise _Limit("argument unpacking")
        args = [self.eval(a) for a in node.args]
        kwargs = {k.arg: self.eval(k.value) for k in node.keywords}
        for arg in (*args, *kwargs.values()):  # list(range(10**12)) and the like are refused, not built
            _plain(arg)
            if _size(arg) > MAX_ITEMS:
                raise _Limit(f"{ast.unparse(node.func)}() over more than {MAX_ITEMS} items")
        return function(*args, **kwargs)


class _ProbeRaised(Exception):
    def __init__(self, failure: ProbeFailed):
        super().__init__(failure.message)
        self.failure = failure


def judge(check: Check, values: Sequence[Any]) -> tuple[str, str | None, str | None]:
    """(status, error type, message) of a judged test, from its probes' values (ProbeFailed where one raised)."""
    interpreter = _Interpreter(values)
    try:
        if interpreter.truth(interpreter.eval(check.expression)):
            return "Passed", None, None
    except _ProbeRaised as raised:
        return raised.failure.status, raised.failure.error_type, raised.failure.message
    except NotPlainData as e:
        return "Failed", "NotPlainData", f"{_returned(check, values)}: {e}; the judge compares only plain data"
    except _Limit as e:
        return "Error", "JudgeLimit", f"the judge does not evaluate {e}"
    except RecursionError:
        return "Error", "RecursionError", "the values are nested too deeply to compare"
    except Exception as e:  # noqa: BLE001 - what evaluating the assert in Python would raise: the test's error
        return "Error", type(e).__name__, str(e)[:500]
    return "Failed", "AssertionError", _message(interpreter, check, values)


def _returned(check: Check, values: Sequence[Any]) -> str:
    shown = [
        f"{source} returned {show(value)}"
        for source, value in zip(check.probes, values)
        if not isinstance(value, ProbeFailed)
    ]
    return "; ".join(shown) or "assertion failed"


def _message(interpreter: _Interpreter, check: Check, values: Sequence[Any]) -> str:
    if check.message is not None:
        try:
            return str(_plain(interpreter.eval(check.message)))[:500]
        except Exception:  # noqa: BLE001 - a message the judge cannot build: say what the probes returned
            pass
    return _returned(check, values)[:500]

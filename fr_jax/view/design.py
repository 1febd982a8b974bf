"""A workflow design as a graph of operator calls, read from its <graph> with `ast` (nothing is run).

The operators are the attributes `__init__` builds from `operator.X(...)`; every call of one in `__call__` is a
node, in source order. Data flows along names: an edge goes from the call (or the query's input) that last set a
name to each call, or to the returned solution, that reads it; plain assignments (`code = draft["response"]`) and
list building (`answers.append(...)`) pass a name's sources on. A call inside a loop is marked, since it may run
several times.
"""

from __future__ import annotations

import ast
from typing import Any

INPUT, OUTPUT = "query", "return"


def _self_attribute(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _operators(init: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, str]:
    """self.<attr> -> operator type, for `self.attr = operator.Type(...)` (or `Type(...)`) in __init__."""
    found = {}
    for node in ast.walk(init):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        func = node.value.func
        kind = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if kind is None or kind == "create_llm_instance":
            continue
        for target in node.targets:
            if (attr := _self_attribute(target)) is not None:
                found[attr] = kind
    return found


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    return next((n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name), None)


class _Flow:
    def __init__(self, operators: dict[str, str], params: list[str]):
        self.operators = operators
        self.nodes: list[dict[str, Any]] = [{"id": 0, "label": INPUT, "operator": None, "line": None, "loop": False}]
        self.edges: set[tuple[int, int, str]] = set()
        self.sources: dict[str, set[int]] = {name: {0} for name in params}

    def _reads(self, expr: ast.AST) -> set[int]:
        return {s for n in ast.walk(expr) if isinstance(n, ast.Name) for s in self.sources.get(n.id, ())}

    def _calls(self, tree: ast.AST) -> list[ast.Call]:
        calls = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and (attr := _self_attribute(n.func)) is not None and attr in self.operators
        ]
        return sorted(calls, key=lambda c: (c.lineno, c.col_offset))

    def _add_calls(self, tree: ast.AST, in_loop: bool) -> set[int]:
        """Nodes for the operator calls in `tree`, with edges from what their arguments read."""
        made: dict[ast.Call, int] = {}
        for call in self._calls(tree):
            attr = _self_attribute(call.func)
            node = len(self.nodes)
            self.nodes.append(
                {"id": node, "label": attr, "operator": self.operators[attr], "line": call.lineno, "loop": in_loop}
            )
            made[call] = node
            arguments = [("", a) for a in call.args] + [(k.arg or "**", k.value) for k in call.keywords]
            for label, value in arguments:
                inner = [made[c] for c in self._calls(value) if c in made]
                for source in self._reads(value) | set(inner):
                    self.edges.add((source, node, label))
        return set(made.values())

    def statements(self, body: list[ast.stmt], in_loop: bool = False) -> None:
        for stmt in body:
            if isinstance(stmt, ast.For | ast.AsyncFor | ast.While):
                header = stmt.iter if isinstance(stmt, ast.For | ast.AsyncFor) else stmt.test
                produced = self._add_calls(header, in_loop) | self._reads(header)
                if isinstance(stmt, ast.For | ast.AsyncFor):
                    self._assign([stmt.target], produced)
                self.statements(stmt.body, True)
                self.statements(stmt.orelse, in_loop)
            elif isinstance(stmt, ast.If):
                self._add_calls(stmt.test, in_loop)
                self.statements(stmt.body, in_loop)
                self.statements(stmt.orelse, in_loop)
            elif isinstance(stmt, ast.With | ast.AsyncWith):
                self.statements(stmt.body, in_loop)
            elif isinstance(stmt, ast.Try):
                for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                    self.statements(block, in_loop)
            elif isinstance(stmt, ast.Return):
                if stmt.value is not None:
                    self._return(stmt.value, in_loop)
            else:
                self._simple(stmt, in_loop)

    def _simple(self, stmt: ast.stmt, in_loop: bool) -> None:
        made = self._add_calls(stmt, in_loop)
        value = getattr(stmt, "value", None)
        produced = made or (self._reads(value) if value is not None else set())
        if isinstance(stmt, ast.Assign):
            self._assign(stmt.targets, produced)
        elif isinstance(stmt, ast.AnnAssign | ast.AugAssign):
            keep = isinstance(stmt, ast.AugAssign)
            self._assign([stmt.target], produced, keep=keep)
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            func = stmt.value.func  # answers.append(x), answers.extend(...): the list now holds x
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                self._assign([func.value], made or self._reads(stmt.value), keep=True)

    def _assign(self, targets: list[ast.expr], produced: set[int], keep: bool = False) -> None:
        for target in targets:
            for name in (n.id for n in ast.walk(target) if isinstance(n, ast.Name)):
                self.sources[name] = (self.sources.get(name, set()) if keep else set()) | produced

    def _return(self, value: ast.expr, in_loop: bool) -> None:
        made = self._add_calls(value, in_loop)
        solution = value.elts[0] if isinstance(value, ast.Tuple) and value.elts else value  # (solution, cost)
        output = next((n["id"] for n in self.nodes if n["label"] == OUTPUT), None)
        if output is None:
            output = len(self.nodes)
            self.nodes.append({"id": output, "label": OUTPUT, "operator": None, "line": value.lineno, "loop": False})
        for source in (self._reads(solution) | made) - {output}:
            self.edges.add((source, output, ""))


def design_flow(graph: str | None) -> dict[str, Any] | None:
    """{"nodes": [...], "edges": [[from, to, argument], ...]} of a <graph>'s __call__; None if it has no
    class Workflow with __init__ and __call__ to read (the page then shows the code alone)."""
    if not graph:
        return None
    try:
        module = ast.parse(graph)
    except (SyntaxError, ValueError, RecursionError):
        return None
    cls = next((n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "Workflow"), None)
    init, call = (_method(cls, "__init__"), _method(cls, "__call__")) if cls is not None else (None, None)
    if init is None or call is None:
        return None
    params = [a.arg for a in call.args.args[1:]] + [a.arg for a in call.args.kwonlyargs]
    flow = _Flow(_operators(init), params)
    flow.statements(call.body)
    return {"nodes": flow.nodes, "edges": sorted(list(edge) for edge in flow.edges)}

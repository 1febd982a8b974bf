"""fr_jax's client (fr_jax/sandbox/client.py) mirrors sandbox_service's wire models on purpose (fr_jax reaches the
service over HTTP only); these tests keep the mirror from drifting, field by field.

Requests: what each client request object sends is accepted by the service's model (which forbids unknown keys)
and sets every field the model has. Answers: each client dataclass keeps a model field under the same name and a
comparable kind, or derives it (a property), and from_json reads back every value of a fully populated answer.
"""

from __future__ import annotations

import base64
import collections.abc
import dataclasses
import types
import typing
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from fr_jax.sandbox import client
from sandbox_service import schemas

# client answer class -> (service model, {wire field: the client property deriving it}, {wire field left out: why})
ANSWERS: dict[type, tuple[type[BaseModel], dict[str, str], dict[str, str]]] = {
    client.TestOutcome: (schemas.TestResult, {}, {}),
    client.LoadError: (schemas.ErrorInfo, {}, {}),
    client.Evaluation: (
        schemas.EvaluateResponse,
        {name: name for name in ("passed_all", "pass_rate", "num_tests", "num_passed")},
        {},
    ),
    client.WorkflowFailure: (schemas.WorkflowFailure, {}, {}),
    client.WorkerCall: (schemas.WorkerCallRecord, {}, {}),
    client.TestRun: (schemas.TestRunRecord, {}, {}),
    client.OperatorCall: (schemas.OperatorCallRecord, {}, {}),
    client.WorkerUsage: (schemas.WorkerUsage, {}, {}),
    client.WorkflowRun: (
        schemas.WorkflowRunResponse,
        {"status": "ok"} | {name: name for name in ("public_pass_rate", "hidden_pass_rate", "num_operator_calls")},
        {},
    ),
    client.WorkflowOperators: (schemas.OperatorsResponse, {}, {}),
    client.SandboxHealth: (schemas.HealthResponse, {}, {}),
    client.RunCodeResult: (
        schemas.RunCodeResponse,
        {},
        {"run_result": "flattened into run_status and the fields below", "compile_result": "Python is not compiled"},
    ),
}
# the wire value a derived property must equal, where it is not the wire value itself
DERIVED_VALUE = {"ok": lambda status: status == "ok"}
# request fields the client never sets, and why
NOT_SENT = {"RunCodeRequest.compile_timeout": "accepted for SandboxFusion's sake; Python is not compiled"}
# RunCodeResult's fields that come from run_result (schemas.CommandResult), by client name -> wire name
RUN_RESULT = {"run_status": "status", "return_code": "return_code", "stdout": "stdout", "stderr": "stderr"}
RUN_RESULT["execution_time"] = "execution_time"
MODEL_TO_CLIENT = {model: cls for cls, (model, _, _) in ANSWERS.items()} | {
    schemas.HumanEvalTests: client.HumanEvalTests,
    schemas.AssertTests: client.AssertTests,
    schemas.StdioTests: client.StdioTests,
    schemas.UnitTests: client.UnitTests,
}


def kind(tp: Any) -> Any:
    """A comparable shape of a type on either side: str/int/float/bool, ("seq", x), ("map", x), ("optional", x),
    ("union", {...}) or ("obj", client class name)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return kind(args[0])
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        shape = kind(present[0]) if len(present) == 1 else ("union", frozenset(kind(a) for a in present))
        return ("optional", shape) if len(present) < len(args) else shape
    if origin is Literal:
        return kind(type(args[0]))
    if origin in (list, tuple, collections.abc.Sequence):
        return ("seq", kind(args[0]))
    if origin in (dict, collections.abc.Mapping):
        return ("map", kind(args[1]))
    if tp is Any:
        return "any"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return ("obj", MODEL_TO_CLIENT[tp].__name__)
    if dataclasses.is_dataclass(tp):
        return ("obj", tp.__name__)
    return tp.__name__


def _client_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# -- requests -------------------------------------------------------------------------------------------------

EVERY_KIND = [
    client.HumanEvalTests("def check(candidate):\n    assert candidate(1) == 1\n", "f", split_asserts=False),
    client.AssertTests(["assert f(1) == 1"], setup_code="X = 1", imports=["import math"], entry_point="f"),
    client.StdioTests([("1\n", "1")]),
    client.UnitTests("import unittest\nclass TestCases(unittest.TestCase):\n    pass\n", imports=["import os"]),
]
REQUESTS = [
    (
        client.EvalItem("def f(x):\n    return x", EVERY_KIND[3], timeout_s=2.0, memory_limit_mb=512, python="bcb"),
        schemas.EvaluateRequest,
    ),
    (
        client.RunCodeJob(
            "print(1)",
            stdin="x",
            run_timeout=3.0,
            memory_limit_mb=256,
            files={"a.txt": b"a"},
            fetch_files=["b.txt"],
            python="bcb",
        ),
        schemas.RunCodeRequest,
    ),
    (
        client.WorkflowJob(
            "class Workflow: ...",
            "P = 'p'",
            problem="q",
            entry_point="f",
            worker="w",
            public_tests=EVERY_KIND[1],
            hidden_tests=EVERY_KIND[0],
            max_operator_calls=3,
            max_worker_tokens=100,
            wall_s=9.0,
            max_tokens=8,
            temperature=0.5,
            top_p=0.9,
            seed=1,
            dataset="code",
            test_timeout_s=2.0,
            test_memory_mb=512,
            memory_mb=2048,
            python="bcb",
        ),
        schemas.WorkflowRunRequest,
    ),
] + [(tests, type(tests)) for tests in EVERY_KIND]
CLIENT_KIND_TO_MODEL = {cls: model for model, cls in MODEL_TO_CLIENT.items()}


def _unset(instance: BaseModel, where: str) -> list[str]:
    """Fields of a validated request (and of the models inside it) that the payload did not set."""
    missing = [f"{where}.{name}" for name in type(instance).model_fields if name not in instance.model_fields_set]
    for name in instance.model_fields_set:
        value = getattr(instance, name)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                missing += _unset(item, f"{where}.{name}" + (f"[{i}]" if isinstance(value, list) else ""))
    return missing


@pytest.mark.parametrize("request_object, model", REQUESTS, ids=lambda value: type(value).__name__)
def test_client_requests_are_accepted_and_set_every_field(request_object, model):
    model = CLIENT_KIND_TO_MODEL.get(model, model)
    payload = request_object.to_json()
    validated = model.model_validate(payload)  # the service forbids keys it does not know
    assert [name for name in _unset(validated, model.__name__) if name not in NOT_SENT] == []


def test_every_test_kind_of_the_service_has_a_client_class():
    service_kinds = {get_args(m.model_fields["kind"].annotation)[0] for m in get_args(get_args(schemas.Tests)[0])}
    assert service_kinds == {tests.to_json()["kind"] for tests in EVERY_KIND}
    assert set(get_args(client.Tests)) == {type(tests) for tests in EVERY_KIND}


# -- answers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(ANSWERS), ids=lambda cls: cls.__name__)
def test_answer_fields_agree_by_name_and_kind(cls):
    model, derived, left_out = ANSWERS[cls]
    wire = {name: field.annotation for name, field in model.model_fields.items()}
    if cls is client.RunCodeResult:
        wire |= {name: schemas.CommandResult.model_fields[source].annotation for name, source in RUN_RESULT.items()}
        wire["files"] = dict[str, bytes]  # base64 on the wire, decoded by the client
    kept = _client_fields(cls)
    assert set(kept) - set(wire) == set(), "client fields the service does not send"
    assert set(wire) - set(kept) - set(derived) - set(left_out) == set(), (
        "wire fields the client neither keeps nor derives"
    )
    assert all(isinstance(getattr(cls, prop, None), property) for prop in derived.values())
    # a field the client keeps optional may be required on the wire, not the other way round
    mismatched = {
        name: (kind(kept[name]), kind(wire[name]))
        for name in kept
        if kind(kept[name]) not in (kind(wire[name]), ("optional", kind(wire[name])))
    }
    assert mismatched == {}


def _evaluation(passed: bool) -> schemas.EvaluateResponse:
    tests = [
        schemas.TestResult(name="t1", passed=True, status="Passed", time_ms=1.5),
        schemas.TestResult(
            name="t2",
            passed=passed,
            status="Passed" if passed else "Failed",
            error_type="AssertionError",
            error_message="1 != 2",
            time_ms=2.5,
            judged_in_process=True,
        ),
    ]
    return schemas.EvaluateResponse(
        status="Finished",
        message="m",
        passed_all=passed,
        pass_rate=1.0 if passed else 0.5,
        num_tests=2,
        num_passed=2 if passed else 1,
        load_error=schemas.ErrorInfo(type="ImportError", message="x", step="s"),
        tests=tests,
        restarts=1,
        time_ms=12.0,
        stderr="err",
    )


def _populated_answers() -> list[BaseModel]:
    record = schemas.OperatorCallRecord(
        index=0,
        operator="Test",
        worker="w",
        arguments={"a": 1},
        result={"result": True},
        error="e",
        started_s=0.5,
        duration_s=0.25,
        worker_calls=[
            schemas.WorkerCallRecord(
                worker="w",
                prompt="p",
                reply="r",
                prompt_tokens=3,
                completion_tokens=4,
                latency_s=0.1,
                finish_reason="stop",
            )
        ],
        test_runs=[
            schemas.TestRunRecord(num_tests=2, num_passed=1, passed=False, failures=["t2: Failed"], time_ms=3.0)
        ],
    )
    workflow = schemas.WorkflowRunResponse(
        status="failed",
        failure=schemas.WorkflowFailure(kind="timeout", message="m", traceback="tb"),
        solution="s",
        public=_evaluation(True),
        hidden=_evaluation(False),
        public_pass_rate=1.0,
        hidden_pass_rate=0.5,
        operator_calls={"Test": 1},
        num_operator_calls=1,
        worker=schemas.WorkerUsage(calls=1, prompt_tokens=3, completion_tokens=4, latency_s=0.1),
        test_runs=1,
        trace=[record],
        wall_s=2.0,
        stderr="e",
    )
    run = schemas.RunCodeResponse(
        status="Failed",
        message="m",
        files={"o.txt": "aGk="},
        run_result=schemas.CommandResult(status="Finished", execution_time=0.5, return_code=3, stdout="o", stderr="e"),
    )
    operators = schemas.OperatorsResponse(operators=[{"name": "Custom", "signature": "s"}], text="t")
    health = schemas.HealthResponse(
        status="ok",
        version="1",
        isolation={"level": "full", "namespaces": ["pid"]},
        capacity={"workers": 2},
        limits={"max_body_bytes": 10},
        pythons={"default": "/usr/bin/python3", "bcb": "/opt/bcb/bin/python"},
    )
    return [workflow, run, operators, health]


def _same(value: Any, wire: Any, where: str) -> list[str]:
    """Where a client value differs from the wire value it was read from."""
    if dataclasses.is_dataclass(value):
        cls = type(value)
        found = []
        for name in _client_fields(cls):
            if cls is client.RunCodeResult and name in RUN_RESULT:
                expected = wire["run_result"][RUN_RESULT[name]]
            elif cls is client.RunCodeResult and name == "files":
                expected = {path: base64.b64decode(data) for path, data in wire["files"].items()}
            else:
                expected = wire[name]
            found += _same(getattr(value, name), expected, f"{where}.{name}")
        return found
    if isinstance(value, (tuple, list)):
        if len(value) != len(wire):
            return [where]
        return [d for i, (v, w) in enumerate(zip(value, wire)) for d in _same(v, w, f"{where}[{i}]")]
    return [] if value == wire else [f"{where}: {value!r} != {wire!r}"]


@pytest.mark.parametrize("answer", _populated_answers(), ids=lambda answer: type(answer).__name__)
def test_from_json_reads_back_every_value(answer):
    cls = MODEL_TO_CLIENT[type(answer)]
    wire = answer.model_dump(mode="json")
    read = cls.from_json(wire)
    assert _same(read, wire, cls.__name__) == []
    for name, prop in ANSWERS[cls][1].items():  # what the client derives equals what the service sent
        assert getattr(read, prop) == DERIVED_VALUE.get(prop, lambda value: value)(wire[name]), name
    for nested, model in (("public", schemas.EvaluateResponse), ("hidden", schemas.EvaluateResponse)):
        for name, prop in ANSWERS[MODEL_TO_CLIENT[model]][1].items():
            assert wire.get(nested) is None or getattr(getattr(read, nested), prop) == wire[nested][name], name

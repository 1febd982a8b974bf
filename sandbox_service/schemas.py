"""Request and response models. /run_code follows SandboxFusion's shape so that verl's reward client works as is."""

from __future__ import annotations

import ast
import base64
import binascii
import keyword
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox_service.run_dir import safe_relative_path

MAX_CODE_CHARS = 1_000_000
MAX_TESTS = 1000
MAX_BATCH = 512
MAX_TIMEOUT_S = 300.0
MAX_FILES = 1000
MAX_PATH_PARTS = 32
MAX_PATH_CHARS = 1024
CODE_FILE = "main.py"

FailureKind = Literal[
    "graph_syntax_error",
    "workflow_exception",
    "budget_exceeded",
    "timeout",
    "worker_unreachable",
    "worker_not_allowed",
    "worker_error",
    "no_solution",
    "sandbox_error",
]

TestStatus = Literal[
    "Passed", "Failed", "Error", "TimeLimitExceeded", "MemoryLimitExceeded", "OutputLimitExceeded", "Crashed"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _python_field() -> Any:
    return Field(
        None,
        max_length=64,
        description="name of one of the service's pythons (GET /health lists them); default: its default python",
    )


def _parses(code: str) -> str:
    try:
        ast.parse(code)
    except SyntaxError as e:
        raise ValueError(f"not valid Python: {e.msg} (line {e.lineno})") from None
    return code


def _defines(code: str, kind: type[ast.FunctionDef | ast.ClassDef], name: str, missing: str) -> str:
    """`code` if it parses and defines `name` (a `kind`) at top level; else ValueError(`missing`)."""
    if not any(isinstance(node, kind) and node.name == name for node in ast.parse(_parses(code)).body):
        raise ValueError(missing)
    return code


def _identifier(name: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"{name!r} is not a Python identifier")
    return name


def _each_parses(codes: list[str]) -> list[str]:
    for i, code in enumerate(codes):
        try:
            _parses(code)
        except ValueError as e:
            raise ValueError(f"entry {i}: {e}") from None
    return codes


# -- /run_code -------------------------------------------------------------------------------------------


class RunCodeRequest(_Strict):
    code: str = Field(max_length=MAX_CODE_CHARS)
    language: str = "python"
    stdin: str = Field("", max_length=16 * MAX_CODE_CHARS)
    run_timeout: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S)
    compile_timeout: float = Field(
        10.0, ge=0, le=MAX_TIMEOUT_S, description="accepted for compatibility; Python is not compiled"
    )
    memory_limit_MB: int = Field(-1, ge=-1, le=65536, description="-1: the service default")
    files: dict[str, str] = Field(
        default_factory=dict, description="path -> base64 content, written into the run directory"
    )
    fetch_files: list[str] = Field(
        default_factory=list, max_length=MAX_FILES, description="paths to read back after the run"
    )
    python: str | None = _python_field()

    @field_validator("language")
    @classmethod
    def _python_only(cls, value: str) -> str:
        if value != "python":
            raise ValueError(f"language {value!r} is not supported: this sandbox runs only 'python'")
        return value

    @field_validator("memory_limit_MB")
    @classmethod
    def _memory(cls, value: int) -> int:
        if 0 <= value < 64:
            raise ValueError("must be -1 (the service default) or at least 64 MiB")
        return value

    @field_validator("files")
    @classmethod
    def _files(cls, files: dict[str, str]) -> dict[str, str]:
        if len(files) > MAX_FILES:
            raise ValueError(f"{len(files)} files, over the limit of {MAX_FILES}")
        seen: dict[PurePosixPath, str] = {}
        for path, content in files.items():
            relative = _check_path(path)
            if str(relative) == CODE_FILE:
                raise ValueError(f"{path!r}: the code itself is written to {CODE_FILE}")
            if relative in seen:
                raise ValueError(f"{path!r} and {seen[relative]!r} name the same file")
            seen[relative] = path
            try:
                base64.b64decode(content, validate=True)
            except binascii.Error as e:
                raise ValueError(f"{path!r}: content is not valid base64 ({e})") from None
        for relative, path in seen.items():
            clash = next((parent for parent in relative.parents if parent in seen), None)
            if clash is not None:
                raise ValueError(f"{path!r} lies under {seen[clash]!r}, which is a file")
        return files

    @field_validator("fetch_files")
    @classmethod
    def _fetch(cls, paths: list[str]) -> list[str]:
        for path in paths:
            _check_path(path)
        return paths


def _check_path(path: str) -> PurePosixPath:
    try:
        relative = safe_relative_path(path)
    except ValueError as e:
        raise ValueError(f"{path!r}: {e}") from None
    if len(relative.parts) > MAX_PATH_PARTS or len(path) > MAX_PATH_CHARS:
        raise ValueError(f"{path[:100]!r}...: deeper than {MAX_PATH_PARTS} parts or longer than {MAX_PATH_CHARS}")
    if any(len(part.encode()) > 255 for part in relative.parts):
        raise ValueError(f"{path[:100]!r}: a path part is longer than 255 bytes")
    return relative


class CommandResult(BaseModel):
    status: Literal["Finished", "Error", "TimeLimitExceeded"]
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str = ""
    stderr: str = ""


class RunCodeResponse(BaseModel):
    status: Literal["Success", "Failed", "SandboxError"]
    message: str = ""
    compile_result: CommandResult | None = None
    run_result: CommandResult | None = None
    files: dict[str, str] = Field(default_factory=dict)


# -- /evaluate -------------------------------------------------------------------------------------------


class HumanEvalTests(_Strict):
    """A HumanEval-style test program defining check(candidate), applied to the solution's `entry_point`."""

    kind: Literal["humaneval"]
    test: str = Field(max_length=MAX_CODE_CHARS)
    entry_point: str
    split_asserts: bool = Field(
        True, description="one test per assert statement of check(); false: check() is one test"
    )

    @field_validator("test")
    @classmethod
    def _test(cls, test: str) -> str:
        return _defines(test, ast.FunctionDef, "check", "defines no top-level check(candidate) function")

    @field_validator("entry_point")
    @classmethod
    def _entry_point(cls, name: str) -> str:
        return _identifier(name)


class AssertTests(_Strict):
    """MBPP-style: each entry of test_list is one test (usually one assert)."""

    kind: Literal["asserts"]
    test_list: list[Annotated[str, Field(max_length=MAX_CODE_CHARS)]] = Field(min_length=1, max_length=MAX_TESTS)
    test_setup_code: str = Field("", max_length=MAX_CODE_CHARS)
    test_imports: list[str] = Field(default_factory=list, max_length=100)
    entry_point: str | None = Field(
        None,
        description="the function under test: the tests' uses of its name mean the solution's even where it is also "
        "a builtin's (MBPP 126 defines sum); other names the solution defines never shadow a builtin for the tests",
    )

    @field_validator("entry_point")
    @classmethod
    def _entry_point(cls, name: str | None) -> str | None:
        return name if name is None else _identifier(name)

    @field_validator("test_list", "test_imports")
    @classmethod
    def _each_parses(cls, codes: list[str]) -> list[str]:
        return _each_parses(codes)

    @field_validator("test_setup_code")
    @classmethod
    def _setup_parses(cls, code: str) -> str:
        return _parses(code)


class UnitTests(_Strict):
    """A module of unittest.TestCase classes (BigCodeBench): each test method of its TestCases class is one test.

    The module runs after the solution, in the same namespace; `test_imports` run before the solution."""

    kind: Literal["unittest"]
    test: str = Field(max_length=MAX_CODE_CHARS)
    test_imports: list[str] = Field(default_factory=list, max_length=100)

    @field_validator("test")
    @classmethod
    def _test(cls, test: str) -> str:
        return _defines(
            test, ast.ClassDef, "TestCases", "defines no top-level class TestCases (the unittest.TestCase class run)"
        )

    @field_validator("test_imports")
    @classmethod
    def _imports_parse(cls, codes: list[str]) -> list[str]:
        return _each_parses(codes)


class StdioCase(_Strict):
    stdin: str = ""
    expected_stdout: str


class StdioTests(_Strict):
    """Program tests: the solution runs once per case; output compared up to trailing whitespace."""

    kind: Literal["stdio"]
    cases: list[StdioCase] = Field(min_length=1, max_length=MAX_TESTS)


Tests = Annotated[HumanEvalTests | AssertTests | StdioTests | UnitTests, Field(discriminator="kind")]


class EvaluateRequest(_Strict):
    code: str = Field(max_length=MAX_CODE_CHARS, description="the solution program")
    tests: Tests
    timeout_s: float = Field(5.0, gt=0, le=60, description="per test (and for loading the solution)")
    memory_limit_MB: int = Field(1024, ge=64, le=65536)
    python: str | None = _python_field()


class ErrorInfo(BaseModel):
    type: str
    message: str
    step: str


class TestResult(BaseModel):
    name: str
    passed: bool
    status: TestStatus
    error_type: str | None = None
    error_message: str | None = None
    time_ms: float | None = None
    judged_in_process: bool = Field(
        False,
        description="decided inside the solution's process (unittest methods, asserts the judge cannot split): safe "
        "against accidents and simple tricks, not against code written to dig through that process (README)",
    )


class EvaluateResponse(BaseModel):
    status: Literal["Finished", "SandboxError"]
    message: str = ""
    passed_all: bool
    pass_rate: float
    num_tests: int
    num_passed: int
    load_error: ErrorInfo | None = Field(
        None, description="the solution (or its test imports) failed to load: SyntaxError, ImportError, ..."
    )
    tests: list[TestResult]
    restarts: int = Field(0, description="times the harness was started again after the process died mid-test")
    time_ms: float = Field(description="wall time of the evaluation, waiting for a free worker included")
    stderr: str = ""


class EvaluateBatchRequest(_Strict):
    items: list[EvaluateRequest] = Field(min_length=1, max_length=MAX_BATCH)


class EvaluateBatchResponse(BaseModel):
    results: list[EvaluateResponse]


# -- /workflow -------------------------------------------------------------------------------------


class WorkflowProblem(_Strict):
    text: str = Field(max_length=MAX_CODE_CHARS, description="the query, as the graph receives it (`problem`)")
    entry_point: str = Field(description="the function the solution must define")
    public_tests: Tests | None = Field(None, description="what the Test operator runs; scored as `public`")
    hidden_tests: Tests | None = Field(None, description="only scored after the run, as `hidden`")

    @field_validator("entry_point")
    @classmethod
    def _identifier(cls, name: str) -> str:
        if not name.isidentifier():
            raise ValueError(f"{name!r} is not a Python identifier")
        return name


class WorkflowBudgets(_Strict):
    max_operator_calls: int = Field(20, ge=1, le=1000)
    max_worker_tokens: int = Field(32_000, ge=1, description="prompt + completion tokens over all worker calls")
    wall_s: float = Field(
        120.0,
        gt=0,
        le=1800,
        description="the graph's time: waiting on the service for a worker's reply or a free jail slot is not charged "
        "(its CPU time has the same budget)",
    )


class WorkerSampling(_Strict):
    max_tokens: int = Field(1024, ge=1, le=131_072, description="per worker call")
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None


class WorkflowRunRequest(_Strict):
    graph: str = Field(max_length=MAX_CODE_CHARS, description="Python defining class Workflow")
    prompt: str = Field("", max_length=MAX_CODE_CHARS, description="the prompt_custom module (string constants)")
    problem: WorkflowProblem
    worker: str = Field(description="name of an allowlisted worker, given to the graph as llm_config")
    dataset: str = Field("code", description="given to Workflow(dataset=...)")
    budgets: WorkflowBudgets = WorkflowBudgets()
    sampling: WorkerSampling = WorkerSampling()
    test_timeout_s: float = Field(5.0, gt=0, le=60, description="per test, for the Test operator and scoring")
    test_memory_mb: int = Field(1024, ge=64, le=65536)
    memory_mb: int = Field(1024, ge=128, le=65536, description="the workflow process")
    python: str | None = Field(
        None, max_length=64, description="the python the solution is tested with (the Test operator and scoring)"
    )


class WorkflowFailure(BaseModel):
    kind: FailureKind
    message: str
    traceback: str | None = None
    infrastructure: bool = Field(
        False,
        description="the design did not cause it (the sandbox could not judge; the worker timed out, was "
        "unreachable, answered 429/5xx or gibberish): retry the run, never score it",
    )


class WorkerCallRecord(BaseModel):
    worker: str
    prompt: str
    reply: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str | None = None


class TestRunRecord(BaseModel):
    num_tests: int
    num_passed: int
    passed: bool
    failures: list[str]
    time_ms: float


class OperatorCallRecord(BaseModel):
    index: int = Field(description="order of arrival; a refused call has index -1")
    operator: str
    worker: str
    arguments: dict[str, Any]
    result: dict[str, Any] | None = None
    error: str | None = None
    started_s: float = Field(description="since the run started")
    duration_s: float | None = None
    worker_calls: list[WorkerCallRecord] = Field(default_factory=list)
    test_runs: list[TestRunRecord] = Field(default_factory=list)


class WorkerUsage(BaseModel):
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = Field(0.0, description="summed over calls")


class WorkflowRunResponse(BaseModel):
    status: Literal["ok", "failed"]
    failure: WorkflowFailure | None = None
    solution: str | None = None
    public: EvaluateResponse | None = Field(
        None, description="the solution on the public tests (None: no solution or no public tests)"
    )
    hidden: EvaluateResponse | None = None
    public_pass_rate: float | None = None
    hidden_pass_rate: float | None = None
    operator_calls: dict[str, int] = Field(description="accepted calls by operator")
    num_operator_calls: int
    worker: WorkerUsage
    test_runs: int = Field(description="public-test runs made by Test operators")
    trace: list[OperatorCallRecord]
    wall_s: float = Field(description="the workflow's run, scoring excluded")
    stderr: str = Field("", description="tail of what the workflow process wrote to stderr")


class OperatorsResponse(BaseModel):
    operators: list[dict[str, str]]
    text: str = Field(description="the descriptions as the meta-agent's prompt shows them")


# -- /health -----------------------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok", "draining"]
    version: str
    isolation: dict[str, Any] = Field(description="the isolation level in force and how it is made")
    capacity: dict[str, int] = Field(description="workers, busy, waiting, admitted, max_queue")
    limits: dict[str, int] = Field(
        description="max_output_bytes, max_body_bytes, default_memory_mb, max_fetch_bytes, max_eval_s, and as root "
        "run_disk_mb and run_inodes"
    )
    pythons: dict[str, str] = Field(description="name -> interpreter; a request chooses one by name")

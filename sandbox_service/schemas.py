"""Request and response models. /run_code follows SandboxFusion's shape so that verl's reward client works as is."""

from __future__ import annotations

import ast
import base64
import binascii
import keyword
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox_service.jail import safe_relative_path

MAX_CODE_CHARS = 1_000_000
MAX_TESTS = 1000
MAX_BATCH = 512
MAX_TIMEOUT_S = 300.0
CODE_FILE = "main.py"

TestStatus = Literal[
    "Passed", "Failed", "Error", "TimeLimitExceeded", "MemoryLimitExceeded", "OutputLimitExceeded", "Crashed"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _parses(code: str) -> str:
    try:
        ast.parse(code)
    except SyntaxError as e:
        raise ValueError(f"not valid Python: {e.msg} (line {e.lineno})") from None
    return code


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
    fetch_files: list[str] = Field(default_factory=list, description="paths to read back after the run")

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
        for path, content in files.items():
            _check_path(path)
            if str(safe_relative_path(path)) == CODE_FILE:
                raise ValueError(f"{path!r}: the code itself is written to {CODE_FILE}")
            try:
                base64.b64decode(content, validate=True)
            except binascii.Error as e:
                raise ValueError(f"{path!r}: content is not valid base64 ({e})") from None
        return files

    @field_validator("fetch_files")
    @classmethod
    def _fetch(cls, paths: list[str]) -> list[str]:
        for path in paths:
            _check_path(path)
        return paths


def _check_path(path: str) -> None:
    try:
        safe_relative_path(path)
    except ValueError as e:
        raise ValueError(f"{path!r}: {e}") from None


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
        _parses(test)
        if not any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in ast.parse(test).body):
            raise ValueError("defines no top-level check(candidate) function")
        return test

    @field_validator("entry_point")
    @classmethod
    def _entry_point(cls, name: str) -> str:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"{name!r} is not a Python identifier")
        return name


class AssertTests(_Strict):
    """MBPP-style: each entry of test_list is one test (usually one assert)."""

    kind: Literal["asserts"]
    test_list: list[Annotated[str, Field(max_length=MAX_CODE_CHARS)]] = Field(min_length=1, max_length=MAX_TESTS)
    test_setup_code: str = Field("", max_length=MAX_CODE_CHARS)
    test_imports: list[str] = Field(default_factory=list, max_length=100)

    @field_validator("test_list", "test_imports")
    @classmethod
    def _each_parses(cls, codes: list[str]) -> list[str]:
        for i, code in enumerate(codes):
            try:
                _parses(code)
            except ValueError as e:
                raise ValueError(f"entry {i}: {e}") from None
        return codes

    @field_validator("test_setup_code")
    @classmethod
    def _setup_parses(cls, code: str) -> str:
        return _parses(code)


class StdioCase(_Strict):
    stdin: str = ""
    expected_stdout: str


class StdioTests(_Strict):
    """Program tests: the solution runs once per case; output compared up to trailing whitespace."""

    kind: Literal["stdio"]
    cases: list[StdioCase] = Field(min_length=1, max_length=MAX_TESTS)


Tests = Annotated[HumanEvalTests | AssertTests | StdioTests, Field(discriminator="kind")]


class EvaluateRequest(_Strict):
    code: str = Field(max_length=MAX_CODE_CHARS, description="the solution program")
    tests: Tests
    timeout_s: float = Field(5.0, gt=0, le=60, description="per test (and for loading the solution)")
    memory_limit_MB: int = Field(1024, ge=64, le=65536)


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

"""Async client for sandbox_service (its launcher for a local instance is fr_jax.sandbox.local).

fr_jax reaches the sandbox only over HTTP (it never imports sandbox_service), so the service can live on its
own hosts. The client bounds its own concurrency, retries what is worth retrying (429 honouring Retry-After,
5xx, timeouts, dropped connections) with jittered exponential backoff inside a total deadline per call, and
says clearly when the service cannot be reached at all. A 4xx other than 429 is a bad request: it raises
at once with the service's message, which names the offending field.

Results are typed. An Evaluation whose `status` is "SandboxError" means the code could not be judged (the
service was shutting down, the jail failed); it is not a wrong answer, and callers must not score it as one.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

_log = logging.getLogger(__name__)


class SandboxError(RuntimeError):
    """Base class of the client's errors."""


class SandboxUnavailable(SandboxError):
    """The service cannot be reached (nothing listening, or it exited)."""


class SandboxRequestError(SandboxError):
    """The service rejected the request as malformed (4xx other than 429); retrying would not help."""


class SandboxDeadlineExceeded(SandboxError):
    """No answer within the call's total deadline, retries included."""


# -- what to evaluate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HumanEvalTests:
    """A test program defining check(candidate); by default each assert in check() counts as one test."""

    test: str
    entry_point: str
    split_asserts: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "humaneval",
            "test": self.test,
            "entry_point": self.entry_point,
            "split_asserts": self.split_asserts,
        }


@dataclass(frozen=True)
class AssertTests:
    """MBPP-style asserts, each one a test, after the optional imports and setup code. `entry_point`, the function
    under test, is the one name of the solution's the tests may use where it is also a builtin's (MBPP 126's `sum`)."""

    test_list: Sequence[str]
    setup_code: str = ""
    imports: Sequence[str] = ()
    entry_point: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "asserts",
            "test_list": list(self.test_list),
            "test_setup_code": self.setup_code,
            "test_imports": list(self.imports),
            "entry_point": self.entry_point,
        }


@dataclass(frozen=True)
class StdioTests:
    """(stdin, expected stdout) cases; output compared up to trailing whitespace."""

    cases: Sequence[tuple[str, str]]

    def to_json(self) -> dict[str, Any]:
        return {"kind": "stdio", "cases": [{"stdin": i, "expected_stdout": o} for i, o in self.cases]}


@dataclass(frozen=True)
class UnitTests:
    """A module of unittest.TestCase classes (BigCodeBench); each test method of TestCases is one test."""

    test: str
    imports: Sequence[str] = ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": "unittest", "test": self.test, "test_imports": list(self.imports)}


Tests = HumanEvalTests | AssertTests | StdioTests | UnitTests


@dataclass(frozen=True)
class EvalItem:
    """One solution and its tests (POST /evaluate; a list of them for evaluate_batch)."""

    code: str
    tests: Tests
    timeout_s: float = 5.0  # per test
    memory_limit_mb: int = 1024
    python: str | None = None  # one of the service's named pythons (SandboxHealth.pythons); None: its default

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "tests": self.tests.to_json(),
            "timeout_s": self.timeout_s,
            "memory_limit_MB": self.memory_limit_mb,
            "python": self.python,
        }


@dataclass(frozen=True)
class RunCodeJob:
    """One SandboxFusion-style run of a Python program (POST /run_code): `files` land next to it (path -> bytes),
    `fetch_files` come back."""

    code: str
    stdin: str = ""
    run_timeout: float = 10.0
    memory_limit_mb: int = -1  # -1: the service's default
    files: Mapping[str, bytes] = field(default_factory=dict)
    fetch_files: Sequence[str] = ()
    python: str | None = None  # one of the service's named pythons; None: its default

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "language": "python",
            "stdin": self.stdin,
            "run_timeout": self.run_timeout,
            "memory_limit_MB": self.memory_limit_mb,
            "fetch_files": list(self.fetch_files),
            "files": {path: base64.b64encode(data).decode() for path, data in self.files.items()},
            "python": self.python,
        }


@dataclass(frozen=True)
class WorkflowJob:
    """A meta-agent's <graph>/<prompt> run on one query (POST /workflow/run), its operators calling the allowlisted
    worker named `worker` (max_tokens, temperature, top_p and seed apply to every worker call); the solution is then
    scored on the public and hidden tests."""

    graph: str
    prompt: str
    problem: str
    entry_point: str
    worker: str
    public_tests: Tests | None = None
    hidden_tests: Tests | None = None
    max_operator_calls: int = 20
    max_worker_tokens: int = 32_000
    wall_s: float = 120.0
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    dataset: str = "code"
    test_timeout_s: float = 5.0
    test_memory_mb: int = 1024
    memory_mb: int = 1024  # the workflow's own process
    python: str | None = None  # the named python the solution is tested with (Test operator, scoring)

    def to_json(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "prompt": self.prompt,
            "worker": self.worker,
            "dataset": self.dataset,
            "problem": {
                "text": self.problem,
                "entry_point": self.entry_point,
                "public_tests": self.public_tests.to_json() if self.public_tests is not None else None,
                "hidden_tests": self.hidden_tests.to_json() if self.hidden_tests is not None else None,
            },
            "budgets": {
                "max_operator_calls": self.max_operator_calls,
                "max_worker_tokens": self.max_worker_tokens,
                "wall_s": self.wall_s,
            },
            "sampling": {
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "seed": self.seed,
            },
            "test_timeout_s": self.test_timeout_s,
            "test_memory_mb": self.test_memory_mb,
            "memory_mb": self.memory_mb,
            "python": self.python,
        }


# -- what comes back ------------------------------------------------------------------------------------
# The consumer's view of the wire answers (fr_jax must not import sandbox_service's models): flatter than the
# wire where that is handier, with the counts derived from the per-test results. Fields the service may add
# later are ignored.


def _known(cls, fields: Mapping[str, Any]):
    return cls(**{name: fields[name] for name in cls.__dataclass_fields__ if name in fields})


@dataclass(frozen=True)
class TestOutcome:
    __test__ = False  # not a pytest class

    name: str
    passed: bool
    status: str  # Passed | Failed | Error | TimeLimitExceeded | MemoryLimitExceeded | OutputLimitExceeded | Crashed
    error_type: str | None = None
    error_message: str | None = None
    time_ms: float | None = None
    # decided inside the solution's process (unittest methods, asserts the judge cannot split): trustworthy against
    # accidents and simple tricks, not against a solution written to dig through its own process
    judged_in_process: bool = False


@dataclass(frozen=True)
class LoadError:
    type: str  # SyntaxError, ModuleNotFoundError, ...
    message: str
    step: str  # "<solution>" or the test import that failed


@dataclass(frozen=True)
class Evaluation:
    status: str  # "Finished", or "SandboxError": the code could not be judged (not a wrong answer)
    tests: tuple[TestOutcome, ...]
    load_error: LoadError | None = None
    message: str = ""
    restarts: int = 0  # times the harness was restarted after the process died mid-test
    time_ms: float = 0.0
    stderr: str = ""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Evaluation:
        load_error = body.get("load_error")
        return cls(
            status=body["status"],
            tests=tuple(_known(TestOutcome, t) for t in body.get("tests", ())),
            load_error=_known(LoadError, load_error) if load_error else None,
            message=body.get("message", ""),
            restarts=body.get("restarts", 0),
            time_ms=body.get("time_ms", 0.0),
            stderr=body.get("stderr", ""),
        )

    @property
    def sandbox_error(self) -> bool:
        return self.status == "SandboxError"

    @property
    def num_tests(self) -> int:
        return len(self.tests)

    @property
    def num_passed(self) -> int:
        return sum(t.passed for t in self.tests)

    @property
    def pass_rate(self) -> float:
        return self.num_passed / len(self.tests) if self.tests else 0.0

    @property
    def passed_all(self) -> bool:
        return bool(self.tests) and self.num_passed == len(self.tests) and not self.sandbox_error


@dataclass(frozen=True)
class RunCodeResult:
    """/run_code's answer with run_result flattened in; `files` decoded to bytes."""

    status: str  # Success | Failed | SandboxError
    message: str
    run_status: str | None  # Finished | Error | TimeLimitExceeded (None after a SandboxError)
    return_code: int | None
    stdout: str
    stderr: str
    execution_time: float | None
    files: dict[str, bytes]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> RunCodeResult:
        run = body.get("run_result") or {}
        return cls(
            status=body["status"],
            message=body.get("message", ""),
            run_status=run.get("status"),
            return_code=run.get("return_code"),
            stdout=run.get("stdout", ""),
            stderr=run.get("stderr", ""),
            execution_time=run.get("execution_time"),
            files={path: base64.b64decode(data) for path, data in (body.get("files") or {}).items()},
        )


@dataclass(frozen=True)
class SandboxHealth:
    """GET /health: whether the service serves, the isolation in force, its capacity and limits, and the pythons a
    request may name."""

    status: str  # "ok" | "draining"
    version: str
    isolation: dict[str, Any]  # level ("full" | "namespaces" | "none") and how it is made
    capacity: dict[str, int]  # workers, busy, waiting, admitted, max_queue
    limits: dict[str, int]
    pythons: dict[str, str]  # name -> interpreter path

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> SandboxHealth:
        return _known(cls, body)


# -- the client -----------------------------------------------------------------------------------------


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("message") or body.get("detail") or body)
    except (ValueError, AttributeError):
        return response.text[:500]


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


AUTH_TOKEN_ENV = "SANDBOX_AUTH_TOKEN"  # the service's bearer token, sent with every request when set


class SandboxClient:
    """Async client of one sandbox_service. Use as `async with SandboxClient(url) as client: ...`. A service
    started with $SANDBOX_AUTH_TOKEN gets it as a bearer token (`token`, by default that same variable)."""

    def __init__(
        self,
        base_url: str,
        *,
        max_concurrency: int = 32,
        request_timeout_s: float = 300.0,
        deadline_s: float = 900.0,
        unreachable_after_s: float = 15.0,
        backoff_s: float = 0.1,
        max_backoff_s: float = 10.0,
        batch_size: int = 64,
        token: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.request_timeout_s, self.deadline_s = request_timeout_s, deadline_s
        self.unreachable_after_s = unreachable_after_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.batch_size = batch_size
        self.stats: Counter[str] = Counter()  # requests, retries_{429,5xx,timeout,transport,connect}
        self._semaphore = asyncio.Semaphore(max_concurrency)
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        token = token if token is not None else os.environ.get(AUTH_TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url, limits=limits, timeout=request_timeout_s, headers=headers
        )

    async def __aenter__(self) -> SandboxClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self) -> SandboxHealth:
        return SandboxHealth.from_json(await self._request("GET", "/health"))

    async def run_code(self, code: str, **options: Any) -> RunCodeResult:
        """Run a Python program; `options` are RunCodeJob's fields (stdin, run_timeout, files, ...)."""
        job = RunCodeJob(code, **options)
        return RunCodeResult.from_json(await self._request("POST", "/run_code", job.to_json()))

    async def evaluate(self, code: str, tests: Tests, **options: Any) -> Evaluation:
        """Judge one solution; `options` are EvalItem's fields (timeout_s, memory_limit_mb, ...)."""
        item = EvalItem(code, tests, **options)
        return Evaluation.from_json(await self._request("POST", "/evaluate", item.to_json()))

    async def evaluate_batch(self, items: Sequence[EvalItem]) -> list[Evaluation]:
        """Results in the order of `items`; large lists go out as concurrent requests of batch_size items."""
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]

        async def send(chunk: Sequence[EvalItem]) -> list[Evaluation]:
            body = await self._request("POST", "/evaluate/batch", {"items": [item.to_json() for item in chunk]})
            results = [Evaluation.from_json(r) for r in body["results"]]
            if len(results) != len(chunk):
                raise SandboxError(f"/evaluate/batch answered {len(results)} results for {len(chunk)} items")
            return results

        answers = await asyncio.gather(*(send(chunk) for chunk in chunks))
        return [result for answer in answers for result in answer]

    async def workflow_operators(self) -> WorkflowOperators:
        """The operator library's descriptions (GET /workflow/operators); `text` goes into the meta-agent's prompt."""
        return WorkflowOperators.from_json(await self._request("GET", "/workflow/operators"))

    async def run_workflow(self, graph: str, prompt: str, **options: Any) -> WorkflowRun:
        """Run a meta-agent's <graph>/<prompt> in the service's jail and score its solution; `options` are
        WorkflowJob's fields (problem, entry_point and worker are required)."""
        job = WorkflowJob(graph, prompt, **options)
        return WorkflowRun.from_json(await self._request("POST", "/workflow/run", job.to_json()))

    def _backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    async def _request(self, method: str, path: str, payload: dict | None = None) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        unreachable_since: float | None = None
        last, attempt = "no attempt made", 0
        async with self._semaphore:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise SandboxDeadlineExceeded(
                        f"{method} {self.base_url}{path}: no answer within {self.deadline_s} s "
                        f"({attempt} attempts); last problem: {last}"
                    )
                self.stats["requests"] += 1
                delay = self._backoff(attempt)
                try:
                    response = await self._http.request(
                        method, path, json=payload, timeout=min(self.request_timeout_s, remaining)
                    )
                except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                    unreachable_since = unreachable_since if unreachable_since is not None else loop.time()
                    if loop.time() - unreachable_since >= self.unreachable_after_s:
                        raise SandboxUnavailable(
                            f"cannot reach the sandbox service at {self.base_url} for {self.unreachable_after_s:g} s "
                            f"({type(e).__name__}: {e}); start it with `python -m sandbox_service` or LocalSandbox"
                        ) from e
                    self.stats["retries_connect"] += 1
                    last = f"connection failed: {e}"
                except httpx.TransportError as e:  # timeouts, connections dropped mid-request
                    unreachable_since = None
                    self.stats["retries_timeout" if isinstance(e, httpx.TimeoutException) else "retries_transport"] += 1
                    last = f"{type(e).__name__}: {e}"
                else:
                    unreachable_since = None
                    status = response.status_code
                    if status < 400:
                        return response.json()
                    last = f"HTTP {status}: {_message(response)}"
                    if status == 429 or status >= 500:
                        self.stats["retries_429" if status == 429 else "retries_5xx"] += 1
                        hinted = _retry_after_s(response)
                        delay = hinted + random.uniform(0, 0.1 * hinted + 0.05) if hinted is not None else delay
                    else:
                        raise SandboxRequestError(f"{method} {path} was rejected: {last}")
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                attempt += 1


# -- workflows (POST /workflow/run) ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkflowOperators:
    operators: tuple[dict[str, str], ...]  # name, signature, description, usage
    text: str  # the descriptions as the meta-agent's prompt shows them

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> WorkflowOperators:
        return cls(operators=tuple(body["operators"]), text=body["text"])


@dataclass(frozen=True)
class WorkflowFailure:
    # graph_syntax_error | workflow_exception | budget_exceeded | timeout | worker_unreachable | worker_not_allowed |
    # worker_error | no_solution | sandbox_error
    kind: str
    message: str
    traceback: str | None = None
    # the design did not cause it (the sandbox could not judge; the worker timed out, was unreachable, answered
    # 429/5xx or gibberish): retry the run, never score it
    infrastructure: bool = False


@dataclass(frozen=True)
class WorkerCall:
    worker: str
    prompt: str
    reply: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str | None = None


@dataclass(frozen=True)
class TestRun:
    """One run of the public tests by a Test operator."""

    __test__ = False  # not a pytest class

    num_tests: int
    num_passed: int
    passed: bool
    failures: tuple[str, ...]
    time_ms: float


@dataclass(frozen=True)
class OperatorCall:
    index: int  # order of arrival; -1: refused (budget spent, run over, bad worker)
    operator: str
    worker: str
    arguments: dict[str, Any]
    started_s: float  # since the workflow started
    duration_s: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    worker_calls: tuple[WorkerCall, ...] = ()
    test_runs: tuple[TestRun, ...] = ()

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> OperatorCall:
        calls = tuple(_known(WorkerCall, call) for call in body.get("worker_calls", ()))
        runs = tuple(_known(TestRun, {**run, "failures": tuple(run["failures"])}) for run in body.get("test_runs", ()))
        return _known(cls, {**body, "worker_calls": calls, "test_runs": runs})


@dataclass(frozen=True)
class WorkerUsage:
    calls: int
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # summed over calls


@dataclass(frozen=True)
class WorkflowRun:
    """A workflow's run: `failure` is None when it returned a solution, which was then scored."""

    failure: WorkflowFailure | None
    solution: str | None
    public: Evaluation | None  # None: no solution, or the query has no public tests
    hidden: Evaluation | None
    operator_calls: dict[str, int]  # accepted calls by operator
    worker: WorkerUsage
    test_runs: int  # public-test runs made by Test operators
    trace: tuple[OperatorCall, ...]
    wall_s: float  # the workflow's run, scoring excluded
    stderr: str = ""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> WorkflowRun:
        failure, public, hidden = body.get("failure"), body.get("public"), body.get("hidden")
        return cls(
            failure=_known(WorkflowFailure, failure) if failure else None,
            solution=body.get("solution"),
            public=Evaluation.from_json(public) if public else None,
            hidden=Evaluation.from_json(hidden) if hidden else None,
            operator_calls=dict(body["operator_calls"]),
            worker=_known(WorkerUsage, body["worker"]),
            test_runs=body["test_runs"],
            trace=tuple(OperatorCall.from_json(r) for r in body["trace"]),
            wall_s=body["wall_s"],
            stderr=body.get("stderr", ""),
        )

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def num_operator_calls(self) -> int:
        return sum(self.operator_calls.values())

    @property
    def public_pass_rate(self) -> float | None:
        return self.public.pass_rate if self.public is not None else None

    @property
    def hidden_pass_rate(self) -> float | None:
        return self.hidden.pass_rate if self.hidden is not None else None

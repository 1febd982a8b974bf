"""POST /workflow/run: run a model-written Workflow in the jail, its operator calls performed by the service.

The graph never runs in this process. It runs in the same jail as /evaluate (workflow_runtime.py is the jailed
side), and each operator call crosses the run's channel as one JSON line. The service binds the call against the
operator library (operators.py), performs it (worker LLM calls over HTTP, public-test runs in a separate jail)
and answers, counting everything on its own side, so a graph can neither skip the accounting nor reach a worker
except by name: workers are an allowlist fixed at start-up (workers.py), never a URL from a request.

Budgets: operator calls are counted as they arrive, and a worker call reserves its most possible tokens (its
prompt's bytes, the chat template's allowance and max_tokens) before it is made, so calls in parallel cannot
overshoot the token budget together; the first call past a budget ends the run (budget_exceeded), and so does a
worker other than the one the request named (worker_not_allowed). Wall time is charged while the graph runs, not
while it waits on the service for a worker's reply or a free jail slot (the service's load is not the design's
doing); the graph's CPU time has the same budget, and a hard cap bounds the run with the waits.

A failure the design did not cause is marked `infrastructure` (the sandbox could not judge; the worker timed out,
was unreachable, answered 429 or 5xx or gibberish): it says nothing about the design and must be retried, never
scored. A finished workflow's solution is then scored on the query's public and hidden tests (the /evaluate judge),
with per-test feedback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from sandbox_service.channel import Malformed, parse_off_loop, read_line
from sandbox_service.jail import Jail, Limits, RunOutcome
from sandbox_service.judge import Judge
from sandbox_service.operators import OPERATORS, OperatorError, TestFeedback, bind_arguments, call_operator
from sandbox_service.schemas import (
    MAX_CODE_CHARS,
    EvaluateRequest,
    EvaluateResponse,
    OperatorCallRecord,
    TestRunRecord,
    WorkerCallRecord,
    WorkerSampling,
    WorkerUsage,
    WorkflowFailure,
    WorkflowRunRequest,
    WorkflowRunResponse,
)
from sandbox_service.workers import WorkerEndpoint

_log = logging.getLogger(__name__)

RUNTIME_SOURCE = (Path(__file__).parent / "workflow_runtime.py").read_text()
MAX_MESSAGE_BYTES = 4 << 20  # one line on the operator channel
MAX_MESSAGE_DEPTH = 16
MAX_IN_FLIGHT = 64  # operator calls of one run being performed at once
MAX_IN_FLIGHT_BYTES = 16 << 20  # and their messages' bytes
MAX_REFUSED_CALLS = 100  # calls with bad arguments do not count as operator calls, but are not free either
MAX_TRACE_CHARS = 16_000  # per text in the trace (prompts, replies, arguments)
START_TIMEOUT_S = 30.0  # for the runtime to report ready (python's start-up, not the design's time)
TEMPLATE_TOKENS = 128  # what a chat template may add to a prompt, reserved with it (a token is at least a byte)
_STDERR_TAIL = 4000


# -- one run ----------------------------------------------------------------------------------------------------


_INFRASTRUCTURE = ("sandbox_error", "worker_unreachable")  # kinds that are never the design's doing


class _Fatal(Exception):
    """Ends the run: the jailed side is told, exits, and the response carries this failure (`infrastructure`:
    the design did not cause it; by default, for the kinds that never are)."""

    def __init__(self, kind: str, message: str, infrastructure: bool | None = None):
        super().__init__(message)
        infrastructure = kind in _INFRASTRUCTURE if infrastructure is None else infrastructure
        self.failure = WorkflowFailure(kind=kind, message=message, infrastructure=infrastructure)


class _BudgetClock:
    """The workflow's wall-time budget: it runs while the graph runs, and stops while at least one of the graph's
    operator calls waits on the service (a worker's reply, a free jail slot, its turn to run tests)."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.started: float | None = None
        self.waits, self.paused_at, self.paused_s = 0, 0.0, 0.0

    def start(self) -> None:
        self.started = time.monotonic()

    def charged(self) -> float:
        if self.started is None:
            return 0.0
        now = time.monotonic()
        return now - self.started - self.paused_s - (now - self.paused_at if self.waits else 0.0)

    def pause(self, waiting: bool) -> None:
        """waiting=True when a wait on the service begins, False when it ends (Jail.run's on_queue)."""
        now = time.monotonic()
        if waiting:
            if self.waits == 0:
                self.paused_at = now
            self.waits += 1
        else:
            self.waits -= 1
            if self.waits == 0:
                self.paused_s += now - self.paused_at

    @contextlib.contextmanager
    def waiting(self):
        self.pause(True)
        try:
            yield
        finally:
            self.pause(False)

    async def expired(self) -> None:
        """Returns once the budget is spent."""
        while (remaining := self.budget_s - self.charged()) > 0:
            await asyncio.sleep(max(remaining, 0.05))


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_TRACE_CHARS:
        return value[:MAX_TRACE_CHARS] + f"...[{len(value) - MAX_TRACE_CHARS} more characters]"
    if isinstance(value, list):
        return [_clip(item) for item in value]
    if isinstance(value, dict):
        return {key: _clip(item) for key, item in value.items()}
    return value


class _CallServices:
    """What one operator call may do (operators.Services), charged to its run and recorded in its trace entry."""

    def __init__(self, run: _Run, worker: str, record: OperatorCallRecord):
        self.run, self.worker, self.record = run, worker, record

    async def ask_worker(self, prompt: str) -> str:
        return await self.run.ask_worker(self.worker, prompt, self.record)

    async def run_public_tests(self, solution: str) -> TestFeedback | None:
        return await self.run.run_public_tests(solution, self.record)


class _Run:
    """The service side of one workflow run: serves the channel, performs and accounts for operator calls."""

    def __init__(self, runner: WorkflowRunner, request: WorkflowRunRequest, client: httpx.AsyncClient):
        self.runner, self.request, self.client = runner, request, client
        self.clock = _BudgetClock(request.budgets.wall_s)
        self.reserved = 0  # worker tokens reserved by calls in flight
        self.test_turn = asyncio.Lock()  # the run was admitted for one test run at a time
        self.calls: collections.Counter[str] = collections.Counter()
        self.trace: list[OperatorCallRecord] = []
        self.usage = WorkerUsage()
        self.test_runs = 0
        self.fatal: WorkflowFailure | None = None
        self.final: dict[str, Any] | None = None

    # channel ----------------------------------------------------------------------------------------------
    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Wait for the runtime to be ready (its start-up is not the design's time), then read the graph's messages
        and answer them until it is done, its budget is spent or it breaks a bound; a malformed message or a bound
        broken ends the run with a failure kind, never an error of the service."""
        tasks: dict[asyncio.Task, int] = {}  # operator calls in flight -> their message's size
        reading = watchdog = None
        try:
            try:
                first = await asyncio.wait_for(read_line(reader), START_TIMEOUT_S)
            except TimeoutError:
                raise _Fatal(
                    "sandbox_error",
                    f"the workflow runtime did not start within {START_TIMEOUT_S:g} s (host overloaded?)",
                ) from None
            if first is None or _decode(await parse_off_loop(first, MAX_MESSAGE_DEPTH)).get("ready") is not True:
                raise Malformed("the runtime's first message is not ready")
            self.clock.start()
            reading = asyncio.ensure_future(self._read(reader, writer, tasks))
            watchdog = asyncio.ensure_future(self.clock.expired())
            await asyncio.wait({reading, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                raise _Fatal("timeout", f"the workflow ran past its budget of wall_s={self.request.budgets.wall_s} s")
            reading.result()
        except Malformed as e:
            self._end(
                _Fatal(
                    "workflow_exception",
                    f"malformed message on the operator channel ({e}): did the graph write to the channel itself?",
                )
            )
            await _send(writer, {"fatal": self.fatal.kind})
        except _Fatal as fatal:
            self._end(fatal)
            await _send(writer, {"fatal": self.fatal.kind})
        finally:
            for task in [t for t in (reading, watchdog) if t is not None] + list(tasks):
                task.cancel()  # the jailed side is gone or told to stop: nobody will read these answers
            await asyncio.gather(*tasks, *(t for t in (reading, watchdog) if t is not None), return_exceptions=True)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tasks: dict) -> None:
        most = self.request.budgets.max_operator_calls + MAX_REFUSED_CALLS + 1
        for count in itertools.count(1):
            line = await read_line(reader)
            if line is None:
                return
            if count > most:
                raise _Fatal("budget_exceeded", f"more than {most} messages on the operator channel")
            message = _decode(await parse_off_loop(line, MAX_MESSAGE_DEPTH))
            if message.get("done") is True:
                self.final = self.final or message
                continue
            if len(tasks) >= MAX_IN_FLIGHT or sum(tasks.values()) + len(line) > MAX_IN_FLIGHT_BYTES:
                raise _Fatal(
                    "budget_exceeded",
                    f"over {MAX_IN_FLIGHT} operator calls or {MAX_IN_FLIGHT_BYTES >> 20} MiB of them in flight",
                )
            task = asyncio.ensure_future(self._answer(message, writer))
            tasks[task] = len(line)
            task.add_done_callback(lambda done: tasks.pop(done, None))

    async def _answer(self, message: dict, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._operator_call(message)
        except _Fatal as fatal:
            self._end(fatal)
            reply = {"id": message["id"], "fatal": self.fatal.kind}
        except Exception as e:  # noqa: BLE001 - a bug on our side: logged, and the run reports it
            _log.exception("operator call %s failed", message.get("op"))
            self._end(
                _Fatal("sandbox_error", f"internal error in operator {message.get('op')!r}: {type(e).__name__}: {e}")
            )
            reply = {"id": message["id"], "fatal": self.fatal.kind}
        await _send(writer, reply)

    def _elapsed(self) -> float:
        """Wall time since the graph started (waits included: this is the trace's time line, not the budget)."""
        return time.monotonic() - self.clock.started if self.clock.started is not None else 0.0

    def _end(self, fatal: _Fatal) -> None:
        if self.fatal is None:  # the first cause is the one reported
            self.fatal = fatal.failure

    async def _operator_call(self, message: dict) -> dict:
        op, worker = str(message.get("op")), message.get("worker")
        args, kwargs = message.get("args", []), message.get("kwargs", {})
        if len(self.trace) >= self.request.budgets.max_operator_calls + MAX_REFUSED_CALLS:
            raise _Fatal("budget_exceeded", f"more than {MAX_REFUSED_CALLS} operator calls were refused")
        record = OperatorCallRecord(index=-1, operator=op, worker=str(worker), arguments={}, started_s=self._elapsed())
        self.trace.append(record)
        if self.fatal is not None:
            record.error = f"refused: the run already ended ({self.fatal.kind})"
            raise _Fatal(self.fatal.kind, self.fatal.message)
        if worker != self.request.worker:
            record.error = f"worker {worker!r} is not the one this run's request named"
            raise _Fatal(
                "worker_not_allowed",
                f"{op} called worker {worker!r}; this run may call only {self.request.worker!r}, the worker its "
                "request named",
            )
        try:
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise OperatorError(f"{op}: malformed call (args must be a list, kwargs an object)")
            arguments = bind_arguments(op, args, kwargs)
        except OperatorError as e:
            record.error = str(e)
            return {"id": message["id"], "error": str(e)}
        record.arguments = _clip(arguments)
        if sum(self.calls.values()) >= self.request.budgets.max_operator_calls:
            record.error = "refused: operator-call budget spent"
            raise _Fatal(
                "budget_exceeded",
                f"{op}: more than max_operator_calls={self.request.budgets.max_operator_calls} operator calls",
            )
        record.index = sum(self.calls.values())
        self.calls[op] += 1
        try:
            result = await call_operator(op, _CallServices(self, worker, record), arguments)
        except OperatorError as e:
            record.error = str(e)
            return {"id": message["id"], "error": str(e)}
        except asyncio.CancelledError:
            record.error = "cancelled: the run ended while this call was in flight"
            raise
        except _Fatal as fatal:
            record.error = fatal.failure.message
            raise
        finally:
            record.duration_s = self._elapsed() - record.started_s
        record.result = _clip(result)
        usage = {
            "prompt_tokens": sum(call.prompt_tokens for call in record.worker_calls),
            "completion_tokens": sum(call.completion_tokens for call in record.worker_calls),
        }
        return {"id": message["id"], "result": result, "usage": usage}

    # services -----------------------------------------------------------------------------------------------
    async def ask_worker(self, worker: str, prompt: str, record: OperatorCallRecord) -> str:
        budget = self.request.budgets.max_worker_tokens
        reservation = len(prompt.encode()) + TEMPLATE_TOKENS + self.request.sampling.max_tokens
        used = self.usage.prompt_tokens + self.usage.completion_tokens
        if used + self.reserved + reservation > budget:
            raise _Fatal(
                "budget_exceeded",
                f"{record.operator}: a worker call may take {reservation} tokens, and {used} are used and "
                f"{self.reserved} reserved by calls in flight, of max_worker_tokens={budget}",
            )
        self.reserved += reservation
        try:
            with self.clock.waiting():
                completion = await self.runner.complete(self.client, worker, prompt, self.request.sampling)
        finally:
            self.reserved -= reservation
        record.worker_calls.append(completion)
        self.usage.calls += 1
        self.usage.prompt_tokens += completion.prompt_tokens
        self.usage.completion_tokens += completion.completion_tokens
        self.usage.latency_s += completion.latency_s
        used = self.usage.prompt_tokens + self.usage.completion_tokens
        if used > budget:
            raise _Fatal(
                "budget_exceeded",
                f"{record.operator}: worker calls used {used} tokens, over max_worker_tokens={budget}",
            )
        return completion.reply

    async def run_public_tests(self, solution: str, record: OperatorCallRecord) -> TestFeedback | None:
        tests = self.request.problem.public_tests
        if tests is None:
            return None
        if self.runner.jail.workers < 2:
            raise _Fatal(
                "sandbox_error",
                "the Test operator needs a second jail slot while the workflow holds one: "
                "start the service with --workers 2 or more",
            )
        if len(solution) > MAX_CODE_CHARS:
            raise OperatorError(f"Test: the solution has {len(solution)} characters, over {MAX_CODE_CHARS}")
        with self.clock.waiting():
            await self.test_turn.acquire()
        try:
            response = await self.runner.score_solution(solution, tests, self.request, on_queue=self.clock.pause)
        finally:
            self.test_turn.release()
        if response.status != "Finished":
            raise _Fatal("sandbox_error", f"running the public tests failed: {response.message}")
        self.test_runs += 1
        failures = [
            f"{t.name}: {t.status}" + (f" ({t.error_type}: {t.error_message})" if t.error_type else "")
            for t in response.tests
            if not t.passed
        ]
        if response.load_error is not None:
            failures.insert(0, f"the solution did not load: {response.load_error.type}: {response.load_error.message}")
        record.test_runs.append(
            TestRunRecord(
                num_tests=response.num_tests,
                num_passed=response.num_passed,
                passed=response.passed_all,
                failures=_clip(failures),
                time_ms=response.time_ms,
            )
        )
        return TestFeedback(response.passed_all, response.num_tests, response.num_passed, tuple(failures))

    # outcome ------------------------------------------------------------------------------------------------
    def failure(self, outcome: RunOutcome, limits: Limits) -> WorkflowFailure | None:
        if self.fatal is not None:
            return self.fatal
        if outcome.cpu_limit_hit:
            return WorkflowFailure(
                kind="timeout", message=f"the workflow's CPU time ran past wall_s={self.request.budgets.wall_s} s"
            )
        if outcome.killed_for == "timeout":  # the hard cap: the budget was not spent, so waiting on the service was
            return WorkflowFailure(
                kind="sandbox_error",
                message=f"the run waited on workers and jail slots past the service's cap of {limits.wall_s:g} s",
                infrastructure=True,
            )
        if outcome.killed_for == "shutdown":
            return WorkflowFailure(
                kind="sandbox_error", message="the service is shutting down; the run was killed", infrastructure=True
            )
        final = self.final
        if final is None:
            if outcome.sandbox_error:
                return WorkflowFailure(kind="sandbox_error", message=outcome.sandbox_error, infrastructure=True)
            if outcome.oom_killed:
                why = f"killed by the memory limit ({limits.memory_mb} MiB)"
            elif outcome.killed_for == "output_limit":
                why = f"killed for writing more than {limits.output_bytes} bytes to stdout or stderr"
            else:
                why = f"exited (status {outcome.exit_code}) without returning"
            return WorkflowFailure(
                kind="workflow_exception",
                message=f"the workflow process {why}",
                traceback=_tail(outcome.stderr) or None,
            )
        status = final.get("status")
        if status == "ok":
            if isinstance(final.get("solution"), str):
                return None
            return WorkflowFailure(kind="workflow_exception", message="the workflow process reported no solution text")
        if status not in ("graph_syntax_error", "workflow_exception", "no_solution"):
            return WorkflowFailure(kind="workflow_exception", message=f"the workflow process reported {status!r}")
        traceback = final.get("traceback")
        return WorkflowFailure(
            kind=status,
            message=str(final.get("message", "")),
            traceback=traceback if isinstance(traceback, str) else None,
        )


def _decode(message: Any) -> dict:
    """An operator call, the runtime's ready or its final report; Malformed otherwise."""
    if not isinstance(message, dict) or not (
        message.get("done") is True or message.get("ready") is True or type(message.get("id")) is int
    ):
        raise Malformed("neither an operator call nor the runtime's report")
    return message


async def _send(writer: asyncio.StreamWriter, message: dict) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):  # the jailed side may already be gone
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()


def _tail(data: bytes) -> str:
    return data[-_STDERR_TAIL:].decode(errors="replace")


# -- the runner ---------------------------------------------------------------------------------------------------


class WorkflowRunner:
    """Runs workflows in `jail` with `python` (the graph runtime needs only the standard library), scores their
    solutions with `judge`, and lets their operators call the allowlisted `workers`."""

    def __init__(
        self,
        jail: Jail,
        judge: Judge,
        workers: Mapping[str, WorkerEndpoint],
        *,
        python: str,
        output_bytes: int,
        worker_timeout_s: float = 120.0,
        max_wait_s: float = 600.0,
    ):
        self.jail, self.judge, self.workers = jail, judge, dict(workers)
        self.python, self.output_bytes = python, output_bytes
        self.worker_timeout_s = worker_timeout_s  # a worker call unanswered this long: the worker failed
        self.max_wait_s = max_wait_s  # the most a run may spend waiting on the service, past its own budget
        # A running graph holds one jail slot and its Test calls need another: leave one slot for them.
        self.graphs = asyncio.Semaphore(max(1, jail.workers - 1))

    async def run(self, request: WorkflowRunRequest) -> WorkflowRunResponse:
        started = time.monotonic()
        if request.worker not in self.workers:
            failure = WorkflowFailure(
                kind="worker_not_allowed",
                message=f"worker {request.worker!r} is not on this service's allowlist {sorted(self.workers)}",
            )
            return _response(failure, None, started, trace=[], calls={}, usage=WorkerUsage(), test_runs=0)
        limits = Limits(
            wall_s=START_TIMEOUT_S + request.budgets.wall_s + self.max_wait_s,  # the hard cap, waits included
            cpu_s=request.budgets.wall_s,
            memory_mb=request.memory_mb,
            output_bytes=self.output_bytes,
        )
        spec = {
            "graph": request.graph,
            "prompt": request.prompt,
            "problem": request.problem.text,
            "entry_point": request.problem.entry_point,
            "worker": request.worker,
            "dataset": request.dataset,
            "operators": list(OPERATORS),
        }
        async with httpx.AsyncClient() as client, self.graphs:
            run = _Run(self, request, client)
            outcome = await self.jail.run(
                [self.python, "-c", RUNTIME_SOURCE],
                limits,
                stdin=json.dumps(spec).encode(),
                channel=run.serve,
                channel_line_limit=MAX_MESSAGE_BYTES,
                label="workflow",
            )
        failure = run.failure(outcome, limits)
        solution = run.final.get("solution") if failure is None and run.final else None
        public = hidden = None
        if failure is None and len(solution) > MAX_CODE_CHARS:
            failure = WorkflowFailure(
                kind="workflow_exception", message=f"the solution has {len(solution)} characters, over {MAX_CODE_CHARS}"
            )
        if failure is None:
            public, hidden = await asyncio.gather(
                *(
                    self.score_solution(solution, tests, request) if tests is not None else _none()
                    for tests in (request.problem.public_tests, request.problem.hidden_tests)
                )
            )
            broken = [r.message for r in (public, hidden) if r is not None and r.status != "Finished"]
            if broken:
                failure = WorkflowFailure(kind="sandbox_error", message=f"scoring the solution failed: {broken[0]}")
        return _response(
            failure,
            solution,
            started,
            trace=run.trace,
            calls=dict(run.calls),
            usage=run.usage,
            test_runs=run.test_runs,
            public=public,
            hidden=hidden,
            wall_s=outcome.wall_s,
            stderr=_tail(outcome.stderr),
        )

    async def score_solution(
        self,
        solution: str,
        tests: Any,
        request: WorkflowRunRequest,
        on_queue: Callable[[bool], None] | None = None,
    ) -> EvaluateResponse:
        evaluation = EvaluateRequest(
            code=solution,
            tests=tests,
            timeout_s=request.test_timeout_s,
            memory_limit_MB=request.test_memory_mb,
            python=request.python,
        )
        return await self.judge.judge(evaluation, on_queue=on_queue)

    async def complete(
        self, client: httpx.AsyncClient, worker: str, prompt: str, sampling: WorkerSampling
    ) -> WorkerCallRecord:
        """One chat completion from an allowlisted worker; _Fatal when it cannot be had. A worker that cannot be
        reached, does not answer within worker_timeout_s, answers 429 or 5xx or a reply without choices and usage
        has failed, not the design: those failures are marked infrastructure."""
        endpoint = self.workers[worker]
        body: dict[str, Any] = {
            "model": endpoint.model or endpoint.name,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        headers = {}
        if endpoint.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(endpoint.api_key_env, '')}"
        started = time.monotonic()
        try:
            response = await client.post(
                f"{endpoint.url}/chat/completions",
                json=body,
                headers=headers,
                timeout=httpx.Timeout(self.worker_timeout_s, connect=min(self.worker_timeout_s, 10.0)),
            )
        except httpx.TimeoutException:
            raise _Fatal(
                "worker_unreachable",
                f"worker {worker!r} at {endpoint.url} did not answer within {self.worker_timeout_s:g} s",
            ) from None
        except httpx.HTTPError as e:
            raise _Fatal(
                "worker_unreachable", f"worker {worker!r} at {endpoint.url}: {type(e).__name__}: {e}"
            ) from None
        latency = time.monotonic() - started
        if response.status_code != 200:
            overloaded = response.status_code in (408, 429) or response.status_code >= 500
            raise _Fatal(
                "worker_error",
                f"worker {worker!r} answered HTTP {response.status_code}: {response.text[:500]}",
                infrastructure=overloaded,  # a 4xx other than these: the request (say, a prompt too long) was bad
            )
        try:
            document = response.json()
            choice = document["choices"][0]
            reply = choice["message"]["content"] or ""
            prompt_tokens = int(document["usage"]["prompt_tokens"])
            completion_tokens = int(document["usage"]["completion_tokens"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Fatal(
                "worker_error",
                f"worker {worker!r} sent a reply without choices[0].message.content and "
                f"usage ({type(e).__name__}: {e}): {response.text[:500]}",
                infrastructure=True,
            ) from None
        return WorkerCallRecord(
            worker=worker,
            prompt=_clip(prompt),
            reply=_clip(reply),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=latency,
            finish_reason=choice.get("finish_reason"),
        )


async def _none() -> None:
    return None


def _response(
    failure: WorkflowFailure | None,
    solution: str | None,
    started: float,
    *,
    trace,
    calls,
    usage,
    test_runs,
    public: EvaluateResponse | None = None,
    hidden: EvaluateResponse | None = None,
    wall_s: float | None = None,
    stderr: str = "",
) -> WorkflowRunResponse:
    return WorkflowRunResponse(
        status="ok" if failure is None else "failed",
        failure=failure,
        solution=solution,
        public=public,
        hidden=hidden,
        public_pass_rate=public.pass_rate if public is not None else None,
        hidden_pass_rate=hidden.pass_rate if hidden is not None else None,
        operator_calls=calls,
        num_operator_calls=sum(calls.values()),
        worker=usage,
        test_runs=test_runs,
        trace=trace,
        wall_s=wall_s if wall_s is not None else time.monotonic() - started,
        stderr=stderr,
    )

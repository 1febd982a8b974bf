"""/evaluate's verdicts: run the harness on a plan (plans.py) in the jail, read its records, decide every test.

The harness (harness.py) only reports; the decisions are made here. A judged test's probe values are decoded
(values.py) and its assert evaluated by the judge (verdicts.py); an in-process test's outcome is taken as the
harness reported it and marked `judged_in_process`; a stdio case's output is compared here with the expected
output, which never enters the jail.

Records come from the harness's supervisor, which the solution's process cannot write to: each carries the run's
nonce, and only such records count as progress. Time is accounted so that the host's load is not the solution's
fault: the harness's start-up has its own allowance (a start that never reports "ready" is retried, then a
SandboxError), steps are timed in CPU by the harness, and the evaluation as a whole has a wall-clock budget
(`max_eval_s`) however many tests it has. If the jailed process dies during a test (os._exit, a kill by the memory
cgroup, a blown output cap, a hang past the step's backstop), that test gets the cause and the harness is started
again from the next test, up to MAX_RESTARTS times, so that one test never hides the others.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from sandbox_service.channel import INLINE_BYTES, Malformed, parse, read_exactly, read_line
from sandbox_service.jail import Jail, Limits, RunOutcome
from sandbox_service.plans import Plan, build_plan
from sandbox_service.pythons import python_path
from sandbox_service.schemas import MAX_TESTS, ErrorInfo, EvaluateRequest, EvaluateResponse, TestResult, TestStatus
from sandbox_service.values import BadValue, decode, show
from sandbox_service.verdicts import ProbeFailed, judge

HARNESS_SOURCE = (Path(__file__).parent / "harness.py").read_text()
MAX_RESTARTS = 3
START_RETRIES = 2  # harness start-ups that never reported "ready" (a loaded host), tried again before SandboxError
STALL_S = 10.0  # without a record (the harness sends a heartbeat every second), the harness counts as stalled
MAX_HEADER_BYTES = 4096
MAX_ANSWER_BYTES = 4 << 20  # one step's answer (the probes' values)
MAX_ITEMS = 200_000  # items in one probe's value
_STDERR_TAIL = 2000
_STATUSES = set(get_args(TestStatus))


@dataclass
class _Reading:
    """What one harness run reported, read from its channel."""

    nonce: str
    window_s: float
    deadline: float | None  # monotonic: the end of the evaluation's budget (None: budget_s from "ready" on)
    budget_s: float
    start_s: float  # for the harness to report "ready": python's start-up, not the solution's time
    ready: bool = False
    ready_after_s: float = 0.0  # the harness's start-up, which is not the solution's time
    steps: list[tuple[dict, bytes]] = field(default_factory=list)
    died: dict | None = None
    done: bool = False
    stalled: bool = False
    out_of_time: bool = False
    broken: str | None = None  # the channel carried something the protocol does not allow

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened = time.monotonic()
        try:
            while not self.done:
                timeout = self.start_s if not self.ready else min(self.window_s, self.deadline - time.monotonic())
                if timeout <= 0:
                    self.out_of_time = True
                    return
                try:
                    record, payload = await asyncio.wait_for(self._record(reader), timeout)
                except TimeoutError:
                    self.stalled = self.ready
                    self.out_of_time = self.ready and time.monotonic() >= self.deadline
                    return
                if record is None:
                    return
                self._take(record, payload)
        except Malformed as e:
            self.broken = str(e)

    async def _record(self, reader: asyncio.StreamReader) -> tuple[dict | None, bytes]:
        """The next record carrying this run's nonce (others are not progress), or None at the end."""
        while True:
            line = await read_line(reader)
            if line is None:
                return None, b""
            record = parse(line, 2)
            if not isinstance(record, dict) or record.get("n") != self.nonce:
                raise Malformed("a record without the run's nonce")
            size = record.get("len", 0)
            if not isinstance(size, int) or not 0 <= size <= MAX_ANSWER_BYTES:
                raise Malformed(f"an answer of {size!r} bytes")
            return record, await read_exactly(reader, size) if size else b""

    def _take(self, record: dict, payload: bytes) -> None:
        event = record.get("e")
        if event == "ready" and not self.ready:
            self.ready, self.ready_after_s = True, time.monotonic() - self.opened
            self.deadline = (self.deadline + self.ready_after_s) if self.deadline else time.monotonic() + self.budget_s
        elif event == "alive":
            pass  # progress: the harness is waiting on a step that has not used up its time
        elif event == "step" and isinstance(record.get("k"), int):
            self.steps.append((record, payload))
        elif event == "died" and isinstance(record.get("k"), int):
            self.died = record
        elif event == "done":
            self.done = True
        else:
            raise Malformed(f"an unknown record {event!r}")


@dataclass
class _Tally:
    """The verdicts so far, over the harness runs of one evaluation."""

    plan: Plan
    names: list[str]
    results: list[TestResult | None]
    load_error: ErrorInfo | None = None
    broken: str | None = None  # a setup step that failed, noted in the messages of tests that then fail

    def missing(self, start: int) -> list[int]:
        return [i for i in range(start, len(self.names)) if self.results[i] is None]

    def set(self, test: int, status: str, error_type: str | None, message: str | None, ms: float | None) -> None:
        if not 0 <= test < len(self.names) or self.results[test] is not None:
            return
        judged = self.plan.judged(test) and self.plan.mode != "unittest"
        if status != "Passed" and self.broken and message is not None:
            message += self.broken
        self.results[test] = TestResult(
            name=self.names[test],
            passed=status == "Passed",
            status=status if status in _STATUSES else "Error",
            error_type=error_type,
            error_message=message,
            time_ms=ms,
            judged_in_process=not judged,
        )


def _cause(why: str, outcome: RunOutcome, limits: Limits) -> tuple[str, str, str]:
    """(status, error type, message) for a test during which the jailed process died or was killed."""
    if why == "timeout" or outcome.killed_for == "channel":
        return (
            "TimeLimitExceeded",
            "TimeoutError",
            "the test kept running past its time limit (the alarm was caught, or it slept) and was killed",
        )
    if outcome.killed_for == "timeout" or outcome.cpu_limit_hit:
        return "TimeLimitExceeded", "TimeoutError", "the run exceeded its time limit and was killed"
    if outcome.killed_for == "output_limit":
        return "OutputLimitExceeded", "OutputLimitExceeded", f"stdout or stderr exceeded {limits.output_bytes} bytes"
    if outcome.oom_killed:
        return "MemoryLimitExceeded", "MemoryError", f"killed by the memory limit ({limits.memory_mb} MiB)"
    if why == "framing":
        return "Error", "HarnessTampered", "the solution wrote to the harness's answer pipe"
    if why == "too_large":
        return "Error", "ValueTooLarge", f"the values to judge exceed {MAX_ANSWER_BYTES} bytes"
    tail = outcome.stderr[-300:].decode(errors="replace").strip()
    ended = why if why and why != "closed" else f"exit status {outcome.exit_code}"
    message = f"the process ended ({ended}) before reporting this test"
    return "Crashed", "ProcessExit", message + (f"; stderr: {tail}" if tail else "")


class Judge:
    """Judges solutions against their tests: one harness run per request, restarted past a test that kills it."""

    def __init__(
        self,
        jail: Jail,
        pythons: Mapping[str, str],
        output_bytes: int,
        max_eval_s: float = 300.0,
        start_s: float = 30.0,
    ):
        self.jail, self.pythons, self.output_bytes = jail, pythons, output_bytes
        self.max_eval_s, self.start_s = max_eval_s, start_s

    async def judge(self, request: EvaluateRequest, on_queue: Callable[[bool], None] | None = None) -> EvaluateResponse:
        """Every test's verdict; `on_queue` brackets each wait for a jail slot (Jail.run)."""
        started = time.monotonic()
        plan = build_plan(request.tests)
        tally = _Tally(plan, list(plan.names), [None] * len(plan.names))
        start, restarts, starts_failed, stderr = 0, 0, 0, b""
        deadline: float | None = None  # set when the harness first reports ready
        while True:
            budget = self.max_eval_s if deadline is None else deadline - time.monotonic()
            limits = Limits(
                wall_s=2 * self.start_s + budget + STALL_S,
                cpu_s=budget + 1.0,
                memory_mb=request.memory_limit_MB,
                output_bytes=self.output_bytes,
            )
            reading = _Reading(
                secrets.token_hex(16),
                window_s=STALL_S,
                deadline=deadline,
                budget_s=self.max_eval_s,
                start_s=self.start_s,
            )
            outcome = await self._run_harness(plan, request, start, limits, reading, on_queue)
            stderr = outcome.stderr
            if outcome.sandbox_error or outcome.killed_for == "shutdown":
                message = outcome.sandbox_error or "the service is shutting down; the run was killed"
                return _sandbox_error(message, plan, started)
            if not reading.ready:
                starts_failed += 1
                if starts_failed > START_RETRIES:
                    return _sandbox_error(
                        f"the harness did not start {starts_failed} times (host overloaded?)", plan, started
                    )
                continue
            deadline = reading.deadline
            loaded = await self._account(tally, reading, request)
            missing = tally.missing(start)
            if tally.load_error is not None or not missing:
                break
            if reading.out_of_time or time.monotonic() >= deadline:
                for i in missing:
                    tally.set(i, "TimeLimitExceeded", "TimeoutError", self._out_of_time(), None)
                break
            why = reading.died.get("why") if reading.died else ("timeout" if reading.stalled else "")
            status, error_type, message = _cause(str(why), outcome, limits)
            if reading.broken:
                status, error_type, message = (
                    "Error",
                    "HarnessTampered",
                    f"the harness's report broke: {reading.broken}",
                )
            if not loaded:
                tally.load_error = ErrorInfo(type=error_type, message=message, step="<solution>")
                break
            first = missing[0]
            tally.set(first, status, error_type, message, None)
            if first + 1 >= len(tally.names) or restarts == MAX_RESTARTS:
                break
            start, restarts = first + 1, restarts + 1
        return _response(tally, restarts, started, stderr)

    def _out_of_time(self) -> str:
        return f"the evaluation's total time limit ({self.max_eval_s:g} s) ran out before this test finished"

    async def _account(self, tally: _Tally, reading: _Reading, request: EvaluateRequest) -> bool:
        """Turn one harness run's step records into verdicts; True once the solution has loaded."""
        plan, loaded = tally.plan, False
        for record, payload in reading.steps:
            index = record["k"]
            step = plan.steps[index] if index < len(plan.steps) else None
            kind = step.kind if step is not None else "method"
            test = step.test if step is not None else index - len(plan.steps)
            ms = record.get("ms") if isinstance(record.get("ms"), (int, float)) else None
            try:
                if kind == "probe":
                    tally.set(test, *await _judged(plan, test, payload), ms)
                    continue
                answer = (
                    parse(payload, 4) if len(payload) <= INLINE_BYTES else await asyncio.to_thread(parse, payload, 4)
                )
                outcome = _outcome(answer)
            except (Malformed, BadValue) as e:
                tally.set(test, "Error", "HarnessTampered", f"the harness's answer was malformed: {e}", ms)
                continue
            if kind in ("prelude", "solution") or (kind == "setup" and plan.mode == "unittest"):
                if outcome is not None:
                    tally.load_error = ErrorInfo(type=str(outcome[1]), message=str(outcome[2]), step=step.name)
                    return loaded
                loaded = loaded or (kind == "solution" and plan.mode != "unittest")
            elif kind == "setup":
                if outcome is not None and tally.broken is None:
                    tally.broken = f" (after setup step {step.name!r} failed: {outcome[1]}: {str(outcome[2])[:200]})"
            elif kind == "discover":
                loaded = True
                if outcome is not None:
                    tally.load_error = ErrorInfo(type=str(outcome[1]), message=str(outcome[2]), step="test module")
                    return loaded
                names = answer.get("tests") if isinstance(answer, dict) else None
                if _names(names) and not any(tally.results):
                    tally.names, tally.results = list(names), [None] * len(names)
            elif kind == "case":
                tally.set(test, *_case(answer, outcome, plan.expected[test]), ms)
            else:  # inproc, method: the outcome the runner reported
                tally.set(test, *(outcome or ("Passed", None, None)), ms)
        return loaded or plan.mode == "stdio"

    async def _run_harness(
        self,
        plan: Plan,
        request: EvaluateRequest,
        start: int,
        limits: Limits,
        reading: _Reading,
        on_queue: Callable[[bool], None] | None,
    ) -> RunOutcome:
        spec = {
            "nonce": reading.nonce,
            "solution": request.code,
            "entry_point": plan.entry_point,
            "timeout": request.timeout_s,
            "start": start,
            "steps": [step.to_spec() for step in plan.steps],
            "output_cap": self.output_bytes,
            "max_tests": MAX_TESTS,
            "max_items": MAX_ITEMS,
            "max_answer_bytes": MAX_ANSWER_BYTES,
        }
        python = python_path(self.pythons, request.python)
        return await self.jail.run(
            [python, "-c", HARNESS_SOURCE],
            limits,
            stdin=repr(spec).encode(),
            channel=reading,
            channel_line_limit=MAX_HEADER_BYTES,
            label="evaluate",
            on_queue=on_queue,
        )


def _outcome(answer: Any) -> tuple[str, str | None, str | None] | None:
    """None for an answer that says the step ran through; else its (status, error type, message)."""
    if isinstance(answer, dict) and answer.get("ok") is True:
        return None
    reported = answer.get("err", answer.get("end")) if isinstance(answer, dict) else None
    if not (isinstance(reported, list) and len(reported) == 3):
        if isinstance(answer, dict) and ("tests" in answer or "out" in answer):
            return None
        raise Malformed("an answer that is neither ok nor an error")
    status, error_type, message = (None if part is None else str(part)[:1000] for part in reported)
    if status == "Passed":
        return None
    return str(status), error_type, message


async def _judged(plan: Plan, test: int, payload: bytes) -> tuple[str, str | None, str | None]:
    """The judge's verdict on a judged test from its probes' answer (parsed and judged off the loop when large)."""
    check = plan.checks[test]

    def decide() -> tuple[str, str | None, str | None]:
        answer = parse(payload, 2 + 100 + 2)
        values = answer.get("v") if isinstance(answer, dict) else None
        if not isinstance(values, list) or len(values) != len(check.probes):
            raise Malformed("an answer without one value per probe")
        decoded = []
        for value in values:
            if isinstance(value, dict) and set(value) == {"E"}:
                failure = value["E"]
                if not (isinstance(failure, list) and len(failure) == 3):
                    raise Malformed("a probe error that is not [status, type, message]")
                decoded.append(ProbeFailed(*(str(part)[:1000] for part in failure)))
            else:
                decoded.append(decode(value))
        return judge(check, decoded)

    if len(payload) <= INLINE_BYTES:
        return decide()
    return await asyncio.to_thread(decide)


def _normalized(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


def _case(answer: Any, outcome: tuple | None, expected: str) -> tuple[str, str | None, str | None]:
    if outcome is not None:
        return outcome
    output = answer.get("out") if isinstance(answer, dict) else None
    if not isinstance(output, str):
        raise Malformed("a case answer without its output")
    if _normalized(output) == _normalized(expected):
        return "Passed", None, None
    return "Failed", "WrongAnswer", f"expected {show(expected[:200])}, got {show(output[:200])}"


def _names(value: object) -> bool:
    """Whether the harness's list of test names is well formed."""
    return isinstance(value, list) and 0 < len(value) <= MAX_TESTS and all(isinstance(name, str) for name in value)


def _response(tally: _Tally, restarts: int, started: float, stderr: bytes) -> EvaluateResponse:
    load_error = tally.load_error
    for i in range(len(tally.names)):
        reason = (
            f"not run: the solution failed to load ({load_error.type}: {load_error.message})"
            if load_error
            else f"not run: the process died {restarts + 1} times"
        )
        tally.set(i, "Error", load_error.type if load_error else "NotRun", reason, None)
    results = [r for r in tally.results if r is not None]
    passed = sum(r.passed for r in results)
    return EvaluateResponse(
        status="Finished",
        passed_all=bool(results) and passed == len(results),
        pass_rate=passed / len(results) if results else 0.0,
        num_tests=len(results),
        num_passed=passed,
        load_error=load_error,
        tests=results,
        restarts=restarts,
        time_ms=(time.monotonic() - started) * 1000,
        stderr=stderr[-_STDERR_TAIL:].decode(errors="replace"),
    )


def _sandbox_error(message: str, plan: Plan, started: float) -> EvaluateResponse:
    return EvaluateResponse(
        status="SandboxError",
        message=message,
        passed_all=False,
        pass_rate=0.0,
        num_tests=len(plan.names),
        num_passed=0,
        load_error=None,
        tests=[],
        restarts=0,
        time_ms=(time.monotonic() - started) * 1000,
        stderr="",
    )

"""/evaluate's verdicts: run the harness on a plan (plans.py) in the jail and account for every test.

If the jailed process dies during a test (os._exit, a kill by the memory cgroup, a blown output cap,
a hang that survives SIGALRM), that test gets the cause and the harness is started again from the next
test, up to MAX_RESTARTS times, so that one test never hides the others.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from sandbox_service.jail import Jail, Limits, RunOutcome
from sandbox_service.plans import Plan, build_plan
from sandbox_service.pythons import python_path
from sandbox_service.schemas import MAX_TESTS, ErrorInfo, EvaluateRequest, EvaluateResponse, TestResult

HARNESS_SOURCE = (Path(__file__).parent / "harness.py").read_text()
MAX_RESTARTS = 3
_STDERR_TAIL = 2000
_STEP_GRACE_S = 2.0  # python start-up and a loaded machine, on top of a step's own timeout


class _Collector:
    """Serves the harness's channel: keeps the JSON records that carry this run's nonce.

    The harness reports every step; when none arrives within a step's timeout plus a grace period, the step
    survived SIGALRM (the solution swallowed it), so the collector returns and the jail kills the run.
    """

    def __init__(self, nonce: str, max_records: int, step_window_s: float):
        self.nonce, self.max_records, self.step_window_s = nonce, max_records, step_window_s
        self.records: list[dict] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[dict]:
        while len(self.records) < self.max_records:
            try:
                line = await asyncio.wait_for(reader.readline(), self.step_window_s)
            except (asyncio.LimitOverrunError, ValueError, TimeoutError):  # stalled, or junk on the channel
                break
            if not line:
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("n") == self.nonce:
                self.records.append(record)
        return self.records


def _cause(outcome: RunOutcome, limits: Limits) -> tuple[str, str, str]:
    """(status, error type, message) for a test during which the jailed process died."""
    if outcome.killed_for == "channel":
        return (
            "TimeLimitExceeded",
            "TimeoutError",
            "the test kept running past its time limit (SIGALRM was caught) and was killed",
        )
    if outcome.killed_for == "timeout" or outcome.cpu_limit_hit:
        return "TimeLimitExceeded", "TimeoutError", "the run exceeded its time limit and was killed"
    if outcome.killed_for == "output_limit":
        return "OutputLimitExceeded", "OutputLimitExceeded", f"stdout or stderr exceeded {limits.output_bytes} bytes"
    if outcome.oom_killed:
        return "MemoryLimitExceeded", "MemoryError", f"killed by the memory limit ({limits.memory_mb} MiB)"
    tail = outcome.stderr[-300:].decode(errors="replace").strip()
    message = f"the process ended (exit status {outcome.exit_code}) before reporting this test"
    return "Crashed", "ProcessExit", message + (f"; stderr: {tail}" if tail else "")


class Judge:
    """Judges solutions against their tests: one harness run per request, restarted past a test that kills it."""

    def __init__(self, jail: Jail, pythons: Mapping[str, str], output_bytes: int):
        self.jail, self.pythons, self.output_bytes = jail, pythons, output_bytes

    async def judge(self, request: EvaluateRequest) -> EvaluateResponse:
        started = time.monotonic()
        plan = build_plan(request.tests)
        names = plan.names  # a unittest module's harness reports the names its loader finds
        results: list[TestResult | None] = [None] * len(names)
        load_error: ErrorInfo | None = None
        start, restarts, stderr = 0, 0, b""
        limits = Limits(
            wall_s=request.timeout_s * plan.timed_steps + _STEP_GRACE_S,
            cpu_s=request.timeout_s * plan.timed_steps + 1.0,
            memory_mb=request.memory_limit_MB,
            output_bytes=self.output_bytes,
        )
        while True:
            outcome, records = await self._run_harness(plan, request, start, limits)
            stderr = outcome.stderr
            if outcome.sandbox_error or outcome.killed_for == "shutdown":
                message = outcome.sandbox_error or "the service is shutting down; the run was killed"
                return _sandbox_error(message, plan, started)
            loaded = False
            for record in records:
                if record.get("e") == "tests" and start == 0 and _names(record.get("names")):
                    names = record["names"]
                    results = [None] * len(names)
                elif record.get("e") == "loaded":
                    loaded = True
                elif record.get("e") == "load_error":
                    load_error = ErrorInfo(
                        type=str(record.get("type")), message=str(record.get("message")), step=str(record.get("step"))
                    )
                elif (
                    record.get("e") == "test" and isinstance(record.get("i"), int) and start <= record["i"] < len(names)
                ):
                    results[record["i"]] = _test_result(names[record["i"]], record)
            missing = [i for i in range(start, len(names)) if results[i] is None]
            if load_error is not None or not missing:
                break
            status, error_type, message = _cause(outcome, limits)
            if not loaded:
                load_error = ErrorInfo(type=error_type, message=message, step="<solution>")
                break
            first = missing[0]
            results[first] = TestResult(
                name=names[first],
                passed=False,
                status=status,
                error_type=error_type,
                error_message=message,
                time_ms=None,
            )
            if first + 1 >= len(names) or restarts == MAX_RESTARTS:
                break
            start, restarts = first + 1, restarts + 1
        for i, result in enumerate(results):
            if result is None:
                reason = (
                    f"not run: the solution failed to load ({load_error.type}: {load_error.message})"
                    if load_error
                    else f"not run: the process died {restarts + 1} times"
                )
                results[i] = TestResult(
                    name=names[i],
                    passed=False,
                    status="Error",
                    error_type=load_error.type if load_error else "NotRun",
                    error_message=reason,
                    time_ms=None,
                )
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

    async def _run_harness(
        self, plan: Plan, request: EvaluateRequest, start: int, limits: Limits
    ) -> tuple[RunOutcome, list[dict]]:
        nonce = secrets.token_hex(16)
        spec = {
            "nonce": nonce,
            "mode": plan.mode,
            "timeout": request.timeout_s,
            "start": start,
            "prelude": plan.prelude,
            "solution": request.code,
            "steps": plan.steps,
            "cases": plan.cases,
            "output_cap": self.output_bytes,
            "max_tests": MAX_TESTS,
        }
        collector = _Collector(
            nonce,
            max_records=plan.timed_steps + 4 + (MAX_TESTS if plan.mode == "unittest" else 0),
            step_window_s=request.timeout_s + _STEP_GRACE_S,
        )
        python = python_path(self.pythons, request.python)
        outcome = await self.jail.run(
            [python, "-c", HARNESS_SOURCE], limits, stdin=repr(spec).encode(), channel=collector, label="evaluate"
        )
        return outcome, collector.records


def _names(value: object) -> bool:
    """Whether the harness's list of test names is well formed."""
    return isinstance(value, list) and 0 < len(value) <= MAX_TESTS and all(isinstance(name, str) for name in value)


def _test_result(name: str, record: dict) -> TestResult:
    status = str(record.get("status"))
    ms = record.get("ms")
    return TestResult(
        name=name,
        passed=status == "Passed",
        status=status,
        error_type=None if record.get("type") is None else str(record["type"]),
        error_message=None if record.get("message") is None else str(record["message"]),
        time_ms=float(ms) if isinstance(ms, (int, float)) else None,
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

"""Execution feedback: what one run of a design on a query's tests told, kept in the rounds log, and the text that
reports it to a designer (the search teacher's reasoning) and in the distilled reasoning of the SFT records.

A run's feedback is its public pass rate, how the workflow ended (a failure kind of /workflow/run, or None) and the
failing public tests, each as one line `name: status (error type: message)`, the line the Test operator's repair
prompt shows the worker too. The short form (`short=True`) names each failure by its kind instead: "a wrong
answer", or the error and its message, never the test's source. The distilled reasoning uses it: a small
meta-agent that learns to quote a test's values at length loops on them when it writes its own reasoning.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from fr_jax.flow.mode import run_pass_rate
from fr_jax.sandbox.client import Evaluation, WorkflowRun

MAX_FAILED_TESTS = 3  # kept per run
MAX_LINE_CHARS = 200
MAX_KIND_CHARS = 80


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One run of a design on one query, as the rounds log keeps it."""

    pass_rate: float  # on the public tests; 0 when the workflow failed
    failure: str | None  # /workflow/run's failure kind
    message: str | None
    operator_calls: int
    worker_calls: int
    worker_tokens: int
    wall_s: float
    hidden_pass_rate: float | None = None  # final runs only
    failed_tests: tuple[str, ...] = ()  # the public tests the solution failed (a solution that did not load first)
    failure_kinds: tuple[str, ...] = ()  # the same failures by kind, without the tests' source (failure_kinds)

    @classmethod
    def of(cls, run: WorkflowRun, *, hidden: bool = False) -> RunRecord:
        return cls(
            pass_rate=run_pass_rate(run, hidden=False),
            failure=run.failure.kind if run.failure else None,
            message=run.failure.message[:2000] if run.failure else None,
            operator_calls=run.num_operator_calls,
            worker_calls=run.worker.calls,
            worker_tokens=run.worker.prompt_tokens + run.worker.completion_tokens,
            wall_s=run.wall_s,
            hidden_pass_rate=run_pass_rate(run, hidden=True) if hidden else None,
            failed_tests=failed_tests(run.public) if run.ok and run.public is not None else (),
            failure_kinds=failure_kinds(run.public) if run.ok and run.public is not None else (),
        )

    @classmethod
    def from_json(cls, fields: dict) -> RunRecord:
        return cls(
            **{
                **fields,
                "failed_tests": tuple(fields.get("failed_tests", ())),
                "failure_kinds": tuple(fields.get("failure_kinds", ())),
            }
        )


def failed_tests(evaluation: Evaluation) -> tuple[str, ...]:
    """The failing tests of one evaluation, one clipped line each, at most MAX_FAILED_TESTS."""
    lines = [
        f"{t.name}: {t.status}" + (f" ({t.error_type}: {t.error_message})" if t.error_type else "")
        for t in evaluation.tests
        if not t.passed
    ]
    if evaluation.load_error is not None:
        error = evaluation.load_error
        lines.insert(0, f"the solution did not load: {error.type}: {error.message}")
    return tuple(_clip(line) for line in lines[:MAX_FAILED_TESTS])


def failure_kinds(evaluation: Evaluation) -> tuple[str, ...]:
    """The failures of one evaluation by kind, in order and distinct: a solution that did not load (its tests
    were not run), else each failing test's "a wrong answer", its error with the message, or its status."""
    if evaluation.load_error is not None:
        error = evaluation.load_error
        return (_clip(f"the solution did not load ({error.type}: {error.message})", MAX_KIND_CHARS),)
    kinds = [_test_failure_kind(t.status, t.error_type, t.error_message) for t in evaluation.tests if not t.passed]
    return tuple(dict.fromkeys(_clip(kind, MAX_KIND_CHARS) for kind in kinds))


def _test_failure_kind(status: str, error_type: str | None, error_message: str | None) -> str:
    if status == "Failed" or error_type == "AssertionError":
        return "a wrong answer"
    if error_type:
        return f"{error_type}: {error_message}" if error_message else error_type
    return status  # TimeLimitExceeded, MemoryLimitExceeded, ...


def _clip(line: str, max_chars: int = MAX_LINE_CHARS) -> str:
    line = " ".join(line.split())
    return line if len(line) <= max_chars else line[: max_chars - 3] + "..."


def common_failures(runs: Sequence[RunRecord], *, short: bool = False) -> list[tuple[str, int]]:
    """What went wrong in the runs, most frequent first (ties: first seen): failing tests (by kind when `short`)
    and workflow failures, each with the number of runs it happened in."""
    seen: collections.Counter[str] = collections.Counter()
    chars = MAX_KIND_CHARS if short else MAX_LINE_CHARS
    for run in runs:
        problems = [f"the workflow ended with {run.failure}: {_clip(run.message or '', chars)}"] if run.failure else []
        seen.update(list(dict.fromkeys([*problems, *(run.failure_kinds if short else run.failed_tests)])))
    return seen.most_common()


def feedback_text(score: float, runs: Sequence[RunRecord], *, short: bool = False) -> str:
    """One design's validation, in a line or two: 'public pass rate 0.333 over 3 runs (0.000, 1.000, 0.000);
    failing: assert f([]) == 0: Failed (AssertionError: ) in 2 of 3 runs' (short: '... failing: a wrong answer
    in 2 of 3 runs')."""
    if not runs:
        return "not run"
    rates = ", ".join(f"{run.pass_rate:.3f}" for run in runs)
    text = f"public pass rate {score:.3f} over {len(runs)} run{'s' * (len(runs) > 1)} ({rates})"
    failures = common_failures(runs, short=short)[:MAX_FAILED_TESTS]
    if failures:
        text += "; failing: " + "; ".join(f"{what} in {count} of {len(runs)} runs" for what, count in failures)
    return text

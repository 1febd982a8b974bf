"""How a task becomes a prompt and a completion becomes a score: the "mode" of a GRPO run or an evaluation.

A mode has two jobs. `messages(task)` writes the chat the policy answers. `score(sandbox, tasks, completions)` runs
what the completions produced in the sandbox and turns the execution feedback into the multi-purpose reward
(fr_jax.rl.reward), one `Score` per completion (with the worker-LLM calls and tokens it cost, for a mode that runs
one). `sandbox_workers(rollout_url)` names the worker LLMs a sandbox launched for the mode must allowlist. The loop
and `python -m fr_jax.eval --mode ...` know modes only through these methods, so FlowReasoner's workflow mode
(fr_jax.flow.task: the policy writes a Workflow that calls a worker LLM) plugs in beside `DirectCode` (the policy
writes the solution itself) without touching either; it registers in fr_jax.rl.components.MODE_BUILDERS.

Which tests score what: a training reward runs the task's *hidden* tests by default (every MBPP assert, HumanEval's
check()). They belong to training tasks, which are never evaluated on, and using all of them gives partial credit
on more asserts and leaves less room to game a single visible test. `sandbox.reward_tests: public` restricts the
reward to the visible tests instead. Evaluation always scores the hidden tests of held-out tasks.

A sandbox that could not judge a program (status SandboxError) is retried, and if it still cannot, the round
stops with an error naming the task: a broken sandbox must never look like a wrong answer (reward 0).
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from fr_jax.data.tasks import Task
from fr_jax.rl.reward import RewardBreakdown, RewardConfig, extract_code, multi_purpose_reward
from fr_jax.sandbox.client import EvalItem, Evaluation, SandboxClient, SandboxError
from fr_jax.sandbox.suites import suite_item

_log = logging.getLogger(__name__)


class SandboxFailure(SandboxError):
    """Programs the sandbox could not judge even after retries (not wrong answers: nothing was scored)."""


@dataclasses.dataclass(frozen=True)
class Score:
    """The reward of one completion and the test counts behind it (passed = total = 0 when it was not run)."""

    reward: RewardBreakdown
    well_formed: bool
    passed: int
    total: int
    worker_calls: int | None = None  # what running the answer cost in worker-LLM calls and tokens (None: no worker)
    worker_tokens: int | None = None

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def passed_all(self) -> bool:
        return self.total > 0 and self.passed == self.total


def worker_usage(scores: Sequence[Score]) -> dict[str, float]:
    """Mean worker-LLM calls and tokens per answer, when every score has them ({} otherwise)."""
    if not scores or any(s.worker_calls is None or s.worker_tokens is None for s in scores):
        return {}
    return {
        "worker_calls": sum(s.worker_calls for s in scores) / len(scores),
        "worker_tokens": sum(s.worker_tokens for s in scores) / len(scores),
    }


class Mode(Protocol):
    name: str

    def messages(self, task: Task) -> list[dict[str, str]]:
        """The chat the policy answers (without the assistant turn)."""

    async def score(
        self, sandbox: SandboxClient, tasks: Sequence[Task], completions: Sequence[str], *, hidden: bool
    ) -> list[Score]:
        """One Score per completion; tasks[i] is the task completions[i] answers."""

    def sandbox_workers(self, rollout_url: str) -> list[str]:
        """Worker LLMs (`name=URL[,model=M]`) that a sandbox launched for this mode must allowlist."""


async def evaluate_with_retries(
    sandbox: SandboxClient, items: Sequence[EvalItem], labels: Sequence[str], *, retries: int
) -> list[Evaluation]:
    """Evaluations of `items`; those the sandbox could not judge are sent again up to `retries` times, then raise
    SandboxFailure naming the first one (labels[i] names items[i])."""
    results = list(await sandbox.evaluate_batch(items)) if items else []
    attempt = 0
    while failed := [i for i, r in enumerate(results) if r.sandbox_error]:
        first = results[failed[0]]
        if attempt == retries:
            raise SandboxFailure(
                f"the sandbox could not judge {len(failed)} of {len(items)} programs after {retries} retries "
                f"(first: {labels[failed[0]]}: {first.message or 'no message'}); a sandbox error is not a wrong "
                f"answer, so nothing was scored"
            )
        attempt += 1
        _log.warning(
            "sandbox could not judge %d programs (%s: %s); retry %d/%d",
            len(failed),
            labels[failed[0]],
            first.message,
            attempt,
            retries,
        )
        for i, result in zip(failed, await sandbox.evaluate_batch([items[i] for i in failed])):
            results[i] = result
    return results


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


class DirectCode:
    """The policy writes the solution itself, in a ```python block; it is run against the task's tests."""

    name = "direct"

    def __init__(
        self,
        *,
        reward: RewardConfig,
        count_tokens: Callable[[str], int],
        instruction: str,
        system: str | None = None,
        show_public_tests: bool = True,
        timeout_s: float = 5.0,
        memory_limit_mb: int = 1024,
        retries: int = 2,
    ):
        self.reward = reward
        self.count_tokens = count_tokens
        self.instruction = instruction
        self.system = system
        self.show_public_tests = show_public_tests
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.retries = retries

    def sandbox_workers(self, rollout_url: str) -> list[str]:
        return []

    def messages(self, task: Task) -> list[dict[str, str]]:
        parts = [task.prompt.strip()]
        if self.show_public_tests and task.public_tests.cases:
            parts.append("Your code should pass these tests:\n" + "\n".join(task.public_tests.cases))
        parts.append(self.instruction)
        chat = [{"role": "system", "content": self.system}] if self.system else []
        return chat + [{"role": "user", "content": "\n\n".join(parts)}]

    async def score(
        self, sandbox: SandboxClient, tasks: Sequence[Task], completions: Sequence[str], *, hidden: bool
    ) -> list[Score]:
        if len(tasks) != len(completions):
            raise ValueError(f"{len(tasks)} tasks for {len(completions)} completions")
        codes = [extract_code(text) for text in completions]
        runnable = [i for i, code in enumerate(codes) if code is not None and parses(code)]
        suites = [task.hidden_tests if hidden else task.public_tests for task in tasks]
        empty = [tasks[i].task_id for i in runnable if not suites[i].cases]
        if empty:
            raise ValueError(
                f"task {empty[0]} has no {'hidden' if hidden else 'public'} tests to score against "
                f"(HumanEval has 8 tasks without public tests; use sandbox.reward_tests: hidden)"
            )
        items = [
            suite_item(
                suites[i],
                tasks[i].entry_point,
                codes[i],
                timeout_s=self.timeout_s,
                memory_limit_mb=self.memory_limit_mb,
            )
            for i in runnable
        ]
        evaluations = await evaluate_with_retries(
            sandbox, items, [tasks[i].task_id for i in runnable], retries=self.retries
        )
        scores = [Score(multi_purpose_reward(well_formed=False, config=self.reward), False, 0, 0)] * len(tasks)
        for i, ev in zip(runnable, evaluations):
            total = len(ev.tests)
            status = "error" if ev.load_error is not None else "ok"
            reward = multi_purpose_reward(
                well_formed=True,
                passed=ev.num_passed,
                total=total,
                status=status,
                code_tokens=self.count_tokens(codes[i]),
                config=self.reward,
            )
            scores[i] = Score(reward, True, ev.num_passed, total)
        return scores


def score_completions(
    sandbox_url: str, mode: Mode, tasks: Sequence[Task], completions: Sequence[str], *, hidden: bool
) -> list[Score]:
    """`mode.score` against the sandbox at `sandbox_url`, from synchronous code."""

    async def run() -> list[Score]:
        async with SandboxClient(sandbox_url) as sandbox:
            return await mode.score(sandbox, tasks, completions, hidden=hidden)

    return asyncio.run(run())

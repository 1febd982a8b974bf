"""How a task becomes a prompt and a completion becomes a score: the "mode" of a GRPO run or an evaluation.

A mode (`Mode`) says which worker LLM its answers call (`worker`: the sandbox launched for the run allowlists it),
gets what its prompts need from the sandbox once it is up (`prepare`), writes the chat the policy answers
(`messages(task)`), and runs what the completions produced in the sandbox, turning the execution feedback into
the multi-purpose reward (fr_jax.rl.reward): one `Score` per completion (`score`). The GRPO round and
`python -m fr_jax.eval` know modes only through this protocol, so FlowReasoner's workflow mode (fr_jax.flow.mode:
the policy writes a Workflow that calls a worker LLM) sits beside `DirectCode` (the policy writes the solution
itself). The CLIs hold the one table of modes (fr_jax.cli.MODES) and hand it down; building a mode starts nothing.

Which tests score what: a training reward runs the task's *hidden* tests by default (every MBPP assert, HumanEval's
check()). They belong to training tasks, which are never evaluated on, and using all of them gives partial credit
on more asserts and leaves less room to game a single visible test. `sandbox.reward_tests: public` restricts the
reward to the visible tests instead. Evaluation always scores the hidden tests of held-out tasks.

A sandbox that could not judge a program (status SandboxError) is retried, and if it still cannot, the round
stops with an error naming the task: a broken sandbox must never look like a wrong answer (reward 0).
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fr_jax.config import GRPOSection
from fr_jax.data.tasks import Task
from fr_jax.rl.reward import RewardBreakdown, RewardConfig, extract_code, multi_purpose_reward
from fr_jax.sandbox.client import EvalItem, Evaluation, SandboxClient, SandboxError
from fr_jax.sandbox.suites import suite_item

_log = logging.getLogger(__name__)


class SandboxFailure(SandboxError):
    """Programs the sandbox could not judge even after retries (not wrong answers: nothing was scored)."""


ROLLOUT_WORKER = "rollout"  # WorkerSpec.url: the run's rollout server is also the worker (its /v1 routes)


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """The worker LLM a mode's answers call: a name on the sandbox's allowlist, and where it answers."""

    name: str
    url: str | None  # an OpenAI-compatible base URL (.../v1), ROLLOUT_WORKER, or None: a running sandbox knows it
    model: str | None = None  # the `model` field sent to it (default: the name)
    api_key_env: str | None = None  # the sandbox's environment variable holding its bearer token (a hosted API)

    def resolved_url(self, rollout_url: str | None) -> str | None:
        if self.url == ROLLOUT_WORKER:
            if rollout_url is None:
                raise ValueError("the worker is the rollout server, but there is no rollout server")
            return f"{rollout_url.rstrip('/')}/v1"
        return self.url

    def allowlist_entry(self, rollout_url: str | None) -> str | None:
        """The sandbox's `--worker` value (`name=URL[,model=M]`), or None when no URL is known here."""
        url = self.resolved_url(rollout_url)
        if url is None:
            return None
        options = [
            f"{key}={value}" for key, value in (("model", self.model), ("api_key_env", self.api_key_env)) if value
        ]
        return ",".join([f"{self.name}={url}", *options])


@dataclasses.dataclass(frozen=True)
class Score:
    """The reward of one completion and the test counts behind it (passed = total = 0 when it was not run)."""

    reward: RewardBreakdown
    well_formed: bool
    passed: int
    total: int
    worker_calls: int | None = None  # what running the answer cost in worker-LLM calls and tokens (None: no worker)
    worker_tokens: int | None = None
    # the sandbox's verdict (per-test results) behind the counts, and the code it ran; None when nothing was run
    evaluation: Evaluation | None = dataclasses.field(default=None, repr=False, compare=False)
    solution: str | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def passed_all(self) -> bool:
        return self.total > 0 and self.passed == self.total

    def record_fields(self) -> dict[str, Any]:
        """What a rollout record (docs/records.md) shows of this score; a mode's own Score adds its details."""
        return {
            "well_formed": self.well_formed,
            "passed": self.passed,
            "total": self.total,
            "worker_calls": self.worker_calls,
            "worker_tokens": self.worker_tokens,
            "sandbox": self.evaluation,
            "solution": self.solution,
        }


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
    worker: WorkerSpec | None  # the worker LLM its answers call (None: they call none)

    async def prepare(self, sandbox: SandboxClient) -> None:
        """Fetch what the prompts need from the sandbox that will run the answers (called once, before messages)."""

    def messages(self, task: Task) -> list[dict[str, str]]:
        """The chat the policy answers (without the assistant turn)."""

    async def score(
        self, sandbox: SandboxClient, tasks: Sequence[Task], completions: Sequence[str], *, hidden: bool
    ) -> list[Score]:
        """One Score per completion; tasks[i] is the task completions[i] answers."""


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
    worker = None

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
        python: str | None = None,
    ):
        self.reward = reward
        self.count_tokens = count_tokens
        self.instruction = instruction
        self.system = system
        self.show_public_tests = show_public_tests
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.retries = retries
        self.python = python  # the sandbox's named python (e.g. one with BigCodeBench's libraries)

    async def prepare(self, sandbox: SandboxClient) -> None:
        pass

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
                python=self.python,
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
            scores[i] = Score(reward, True, ev.num_passed, total, evaluation=ev, solution=codes[i])
        return scores


def build_direct_mode(grpo: GRPOSection, tokenizer) -> DirectCode:
    """grpo.mode: direct, from the config (the complexity term counts the policy's code tokens)."""
    return DirectCode(
        reward=grpo.reward,
        count_tokens=lambda code: len(tokenizer.encode(code, add_special_tokens=False)),
        instruction=grpo.prompt.instruction,
        system=grpo.prompt.system,
        show_public_tests=grpo.prompt.show_public_tests,
        timeout_s=grpo.sandbox.timeout_s,
        memory_limit_mb=grpo.sandbox.memory_limit_mb,
        retries=grpo.sandbox.max_retries,
        python=grpo.sandbox.python,
    )

"""FlowReasoner's workflow mode: the policy answers a query with a workflow design, the sandbox runs it.

`WorkflowMode` is a `fr_jax.rl.modes.Mode`: `prepare(sandbox)` fetches the operator library's descriptions from
the sandbox that will run the workflows, `messages(task)` is the meta-agent's prompt for the query (a fresh
design, fr_jax.flow.prompt), and `score(...)` parses each completion's <graph>/<prompt>, runs the workflow with
POST /workflow/run (its operators call the worker LLM named by `WorkflowRunSettings.worker`, which must be on the
sandbox's allowlist), and turns what came back into the multi-purpose reward:

- performance: the solution's pass rate on the task's hidden (or public) tests; a workflow that raised, timed out,
  returned nothing or spent its budget scores 0 (FlowReasoner's convention);
- complexity: the operator call sites of the graph (`count_operator_calls`);
- efficiency: the run's worker calls, worker tokens and wall time;
- format: -1 for a completion whose design cannot be parsed or compiled (it is not run, or its run stopped at
  loading the graph). That is a reward the policy sees, never an exception.

A run the infrastructure spoiled (the sandbox could not judge it, the worker could not be reached or failed with a
server error) is retried and then raises `SandboxFailure`: it says nothing about the design and is never scored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

from fr_jax.config import GRPOSection
from fr_jax.data.tasks import Task
from fr_jax.flow.chat import ChatClient, ChatReply
from fr_jax.flow.prompt import ParsedDesign, build_design_prompt, parse_design
from fr_jax.rl.heldout import EvalReport, summarize
from fr_jax.rl.modes import SandboxFailure, Score, WorkerSpec, build_direct_mode
from fr_jax.rl.records import sample_record
from fr_jax.rl.reward import RewardConfig, count_operator_calls, multi_purpose_reward
from fr_jax.sandbox.client import SandboxClient, WorkflowRun
from fr_jax.sandbox.session import SandboxSession
from fr_jax.sandbox.suites import counted_tests, suite_tests

_log = logging.getLogger(__name__)

# The designer's system turn, in the SFT records and in GRPO prompts alike, so the policy sees one format.
FLOW_SYSTEM_PROMPT = (
    "You are a meta-agent: for each coding problem you design a workflow of operators that call a "
    "worker LLM, and you answer in the <modification>, <graph> and <prompt> tags you are asked for."
)


@dataclasses.dataclass(frozen=True)
class WorkflowRunSettings:
    """How every workflow of a run is executed: the worker, the budgets, the worker's sampling and the tests."""

    worker: str  # a name on the sandbox's worker allowlist
    max_operator_calls: int = 20  # budgets: the first call past one ends the run (budget_exceeded)
    max_worker_tokens: int = 32_000
    wall_s: float = 120.0
    max_tokens: int = 1024  # per worker call
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    test_timeout_s: float = 5.0
    test_memory_mb: int = 1024
    python: str | None = None  # the sandbox's named python for the Test operator and the scoring (None: default)


def is_design_failure(run: WorkflowRun) -> bool:
    """The design could not even be loaded: a format failure, like an unparseable completion."""
    return run.failure is not None and run.failure.kind == "graph_syntax_error"


def _spoiled(run: WorkflowRun) -> bool:
    """The run failed for reasons outside the design (the sandbox says so): it must be retried, never scored."""
    return run.failure is not None and run.failure.infrastructure


async def run_design(
    sandbox: SandboxClient,
    design: ParsedDesign,
    task: Task,
    settings: WorkflowRunSettings,
    *,
    hidden: bool,
    retries: int,
    seed: int | None = None,
) -> WorkflowRun:
    """One run of `design` on `task`: the Test operator sees the public tests; the solution is scored on the
    public tests, and also on the hidden ones when `hidden`. Spoiled runs are retried, then raise SandboxFailure."""
    if not design.ok:
        raise ValueError(f"design of {task.task_id} cannot run: {design.error}")
    public = suite_tests(task.public_tests, task.entry_point)
    hidden_tests = suite_tests(task.hidden_tests, task.entry_point) if hidden else None
    for attempt in range(retries + 1):
        run = await sandbox.run_workflow(
            design.graph,
            design.prompt,
            problem=task.prompt,
            entry_point=task.entry_point,
            worker=settings.worker,
            public_tests=public,
            hidden_tests=hidden_tests,
            max_operator_calls=settings.max_operator_calls,
            max_worker_tokens=settings.max_worker_tokens,
            wall_s=settings.wall_s,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed if seed is None else seed,
            test_timeout_s=settings.test_timeout_s,
            test_memory_mb=settings.test_memory_mb,
            python=settings.python,
        )
        if run.failure is not None and run.failure.kind == "worker_not_allowed" and not run.trace:
            # the request's worker, not one the graph named: the setup is wrong, and every run would score 0
            raise SandboxFailure(
                f"the sandbox does not allowlist the worker {settings.worker!r} "
                f"({run.failure.message}); start it with --worker {settings.worker}=URL"
            )
        if not _spoiled(run):
            return run
        _log.warning(
            "workflow run of %s spoiled (%s: %s); retry %d/%d",
            task.task_id,
            run.failure.kind,
            run.failure.message,
            attempt + 1,
            retries,
        )
    raise SandboxFailure(
        f"the workflow run of {task.task_id} failed {retries + 1} times for reasons outside the "
        f"design ({run.failure.kind}: {run.failure.message}); nothing was scored"
    )


def run_pass_rate(run: WorkflowRun, *, hidden: bool) -> float:
    """FlowReasoner's score of one run: the pass rate of its solution, 0 when the workflow failed."""
    evaluation = run.hidden if hidden else run.public
    return evaluation.pass_rate if run.ok and evaluation is not None else 0.0


@dataclasses.dataclass(frozen=True)
class WorkflowScore(Score):
    """A Score with what the workflow's run cost and how it ended (failure: None or /workflow/run's kind)."""

    operator_calls: int = 0  # calls made at run time (the complexity term counts the graph's call sites)
    failure: str | None = None
    run: WorkflowRun | None = dataclasses.field(default=None, repr=False, compare=False)  # trace, solution, ...
    design: ParsedDesign | None = dataclasses.field(default=None, repr=False, compare=False)

    def record_fields(self) -> dict[str, Any]:
        solution = self.run.solution if self.run is not None else None
        return {**super().record_fields(), "design": self.design, "workflow": self.run, "solution": solution}


def score_run(
    design: ParsedDesign, run: WorkflowRun | None, num_tests: int, reward: RewardConfig, *, hidden: bool
) -> WorkflowScore:
    """The multi-purpose reward of one design and its run (None: the design did not parse, so it was not run)."""
    if run is None or is_design_failure(run):
        failure = "format" if run is None else run.failure.kind
        calls = run.worker.calls if run is not None else 0
        tokens = run.worker.prompt_tokens + run.worker.completion_tokens if run is not None else 0
        return WorkflowScore(
            multi_purpose_reward(well_formed=False, config=reward),
            False,
            0,
            0,
            worker_calls=calls,
            worker_tokens=tokens,
            failure=failure,
            run=run,
            design=design,
        )
    evaluation = run.hidden if hidden else run.public
    passed, status = 0, "ok"
    if run.failure is not None:
        status = "timeout" if run.failure.kind == "timeout" else "error"
    elif evaluation is None:
        raise ValueError("the workflow ran, but its solution was not scored on the requested tests")
    else:
        passed, num_tests = evaluation.num_passed, len(evaluation.tests) or num_tests
        status = "error" if evaluation.load_error is not None else "ok"
    usage = run.worker
    total_reward = multi_purpose_reward(
        well_formed=True,
        passed=passed,
        total=num_tests,
        status=status,
        operator_calls=count_operator_calls(design.graph),
        worker_calls=usage.calls,
        worker_tokens=usage.prompt_tokens + usage.completion_tokens,
        latency_s=run.wall_s,
        config=reward,
    )
    return WorkflowScore(
        total_reward,
        True,
        passed,
        num_tests,
        operator_calls=run.num_operator_calls,
        worker_calls=usage.calls,
        worker_tokens=usage.prompt_tokens + usage.completion_tokens,
        failure=run.failure.kind if run.failure else None,
        run=run,
        evaluation=evaluation,
        design=design,
    )


class WorkflowMode:
    """The policy writes a workflow for the query; the worker LLM runs it in the sandbox (module docstring)."""

    name = "workflow"

    def __init__(
        self,
        *,
        reward: RewardConfig,
        run: WorkflowRunSettings,
        operators_text: str = "",
        system: str | None = FLOW_SYSTEM_PROMPT,
        retries: int = 2,
        worker_url: str | None = None,
        worker_model: str | None = None,
        worker_api_key_env: str | None = None,
    ):
        self.reward = reward
        self.operators_text = operators_text  # the operator library's descriptions: `prepare` fetches them
        self.run = run
        self.system = system
        self.retries = retries
        self.worker = WorkerSpec(run.worker, worker_url, worker_model, worker_api_key_env)

    async def prepare(self, sandbox: SandboxClient) -> None:
        self.operators_text = (await sandbox.workflow_operators()).text

    def messages(self, task: Task) -> list[dict[str, str]]:
        if not self.operators_text.strip():
            raise ValueError("the workflow mode has no operator descriptions: prepare it on its sandbox first")
        user = build_design_prompt(task.prompt, self.operators_text, max_operator_calls=self.reward.max_operator_calls)
        chat = [{"role": "system", "content": self.system}] if self.system else []
        return chat + [{"role": "user", "content": user}]

    async def score(
        self, sandbox: SandboxClient, tasks: Sequence[Task], completions: Sequence[str], *, hidden: bool
    ) -> list[WorkflowScore]:
        if len(tasks) != len(completions):
            raise ValueError(f"{len(tasks)} tasks for {len(completions)} completions")
        for task in tasks:
            if not (task.hidden_tests if hidden else task.public_tests).cases:
                raise ValueError(
                    f"task {task.task_id} has no {'hidden' if hidden else 'public'} tests to score "
                    "against (HumanEval has 8 tasks without public tests; score on the hidden tests)"
                )
        designs = [parse_design(text) for text in completions]

        async def one(task: Task, design: ParsedDesign) -> WorkflowScore:
            suite = task.hidden_tests if hidden else task.public_tests
            if not design.ok:
                return score_run(design, None, counted_tests(suite), self.reward, hidden=hidden)
            run = await run_design(sandbox, design, task, self.run, hidden=hidden, retries=self.retries)
            return score_run(design, run, counted_tests(suite), self.reward, hidden=hidden)

        return list(await asyncio.gather(*(one(t, d) for t, d in zip(tasks, designs))))


# ------------------------------------------------------------------------------------------ from the config


def build_workflow_mode(grpo: GRPOSection, tokenizer) -> WorkflowMode:
    """grpo.mode: workflow. The system prompt is grpo.prompt.system, or FLOW_SYSTEM_PROMPT (the one the SFT
    records carry) when that is null; grpo.prompt's other keys are for the direct mode."""
    del tokenizer  # complexity counts operator call sites, not tokens
    w, sandbox = grpo.workflow, grpo.sandbox
    settings = WorkflowRunSettings(
        worker=w.worker,
        max_operator_calls=w.max_operator_calls,
        max_worker_tokens=w.max_worker_tokens,
        wall_s=w.wall_s,
        max_tokens=w.max_tokens,
        temperature=w.temperature,
        top_p=w.top_p,
        test_timeout_s=sandbox.timeout_s,
        test_memory_mb=sandbox.memory_limit_mb,
        python=sandbox.python,
    )
    return WorkflowMode(
        reward=grpo.reward,
        run=settings,
        system=grpo.prompt.system or FLOW_SYSTEM_PROMPT,
        retries=sandbox.max_retries,
        worker_url=w.worker_url,
        worker_model=w.worker_model,
        worker_api_key_env=w.worker_api_key_env,
    )


# ------------------------------------------------------------------------------- the worker prompted directly


def direct_worker_report(
    grpo: GRPOSection,
    tokenizer,
    tasks: Sequence[Task],
    *,
    worker_url: str,
    sandbox: SandboxSession,
    split: str,
    seeds: Sequence[int] | None,
) -> tuple[EvalReport, list[dict[str, Any]]]:
    """The baseline a workflow must beat: the same worker answering each query itself (the direct mode's prompt,
    one call of grpo.workflow.max_tokens, the eval's n and temperature), scored on the same hidden tests. The report
    and its samples' records."""
    # the direct mode's prompt without the designer's system turn
    direct = build_direct_mode(
        grpo.model_copy(update={"prompt": grpo.prompt.model_copy(update={"system": None})}), tokenizer
    )
    n, w = grpo.eval.n, grpo.workflow
    flat = [task for task in tasks for _ in range(n)]
    started = time.perf_counter()

    async def run(sandbox: SandboxClient) -> tuple[list[Score], list[ChatReply]]:
        async with ChatClient(worker_url, model=w.worker_model) as chat:
            replies = await asyncio.gather(
                *(
                    chat.complete(
                        direct.messages(task),
                        temperature=grpo.eval.temperature,
                        top_p=w.top_p,
                        max_tokens=w.max_tokens,
                        seed=None if seeds is None else seeds[i],
                    )
                    for i, task in enumerate(flat)
                )
            )
            if any(reply.prompt_tokens is None or reply.completion_tokens is None for reply in replies):
                raise ValueError(f"the worker at {worker_url} reports no token usage: cannot compare its cost")
            scores = await direct.score(sandbox, flat, [reply.content for reply in replies], hidden=True)
        costed = [
            dataclasses.replace(score, worker_calls=1, worker_tokens=reply.prompt_tokens + reply.completion_tokens)
            for score, reply in zip(scores, replies)
        ]
        return costed, replies

    scores, replies = sandbox.run(run)
    report = summarize(tasks, scores, split=split, n=n, ks=grpo.eval.k, seconds=time.perf_counter() - started)
    records = [
        sample_record(
            task,
            i // n,
            i % n,
            "\n\n".join(m["content"] for m in direct.messages(task)),
            reply.content,
            score,
            mode="direct",
            seed=None if seeds is None else seeds[i],
            response_tokens=reply.completion_tokens,
        )
        for i, (task, reply, score) in enumerate(zip(flat, replies, scores))
    ]
    return report, records

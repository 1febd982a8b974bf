"""Held-out evaluation through the same rollout server and sandbox as training: pass@k on the hidden tests.

n samples per task; a sample is correct when it passes every hidden test. pass@k is the unbiased estimator of
Chen et al. (fr_jax.rl.reward.pass_at_k) averaged over tasks; with n = 1 and greedy decoding pass@1 is the plain
fraction of tasks solved. The mean multi-purpose reward and each of its terms are reported beside it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fr_jax.config import GRPOSection
from fr_jax.data.tasks import Task
from fr_jax.rl.collect import EVAL_CALL, generate_groups, sampling_seeds
from fr_jax.rl.modes import Mode, Score, worker_usage
from fr_jax.rl.records import eval_records, sample_record
from fr_jax.rl.reward import pass_at_k
from fr_jax.rl.setup import eval_params
from fr_jax.rollout import Rollout, RolloutClient
from fr_jax.rollout.protocol import SamplingParams
from fr_jax.sandbox.session import SandboxSession

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalReport:
    split: str
    n: int
    pass_at_k: dict[int, float]
    reward: dict[str, float]  # mean of each reward term and of the total
    test_pass_rate: float  # mean fraction of hidden tests passed per sample
    well_formed: float  # fraction of samples with a runnable answer
    per_task: dict[str, int]  # task id -> correct samples (of n)
    seconds: float
    worker_calls: float | None = None  # mean worker-LLM calls per answer (None: the mode runs no worker)
    worker_tokens: float | None = None

    def scalars(self, prefix: str = "eval") -> dict[str, float]:
        out = {f"{prefix}/pass_at_{k}": v for k, v in self.pass_at_k.items()}
        out.update({f"{prefix}/reward/{k}": v for k, v in self.reward.items()})
        out[f"{prefix}/test_pass_rate"] = self.test_pass_rate
        out[f"{prefix}/well_formed"] = self.well_formed
        if self.worker_calls is not None:
            out[f"{prefix}/worker_calls"], out[f"{prefix}/worker_tokens"] = self.worker_calls, self.worker_tokens
        return out

    def to_json(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "tasks": len(self.per_task),
            "pass_at_k": {f"pass@{k}": v for k, v in self.pass_at_k.items()},
        }

    def line(self) -> str:
        figures = ", ".join(f"pass@{k} {v:.3f}" for k, v in self.pass_at_k.items())
        return (
            f"{self.split}: {len(self.per_task)} tasks x {self.n} samples: {figures}, reward "
            f"{self.reward['total']:.3f}, tests passed {self.test_pass_rate:.3f}, "
            f"well-formed {self.well_formed:.3f}"
            + (
                f", worker {self.worker_calls:.2f} calls / {self.worker_tokens:.0f} tokens per answer"
                if self.worker_calls is not None
                else ""
            )
        )


def heldout_report(
    client: RolloutClient,
    sandbox: SandboxSession,
    mode: Mode,
    tasks: Sequence[Task],
    prompts: Sequence[Sequence[int]],
    *,
    split: str,
    n: int,
    ks: Sequence[int],
    params: SamplingParams,
    seeds: Sequence[int] | None,
) -> tuple[EvalReport, list[list[Rollout]], list[Score]]:
    """n samples per task from the rollout server, scored on the hidden tests: the report, the samples (per task)
    and their scores (task-major: the n of tasks[0] first)."""
    started = time.perf_counter()
    groups = generate_groups(client, prompts, params, n, seeds)
    flat_tasks = [task for task in tasks for _ in range(n)]
    completions = [r.text for g in groups for r in g]
    scores = sandbox.run(lambda sb: mode.score(sb, flat_tasks, completions, hidden=True))
    return summarize(tasks, scores, split=split, n=n, ks=ks, seconds=time.perf_counter() - started), groups, scores


def summarize(
    tasks: Sequence[Task], scores: Sequence[Score], *, split: str, n: int, ks: Sequence[int], seconds: float
) -> EvalReport:
    """The report of n scored samples per task (scores task-major: the n of tasks[0] first)."""
    correct = np.array([s.passed_all for s in scores]).reshape(len(tasks), n).sum(axis=1)
    terms = [s.reward.as_dict() for s in scores]
    return EvalReport(
        split=split,
        n=n,
        pass_at_k={k: float(np.mean([pass_at_k(n, int(c), k) for c in correct])) for k in ks},
        reward={key: float(np.mean([t[key] for t in terms])) for key in terms[0]},
        test_pass_rate=float(np.mean([s.pass_rate for s in scores])),
        well_formed=float(np.mean([s.well_formed for s in scores])),
        per_task={task.task_id: int(c) for task, c in zip(tasks, correct)},
        seconds=seconds,
        **worker_usage(scores),
    )


class HeldOutSet:
    """A run's held-out split: its tasks and prompt tokens, evaluated with the grpo.eval settings after any round
    (seeds depend on the round, so `python -m fr_jax.eval` redraws those of the evaluation before training)."""

    def __init__(
        self,
        grpo: GRPOSection,
        mode: Mode,
        tasks: Sequence[Task],
        prompts: Sequence[Sequence[int]],
        *,
        seed: int,
        tokenizer,
    ):
        self.grpo, self.mode, self.tasks, self.prompts, self.seed, self.tokenizer = (
            grpo,
            mode,
            tasks,
            prompts,
            seed,
            tokenizer,
        )

    def seeds(self, round_index: int) -> list[int] | None:
        ev = self.grpo.eval
        if not ev.temperature:
            return None
        return sampling_seeds(self.seed, round_index, EVAL_CALL, count=len(self.tasks) * ev.n)

    def evaluate(
        self, client: RolloutClient, sandbox: SandboxSession, round_index: int
    ) -> tuple[EvalReport, list[dict[str, Any]]]:
        """The report after `round_index` rounds, and its samples' records."""
        ev, seeds = self.grpo.eval, self.seeds(round_index)
        report, samples, scores = heldout_report(
            client,
            sandbox,
            self.mode,
            self.tasks,
            self.prompts,
            split=self.grpo.data.eval_split,
            n=ev.n,
            ks=ev.k,
            params=eval_params(self.grpo),
            seeds=seeds,
        )
        _log.info("held-out after round %d: %s (%.1fs)", round_index, report.line(), report.seconds)
        records = eval_records(self.tasks, self.prompts, samples, scores, seeds, self.tokenizer, self.mode.name)
        return report, records

    def evaluate_fixed(self, sandbox: SandboxSession, answer: str, method: str) -> tuple[EvalReport, list[dict]]:
        """The same `answer` (e.g. a fixed workflow's design) scored for every task, grpo.eval.n times: a baseline
        run through the same sandbox, worker, budgets and tests as the policy's answers."""
        started, n = time.perf_counter(), self.grpo.eval.n
        flat = [task for task in self.tasks for _ in range(n)]
        scores = sandbox.run(lambda sb: self.mode.score(sb, flat, [answer] * len(flat), hidden=True))
        report = summarize(
            self.tasks,
            scores,
            split=self.grpo.data.eval_split,
            n=n,
            ks=self.grpo.eval.k,
            seconds=time.perf_counter() - started,
        )
        _log.info("%s: %s (%.1fs)", method, report.line(), report.seconds)
        records = [
            sample_record(
                task, i // n, i % n, self.tokenizer.decode(self.prompts[i // n]), answer, score, mode=self.mode.name
            )
            for i, (task, score) in enumerate(zip(flat, scores))
        ]
        return report, records


def final_report(summary: dict[str, Any]) -> str:
    """The lines a GRPO run prints at its end: the training reward's first and last rounds, held-out before/after."""
    lines = [
        f"GRPO rounds {summary['start_round'] + 1}-{summary['rounds']} done in {summary['wall_s']:.0f} s: "
        f"{summary['train_tasks']} training tasks, {summary['eval_tasks']} held-out tasks"
    ]
    rewards = summary["round_rewards"]
    if rewards:
        k = max(1, min(3, len(rewards) // 2))
        lines.append(
            f"  training reward (mean over a round's samples): first {k} round(s) {np.mean(rewards[:k]):.3f} "
            f"-> last {k} round(s) {np.mean(rewards[-k:]):.3f}"
        )
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if after:
        for key, value in after["pass_at_k"].items():
            was = f"{before['pass_at_k'][key]:.3f} -> " if before else ""
            lines.append(f"  held-out {key} ({after['split']}, {after['tasks']} tasks): {was}{value:.3f}")
        was = f"{before['reward']['total']:.3f} -> " if before else ""
        lines.append(f"  held-out mean reward: {was}{after['reward']['total']:.3f}")
    return "\n".join(lines)

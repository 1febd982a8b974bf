"""The rollout records of a GRPO round or an evaluation (docs/records.md): one plain dict per sample, built from
what the round collected, for fr_jax.trainer.records.RecordWriter to write off the training thread."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fr_jax.data.tasks import Task
from fr_jax.rl.collect import Group
from fr_jax.rl.modes import Score
from fr_jax.rollout import Rollout


def sample_record(
    task: Task,
    group: int,
    sample: int,
    prompt: str,
    completion: str,
    score: Score,
    *,
    mode: str,
    rollout: Rollout | None = None,
    seed: int | None = None,
    overlong: float = 0.0,
    advantage: float | None = None,
    has_variance: bool | None = None,
    response_tokens: int | None = None,
) -> dict[str, Any]:
    reward = {**score.reward.as_dict(), "overlong": float(overlong), "total": float(score.reward.total + overlong)}
    return {
        "task_id": task.task_id,
        "dataset": task.dataset,
        "mode": mode,
        "group": group,
        "sample": sample,
        "prompt": prompt,
        "completion": completion,
        **score.record_fields(),
        "weight_version": rollout.weight_version if rollout is not None else None,
        "seed": seed,
        "finish_reason": rollout.finish_reason if rollout is not None else None,
        "response_tokens": len(rollout.output_ids) if rollout is not None else response_tokens,
        "reward": reward,
        "advantage": advantage,
        "group_has_variance": has_variance,
    }


def round_records(
    drawn: Sequence[Group], trained: Sequence[Group], advantages: np.ndarray, tokenizer, mode: str
) -> list[dict[str, Any]]:
    """Every sample drawn in a round; the groups the update trained on (`trained`, in the batch's order) carry
    their advantages, a group dynamic sampling dropped has none."""
    per_group = {id(x): row for x, row in zip(trained, np.asarray(advantages).reshape(len(trained), -1))}
    records = []
    for g, x in enumerate(drawn):
        prompt, row = tokenizer.decode(x.prompt), per_group.get(id(x))
        for j, (rollout, score) in enumerate(zip(x.rollouts, x.scores)):
            records.append(
                sample_record(
                    x.task,
                    g,
                    j,
                    prompt,
                    rollout.text,
                    score,
                    mode=mode,
                    rollout=rollout,
                    seed=x.seeds[j] if x.seeds is not None else None,
                    overlong=float(x.overlong[j]),
                    advantage=float(row[j]) if row is not None else None,
                    has_variance=x.has_variance,
                )
            )
    return records


def eval_records(
    tasks: Sequence[Task],
    prompts: Sequence[Sequence[int]],
    rollouts: Sequence[Sequence[Rollout]],
    scores: Sequence[Score],
    seeds: Sequence[int] | None,
    tokenizer,
    mode: str,
) -> list[dict[str, Any]]:
    """The samples of a held-out evaluation: n per task (task-major), group = the task's index."""
    records = []
    for g, (task, prompt, samples) in enumerate(zip(tasks, prompts, rollouts)):
        text, n = tokenizer.decode(prompt), len(samples)
        for j, rollout in enumerate(samples):
            i = g * n + j
            seed = seeds[i] if seeds is not None else None
            records.append(
                sample_record(task, g, j, text, rollout.text, scores[i], mode=mode, rollout=rollout, seed=seed)
            )
    return records

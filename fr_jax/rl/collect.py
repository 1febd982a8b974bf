"""Collect, the first phase of a GRPO round: task stream -> n samples per prompt -> scores -> groups.

Tasks come from a seeded stream whose position is checkpointed. The rollout server samples n completions of each
prompt, each its own request with a sampling seed derived from (train.seed, round, call), so a resumed run samples
exactly what the uninterrupted run would have (with the same weights). The mode runs the completions in the
sandbox and scores them with the multi-purpose reward; DAPO's overlong penalty is added when
grpo.overlong_buffer > 0. With grpo.dynamic_sampling, groups whose rewards are all equal are dropped and more tasks
are sampled, up to grpo.max_sampling_rounds calls. A rollout or sandbox failure is retried by the clients and then
stops the run with the cause: it is never scored.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fr_jax.config import GRPOSection
from fr_jax.data.tasks import Task
from fr_jax.rl.grpo import informative_groups, overlong_penalty
from fr_jax.rl.modes import Mode, Score, worker_usage
from fr_jax.rollout import Rollout, RolloutClient, RolloutError
from fr_jax.rollout.protocol import SamplingParams
from fr_jax.sandbox.session import SandboxSession

_log = logging.getLogger(__name__)
EVAL_CALL = 1 << 20  # the `call` of evaluation seeds, apart from a round's rollout calls 0, 1, ...


class TaskStream:
    """Training tasks in a fresh seeded order every epoch; its position is checkpointed, so a resumed run
    continues with the very tasks the uninterrupted run would have drawn."""

    def __init__(self, tasks: Sequence[Task], seed: int):
        if not tasks:
            raise ValueError("the task stream needs at least one task")
        self.tasks = list(tasks)
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.tasks))

    def take(self, count: int) -> list[Task]:
        taken = []
        for _ in range(count):
            if self.cursor == len(self.tasks):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            taken.append(self.tasks[self._order[self.cursor]])
            self.cursor += 1
        return taken

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "size": len(self.tasks)}

    def set_state(self, state: dict[str, Any]) -> None:
        if state["size"] != len(self.tasks):
            raise ValueError(
                f"the checkpoint's task stream had {state['size']} tasks, this run has {len(self.tasks)} "
                f"(the grpo.data settings changed since it was written)"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation()


def sampling_seeds(seed: int, round_index: int, call: int, *, count: int) -> list[int]:
    """`count` sampling seeds that depend only on (seed, round, call): a resumed run draws the seeds the
    uninterrupted run would have, and `python -m fr_jax.eval` those of the run's evaluation before training."""
    return np.random.default_rng([seed, round_index, call]).integers(0, 2**31 - 1, size=count).tolist()


def generate_groups(
    client: RolloutClient,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    n: int,
    seeds: Sequence[int] | None = None,
) -> list[list[Rollout]]:
    """n samples of every prompt, as one /generate batch of prompts x n single-sample requests.

    Each sample is its own request so that it can carry its own sampling_seed: with SGLang, the n samples of a
    request with a seed would share one random stream. The servers prefill a repeated prompt once.
    """
    expanded = [list(p) for p in prompts for _ in range(n)]
    if seeds is None:
        per_sample: SamplingParams | list[SamplingParams] = params.model_copy(update={"n": 1})
    else:
        if len(seeds) != len(expanded):
            raise ValueError(f"{len(seeds)} seeds for {len(expanded)} samples")
        per_sample = [params.model_copy(update={"n": 1, "sampling_seed": int(s)}) for s in seeds]
    flat = client.generate(expanded, per_sample)
    return [[flat[i * n + j][0] for j in range(n)] for i in range(len(prompts))]


@dataclasses.dataclass
class Group:
    """The n samples of one prompt and what they scored."""

    task: Task
    prompt: list[int]
    rollouts: list[Rollout]
    scores: list[Score]
    overlong: np.ndarray  # [n] DAPO penalty (0 when off)
    seeds: list[int] | None = None  # each sample's sampling seed (None: unseeded)

    @property
    def rewards(self) -> np.ndarray:
        return np.array([s.reward.total for s in self.scores]) + self.overlong

    @property
    def has_variance(self) -> bool:
        return bool(informative_groups(self.rewards[None])[0])


@dataclasses.dataclass
class RoundData:
    """What collecting one round gave: the groups the update trains on, every group drawn (dynamic sampling's
    dropped ones too: the round's reward metrics describe all of them), and how long sampling and scoring took."""

    groups: list[Group]
    drawn: list[Group]
    stats: dict[str, float]
    timing: dict[str, float]


class Collector:
    """The collect phase of every round of one run."""

    def __init__(
        self,
        grpo: GRPOSection,
        mode: Mode,
        stream: TaskStream,
        prompt_of: dict[str, list[int]],
        sampling: SamplingParams,
        seed: int,
    ):
        self.grpo, self.mode, self.stream, self.prompt_of, self.sampling, self.seed = (
            grpo,
            mode,
            stream,
            prompt_of,
            sampling,
            seed,
        )

    def _sample(
        self, client: RolloutClient, tasks: list[Task], seeds: list[int] | None, version: str
    ) -> list[list[Rollout]]:
        prompts = [self.prompt_of[t.task_id] for t in tasks]
        try:
            groups = generate_groups(client, prompts, self.sampling, self.grpo.rollout.n, seeds)
        except RolloutError as err:
            raise RolloutError(f"rollout of {len(tasks)} prompts failed: {err}") from err
        stale = {r.weight_version for g in groups for r in g if r.weight_version is not None} - {version}
        if stale:
            raise RolloutError(
                f"the server sampled with weight_version {sorted(map(str, stale))}, expected {version!r}"
                f" (another process changed its weights?)"
            )
        return groups

    def _group(self, task: Task, rollouts: list[Rollout], scores: list[Score], seeds: list[int] | None) -> Group:
        g = self.grpo
        overlong = np.zeros(len(rollouts))
        if g.overlong_buffer:
            lengths = np.array([len(r.output_ids) for r in rollouts])
            penalty = overlong_penalty(lengths, max_len=g.rollout.max_new_tokens, buffer=g.overlong_buffer)
            overlong = np.asarray(penalty)
        return Group(task, self.prompt_of[task.task_id], rollouts, scores, overlong, seeds)

    def collect(self, client: RolloutClient, sandbox: SandboxSession, round_index: int, version: str) -> RoundData:
        g = self.grpo
        wanted, n = g.rollout.prompts_per_step, g.rollout.n
        kept: list[Group] = []
        dropped: list[Group] = []
        timing = {"rollout_s": 0.0, "sandbox_s": 0.0}
        calls = 0
        while len(kept) < wanted and calls < (g.max_sampling_rounds if g.dynamic_sampling else 1):
            tasks = self.stream.take(wanted - len(kept))
            seeds = (
                sampling_seeds(self.seed, round_index, calls, count=len(tasks) * n) if g.rollout.seed_requests else None
            )
            started = time.perf_counter()
            sampled = self._sample(client, tasks, seeds, version)
            timing["rollout_s"] += time.perf_counter() - started
            started = time.perf_counter()
            flat_tasks = [t for t in tasks for _ in range(n)]
            completions = [r.text for s in sampled for r in s]
            hidden = g.sandbox.reward_tests == "hidden"
            score = functools.partial(self.mode.score, tasks=flat_tasks, completions=completions, hidden=hidden)
            scores = sandbox.run(score)
            timing["sandbox_s"] += time.perf_counter() - started
            for i, (task, rollouts) in enumerate(zip(tasks, sampled)):
                group_seeds = seeds[i * n : (i + 1) * n] if seeds is not None else None
                group = self._group(task, rollouts, scores[i * n : (i + 1) * n], group_seeds)
                (kept if group.has_variance or not g.dynamic_sampling else dropped).append(group)
            calls += 1
        drawn = kept + dropped
        stats = {
            "groups/zero_variance_frac": float(np.mean([not x.has_variance for x in drawn])),
            "groups/sampling_calls": float(calls),
            "groups/refilled_zero_variance": float(max(0, wanted - len(kept))),
        }
        if len(kept) < wanted:
            _log.warning(
                "dynamic sampling found %d informative groups of %d in %d calls; filling with groups whose "
                "rewards are all equal (their advantages are 0)",
                len(kept),
                wanted,
                calls,
            )
            kept += dropped[: wanted - len(kept)]
        return RoundData(kept, drawn, stats, timing)


def round_scalars(drawn: Sequence[Group]) -> dict[str, float]:
    """The round's reward, test and length figures over every sample drawn."""
    scores = [s for x in drawn for s in x.scores]
    rollouts = [r for x in drawn for r in x.rollouts]
    out = {
        f"reward/{k}": float(np.mean([s.reward.as_dict()[k] for s in scores]))
        for k in ("performance", "complexity", "efficiency", "format")
    }
    out["reward/overlong"] = float(np.mean(np.concatenate([x.overlong for x in drawn])))
    out["reward/total"] = float(np.mean(np.concatenate([x.rewards for x in drawn])))
    out["pass_rate"] = float(np.mean([s.pass_rate for s in scores]))
    out["all_pass_rate"] = float(np.mean([s.passed_all for s in scores]))
    out["well_formed"] = float(np.mean([s.well_formed for s in scores]))
    usage = worker_usage(scores)
    if usage:  # a mode whose answers run a worker LLM
        out["worker/calls"], out["worker/tokens"] = usage["worker_calls"], usage["worker_tokens"]
    lengths = [len(r.output_ids) for r in rollouts]
    out["response/length_mean"], out["response/length_max"] = float(np.mean(lengths)), float(max(lengths))
    out["response/truncated_frac"] = float(np.mean([r.finish_reason == "length" for r in rollouts]))
    return out


def samples_text(groups: Sequence[Group], tokenizer, shown: int) -> str:
    """The best completion of the first `shown` groups, with their prompt and rewards (TensorBoard text)."""
    parts = []
    for x in groups[:shown]:
        best = int(np.argmax(x.rewards))
        terms = ", ".join(f"{k} {v:.3f}" for k, v in x.scores[best].reward.as_dict().items())
        parts.append(
            f"## {x.task.task_id} (rewards {np.round(x.rewards, 3).tolist()})\n### prompt\n"
            f"{tokenizer.decode(x.prompt)}\n### best completion ({terms})\n{x.rollouts[best].text}"
        )
    return "\n\n".join(parts)

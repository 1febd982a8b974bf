"""From tasks to a training batch: the task stream, prompt tokens, n samples per prompt, and the row layout.

Row layout (one row per sample, groups contiguous: all n samples of prompt 0, then of prompt 1, ...):

    input_ids  [rows, P + R]   the prompt left-padded to P tokens, then the response right-padded to R tokens
    positions  [rows, P + R]   0, 1, ... over the real tokens of the row (padding gets 0)
    segment_ids[rows, P + R]   1 on real tokens, 0 on padding (the decoder's attention mask)
    targets    [rows, R]       the sampled response tokens
    mask       [rows, R]       1 on response tokens, 0 on padding
    rollout_logp [rows, R]     the rollout server's log-prob of each response token

Left-padding the prompts puts every row's last prompt token at P - 1, so the logits that predict the response are
the same slice [P - 1, P - 1 + R) of every row. P is fixed for a run (the longest training prompt) and R is
max_new_tokens, so the trainer compiles one step shape.

Prompts are tokenized here (chat template applied) and sent to the server as input_ids, so the server samples
after exactly the tokens the trainer scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from fr_jax.data.tasks import Task
from fr_jax.rollout import Rollout, RolloutClient
from fr_jax.rollout.protocol import SamplingParams


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


def encode_prompt(tokenizer, messages: list[dict[str, str]], *, chat_template: bool) -> list[int]:
    """Token ids of the prompt: the chat template with the assistant turn opened, or the user text alone."""
    if chat_template:
        if tokenizer.chat_template is None:
            raise ValueError("grpo.prompt.chat_template is true but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode("\n\n".join(m["content"] for m in messages))


EVAL_CALL = 1 << 20  # the `call` of evaluation seeds, apart from a round's rollout calls 0, 1, ...


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


@dataclasses.dataclass(frozen=True)
class Layout:
    prompt_len: int  # P
    response_len: int  # R


def pack_rollouts(
    prompts: Sequence[Sequence[int]], rollouts: Sequence[Rollout], layout: Layout
) -> dict[str, np.ndarray]:
    """The rows of the module docstring, one per (prompt, rollout) pair, in order."""
    if len(prompts) != len(rollouts):
        raise ValueError(f"{len(prompts)} prompts for {len(rollouts)} rollouts")
    rows, p, r = len(rollouts), layout.prompt_len, layout.response_len
    input_ids = np.zeros((rows, p + r), np.int32)
    segment_ids = np.zeros((rows, p + r), np.int32)
    targets = np.zeros((rows, r), np.int32)
    mask = np.zeros((rows, r), np.float32)
    rollout_logp = np.zeros((rows, r), np.float32)
    for i, (prompt, rollout) in enumerate(zip(prompts, rollouts)):
        out = rollout.output_ids
        if not 0 < len(prompt) <= p:
            raise ValueError(f"row {i}: prompt of {len(prompt)} tokens does not fit the layout's {p}")
        if len(out) > r:
            raise ValueError(f"row {i}: the server returned {len(out)} tokens, more than max_new_tokens={r}")
        input_ids[i, p - len(prompt) : p] = prompt
        input_ids[i, p : p + len(out)] = out
        segment_ids[i, p - len(prompt) : p + len(out)] = 1
        targets[i, : len(out)] = out
        mask[i, : len(out)] = 1.0
        rollout_logp[i, : len(out)] = rollout.logprobs
    positions = np.where(segment_ids > 0, np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return {
        "input_ids": input_ids,
        "positions": positions,
        "segment_ids": segment_ids,
        "targets": targets,
        "mask": mask,
        "rollout_logp": rollout_logp,
    }

"""Batch, the second phase of a GRPO round: groups -> the update's rows with their advantages, on every process.

Row layout (one row per sample, groups contiguous: all n samples of prompt 0, then of prompt 1, ...):

    input_ids  [rows, P + R]   the prompt left-padded to P tokens, then the response right-padded to R tokens
    positions  [rows, P + R]   0, 1, ... over the real tokens of the row (padding gets 0)
    segment_ids[rows, P + R]   1 on real tokens, 0 on padding (the decoder's attention mask)
    targets    [rows, R]       the sampled response tokens
    mask       [rows, R]       1 on response tokens, 0 on padding
    rollout_logp [rows, R]     the rollout server's log-prob of each response token
    advantages [rows]          the sample's group advantage

Left-padding the prompts puts every row's last prompt token at P - 1, so the logits that predict the response are
the same slice [P - 1, P - 1 + R) of every row. P is fixed for a run (the longest training prompt) and R is
max_new_tokens, so the trainer compiles one step shape. Process 0 builds the rows; the others receive them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from fr_jax.config import GRPOLossConfig
from fr_jax.rl.collect import Group
from fr_jax.rl.grpo import group_advantages
from fr_jax.rollout import Rollout


@dataclasses.dataclass(frozen=True)
class Layout:
    prompt_len: int  # P
    response_len: int  # R


def row_fields(layout: Layout) -> dict[str, tuple[tuple[int, ...], type]]:
    """Each field of a row: its shape (without the row axis) and dtype."""
    p, r = layout.prompt_len, layout.response_len
    return {
        "input_ids": ((p + r,), np.int32),
        "positions": ((p + r,), np.int32),
        "segment_ids": ((p + r,), np.int32),
        "targets": ((r,), np.int32),
        "mask": ((r,), np.float32),
        "rollout_logp": ((r,), np.float32),
        "advantages": ((), np.float32),
    }


def empty_rows(layout: Layout, rows: int) -> dict[str, np.ndarray]:
    return {k: np.zeros((rows, *shape), dtype) for k, (shape, dtype) in row_fields(layout).items()}


def pack_rollouts(
    prompts: Sequence[Sequence[int]], rollouts: Sequence[Rollout], layout: Layout
) -> dict[str, np.ndarray]:
    """The rows of the module docstring, one per (prompt, rollout) pair, in order (advantages left at 0)."""
    if len(prompts) != len(rollouts):
        raise ValueError(f"{len(prompts)} prompts for {len(rollouts)} rollouts")
    p, r = layout.prompt_len, layout.response_len
    batch = empty_rows(layout, len(rollouts))
    for i, (prompt, rollout) in enumerate(zip(prompts, rollouts)):
        out = rollout.output_ids
        if not 0 < len(prompt) <= p:
            raise ValueError(f"row {i}: prompt of {len(prompt)} tokens does not fit the layout's {p}")
        if len(out) > r:
            raise ValueError(f"row {i}: the server returned {len(out)} tokens, more than max_new_tokens={r}")
        batch["input_ids"][i, p - len(prompt) : p] = prompt
        batch["input_ids"][i, p : p + len(out)] = out
        batch["segment_ids"][i, p - len(prompt) : p + len(out)] = 1
        batch["targets"][i, : len(out)] = out
        batch["mask"][i, : len(out)] = 1.0
        batch["rollout_logp"][i, : len(out)] = rollout.logprobs
    segments = batch["segment_ids"]
    batch["positions"] = np.where(segments > 0, np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    return batch


def group_rows(groups: Sequence[Group], layout: Layout, loss: GRPOLossConfig) -> dict[str, np.ndarray]:
    """The rows of `groups` (each group's n samples in order) with their group advantages."""
    batch = pack_rollouts(
        [x.prompt for x in groups for _ in x.rollouts], [r for x in groups for r in x.rollouts], layout
    )
    advantages = group_advantages(np.stack([x.rewards for x in groups]), norm_by_std=loss.norm_adv_by_std, eps=loss.eps)
    batch["advantages"] = np.asarray(advantages.advantages, np.float32).reshape(-1)
    return batch


def share_rows(batch: dict[str, np.ndarray] | None, layout: Layout, rows: int) -> dict[str, np.ndarray]:
    """Process 0's rows on every process (the others pass None); a one-process run returns `batch` as it is."""
    if jax.process_count() == 1:
        assert batch is not None
        return batch
    return multihost_utils.broadcast_one_to_all(batch if batch is not None else empty_rows(layout, rows))


def share_layout(layout: Layout | None) -> Layout:
    """Process 0's layout (only it tokenizes the prompts: a workflow prompt needs its sandbox) on every process."""
    if jax.process_count() == 1:
        assert layout is not None
        return layout
    sizes = np.array([layout.prompt_len, layout.response_len] if layout is not None else [0, 0], np.int32)
    shared = multihost_utils.broadcast_one_to_all(sizes)
    return Layout(int(shared[0]), int(shared[1]))

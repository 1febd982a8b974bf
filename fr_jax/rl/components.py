"""What a GRPO run and an evaluation build alike from the `grpo:` config: the mode, the loss and reward settings,
the tasks of a split with their prompt tokens, and the sampling parameters."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from fr_jax.config import ConfigError, GRPOSection
from fr_jax.data.task_file import load_task_file
from fr_jax.data.tasks import Task, load_tasks
from fr_jax.rl.grpo import GRPOLossConfig
from fr_jax.rl.modes import DirectCode, Mode
from fr_jax.rl.reward import RewardConfig
from fr_jax.rl.rollout_batch import encode_prompt
from fr_jax.rollout.protocol import SamplingParams

_log = logging.getLogger(__name__)


def from_section(cls, values: dict, key: str):
    """A frozen settings dataclass from a free-form config mapping; bad keys and values name `key`."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; allowed here: {', '.join(allowed)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None


def loss_config(grpo: GRPOSection) -> GRPOLossConfig:
    """grpo.loss; Dr.GRPO's constant L defaults to max_new_tokens."""
    values = dict(grpo.loss)
    if values.get("agg") == "seq-mean-token-sum-norm":
        values.setdefault("max_gen_len", grpo.rollout.max_new_tokens)
    return from_section(GRPOLossConfig, values, "grpo.loss")


def _direct_code(grpo: GRPOSection, tokenizer) -> Mode:
    return DirectCode(
        reward=from_section(RewardConfig, grpo.reward, "grpo.reward"),
        count_tokens=lambda code: len(tokenizer.encode(code, add_special_tokens=False)),
        instruction=grpo.prompt.instruction,
        system=grpo.prompt.system,
        show_public_tests=grpo.prompt.show_public_tests,
        timeout_s=grpo.sandbox.timeout_s,
        memory_limit_mb=grpo.sandbox.memory_limit_mb,
        retries=grpo.sandbox.max_retries,
    )


# grpo.mode -> the builder of that mode from the grpo: section and the policy's tokenizer. Modes of higher floors
# register here (fr_jax.flow.task registers "workflow"; the CLIs import it), since rl must not import them.
MODE_BUILDERS: dict[str, Callable[[GRPOSection, Any], Mode]] = {"direct": _direct_code}


def register_mode(name: str, builder: Callable[[GRPOSection, Any], Mode]) -> None:
    MODE_BUILDERS[name] = builder


def build_mode(grpo: GRPOSection, tokenizer) -> Mode:
    if grpo.mode not in MODE_BUILDERS:
        raise ConfigError(
            f"grpo.mode={grpo.mode!r}: known modes are {sorted(MODE_BUILDERS)} (`workflow` is there "
            "once fr_jax.flow.task is imported, as python -m fr_jax.train and fr_jax.eval do)"
        )
    return MODE_BUILDERS[grpo.mode](grpo, tokenizer)


def _reference_lines(task: Task) -> int | None:
    if task.reference_solution is None:
        return None
    return sum(1 for line in task.reference_solution.splitlines() if line.strip())


def load_prompts(
    grpo: GRPOSection, split: str, mode: Mode, tokenizer, *, limit: int | None
) -> tuple[list[Task], list[list[int]]]:
    """The tasks of `split` that pass grpo.data's filters (first `limit` of them), and their prompt tokens."""
    data = grpo.data
    try:
        if data.dataset == "jsonl":
            tasks = load_task_file(data.file, split)
        else:
            tasks = load_tasks(data.dataset, split, data_dir=data.data_dir)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"grpo.data ({data.dataset}, split {split!r}): {err}") from None
    loaded = len(tasks)
    if data.max_reference_lines is not None:
        tasks = [t for t in tasks if (_reference_lines(t) or 0) and _reference_lines(t) <= data.max_reference_lines]
    prompts = [encode_prompt(tokenizer, mode.messages(t), chat_template=grpo.prompt.chat_template) for t in tasks]
    kept = [(t, p) for t, p in zip(tasks, prompts) if len(p) <= data.max_prompt_tokens]
    kept = kept[:limit] if limit is not None else kept
    _log.info(
        "%s/%s: %d tasks loaded, %d with a reference of <= %s lines, %d with a prompt of <= %d tokens; using %d",
        data.dataset,
        split,
        loaded,
        len(tasks),
        data.max_reference_lines,
        len([p for p in prompts if len(p) <= data.max_prompt_tokens]),
        data.max_prompt_tokens,
        len(kept),
    )
    if not kept:
        raise ConfigError(
            f"grpo.data: no task of {data.dataset}/{split} passes the filters (max_reference_lines="
            f"{data.max_reference_lines}, max_prompt_tokens={data.max_prompt_tokens})"
        )
    return [t for t, _ in kept], [p for _, p in kept]


def rollout_params(grpo: GRPOSection) -> SamplingParams:
    r = grpo.rollout
    return SamplingParams(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        stop=list(r.stop) or None,
        no_stop_trim=bool(r.stop),
    )


def eval_params(grpo: GRPOSection) -> SamplingParams:
    return rollout_params(grpo).model_copy(
        update={
            "temperature": grpo.eval.temperature,
            "max_new_tokens": grpo.eval.max_new_tokens or grpo.rollout.max_new_tokens,
        }
    )

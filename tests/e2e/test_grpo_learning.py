"""GRPO learns: a tiny llama that knows the answer's format but not the answer (tests/support/grpo.py) is trained
to write `def f(): return 3` for "three" and `return 7` for "seven", which it can only do by reading the prompt.
Every reward comes from the real sandbox running the written function; rollouts come from the local server over
HTTP; fixed seeds. The mean reward of the last rounds is far above that of the first, and greedy answers on the
evaluation split (the same two prompts) go from wrong to right."""

import numpy as np

from fr_jax.cli import MODES
from fr_jax.config import parse_config
from fr_jax.rl.loop import run_grpo
from fr_jax.trainer.metrics import read_metrics
from fr_jax.trainer.runtime import start_runtime
from tests.support.grpo import KNOWS_THE_FORMAT, build_tokenizer, grpo_config, write_bigram_model, write_tasks

ROUNDS = 16


def test_reward_rises_with_grpo_on_sandbox_scored_tasks(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    prior = write_bigram_model(tmp_path / "prior", tokenizer, KNOWS_THE_FORMAT)
    cfg = grpo_config(
        tmp_path / "run",
        prior,
        write_tasks(tmp_path / "tasks.jsonl"),
        rounds=ROUNDS,
        ppo_epochs=2,
        dynamic_sampling=True,
        samples_every=0,
    )
    cfg["checkpoint"]["every_steps"] = ROUNDS
    summary = run_grpo(start_runtime(parse_config(cfg)), MODES)
    rewards = [m["reward/total"] for m in read_metrics(tmp_path / "run") if "reward/total" in m]
    assert len(rewards) == ROUNDS
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.5, rewards
    assert summary["eval_before"]["pass_at_k"]["pass@1"] < 1.0 == summary["eval_after"]["pass_at_k"]["pass@1"]

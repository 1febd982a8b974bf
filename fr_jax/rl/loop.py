"""The GRPO stage: rounds of rollout -> sandbox -> reward -> group advantages -> sharded update -> weight sync.

One round (train.steps rounds in all):
1. prompts_per_step tasks come from the seeded task stream; the rollout server samples n completions of each,
   returning their log-probs. Each sample carries a seed derived from (train.seed, round), so a resumed run samples
   exactly what the uninterrupted run would have (with the same weights).
2. The mode (fr_jax.rl.modes) runs the completions in the sandbox and scores them with the multi-purpose reward,
   plus DAPO's overlong penalty when grpo.overlong_buffer > 0. With grpo.dynamic_sampling, groups whose rewards are
   all equal are dropped and more tasks are sampled, up to grpo.max_sampling_rounds calls.
3. Group advantages. The trainer's log-probs before the update (the PPO "old" policy) are computed only when the
   batch gets more than one optimizer step; the frozen reference model exists only when loss.beta > 0.
4. ppo_epochs passes over shuffled mini-batches of train.batch_size rows (TrainStep + the GRPO loss). The server's
   log-probs are the rollout policy of the truncated importance-sampling correction; their mismatch with the
   trainer's is logged.
5. The weights go to the server: an HF directory on a fast local path, /update_weights_from_disk with the new
   weight_version, and a check that the server reports it. Every rollout must carry the version it was asked for.
6. Metrics (every reward term, pass rates, KL, clipping, entropy, importance ratios, lengths, zero-variance groups,
   the time of each phase) go to TensorBoard and metrics.jsonl; every train.eval_every rounds and at both ends the
   held-out split is evaluated; checkpoints hold the train state and the rollout state (task stream position,
   weight version).
A rollout or sandbox failure is retried by the clients and then stops the run with the cause: it is never scored.
Reward metrics describe every sample drawn in the round (dynamic sampling's dropped groups included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import pathlib
import resource
import shutil
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from fr_jax.config import Config, ConfigError
from fr_jax.data.tasks import Task
from fr_jax.models.decoder import abstract_model
from fr_jax.models.hf import save_pretrained
from fr_jax.rl.components import build_mode, eval_params, load_prompts, loss_config, rollout_params
from fr_jax.rl.evaluation import EvalReport, evaluate
from fr_jax.rl.grpo import group_advantages, merge_metrics, needs_reference, overlong_penalty
from fr_jax.rl.modes import Score, score_completions, worker_usage
from fr_jax.rl.rollout_batch import EVAL_CALL, Layout, TaskStream, generate_groups, pack_rollouts, sampling_seeds
from fr_jax.rl.services import rollout_service, sandbox_service
from fr_jax.rl.update import LogprobPass, grpo_loss_fn, ppo_update, summarize_updates
from fr_jax.rollout import Rollout, RolloutClient, RolloutError, sync_weights
from fr_jax.trainer.checkpoint import Checkpointer
from fr_jax.trainer.metrics import MetricsWriter
from fr_jax.trainer.optim import build_optimizer
from fr_jax.trainer.runtime import Runtime, export_hf, load_model, load_tokenizer, model_config
from fr_jax.trainer.step import TrainStep

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Group:
    """The n samples of one prompt and what they scored."""

    task: Task
    prompt: list[int]
    rollouts: list[Rollout]
    scores: list[Score]
    overlong: np.ndarray  # [n] DAPO penalty (0 when off)

    @property
    def rewards(self) -> np.ndarray:
        return np.array([s.reward.total for s in self.scores]) + self.overlong


def _fast_dir(configured: str | None, run_dir: pathlib.Path) -> tuple[pathlib.Path, bool]:
    """Where weights are written for the server, and whether it is a scratch folder to remove at the end.

    By default a folder in /dev/shm (memory: the write and the server's read cost no disk) named after the run
    directory, so a run killed before its clean-up leaves one stale copy that its resumption reuses, not one per
    attempt. Without a writable /dev/shm: <run_dir>/rollout_weights."""
    if configured:
        return pathlib.Path(configured), False
    shm = pathlib.Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        digest = hashlib.sha1(str(run_dir.absolute()).encode()).hexdigest()[:12]
        return shm / f"fr_jax-weights-{digest}", True
    return run_dir / "rollout_weights", False


class GRPORun:
    """One GRPO stage run: build everything from the config, then `run()`."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        cfg: Config = rt.cfg
        self.cfg, self.grpo, self.train = cfg, cfg.grpo, cfg.train
        g = self.grpo
        self.loss_cfg = loss_config(g)
        self.tokenizer = load_tokenizer(cfg.model)
        self.model_cfg = model_config(cfg.model)
        if len(self.tokenizer) > self.model_cfg.vocab_size:
            raise ConfigError(
                f"model.tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is "
                f"{self.model_cfg.vocab_size}"
            )
        self.mode = build_mode(g, self.tokenizer)
        self.train_tasks, train_prompts = load_prompts(
            g, g.data.train_split, self.mode, self.tokenizer, limit=g.data.train_limit
        )
        self.eval_tasks, self.eval_prompts = load_prompts(
            g, g.data.eval_split, self.mode, self.tokenizer, limit=g.data.eval_limit
        )
        self.prompt_of = dict(zip((t.task_id for t in self.train_tasks), train_prompts))
        self.layout = Layout(max(map(len, train_prompts)), g.rollout.max_new_tokens)
        if self.layout.prompt_len + self.layout.response_len > self.model_cfg.max_position_embeddings:
            raise ConfigError(
                f"the longest training prompt ({self.layout.prompt_len} tokens) + grpo.rollout."
                f"max_new_tokens ({self.layout.response_len}) exceed the model's context "
                f"({self.model_cfg.max_position_embeddings}); lower grpo.data.max_prompt_tokens"
            )
        self.rows = g.rollout.prompts_per_step * g.rollout.n
        if self.rows % self.train.batch_size:
            raise ConfigError(
                f"grpo.rollout.prompts_per_step x n = {self.rows} rows per round must be a multiple "
                f"of train.batch_size={self.train.batch_size} (rows per optimizer step)"
            )
        self.steps_per_round = g.ppo_epochs * self.rows // self.train.batch_size
        self.stream = TaskStream(self.train_tasks, g.data.shuffle_seed)
        self.sampling = rollout_params(g)

        optimizer, schedule = build_optimizer(cfg.optim, self.train.steps * self.steps_per_round)
        self.step_fn = TrainStep(
            abstract_model(self.model_cfg),
            grpo_loss_fn(self.loss_cfg, g.rollout.temperature),
            optimizer,
            mesh=rt.mesh,
            micro_batches=self.train.micro_batches,
            learning_rate_fn=schedule,
            combine_metrics=merge_metrics,
        )
        micro_rows = self.train.batch_size // self.train.micro_batches
        self.needs_old = self.steps_per_round > 1
        self.logp_pass = LogprobPass(self.step_fn, g.rollout.temperature, micro_rows)
        self.ckpt = Checkpointer(
            rt.run_dir / "checkpoints",
            every_steps=cfg.checkpoint.every_steps,
            keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save,
        )
        self.sync_dir, self._sync_dir_is_temp = _fast_dir(g.rollout.sync_dir, rt.run_dir)
        self.ref_params = None  # the frozen reference, loaded only when loss.beta > 0

    # ----------------------------------------------------------------------------------------- state

    def _initial_params(self) -> dict:
        return nnx.to_pure_dict(nnx.state(load_model(self.cfg.model, self.rt.mesh)))

    def _restore(self):
        start = self.ckpt.latest_step()
        if start is None:
            return 0, self.step_fn.init_state(self._initial_params(), self.train.seed), "0"
        state, host_states = self.ckpt.restore(self.step_fn.abstract_state())
        host = host_states[0]
        self.stream.set_state(host["tasks"])
        _log.info(
            "resuming after round %d (weight version %s, task stream %s)", start, host["weight_version"], host["tasks"]
        )
        return start, state, host["weight_version"]

    # ------------------------------------------------------------------------------------- one round

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

    def _collect(self, client: RolloutClient, sandbox_url: str, round_index: int, version: str):
        """The round's groups (dynamic sampling applied) and what sampling them took."""
        g = self.grpo
        wanted, n = g.rollout.prompts_per_step, g.rollout.n
        kept: list[Group] = []
        dropped: list[Group] = []
        timing = {"rollout_s": 0.0, "sandbox_s": 0.0}
        calls = 0
        while len(kept) < wanted and calls < (g.max_sampling_rounds if g.dynamic_sampling else 1):
            tasks = self.stream.take(wanted - len(kept))
            seeds = (
                sampling_seeds(self.train.seed, round_index, calls, count=len(tasks) * n)
                if g.rollout.seed_requests
                else None
            )
            started = time.perf_counter()
            sampled = self._sample(client, tasks, seeds, version)
            timing["rollout_s"] += time.perf_counter() - started
            started = time.perf_counter()
            flat_tasks = [t for t in tasks for _ in range(n)]
            scores = score_completions(
                sandbox_url,
                self.mode,
                flat_tasks,
                [r.text for s in sampled for r in s],
                hidden=g.sandbox.reward_tests == "hidden",
            )
            timing["sandbox_s"] += time.perf_counter() - started
            for i, (task, rollouts) in enumerate(zip(tasks, sampled)):
                lengths = np.array([len(r.output_ids) for r in rollouts])
                overlong = (
                    np.asarray(overlong_penalty(lengths, max_len=g.rollout.max_new_tokens, buffer=g.overlong_buffer))
                    if g.overlong_buffer
                    else np.zeros(n)
                )
                group = Group(task, self.prompt_of[task.task_id], rollouts, scores[i * n : (i + 1) * n], overlong)
                informative = np.ptp(group.rewards) > 0
                (kept if informative or not g.dynamic_sampling else dropped).append(group)
            calls += 1
        everything = kept + dropped
        stats = {
            "groups/zero_variance_frac": float(np.mean([np.ptp(x.rewards) == 0 for x in everything])),
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
        return kept, everything, stats, timing

    def _rows(self, groups: list[Group] | None) -> dict[str, np.ndarray]:
        """The update's rows with their advantages: process 0 builds them, every process gets them."""
        n = self.grpo.rollout.n
        if groups is not None:
            batch = pack_rollouts(
                [x.prompt for x in groups for _ in range(n)], [r for x in groups for r in x.rollouts], self.layout
            )
            advantages = group_advantages(
                np.stack([x.rewards for x in groups]), norm_by_std=self.loss_cfg.norm_adv_by_std, eps=self.loss_cfg.eps
            )
            batch["advantages"] = np.asarray(advantages.advantages, np.float32).reshape(-1)
        if jax.process_count() > 1:
            batch = multihost_utils.broadcast_one_to_all(batch if groups is not None else self._empty_batch())
        return batch

    def _add_logprobs(self, batch: dict[str, np.ndarray], state) -> None:
        """The old policy's log-probs (several optimizer steps per batch) and the reference's (beta > 0)."""
        if self.needs_old:
            batch["old_logp"] = self.logp_pass(state.params, batch)
        if self.ref_params is not None:
            batch["ref_logp"] = self.logp_pass(self.ref_params, batch)

    def _empty_batch(self) -> dict[str, np.ndarray]:
        p, r = self.layout.prompt_len, self.layout.response_len
        shapes = {
            "input_ids": (p + r, np.int32),
            "positions": (p + r, np.int32),
            "segment_ids": (p + r, np.int32),
            "targets": (r, np.int32),
            "mask": (r, np.float32),
            "rollout_logp": (r, np.float32),
        }
        batch = {k: np.zeros((self.rows, width), dtype) for k, (width, dtype) in shapes.items()}
        batch["advantages"] = np.zeros((self.rows,), np.float32)
        return batch

    def _push_weights(self, client: RolloutClient | None, params, version: str) -> dict[str, float]:
        model = self.step_fn.model(params)
        if client is None:  # processes other than 0 only help gather the shards
            save_pretrained(model, self.sync_dir)
            return {}
        sync = sync_weights(client, model, self.sync_dir, weight_version=version)
        return {
            "sync/gigabytes": sync.gigabytes,
            "sync/seconds_per_gb": sync.seconds_per_gb,
            "time/sync_write_s": sync.write_s,
            "time/sync_load_s": sync.load_s,
        }

    def _evaluate(self, client: RolloutClient, sandbox_url: str, round_index: int) -> EvalReport:
        ev = self.grpo.eval
        seeds = (
            sampling_seeds(self.train.seed, round_index, EVAL_CALL, count=len(self.eval_tasks) * ev.n)
            if ev.temperature
            else None
        )
        report = evaluate(
            client,
            sandbox_url,
            self.mode,
            self.eval_tasks,
            self.eval_prompts,
            split=self.grpo.data.eval_split,
            n=ev.n,
            ks=ev.k,
            params=eval_params(self.grpo),
            seeds=seeds,
        )
        _log.info("held-out after round %d: %s (%.1fs)", round_index, report.line(), report.seconds)
        return report

    def _round_scalars(self, everything: list[Group]) -> dict[str, float]:
        scores = [s for x in everything for s in x.scores]
        rollouts = [r for x in everything for r in x.rollouts]
        out = {
            f"reward/{k}": float(np.mean([s.reward.as_dict()[k] for s in scores]))
            for k in ("performance", "complexity", "efficiency", "format")
        }
        out["reward/overlong"] = float(np.mean(np.concatenate([x.overlong for x in everything])))
        out["reward/total"] = float(np.mean(np.concatenate([x.rewards for x in everything])))
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

    def _samples_text(self, groups: list[Group]) -> str:
        parts = []
        for x in groups[: self.grpo.samples_shown]:
            best = int(np.argmax(x.rewards))
            terms = ", ".join(f"{k} {v:.3f}" for k, v in x.scores[best].reward.as_dict().items())
            parts.append(
                f"## {x.task.task_id} (rewards {np.round(x.rewards, 3).tolist()})\n### prompt\n"
                f"{self.tokenizer.decode(x.prompt)}\n### best completion ({terms})\n{x.rollouts[best].text}"
            )
        return "\n\n".join(parts)

    # ------------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        started_at = time.perf_counter()
        start, state, version = self._restore()
        self.ref_params = self._initial_params() if needs_reference(self.loss_cfg.beta) else None
        main = self.rt.is_main
        writer = MetricsWriter(
            self.rt.run_dir,
            total_steps=self.train.steps,
            start_step=start,
            tensorboard=self.cfg.monitor.tensorboard,
            progress_bar=self.cfg.monitor.progress_bar,
            desc="grpo",
        )
        writer.text("config", self.cfg.to_yaml())
        summary: dict[str, Any] = {
            "start_round": start,
            "rounds": self.train.steps,
            "train_tasks": len(self.train_tasks),
            "eval_tasks": len(self.eval_tasks),
            "layout": dataclasses.asdict(self.layout),
            "round_rewards": [],
        }
        g = self.grpo
        try:
            if g.rollout.launch != "none":  # a launched server starts on the current weights
                save_pretrained(self.step_fn.model(state.params), self.sync_dir)
                if main:
                    self.tokenizer.save_pretrained(self.sync_dir)
            with self._services(version) as (client, sandbox_url):
                if g.rollout.launch == "none":  # a running server: make it serve the run's weights
                    self._push_weights(client, state.params, version)
                if main and start == 0:
                    before = self._evaluate(client, sandbox_url, 0)
                    writer.scalars(0, before.scalars())
                    summary["eval_before"] = before.to_json()
                state = self._train(state, version, start, client, sandbox_url, writer, summary)
                if main:
                    after = self._evaluate(client, sandbox_url, self.train.steps)
                    writer.scalars(self.train.steps, after.scalars())
                    summary["eval_after"] = after.to_json()
        finally:
            self.ckpt.close()
            writer.close()
            if self._sync_dir_is_temp:
                shutil.rmtree(self.sync_dir, ignore_errors=True)
        if self.train.export_hf:
            summary["export_dir"] = str(export_hf(self.rt, self.step_fn.model(state.params), self.tokenizer))
        summary["wall_s"] = time.perf_counter() - started_at
        if main:
            print(final_report(summary), flush=True)
        return summary

    @contextlib.contextmanager
    def _services(self, version: str):
        """(client, sandbox URL) on process 0, (None, None) elsewhere."""
        if not self.rt.is_main:
            yield None, None
            return
        log_dir = self.rt.run_dir / "logs"
        with (
            rollout_service(
                self.grpo.rollout, self.sync_dir, weight_version=version, seed=self.train.seed, log_dir=log_dir
            ) as client,
            sandbox_service(
                self.grpo.sandbox, log_dir=log_dir, workers=self.mode.sandbox_workers(client.base_url)
            ) as sandbox_url,
        ):
            yield client, sandbox_url

    def _train(self, state, version: str, start: int, client, sandbox_url, writer: MetricsWriter, summary: dict) -> Any:
        g, main = self.grpo, self.rt.is_main
        for round_index in range(start, self.train.steps):
            round_started = time.perf_counter()
            scalars: dict[str, float] = {}
            groups = everything = None
            if main:
                groups, everything, stats, timing = self._collect(client, sandbox_url, round_index, version)
                scalars.update(stats)
                scalars.update({f"time/{k}": v for k, v in timing.items()})
                scalars.update(self._round_scalars(everything))
            done = round_index + 1
            batch = self._rows(groups)
            if np.any(batch["advantages"]):
                train_started = time.perf_counter()
                self._add_logprobs(batch, state)
                state, history = ppo_update(
                    self.step_fn,
                    state,
                    batch,
                    epochs=g.ppo_epochs,
                    rows_per_step=self.train.batch_size,
                    micro_batches=self.train.micro_batches,
                    rng=np.random.default_rng([self.train.seed, round_index]),
                )
                scalars["time/train_s"] = time.perf_counter() - train_started
                scalars.update({f"train/{k}": v for k, v in summarize_updates(history).items()})
                version = str(done)
                sync_started = time.perf_counter()
                scalars.update(self._push_weights(client, state.params, version))
                scalars["time/sync_s"] = time.perf_counter() - sync_started
            else:  # no signal: an optimizer step would only move the weights by momentum and weight decay
                _log.info("round %d: every advantage is 0 (all groups' rewards are equal); no update", done)
                scalars["train/skipped"] = 1.0
            scalars["weight_version"] = float(version)
            if main and self.train.eval_every and done % self.train.eval_every == 0 and done < self.train.steps:
                scalars.update(self._evaluate(client, sandbox_url, done).scalars())
            scalars["time/round_s"] = time.perf_counter() - round_started
            scalars["memory/host_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB
            if main:
                summary["round_rewards"].append(scalars["reward/total"])
                writer.scalars(done, scalars)
                if g.samples_every and (done % g.samples_every == 0 or done == start + 1):
                    writer.text("samples", self._samples_text(groups), done)
                writer.progress(
                    done,
                    reward=scalars["reward/total"],
                    pass_rate=scalars["pass_rate"],
                    round_s=scalars["time/round_s"],
                )
            if self.ckpt.due(done) or done == self.train.steps:
                self.ckpt.save(done, state, {"tasks": self.stream.get_state(), "weight_version": version})
        return state


def final_report(summary: dict[str, Any]) -> str:
    """The before/after lines printed at the end of a run."""
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


def run_grpo(rt: Runtime) -> dict[str, Any]:
    """The `stage: grpo` runner (python -m fr_jax.train): train, resuming from the newest checkpoint if any."""
    return GRPORun(rt).run()

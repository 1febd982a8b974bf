"""The GRPO stage, orchestration only. Each round, in order (docs/grpo_round.md follows the data through them):

1. collect (fr_jax.rl.collect): tasks -> n samples per prompt from the rollout server -> scores from the sandbox
   through the mode -> groups, with dynamic sampling;
2. batch (fr_jax.rl.batch): the groups' rows and advantages, identical on every process;
3. update (fr_jax.rl.update): old-policy and reference log-probs when needed, then the PPO epochs;
4. sync: the new weights go to the rollout server, which must report the new weight_version;
5. log and checkpoint: every reward term, pass rates, KL, clipping, lengths, zero-variance groups and the time of
   each phase to TensorBoard and metrics.jsonl; held-out evaluation every train.eval_every rounds and at both
   ends; a checkpoint holds the train state, the task stream's position and the weight version.
Before the first round (fr_jax.rl.setup): the services and the mode, the prompts, then the shared stage start-up
(fr_jax.trainer.stage: restore or init). A rollout or sandbox failure stops the run with its cause: never scored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import shutil
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from fr_jax.config import ConfigError
from fr_jax.models.hf import save_pretrained
from fr_jax.rl.batch import Layout, group_rows, share_layout, share_rows
from fr_jax.rl.collect import Collector, TaskStream, round_scalars, samples_text
from fr_jax.rl.grpo import merge_metrics, needs_reference
from fr_jax.rl.heldout import EvalReport, HeldOutSet
from fr_jax.rl.records import round_records
from fr_jax.rl.setup import (
    ModeBuilder,
    build_mode,
    check_external_services,
    load_prompts,
    planned_rollout,
    rollout_params,
    rollout_service,
    sandbox_session,
    weights_dir,
)
from fr_jax.rl.update import RoundUpdate, grpo_loss_fn
from fr_jax.rollout import RolloutClient, sync_weights
from fr_jax.sandbox.session import SandboxSession
from fr_jax.trainer.records import RecordWriter
from fr_jax.trainer.runtime import Runtime
from fr_jax.trainer.stage import Stage, policy_of, start_stage

_log = logging.getLogger(__name__)


class GRPORun:
    """One GRPO stage run: `GRPORun(rt, modes).run()`."""

    def __init__(self, rt: Runtime, modes: Mapping[str, ModeBuilder]):
        self.rt, self.cfg, self.grpo, self.train = rt, rt.cfg, rt.cfg.grpo, rt.cfg.train
        self.policy = policy_of(rt)
        self.mode = build_mode(self.grpo, self.policy.tokenizer, modes)
        self.rows = self.grpo.rollout.prompts_per_step * self.grpo.rollout.n
        if self.rows % self.train.batch_size:
            raise ConfigError(
                f"grpo.rollout.prompts_per_step x n = {self.rows} rows per round must be a multiple "
                f"of train.batch_size={self.train.batch_size} (rows per optimizer step)"
            )
        self.steps_per_round = self.grpo.ppo_epochs * self.rows // self.train.batch_size
        self.sync_dir, self._sync_dir_is_temp = weights_dir(self.grpo.rollout.sync_dir, rt.run_dir)

    def run(self) -> dict[str, Any]:
        started_at, g, main = time.perf_counter(), self.grpo, self.rt.is_main
        if main:
            check_external_services(g, self.mode)
        rollout_url, port = planned_rollout(g.rollout) if main else (None, None)
        try:
            state, summary, stage = self._run(rollout_url, port)
        finally:
            if self._sync_dir_is_temp:
                shutil.rmtree(self.sync_dir, ignore_errors=True)
        export = stage.export(state)
        if export is not None:
            summary["export_dir"] = str(export)
        summary["wall_s"] = time.perf_counter() - started_at
        if main:
            print(final_report(summary), flush=True)
        return summary

    def _run(self, rollout_url: str | None, port: int | None) -> tuple[Any, dict[str, Any], Stage]:
        """Services, tasks, the stage's start-up, then the rounds; everything is stopped and closed on the way out."""
        g, main, log_dir = self.grpo, self.rt.is_main, self.rt.run_dir / "logs"
        with contextlib.ExitStack() as services:
            sandbox = None
            if main:
                sandbox = services.enter_context(
                    sandbox_session(g.sandbox, self.mode, rollout_url=rollout_url, log_dir=log_dir)
                )
                self._load_tasks()
            layout = share_layout(self.layout if main else None)
            loss_fn = grpo_loss_fn(g.loss, g.rollout.temperature)
            stage = start_stage(
                self.rt,
                self.policy,
                loss_fn,
                optimizer_steps=self.train.steps * self.steps_per_round,
                desc="grpo",
                combine_metrics=merge_metrics,
            )
            host = stage.host_states[0] if stage.host_states is not None else {"weight_version": "0", "tasks": None}
            if main and host["tasks"] is not None:
                self.stream.set_state(host["tasks"])
            summary: dict[str, Any] = {
                "start_round": stage.start,
                "rounds": self.train.steps,
                "layout": dataclasses.asdict(layout),
                "round_rewards": [],
            }
            try:
                client = services.enter_context(self._rollout(stage, host["weight_version"], port)) if main else None
                records = None
                if main:
                    policy = self.cfg.monitor.rollouts
                    writer = RecordWriter(self.rt.run_dir, policy, seed=self.train.seed, start_round=stage.start)
                    records = services.enter_context(writer)
                state = self._rounds(stage, layout, client, sandbox, records, host["weight_version"], summary)
            finally:
                stage.close()
        return state, summary, stage

    def _load_tasks(self) -> None:
        """Process 0: the training and held-out tasks with their prompt tokens, and the rows' layout."""
        g, tokenizer = self.grpo, self.policy.tokenizer
        self.train_tasks, prompts = load_prompts(g, g.data.train_split, self.mode, tokenizer, limit=g.data.train_limit)
        self.eval_tasks, self.eval_prompts = load_prompts(
            g, g.data.eval_split, self.mode, tokenizer, limit=g.data.eval_limit
        )
        self.layout = Layout(max(map(len, prompts)), g.rollout.max_new_tokens)
        if self.layout.prompt_len + self.layout.response_len > self.policy.config.max_position_embeddings:
            raise ConfigError(
                f"the longest training prompt ({self.layout.prompt_len} tokens) + grpo.rollout.max_new_tokens "
                f"({self.layout.response_len}) exceed the model's context "
                f"({self.policy.config.max_position_embeddings}); lower grpo.data.max_prompt_tokens"
            )
        self.heldout = HeldOutSet(
            g, self.mode, self.eval_tasks, self.eval_prompts, seed=self.train.seed, tokenizer=tokenizer
        )
        self.stream = TaskStream(self.train_tasks, g.data.shuffle_seed)
        self.collector = Collector(
            g,
            self.mode,
            self.stream,
            dict(zip((t.task_id for t in self.train_tasks), prompts)),
            rollout_params(g),
            self.train.seed,
        )

    @contextlib.contextmanager
    def _rollout(self, stage: Stage, version: str, port: int | None):
        """The rollout server, serving the stage's current weights as `version`."""
        g = self.grpo
        if g.rollout.launch != "none":  # a launched server starts on the current weights
            save_pretrained(stage.step_fn.model(stage.state.params), self.sync_dir)
            self.policy.tokenizer.save_pretrained(self.sync_dir)
        with rollout_service(
            g.rollout,
            self.sync_dir,
            weight_version=version,
            seed=self.train.seed,
            log_dir=self.rt.run_dir / "logs",
            port=port,
        ) as client:
            if g.rollout.launch == "none":  # a running server: make it serve the run's weights
                self._push_weights(client, stage.state.params, stage, version)
            yield client

    def _rounds(
        self,
        stage: Stage,
        layout: Layout,
        client: RolloutClient | None,
        sandbox: SandboxSession | None,
        records: RecordWriter | None,
        version: str,
        summary: dict[str, Any],
    ):
        g, train, main, writer, state = self.grpo, self.train, self.rt.is_main, stage.writer, stage.state
        reference = stage.initial_params() if needs_reference(g.loss.beta) else None
        update = RoundUpdate(
            stage.step_fn,
            temperature=g.rollout.temperature,
            epochs=g.ppo_epochs,
            rows_per_step=train.batch_size,
            micro_batches=train.micro_batches,
            steps_per_round=self.steps_per_round,
            seed=train.seed,
            reference_params=reference,
        )
        if main:
            summary.update(train_tasks=len(self.train_tasks), eval_tasks=len(self.eval_tasks))
            if stage.start == 0:
                summary["eval_before"] = self._evaluate(client, sandbox, records, 0, writer).to_json()
        for round_index in range(stage.start, train.steps):
            started, done, scalars, data = time.perf_counter(), round_index + 1, {}, None
            if main:  # 1. collect
                data = self.collector.collect(client, sandbox, round_index, version)
                scalars.update(data.stats)
                scalars.update({f"time/{k}": v for k, v in data.timing.items()})
                scalars.update(round_scalars(data.drawn))
            batch = share_rows(group_rows(data.groups, layout, g.loss) if data else None, layout, self.rows)  # 2.
            if np.any(batch["advantages"]):  # 3. update, 4. sync
                phase = time.perf_counter()
                state, figures = update(state, batch, round_index)
                scalars["time/train_s"] = time.perf_counter() - phase
                scalars.update({f"train/{k}": v for k, v in figures.items()})
                version, phase = str(done), time.perf_counter()
                scalars.update(self._push_weights(client, state.params, stage, version))
                scalars["time/sync_s"] = time.perf_counter() - phase
            else:  # no signal: an optimizer step would only move the weights by momentum and weight decay
                _log.info("round %d: every advantage is 0 (all groups' rewards are equal); no update", done)
                scalars["train/skipped"] = 1.0
            scalars["weight_version"] = float(version)
            if main and train.eval_every and done % train.eval_every == 0 and done < train.steps:
                scalars.update(self._evaluate(client, sandbox, records, done, None).scalars())
            scalars["time/round_s"] = time.perf_counter() - started
            scalars["memory/host_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB
            if main:  # 5. log
                records.write_round(
                    done,
                    round_records(data.drawn, data.groups, batch["advantages"], self.policy.tokenizer, self.mode.name),
                )
                summary["round_rewards"].append(scalars["reward/total"])
                writer.scalars(done, scalars)
                if g.samples_every and (done % g.samples_every == 0 or done == stage.start + 1):
                    writer.text("samples", samples_text(data.groups, self.policy.tokenizer, g.samples_shown), done)
                writer.progress(
                    done,
                    reward=scalars["reward/total"],
                    pass_rate=scalars["pass_rate"],
                    round_s=scalars["time/round_s"],
                )
            if stage.ckpt.due(done) or done == train.steps:  # 5. checkpoint
                stage.ckpt.save(
                    done, state, {"tasks": self.stream.get_state() if main else None, "weight_version": version}
                )
        if main:
            summary["eval_after"] = self._evaluate(client, sandbox, records, train.steps, writer).to_json()
        return state

    def _push_weights(self, client: RolloutClient | None, params, stage: Stage, version: str) -> dict[str, float]:
        model = stage.step_fn.model(params)
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

    def _evaluate(self, client, sandbox, records: RecordWriter, round_index: int, writer) -> EvalReport:
        """The held-out split after `round_index` rounds: its records, and its scalars to `writer` when given."""
        report, samples = self.heldout.evaluate(client, sandbox, round_index)
        records.write_eval(self.grpo.data.eval_split, self.mode.name, samples, round_index=round_index)
        if writer is not None:
            writer.scalars(round_index, report.scalars())
        return report


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


def run_grpo(rt: Runtime, modes: Mapping[str, ModeBuilder]) -> dict[str, Any]:
    """The `stage: grpo` runner (python -m fr_jax.train): train, resuming from the newest checkpoint if any."""
    return GRPORun(rt, modes).run()

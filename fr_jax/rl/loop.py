"""The GRPO stage, orchestration only. Each round, in order (docs/grpo_round.md follows the data through them):

1. collect (fr_jax.rl.collect): tasks -> n samples per prompt from the rollout server -> scores from the sandbox
   through the mode -> groups, with dynamic sampling;
2. batch (fr_jax.rl.batch): the groups' rows and advantages, identical on every process;
3. update (fr_jax.rl.update): old-policy and reference log-probs when needed, then the PPO epochs;
4. sync (fr_jax.rl.sync): the new weights go to the rollout server (every server of a fleet), which must report the
   new weight_version;
5. log and checkpoint: every reward term, pass rates, KL, clipping, lengths, zero-variance groups, the time of
   each phase and the programs the rollout servers compiled while sampling to TensorBoard and metrics.jsonl, the
   round's samples to the rollout records; held-out evaluation every train.eval_every rounds and at both ends (none
   with train.eval_batches 0); a checkpoint holds the train state, the task stream's position and the weight
   version.
Before the first round (fr_jax.rl.setup): the services and the mode, the tasks and their prompts, then the shared
stage start-up (fr_jax.trainer.stage: restore or init). A rollout or sandbox failure stops the run with its cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from fr_jax.config import ConfigError
from fr_jax.rl.batch import group_rows, share_layout, share_rows
from fr_jax.rl.collect import Collector, TaskStream, round_scalars, samples_text
from fr_jax.rl.grpo import merge_metrics, needs_reference
from fr_jax.rl.heldout import EvalReport, HeldOutSet, final_report
from fr_jax.rl.records import round_records
from fr_jax.rl.setup import (
    ModeBuilder,
    build_mode,
    check_external_services,
    planned_rollout,
    rollout_params,
    sandbox_session,
    training_tasks,
)
from fr_jax.rl.sync import PolicySync
from fr_jax.rl.update import RoundUpdate, grpo_loss_fn
from fr_jax.rollout import RolloutClient, RolloutFleet
from fr_jax.sandbox.session import SandboxSession
from fr_jax.trainer.records import RecordWriter
from fr_jax.trainer.runtime import Runtime
from fr_jax.trainer.stage import Stage, policy_of, start_stage

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Services:
    """What process 0 talks to during the rounds (the other processes hold Nones and train their shards)."""

    client: RolloutClient | None = None  # where generation goes: the rollout server, or the fleet's router
    fleet: RolloutFleet | None = None  # every rollout server (weights go to each)
    sandbox: SandboxSession | None = None
    records: RecordWriter | None = None
    collector: Collector | None = None
    heldout: HeldOutSet | None = None


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

    def run(self) -> dict[str, Any]:
        started_at, main = time.perf_counter(), self.rt.is_main
        if main:
            check_external_services(self.grpo, self.mode)
        sync = PolicySync(self.grpo.rollout, self.rt.run_dir)
        try:
            state, stage, summary = self._start_and_train(sync)
        finally:
            sync.close()
        export = stage.export(state)
        summary.update(export_dir=str(export) if export else None, wall_s=time.perf_counter() - started_at)
        if main:
            print(final_report(summary), flush=True)
        return summary

    def _start_and_train(self, sync: PolicySync) -> tuple[Any, Stage, dict[str, Any]]:
        """Services and tasks, the stage's start-up, then the rounds; all stopped and closed on the way out."""
        g, main, log_dir, svc = self.grpo, self.rt.is_main, self.rt.run_dir / "logs", Services()
        with contextlib.ExitStack() as stack:
            url, port = planned_rollout(g.rollout) if main else (None, None)
            if main:
                svc.sandbox = stack.enter_context(
                    sandbox_session(g.sandbox, self.mode, rollout_url=url, log_dir=log_dir)
                )
                tasks = training_tasks(g, self.mode, self.policy.tokenizer, self.policy.config.max_position_embeddings)
                stream = TaskStream(tasks.train, g.data.shuffle_seed)
                svc.collector = Collector(g, self.mode, stream, tasks.prompt_of, rollout_params(g), self.train.seed)
                svc.heldout = HeldOutSet(
                    g,
                    self.mode,
                    tasks.heldout,
                    tasks.heldout_prompts,
                    seed=self.train.seed,
                    tokenizer=self.policy.tokenizer,
                )
            layout = share_layout(tasks.layout if main else None)
            stage = start_stage(
                self.rt,
                self.policy,
                grpo_loss_fn(g.loss, g.rollout.temperature),
                desc="grpo",
                optimizer_steps=self.train.steps * self.steps_per_round,
                combine_metrics=merge_metrics,
            )
            host = stage.host_states[0] if stage.host_states is not None else {"weight_version": "0", "tasks": None}
            summary: dict[str, Any] = {
                "start_round": stage.start,
                "rounds": self.train.steps,
                "round_rewards": [],
                "layout": dataclasses.asdict(layout),
            }
            try:
                if main:
                    if host["tasks"] is not None:
                        stream.set_state(host["tasks"])
                    summary.update(train_tasks=len(tasks.train), eval_tasks=len(tasks.heldout))
                model, version = stage.step_fn.model(stage.state.params), host["weight_version"]
                sync.publish(model, self.policy.tokenizer, write_tokenizer=main)  # every process: it gathers shards
                if main:
                    svc.fleet = stack.enter_context(
                        sync.serving(version=version, seed=self.train.seed, log_dir=log_dir, port=port)
                    )
                    svc.client = svc.fleet.client
                    svc.records = stack.enter_context(
                        RecordWriter(
                            self.rt.run_dir, self.cfg.monitor.rollouts, seed=self.train.seed, start_round=stage.start
                        )
                    )
                if g.rollout.launch == "none":  # a running server: make it serve the run's weights
                    sync.push(svc.fleet, model, version)
                state = self._rounds(stage, layout, sync, svc, version, summary)
            finally:
                stage.close()
        return state, stage, summary

    def _rounds(self, stage: Stage, layout, sync: PolicySync, svc: Services, version: str, summary: dict[str, Any]):
        g, train, main, writer, state = self.grpo, self.train, self.rt.is_main, stage.writer, stage.state
        update = RoundUpdate(
            stage.step_fn,
            temperature=g.rollout.temperature,
            epochs=g.ppo_epochs,
            rows_per_step=train.batch_size,
            micro_batches=train.micro_batches,
            steps_per_round=self.steps_per_round,
            seed=train.seed,
            reference_params=stage.initial_params() if needs_reference(g.loss.beta) else None,
        )
        evaluates = main and train.eval_batches > 0  # 0: no held-out evaluation (a pipeline evaluates after)
        if evaluates and stage.start == 0:
            summary["eval_before"] = self._evaluate(svc, 0, writer).to_json()
        for round_index in range(stage.start, train.steps):
            started, done, scalars, data = time.perf_counter(), round_index + 1, {}, None
            if main:  # 1. collect
                compiled = svc.fleet.compiles()
                data = svc.collector.collect(svc.client, svc.sandbox, round_index, version)
                scalars.update({**data.stats, **{f"time/{k}": v for k, v in data.timing.items()}})
                scalars.update(round_scalars(data.drawn))
                if compiled is not None:  # a round that compiled is slower for it, not for its scheduling
                    compiled = svc.fleet.compiles() - compiled
                    scalars.update({"rollout/compiles": compiled.programs, "rollout/compile_s": compiled.seconds})
            batch = share_rows(group_rows(data.groups, layout, g.loss) if data else None, layout, self.rows)  # 2.
            if np.any(batch["advantages"]):  # 3. update
                phase = time.perf_counter()
                state, figures = update(state, batch, round_index)
                scalars.update(
                    {"time/train_s": time.perf_counter() - phase, **{f"train/{k}": v for k, v in figures.items()}}
                )
                version, phase = str(done), time.perf_counter()  # 4. sync
                scalars.update(sync.push(svc.fleet, stage.step_fn.model(state.params), version))
                scalars["time/sync_s"] = time.perf_counter() - phase
            else:  # no signal: an optimizer step would only move the weights by momentum and weight decay
                _log.info("round %d: every advantage is 0 (all groups' rewards are equal); no update", done)
                scalars["train/skipped"] = 1.0
            scalars["weight_version"] = float(version)
            if evaluates and train.eval_every and done % train.eval_every == 0 and done < train.steps:
                scalars.update(self._evaluate(svc, done, None).scalars())
            tokenizer = self.policy.tokenizer
            if main:  # 5. log: the round's samples (written off this thread), then its scalars
                records = round_records(data.drawn, data.groups, batch["advantages"], tokenizer, self.mode.name)
                svc.records.write_round(done, records)
            scalars["time/round_s"] = time.perf_counter() - started
            scalars["memory/host_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB
            if main:
                summary["round_rewards"].append(scalars["reward/total"])
                writer.scalars(done, scalars)
                if g.samples_every and (done % g.samples_every == 0 or done == stage.start + 1):
                    writer.text("samples", samples_text(data.groups, tokenizer, g.samples_shown), done)
                writer.progress(
                    done,
                    reward=scalars["reward/total"],
                    pass_rate=scalars["pass_rate"],
                    round_s=scalars["time/round_s"],
                )
            if stage.ckpt.due(done) or done == train.steps:  # 5. checkpoint
                tasks = svc.collector.stream.get_state() if main else None
                stage.ckpt.save(done, state, {"tasks": tasks, "weight_version": version})
        if evaluates:
            summary["eval_after"] = self._evaluate(svc, train.steps, writer).to_json()
        return state

    def _evaluate(self, svc: Services, round_index: int, writer) -> EvalReport:
        """The held-out split after `round_index` rounds: its records, and its scalars to `writer` when given."""
        report, samples = svc.heldout.evaluate(svc.client, svc.sandbox, round_index)
        svc.records.write_eval(self.grpo.data.eval_split, self.mode.name, samples, round_index=round_index)
        if writer is not None:
            writer.scalars(round_index, report.scalars())
        return report


def run_grpo(rt: Runtime, modes: Mapping[str, ModeBuilder]) -> dict[str, Any]:
    """The `stage: grpo` runner (python -m fr_jax.train): train, resuming from the newest checkpoint if any."""
    return GRPORun(rt, modes).run()

"""Sync, the fourth phase of a GRPO round: the trainer's weights become the rollout server's (every server's, in a
fleet).

The weights go as an HF directory on a fast local path (by default a folder in /dev/shm, removed at the end), each
server loads it with /update_weights_from_disk and must then report the round's weight_version: every rollout
carries the version that sampled it. A fleet's servers are synced directly, not through the router, and one that
does not load the weights stops the run with its URL, so no round samples on mixed versions. A server launched by
the run starts on the run's current weights (the restored ones when resuming, `publish`); a running server
(`launch: none`) is made to load them first (`push`).
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
from collections.abc import Iterator

from fr_jax.config import GRPORolloutSection
from fr_jax.models.hf import save_pretrained
from fr_jax.rl.setup import rollout_service, weights_dir
from fr_jax.rollout import RolloutFleet, sync_weights


class PolicySync:
    """The run's weight folder and the servers that read it. Every process calls `push` (saving gathers shards);
    only process 0 has the fleet."""

    def __init__(self, section: GRPORolloutSection, run_dir: pathlib.Path):
        self.section = section
        self.dir, self._temporary = weights_dir(section.sync_dir, run_dir)

    def close(self) -> None:
        if self._temporary:
            shutil.rmtree(self.dir, ignore_errors=True)

    def publish(self, model, tokenizer, *, write_tokenizer: bool) -> None:
        """Every process: write the run's current weights (and, on process 0, the tokenizer) for a server the run
        launches; saving gathers the shards, so every process takes part."""
        if self.section.launch != "none":
            save_pretrained(model, self.dir)
            if write_tokenizer:
                tokenizer.save_pretrained(self.dir)

    @contextlib.contextmanager
    def serving(self, *, version: str, seed: int, log_dir: pathlib.Path, port: int | None) -> Iterator[RolloutFleet]:
        """Process 0: the rollout servers, which serve the published weights as `version` (running servers are
        made to load them with `push`, which every process calls)."""
        with rollout_service(
            self.section, self.dir, weight_version=version, seed=seed, log_dir=log_dir, port=port
        ) as fleet:
            yield fleet

    def push(self, fleet: RolloutFleet | None, model, version: str) -> dict[str, float]:
        """Every server now serves `model` as `version`; what it cost (process 0)."""
        if fleet is None:  # processes other than 0 only help gather the shards
            save_pretrained(model, self.dir)
            return {}
        sync = sync_weights(fleet.workers, model, self.dir, weight_version=version)
        return {
            "sync/gigabytes": sync.gigabytes,
            "sync/seconds_per_gb": sync.seconds_per_gb,
            "time/sync_write_s": sync.write_s,
            "time/sync_load_s": sync.load_s,
        }

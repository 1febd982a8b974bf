"""Sync, the fourth phase of a GRPO round: the trainer's weights become the rollout server's.

The weights go as an HF directory on a fast local path (by default a folder in /dev/shm, removed at the end), the
server loads it with /update_weights_from_disk and must then report the round's weight_version: every rollout
carries the version that sampled it. A server launched by the run starts on the run's current weights (the
restored ones when resuming); a running server (`launch: none`) is made to load them first.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
from collections.abc import Iterator

from fr_jax.config import GRPORolloutSection
from fr_jax.models.hf import save_pretrained
from fr_jax.rl.setup import rollout_service, weights_dir
from fr_jax.rollout import RolloutClient, sync_weights


class PolicySync:
    """The run's weight folder and the server that reads it. Every process calls `push` (saving gathers shards);
    only process 0 has a client."""

    def __init__(self, section: GRPORolloutSection, run_dir: pathlib.Path):
        self.section = section
        self.dir, self._temporary = weights_dir(section.sync_dir, run_dir)

    def close(self) -> None:
        if self._temporary:
            shutil.rmtree(self.dir, ignore_errors=True)

    @contextlib.contextmanager
    def serving(
        self, model, tokenizer, *, version: str, seed: int, log_dir: pathlib.Path, port: int | None
    ) -> Iterator[RolloutClient]:
        """A client of the rollout server, which serves `model`'s weights as `version`."""
        if self.section.launch != "none":  # a launched server starts on these weights
            save_pretrained(model, self.dir)
            tokenizer.save_pretrained(self.dir)
        with rollout_service(
            self.section, self.dir, weight_version=version, seed=seed, log_dir=log_dir, port=port
        ) as client:
            if self.section.launch == "none":  # a running server: make it serve them
                self.push(client, model, version)
            yield client

    def push(self, client: RolloutClient | None, model, version: str) -> dict[str, float]:
        """The server now serves `model` as `version`; what it cost (process 0)."""
        if client is None:  # processes other than 0 only help gather the shards
            save_pretrained(model, self.dir)
            return {}
        sync = sync_weights(client, model, self.dir, weight_version=version)
        return {
            "sync/gigabytes": sync.gigabytes,
            "sync/seconds_per_gb": sync.seconds_per_gb,
            "time/sync_write_s": sync.write_s,
            "time/sync_load_s": sync.load_s,
        }

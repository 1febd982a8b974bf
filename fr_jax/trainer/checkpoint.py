"""Checkpoints: an orbax CheckpointManager holding the device state and per-process host state.

Two items per step:
- "state": any pytree of (sharded) jax arrays, e.g. TrainState (params, optimizer state, step, rng).
  Restored straight into the shardings of an abstract target, so a resumed run never gathers on one host.
- "host": a JSON-able dict from every process (data iterator positions, rollout bookkeeping), one file per
  process. Restore returns the dicts of all processes of the run that wrote it, so a reader can redistribute
  them (e.g. data shards) when the process count changed.
Saves are asynchronous (the device->host copy blocks, the write does not); a checkpoint appears in the
directory only once complete, so `kill -9` at any moment leaves the last complete one usable.
The directory is a local path or a gs:// URL (fr_jax.config.storage_location): orbax writes the arrays through
tensorstore's gcs driver and the rest through etils.epath (gcsfs), so every host of a TPU pod writes its own shards
to the bucket and a resumed run on other hosts finds them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

_log = logging.getLogger(__name__)
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class HostStateHandler(ocp.CheckpointHandler):
    """Writes this process's dict to process_<i>-of-<n>.json; restores the dicts of all processes."""

    def save(self, directory: epath.Path, args: HostStateSave) -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state, sort_keys=True))

    def restore(self, directory: epath.Path, args: HostStateRestore | None = None) -> list[dict[str, Any]]:
        found = {}
        for path in directory.iterdir():
            match = _PROCESS_FILE.fullmatch(path.name)
            if match:
                found[int(match.group(1))] = (int(match.group(2)), json.loads(path.read_text()))
        counts = {n for n, _ in found.values()}
        if len(counts) != 1 or sorted(found) != list(range(counts.pop())):
            raise ValueError(f"{directory}: incomplete host state files {sorted(p.name for p in directory.iterdir())}")
        return [found[i][1] for i in sorted(found)]

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(HostStateHandler, for_save=True)
@dataclasses.dataclass
class HostStateSave(ocp.args.CheckpointArgs):
    state: dict[str, Any]


@ocp.args.register_with_handler(HostStateHandler, for_restore=True)
@dataclasses.dataclass
class HostStateRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    """Save every `every_steps` steps (and on demand), keep the newest `keep`, resume from the newest."""

    def __init__(self, directory: str | os.PathLike, *, every_steps: int, keep: int, async_save: bool = True):
        path = epath.Path(directory)
        self.directory = path if path.is_absolute() else path.absolute()  # a gs:// path is absolute already
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, save_interval_steps=1
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "host": HostStateHandler()},
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state, host_state: dict[str, Any]) -> None:
        """Start saving `state` (device pytree) and this process's `host_state`; returns once arrays are copied."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=HostStateSave(host_state)),
            force=True,
        )
        _log.info("checkpoint of step %d started in %s", step, self.directory)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, list[dict[str, Any]]]:
        """(state placed per `abstract_state`'s shardings, host-state dicts of every process that saved)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), host=HostStateRestore())
        )
        _log.info("restored step %d from %s", step, self.directory)
        return restored["state"], restored["host"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

"""CLI: python -m fr_jax.train --config FILE.yaml [key.sub=value ...]

Reads and validates the config, starts the processes and the mesh, then runs the stage the config names.
Exit status: 0 done, 2 unusable config (the message names the key), 3 stopped on a non-finite loss or gradient.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

import fr_jax.flow.task  # noqa: F401 - registers grpo.mode: workflow
from fr_jax.config import ConfigError, load_config
from fr_jax.rl.loop import run_grpo
from fr_jax.trainer.runtime import Runtime, start_runtime
from fr_jax.trainer.sft import run_sft
from fr_jax.trainer.step import NonFiniteError

# stage name -> runner; a stage's runner takes the started Runtime and returns a summary dict
STAGES: dict[str, Callable[[Runtime], dict[str, Any]]] = {"sft": run_sft, "grpo": run_grpo}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fr_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.stage not in STAGES:
            raise ConfigError(f"stage: {cfg.stage!r} has no runner yet; available: {sorted(STAGES)}")
        STAGES[cfg.stage](start_runtime(cfg))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

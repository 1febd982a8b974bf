"""python -m fr_jax.train --config FILE.yaml [key.sub=value ...]

Trains the stage the config names (`stage: sft` or `stage: grpo`): reads and validates the config, starts the
processes and the device mesh, then runs the stage, resuming from the run directory's newest checkpoint.
`stage: pipeline` runs FlowReasoner's whole recipe (distil -> SFT -> GRPO -> evaluation; fr_jax.pipeline).
Exit status: 0 done, 2 a mistake in the config or setup (one line names it), 3 a non-finite loss or gradient.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

from fr_jax import cli
from fr_jax.config import ConfigError, load_config, stage_of
from fr_jax.pipeline import load_pipeline_config, run_pipeline
from fr_jax.rl.loop import run_grpo
from fr_jax.trainer.runtime import Runtime, start_runtime
from fr_jax.trainer.sft import run_sft

# stage name -> runner; a stage's runner takes the started Runtime and returns a summary dict
STAGES: dict[str, Callable[[Runtime], dict[str, Any]]] = {
    "sft": run_sft,
    "grpo": functools.partial(run_grpo, modes=cli.MODES),
}


def train(args: argparse.Namespace) -> int:
    if stage_of(args.config) == "pipeline":  # FlowReasoner's recipe: stages in order (fr_jax.pipeline)
        run_pipeline(load_pipeline_config(args.config, args.overrides))
        return 0
    cfg = load_config(args.config, args.overrides)
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage: {cfg.stage!r} has no runner yet; available: {sorted(STAGES)}")
    STAGES[cfg.stage](start_runtime(cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m fr_jax.train", __doc__)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    return cli.run(train, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

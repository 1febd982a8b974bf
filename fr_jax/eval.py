"""python -m fr_jax.eval --config FILE.yaml [--split test] [--mode direct|workflow] [--model DIR] [--n N --k K]

Evaluates a policy on a held-out split through the same rollout server and sandbox as GRPO training (the config's
`grpo:` section: data, prompt, rollout, sandbox, eval): pass@1, and pass@k from n samples per task with the
unbiased estimator, on the split's hidden tests. `--mode` picks what the policy writes: `direct`, the solution;
`workflow`, a FlowReasoner workflow whose operators call the worker LLM (grpo.workflow). A workflow evaluation also
asks that worker to answer each query directly, with the same per-call budget, and reports both side by side with
the mean worker calls and tokens per query.

The weights: --model DIR (an HF directory), else the run's export <run_dir>/hf, else model.pretrained. With
grpo.rollout.launch none the server at grpo.rollout.url is asked to load them (/update_weights_from_disk).
The report is printed and written to <run_dir>/eval/<split>.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys

from fr_jax import cli
from fr_jax.config import Config, ConfigError, load_config
from fr_jax.flow.baselines import BASELINES, fixed_design, load_best_fixed
from fr_jax.flow.mode import direct_worker_report
from fr_jax.flow.prompt import ParsedDesign, design_text
from fr_jax.models.loading import load_tokenizer as config_tokenizer
from fr_jax.models.loading import pretrained_dir
from fr_jax.models.tokenizer import TOKENIZER_FILES, load_tokenizer
from fr_jax.rl.heldout import EvalReport, HeldOutSet
from fr_jax.rl.modes import ROLLOUT_WORKER
from fr_jax.rl.setup import (
    build_mode,
    check_external_services,
    load_prompts,
    planned_rollout,
    rollout_service,
    sandbox_session,
)
from fr_jax.trainer.records import RecordWriter

EVAL_VERSION = "eval"
BASELINE_PREFIX = "baseline:"


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("python -m fr_jax.eval", __doc__)
    p.add_argument("--config", required=True, help="YAML config with a grpo: section")
    p.add_argument("--split", default=None, help="the split to evaluate (default: grpo.data.eval_split)")
    p.add_argument(
        "--mode",
        default=None,
        help=f"what answers: a policy mode ({', '.join(sorted(cli.MODES))}; default grpo.mode), or a fixed workflow "
        f"run for every query (baseline:NAME, NAME one of {', '.join(BASELINES)})",
    )
    p.add_argument("--best-fixed", default=None, help="best_fixed.json of an optimiser run (for baseline:best_fixed)")
    p.add_argument("--model", default=None, help="HF model directory (default: <run_dir>/hf, else model.pretrained)")
    p.add_argument("--n", type=int, default=None, help="samples per task (default: grpo.eval.n)")
    p.add_argument("--k", nargs="+", default=None, help="report pass@k for these k (default: grpo.eval.k)")
    p.add_argument("--temperature", type=float, default=None, help="default: grpo.eval.temperature (0: greedy)")
    p.add_argument("--limit", type=int, default=None, help="the first tasks of the split only")
    p.add_argument("--out", default=None, help="report JSON path (default: <run_dir>/eval/<split>.json)")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = p.parse_args(argv)
    args.baseline = None
    if args.mode is not None and args.mode.startswith(BASELINE_PREFIX):
        args.baseline, args.mode = args.mode.removeprefix(BASELINE_PREFIX), "workflow"  # baselines run workflows
        if args.baseline not in BASELINES:
            p.error(f"--mode {BASELINE_PREFIX}{args.baseline}: known baselines are {', '.join(BASELINES)}")
        if (args.baseline == "best_fixed") != (args.best_fixed is not None):
            p.error("--best-fixed FILE goes with --mode baseline:best_fixed, and only with it")
    elif args.mode is not None and args.mode not in cli.MODES:
        p.error(f"--mode {args.mode}: expected one of {', '.join(sorted(cli.MODES))} or baseline:NAME")
    if args.k is not None:  # `--k 1 5 key=value`: argparse hands the override to --k; give it back
        args.overrides += [item for item in args.k if "=" in item]
        try:
            args.k = [int(item) for item in args.k if "=" not in item]
        except ValueError:
            p.error(f"--k takes whole numbers, got {args.k}")
    return args


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """CLI flags as config overrides, so the config's own checks (e.g. n > 1 needs a temperature) apply to them."""
    pairs = [
        ("grpo.data.eval_split", args.split),
        ("grpo.mode", args.mode),
        ("grpo.eval.n", args.n),
        ("grpo.eval.k", args.k),
        ("grpo.eval.temperature", args.temperature),
        ("grpo.data.eval_limit", args.limit),
    ]
    return [f"{key}={json.dumps(value)}" for key, value in pairs if value is not None]


def model_dir(cfg: Config, given: str | None) -> pathlib.Path:
    if given is not None:
        path = pathlib.Path(given)
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {given}: not an HF model directory (no config.json)")
        return path
    export = pathlib.Path(cfg.run_dir) / "hf"
    if (export / "config.json").is_file():
        return export
    if cfg.model.pretrained is not None:
        return pretrained_dir(cfg.model.pretrained)
    raise ConfigError(f"nothing to evaluate: no --model, no export at {export}, and model.pretrained is not set")


def run_eval(
    cfg: Config, weights: pathlib.Path, *, given_model: bool, fixed: tuple[str, ParsedDesign] | None = None
) -> tuple[EvalReport, EvalReport | None]:
    """The policy's report, and for a mode whose answers call a worker LLM that of the worker prompted directly
    (None when the worker's URL is not known here). Both write their samples' records (docs/records.md). With
    `fixed` (a baseline's name and design) no policy answers: that design is run for every query."""
    grpo = cfg.grpo
    has_tokenizer = any((weights / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = load_tokenizer(weights) if has_tokenizer else config_tokenizer(cfg.model)
    mode = build_mode(grpo, tokenizer, cli.MODES)
    check_external_services(grpo, mode)
    split, log_dir = grpo.data.eval_split, pathlib.Path(cfg.run_dir) / "logs"
    rollout_url, port = planned_rollout(grpo.rollout)
    with contextlib.ExitStack() as services:
        sandbox = services.enter_context(sandbox_session(grpo.sandbox, mode, rollout_url=rollout_url, log_dir=log_dir))
        tasks, prompts = load_prompts(grpo, split, mode, tokenizer, limit=grpo.data.eval_limit)
        heldout = HeldOutSet(grpo, mode, tasks, prompts, seed=cfg.train.seed, tokenizer=tokenizer)
        records = services.enter_context(RecordWriter(cfg.run_dir, cfg.monitor.rollouts, seed=cfg.train.seed))
        worker_is_policy = mode.worker is not None and mode.worker.url == ROLLOUT_WORKER
        if fixed is not None and not worker_is_policy:  # no policy answers, and the worker is elsewhere
            client = None
        else:
            fleet = services.enter_context(
                rollout_service(
                    grpo.rollout, weights, weight_version=EVAL_VERSION, seed=cfg.train.seed, log_dir=log_dir, port=port
                )
            )
            client = fleet.client
            if grpo.rollout.launch == "none" and given_model:
                fleet.load(weights, weight_version=EVAL_VERSION)
        if fixed is not None:
            report, samples = heldout.evaluate_fixed(
                sandbox, design_text(fixed[1].modification, fixed[1].graph, fixed[1].prompt), f"baseline-{fixed[0]}"
            )
            records.write_eval(split, f"baseline-{fixed[0]}", samples)
            return report, None
        report, samples = heldout.evaluate(client, sandbox, 0)  # round 0's seeds: those of the run's first evaluation
        records.write_eval(split, mode.name, samples)
        worker_url = mode.worker.resolved_url(client.base_url) if mode.worker is not None else None
        if worker_url is None:
            return report, None
        baseline, samples = direct_worker_report(
            grpo, tokenizer, tasks, worker_url=worker_url, sandbox=sandbox, split=split, seeds=heldout.seeds(0)
        )
        records.write_eval(split, "direct_worker", samples)
        return report, baseline


def side_by_side(report: EvalReport, baseline: EvalReport) -> str:
    """The worker prompted directly vs the meta-agent's workflows, on the same queries."""
    ks = list(report.pass_at_k)
    header = f"{'':28}" + "".join(f"{f'pass@{k}':>9}" for k in ks) + f"{'worker calls/query':>20}{'tokens/query':>14}"
    rows = [
        f"{name:<28}" + "".join(f"{r.pass_at_k[k]:9.3f}" for k in ks) + f"{r.worker_calls:20.2f}{r.worker_tokens:14.0f}"
        for name, r in (("worker prompted directly", baseline), ("meta-agent workflows", report))
    ]
    return "\n".join([f"{report.split}: {len(report.per_task)} queries x {report.n} samples", header, *rows])


def evaluate_policy(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*args.overrides, *_flag_overrides(args)])
    if cfg.grpo is None:
        raise ConfigError("evaluation reads the config's grpo: section (data, prompt, rollout, sandbox, eval)")
    weights = model_dir(cfg, args.model)
    fixed = None
    if args.baseline is not None:
        design = load_best_fixed(args.best_fixed) if args.baseline == "best_fixed" else fixed_design(args.baseline)
        fixed = (args.baseline, design)
    report, baseline = run_eval(cfg, weights, given_model=args.model is not None, fixed=fixed)
    method = f"baseline-{args.baseline}" if args.baseline else cfg.grpo.mode
    default = f"{report.split}_{method}.json" if args.baseline else f"{report.split}.json"
    out = pathlib.Path(args.out) if args.out else pathlib.Path(cfg.run_dir) / "eval" / default
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "model": None if args.baseline else str(weights),
        "mode": cfg.grpo.mode,
        "method": method,
        **report.to_json(),
    }
    if baseline is not None:
        document["direct_worker"] = baseline.to_json()
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(report.line())
    if baseline is not None:
        print(side_by_side(report, baseline))
    elif cfg.grpo.mode == "workflow":
        print("(set grpo.workflow.worker_url to also evaluate the worker prompted directly)")
    print(f"report: {out}")
    return 0


def main(argv=None) -> int:
    return cli.run(evaluate_policy, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

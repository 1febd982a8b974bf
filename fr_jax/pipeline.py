"""python -m fr_jax.pipeline --config FILE.yaml [key.sub=value ...]  (or python -m fr_jax.train with stage: pipeline)

FlowReasoner's recipe as one command, each stage resumable and skipped once its output is complete:
1. distil: the per-query optimiser (fr_jax.flow.optimize) with a teacher (R1 through an API, or the offline search
   teacher) on training queries, and its SFT records in the paper's shape (one per query: the policy's prompt in,
   the rounds' reasoning and the final design out); best_fixed: the same teacher over validation queries, and the
   one design best over all of them (best_fixed.json: a task-level meta-agent, as AFlow);
2. sft: SFT of the meta-agent on those records (stage sft);
3. grpo: GRPO on workflows from the SFT'd meta-agent (stage grpo, mode workflow);
4. evaluate: on a held-out split, through the same worker, sandbox, queries and budgets: the meta-agent after GRPO,
   after SFT, the base model, and the fixed workflows (io, cot, sc, self_refine, best_fixed); then
   <run_dir>/report.md and report.json.
One worker LLM serves every stage (launched here on loopback, or a running OpenAI-compatible server). The training
stages run as `python -m fr_jax.train` child processes on configs written to <run_dir>/<stage>.yaml; a stage is done
when its marker <run_dir>/<stage>/DONE exists, so a pipeline killed between or inside stages resumes where it was.
Docs: docs/flow.md (the recipe), README.md.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import logging
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, model_validator

from fr_jax import cli
from fr_jax.config import ConfigError, Section, apply_overrides, load_config, parse_config, read_yaml
from fr_jax.flow.mode import FLOW_SYSTEM_PROMPT
from fr_jax.flow.optimize import OptimizeConfig
from fr_jax.models.loading import pretrained_dir
from fr_jax.rl.setup import server_env
from fr_jax.rollout.launch import bound_to_parent, launch_local
from fr_jax.trainer.metrics import read_metrics

_log = logging.getLogger(__name__)
DONE = "DONE"
POLICY_METHODS = ("meta-agent", "sft", "base")  # the GRPO'd, the SFT'd and the base policy writing workflows
FIXED_METHODS = ("io", "cot", "sc", "self_refine", "best_fixed")


class WorkerServerSection(Section):
    """The worker LLM every stage's workflows call: launched here (fr_jax.serve) or running at `url`."""

    launch: Literal["local", "none"] = "local"
    url: str | None = None  # launch none: an OpenAI-compatible base URL ending in /v1
    name: str = "local"  # the name the sandboxes allowlist it under
    model: str = "smollm2"  # launch local: an HF model directory or a demo name
    request_model: str | None = None  # launch none: the `model` field its requests carry (e.g. gpt-4o-mini)
    api_key_env: str | None = None  # launch none: the environment variable holding its API key
    context_length: int = Field(4096, ge=256)
    max_running_requests: int = Field(16, ge=1)
    startup_timeout_s: float = Field(900.0, gt=0)

    @model_validator(mode="after")
    def _url(self):
        if (self.launch == "none") != (self.url is not None):
            raise ValueError("worker.url is required with worker.launch 'none', and only then")
        return self


class BestFixedSection(Section):
    """Where best_fixed (a task-level meta-agent, as AFlow) is searched: the teacher over held-out validation queries,
    neither the training queries nor the evaluated ones."""

    split: str = "validation"
    limit: int | None = Field(8, ge=1)
    rounds: int = Field(3, ge=1)


class EvaluateSection(Section):
    split: str | None = None  # default: the grpo stage's grpo.data.eval_split
    limit: int | None = Field(None, ge=1)  # default: its grpo.data.eval_limit
    methods: list[str] = Field(default_factory=lambda: [*POLICY_METHODS, *FIXED_METHODS], strict=False)

    @model_validator(mode="after")
    def _known(self):
        unknown = sorted(set(self.methods) - {*POLICY_METHODS, *FIXED_METHODS})
        if unknown:
            raise ValueError(f"evaluate.methods: unknown {unknown}; known: {[*POLICY_METHODS, *FIXED_METHODS]}")
        return self


class PipelineConfig(Section):
    stage: Literal["pipeline"]
    run_dir: str
    worker: WorkerServerSection = WorkerServerSection()
    # each stage's own config tree, less what the pipeline wires: out_dir/run_dir, the worker's URL, the SFT data
    # file, the GRPO starting weights (docs/flow.md)
    distil: dict[str, Any]
    sft: dict[str, Any]
    grpo: dict[str, Any]
    best_fixed: BestFixedSection = BestFixedSection()
    evaluate: EvaluateSection = EvaluateSection()


# ------------------------------------------------------------------------------------------ the stage configs


def stage_configs(cfg: PipelineConfig, worker_url: str) -> tuple[OptimizeConfig, OptimizeConfig, dict, dict]:
    """The stages' configs (distil, the best_fixed search, sft, grpo), wired to each other and to the worker, checked
    as their own commands would."""
    run = pathlib.Path(cfg.run_dir)
    grpo = cfg.grpo.get("grpo", {})
    system = (grpo.get("prompt") or {}).get("system") or FLOW_SYSTEM_PROMPT
    max_calls = (grpo.get("reward") or {}).get("max_operator_calls", 10)
    distil_tree = apply_overrides(cfg.distil, [f"out_dir={run / 'distil'}"])
    who = {
        "name": cfg.worker.name,
        "url": worker_url,
        "model": cfg.worker.request_model,
        "api_key_env": cfg.worker.api_key_env,
    }
    distil_tree["worker"] = {**distil_tree.get("worker", {}), **who}
    distil_tree["records"] = {**distil_tree.get("records", {}), "form": "query", "system": system}
    distil_tree["loop"] = {**distil_tree.get("loop", {}), "max_operator_calls_told": max_calls}
    sft = apply_overrides(cfg.sft, [f"run_dir={run / 'sft'}", "stage=sft", "sft.data.source=jsonl"])
    sft["sft"]["data"]["train_file"] = str(run / "distil" / "sft.jsonl")
    grpo_tree = apply_overrides(cfg.grpo, [f"run_dir={run / 'grpo'}", "stage=grpo", "grpo.mode=workflow"])
    grpo_tree["model"] = {**grpo_tree.get("model", {}), "pretrained": str(run / "sft" / "hf")}
    grpo_tree["grpo"]["workflow"] = {
        **grpo_tree["grpo"].get("workflow", {}),
        "worker": cfg.worker.name,
        "worker_url": worker_url,
        "worker_model": cfg.worker.request_model,
        "worker_api_key_env": cfg.worker.api_key_env,
    }
    for key, tree in (("sft", sft), ("grpo", grpo_tree)):
        try:
            parse_config(tree)
        except ConfigError as err:
            raise ConfigError(f"pipeline {key}: {err}") from None
    b = cfg.best_fixed
    limit = [f"tasks.limit={b.limit}"] if b.limit else []
    search_tree = apply_overrides(
        distil_tree, [f"out_dir={run / 'best_fixed'}", f"tasks.split={b.split}", f"loop.rounds={b.rounds}", *limit]
    )
    try:
        distil = parse_config(distil_tree, OptimizeConfig)
        search = parse_config(search_tree, OptimizeConfig)
    except ConfigError as err:
        raise ConfigError(f"pipeline distil: {err}") from None
    return distil, search, sft, grpo_tree


def _run_child(command: list[str], log: pathlib.Path, what: str) -> None:
    """A stage as a child process that dies with the pipeline. Its output goes to `log` and to this console as it
    comes, progress bars included: a stage runs for minutes, and the user watches it here."""
    _log.info("%s: %s (log %s)", what, " ".join(command), log)
    console = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may end inside a character
    with (
        log.open("ab") as out,
        subprocess.Popen(
            bound_to_parent(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=server_env()
        ) as child,
    ):
        for chunk in iter(lambda: child.stdout.read1(1 << 16), b""):
            out.write(chunk)
            out.flush()
            sys.stderr.write(console.decode(chunk))
            sys.stderr.flush()
    if child.returncode != 0:
        last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise cli.CommandFailed(f"{what} failed with exit status {child.returncode}: {last[0]} (whole log: {log})")


def _stage(run: pathlib.Path, name: str, *commands: list[str]) -> None:
    """Run a stage's commands unless its DONE marker says an earlier run finished them."""
    marker = run / name / DONE
    if marker.is_file():
        _log.info("%s: done before (%s), skipped", name, marker)
        return
    (run / name).mkdir(parents=True, exist_ok=True)
    for command in commands:
        _run_child(command, run / f"{name}.log", name)
    marker.write_text("")


def _write_yaml(path: pathlib.Path, tree: dict) -> pathlib.Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- the stages


@contextlib.contextmanager
def worker_server(section: WorkerServerSection, log_dir: pathlib.Path) -> Iterator[str]:
    """The worker's base URL (.../v1) for the whole pipeline."""
    if section.launch == "none":
        yield section.url
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    with launch_local(
        section.model,
        context_length=section.context_length,
        random_seed=0,
        max_running_requests=section.max_running_requests,
        env=server_env(),
        startup_timeout=section.startup_timeout_s,
        log_path=log_dir / "worker.log",
    ) as server:
        yield f"{server.url}/v1"


def evaluate_methods(cfg: PipelineConfig, grpo_config: pathlib.Path) -> dict[str, dict]:
    """Every evaluation method's report (fr_jax.eval on the held-out split), each written once to
    <run_dir>/evaluate/<method>.json and reused when there."""
    run = pathlib.Path(cfg.run_dir)
    out_dir = run / "evaluate"
    out_dir.mkdir(parents=True, exist_ok=True)
    stage_tree = read_yaml(grpo_config.read_text())
    base = stage_tree["model"]["pretrained"]
    split = cfg.evaluate.split or stage_tree["grpo"].get("data", {}).get("eval_split", "validation")
    limit = cfg.evaluate.limit or stage_tree["grpo"].get("data", {}).get("eval_limit")
    common = ["--config", str(grpo_config), "--split", split, *(["--limit", str(limit)] if limit else [])]
    weights = {"meta-agent": run / "grpo" / "hf", "sft": run / "sft" / "hf", "base": None}
    reports = {}
    for method in cfg.evaluate.methods:
        out = out_dir / f"{method}.json"
        if not out.is_file():
            if method in POLICY_METHODS:
                model = weights[method] or pretrained_dir(cfg.sft["model"]["pretrained"])
                args = [*common, "--mode", "workflow", "--model", str(model)]
            elif method == "best_fixed":
                args = [
                    *common,
                    "--mode",
                    "baseline:best_fixed",
                    "--best-fixed",
                    str(run / "best_fixed" / "best_fixed.json"),
                ]
            else:
                args = [*common, "--mode", f"baseline:{method}"]
            _run_child(
                [
                    sys.executable,
                    "-m",
                    "fr_jax.eval",
                    *args,
                    "--out",
                    str(out),
                    f"run_dir={out_dir / method}",
                    f"model.pretrained={base}",
                ],
                run / "evaluate.log",
                f"evaluate {method}",
            )
        reports[method] = json.loads(out.read_text())
    return reports


# ------------------------------------------------------------------------------------------------ the report


def pipeline_report(run: pathlib.Path, reports: dict[str, dict]) -> dict[str, Any]:
    """report.json's content: the table's rows, and what SFT and GRPO did."""
    rows = [
        {
            "method": method,
            "pass_at_1": r["pass_at_k"]["pass@1"],
            "worker_calls": r.get("worker_calls"),
            "worker_tokens": r.get("worker_tokens"),
            "format_ok": r["well_formed"],
            "tasks": r["tasks"],
            "n": r["n"],
            **{f"pass_at_{k.split('@')[1]}": v for k, v in r["pass_at_k"].items() if k != "pass@1"},
        }
        for method, r in reports.items()
    ]
    summary = json.loads((run / "distil" / "summary.json").read_text())
    rounds = [m for m in read_metrics(run / "grpo") if "reward/total" in m]
    third = max(1, len(rounds) // 3)
    rewards = [m["reward/total"] for m in rounds]
    return {
        "rows": rows,
        "sft": {"records": summary["sft_records"], "queries": summary["queries"]},
        "grpo": {
            "rounds": len(rounds),
            "optimizer_steps": int(sum(m.get("train/optimizer_steps", 0) for m in rounds)),
            "rounds_with_steps": sum(1 for m in rounds if m.get("train/optimizer_steps", 0) > 0),
            "reward_first": float(np.mean(rewards[:third])) if rewards else None,
            "reward_last": float(np.mean(rewards[-third:])) if rewards else None,
            "zero_variance_frac": float(np.mean([m["groups/zero_variance_frac"] for m in rounds])) if rounds else None,
        },
    }


def report_markdown(report: dict[str, Any]) -> str:
    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    lines = [
        "| method | pass@1 | worker calls / query | worker tokens / query | format ok | queries x n |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {fmt(r['pass_at_1'])} | {fmt(r['worker_calls'], '.2f')} | "
        f"{fmt(r['worker_tokens'], '.0f')} | {fmt(r['format_ok'])} | {r['tasks']} x {r['n']} |"
        for r in report["rows"]
    ]
    s, g = report["sft"], report["grpo"]
    lines += [
        "",
        f"SFT: {s['records']} records from {s['queries']} queries.",
        f"GRPO: {g['rounds']} rounds, {g['optimizer_steps']} optimizer steps (in {g['rounds_with_steps']} "
        f"rounds); mean training reward of the first third {fmt(g['reward_first'])} -> last third "
        f"{fmt(g['reward_last'])}; zero-variance groups {fmt(g['zero_variance_frac'])}.",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- the run


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    run = pathlib.Path(cfg.run_dir).absolute()
    run.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"run_dir": str(run)})
    with worker_server(cfg.worker, run / "logs") as worker_url:
        distil, search, sft, grpo = stage_configs(cfg, worker_url)
        for name, tree in (("distil", distil), ("best_fixed", search)):
            path = _write_yaml(run / f"{name}.yaml", tree.model_dump(mode="json"))
            optimize = [sys.executable, "-m", "fr_jax.flow.optimize", "--config", str(path)]
            _stage(run, name, optimize, *([[*optimize, "--best-fixed"]] if name == "best_fixed" else []))
        for name, tree in (("sft", sft), ("grpo", grpo)):
            path = _write_yaml(run / f"{name}.yaml", tree)
            _stage(run, name, [sys.executable, "-m", "fr_jax.train", "--config", str(path)])
        reports = evaluate_methods(cfg, run / "grpo.yaml")
    report = pipeline_report(run, reports)
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (run / "report.md").write_text(report_markdown(report))
    print(report_markdown(report), flush=True)
    return report


def load_pipeline_config(path: str, overrides: list[str]) -> PipelineConfig:
    return load_config(path, overrides, model=PipelineConfig)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m fr_jax.pipeline", __doc__)
    parser.add_argument("--config", required=True, help="YAML config with stage: pipeline (configs/flowreasoner_*)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")

    def pipeline(args: argparse.Namespace) -> int:
        run_pipeline(load_pipeline_config(args.config, args.overrides))
        return 0

    return cli.run(pipeline, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

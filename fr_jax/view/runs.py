"""What the viewer reads from a run directory: metrics.jsonl, the record files and the evaluation reports.

Evaluation reports are `<run_dir>/eval/*.json` (written by `python -m fr_jax.eval`: one method, plus the worker
prompted directly in workflow mode) and `<run_dir>/report.json` (the pipeline's table: rows of method and metrics,
as a list or under "rows"). Each becomes a method x metric table; a row links to the records of that evaluation
when they exist.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from fr_jax.trainer.metrics import METRICS_FILE, read_metrics
from fr_jax.trainer.records import record_files


@dataclasses.dataclass
class EvalTable:
    title: str
    split: str | None
    columns: list[str]
    rows: list[dict[str, Any]]  # {"method": ..., "values": {column: number}}
    per_task: dict[str, dict[str, int]]  # method -> task id -> correct samples (fr_jax.eval reports)
    samples_per_task: int | None


@dataclasses.dataclass
class RunInputs:
    name: str
    path: pathlib.Path
    metrics: list[dict[str, float]]
    record_files: list[pathlib.Path]
    evals: list[EvalTable]


def _eval_report(path: pathlib.Path, document: dict) -> EvalTable:
    """A `python -m fr_jax.eval` report: the policy's method, and `direct_worker` beside it when present."""
    methods = [(document.get("mode") or "policy", document)]
    if isinstance(document.get("direct_worker"), dict):
        methods.append(("direct_worker", document["direct_worker"]))
    rows, per_task = [], {}
    for method, report in methods:
        values = dict(report.get("pass_at_k", {}))
        values["reward"] = report.get("reward", {}).get("total")
        values.update(
            (key, report.get(key))
            for key in ("test_pass_rate", "well_formed", "worker_calls", "worker_tokens", "tasks")
        )
        rows.append({"method": method, "values": values})
        per_task[method] = report.get("per_task", {})
    columns = list(dict.fromkeys(key for row in rows for key, value in row["values"].items() if value is not None))
    return EvalTable(
        f"{path.parent.name}/{path.name}", document.get("split"), columns, rows, per_task, document.get("n")
    )


def _pipeline_report(path: pathlib.Path, document: dict | list) -> EvalTable:
    entries = document.get("rows", []) if isinstance(document, dict) else document
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "method" in e for e in entries):
        raise ValueError(f"{path}: expected rows of {{method, metric: value, ...}} (a list, or under 'rows')")
    split = document.get("split") if isinstance(document, dict) else None
    rows = [
        {"method": e["method"], "values": {k: v for k, v in e.items() if k not in ("method", "split")}} for e in entries
    ]
    columns = list(dict.fromkeys(key for row in rows for key in row["values"]))
    return EvalTable(path.name, split, columns, rows, {}, None)


def read_run(path: str | pathlib.Path, name: str | None = None) -> RunInputs:
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    files = record_files(path)
    if not (path / METRICS_FILE).is_file() and not files and not (path / "eval").is_dir():
        raise FileNotFoundError(
            f"{path} has no {METRICS_FILE}, no rollout records and no eval reports: is it a run directory "
            "(the run_dir of a fr_jax config)?"
        )
    evals = []
    for report in sorted((path / "eval").glob("*.json")):
        evals.append(_eval_report(report, _load_json(report)))
    if (path / "report.json").is_file():
        evals.append(_pipeline_report(path / "report.json", _load_json(path / "report.json")))
    return RunInputs(name or path.name, path, read_metrics(path), files, evals)


def _load_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None

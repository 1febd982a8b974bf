"""Fixed workflows to compare the meta-agent with: the same design for every query, run through the same
POST /workflow/run, worker and budgets as the meta-agent's designs.

- `io`: the worker prompted directly, one CustomCodeGenerate call (FlowReasoner's seed workflow);
- `cot`: one CustomCodeGenerate call whose instruction asks to think step by step before the code;
- `sc`: k CustomCodeGenerate candidates at once (k = 3 unless given), ScEnsemble picks one (self-consistency);
- `self_refine`: one CustomCodeGenerate call, then Test: the public tests run and the worker repairs the code on
  failure, up to 3 times;
- `best_fixed`: the single design the teacher found best over a validation split, applied to every query: a
  task-level meta-agent, as AFlow is. `best_fixed` picks it from an optimiser run's rounds.jsonl
  (`python -m fr_jax.flow.optimize --config ... --best-fixed` writes best_fixed.json; `load_best_fixed` reads it).

The first four are points of the operator grammar (fr_jax.flow.grammar), so they are written exactly like the
search teacher's designs.
"""

from __future__ import annotations

import asyncio
import collections
import json
import pathlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fr_jax.flow.grammar import WorkflowSpec, render
from fr_jax.flow.prompt import ParsedDesign, design_text, parse_design

FIXED = ("io", "cot", "sc", "self_refine")
BASELINES = (*FIXED, "best_fixed")
SC_SAMPLES = 3

_MODIFICATIONS = {
    "io": "io: the worker prompted directly (one CustomCodeGenerate call).",
    "cot": "cot: think step by step, then code (one CustomCodeGenerate call).",
    "sc": "sc: {k} candidates, the most consistent picked by ScEnsemble.",
    "self_refine": "self_refine: generate, then Test runs the public tests and repairs the code.",
}


def fixed_design(name: str, *, samples: int = SC_SAMPLES) -> ParsedDesign:
    """The design of a fixed baseline (`samples`: sc's k)."""
    specs = {
        "io": WorkflowSpec(),
        "cot": WorkflowSpec(strategy="step_by_step"),
        "sc": WorkflowSpec(samples=samples),
        "self_refine": WorkflowSpec(test=True),
    }
    if name not in specs:
        hint = "; best_fixed comes from load_best_fixed" if name == "best_fixed" else ""
        raise ValueError(f"unknown fixed baseline {name!r}; known: {', '.join(FIXED)}{hint}")
    if name == "sc" and samples < 2:
        raise ValueError(f"sc needs at least 2 samples to pick among, got {samples}")
    graph, prompt = render(specs[name])
    return ParsedDesign(_MODIFICATIONS[name].format(k=samples), graph, prompt)


# ------------------------------------------------------------------------------------------------ best_fixed


def tried_designs(queries: Sequence[dict]) -> list[dict[str, Any]]:
    """Every distinct runnable design of an optimiser run (rounds.jsonl lines), in the order first seen, with its
    validation score on each query it was tried on (the mean when a query tried it more than once)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for query in queries:
        per_query: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        for r in query["rounds"]:
            if r["format_error"] is None:
                key = (r["graph"], r["prompt"])
                per_query[key].append(r["score"])
                found.setdefault(key, {"modification": r["modification"], "graph": key[0], "prompt": key[1]})
        for key, scores in per_query.items():
            found[key].setdefault("scores", {})[query["task_id"]] = sum(scores) / len(scores)
    return list(found.values())


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


async def best_fixed(
    queries: Sequence[dict],
    validate: Callable[[str, ParsedDesign], Awaitable[float]],
    *,
    candidates: int = 4,
) -> dict[str, Any]:
    """The design with the best mean validation score over ALL the run's queries. The `candidates` designs with the
    best mean where tried (ties: tried on more queries, then first seen) are completed by `validate(task_id,
    design)` on the queries they were not tried on (all at once: `validate` bounds its own concurrency); the best
    of them (ties: first in that order) is chosen."""
    if not queries:
        raise ValueError("best_fixed needs the rounds of at least one query")
    task_ids = [q["task_id"] for q in queries]
    tried = tried_designs(queries)
    order = sorted(range(len(tried)), key=lambda i: (-_mean(tried[i]["scores"].values()), -len(tried[i]["scores"]), i))
    leading = [tried[i] for i in order[:candidates]]
    missing = [(entry, task_id) for entry in leading for task_id in task_ids if task_id not in entry["scores"]]
    scores = await asyncio.gather(
        *(validate(task_id, ParsedDesign(e["modification"], e["graph"], e["prompt"])) for e, task_id in missing)
    )
    for entry in leading:
        entry["tried_on"] = len(entry["scores"])
    for (entry, task_id), score in zip(missing, scores):
        entry["scores"][task_id] = score
    for entry in leading:
        entry["score"] = _mean(entry["scores"][t] for t in task_ids)
    chosen = max(leading, key=lambda entry: entry["score"])  # max keeps the first of equals
    return {
        "design": {key: chosen[key] for key in ("modification", "graph", "prompt")},
        "score": chosen["score"],
        "scores": {t: chosen["scores"][t] for t in task_ids},
        "candidates": [{key: e[key] for key in ("modification", "score", "tried_on")} for e in leading],
    }


def load_best_fixed(path: str | pathlib.Path) -> ParsedDesign:
    """The best_fixed design from best_fixed.json, checked as any design is."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: pick it with python -m fr_jax.flow.optimize --config ... --best-fixed"
        )
    design = json.loads(path.read_text())["design"]
    parsed = parse_design(design_text(design["modification"], design["graph"], design["prompt"]))
    if not parsed.ok:
        raise ValueError(f"{path}: the best_fixed design does not parse: {parsed.error}")
    return parsed

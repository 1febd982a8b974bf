"""The fixed-workflow baselines (fr_jax/flow/baselines.py): each one runs through the real POST /workflow/run with the
real SmolLM2 worker and comes back scored; best_fixed's choice against a hand-computed case. best_fixed picked from
a real optimiser run is in test_distil.py."""

import asyncio
import json

import pytest

from fr_jax.data.tasks import Task, TestSuite
from fr_jax.flow.baselines import BASELINES, FIXED, best_fixed, fixed_design, load_best_fixed
from fr_jax.flow.grammar import WorkflowSpec, render
from fr_jax.flow.mode import WorkflowRunSettings, run_design
from fr_jax.flow.prompt import ParsedDesign
from fr_jax.rl.reward import count_operator_calls
from fr_jax.sandbox.client import SandboxClient

ADD = Task(
    "toy/add",
    "toy",
    'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
    "add",
    public_tests=TestSuite(("assert add(1, 2) == 3",)),
    hidden_tests=TestSuite(("assert add(2, 3) == 5", "assert add(-1, 1) == 0")),
)
SETTINGS = WorkflowRunSettings(worker="local", max_tokens=48, temperature=0.7, wall_s=300)
EXPECTED_CALLS = {
    "io": {"CustomCodeGenerate": 1},
    "cot": {"CustomCodeGenerate": 1},
    "sc": {"CustomCodeGenerate": 3, "ScEnsemble": 1},
    "self_refine": {"CustomCodeGenerate": 1, "Test": 1},
}


def test_each_baseline_runs_through_workflow_run(workflow_sandbox):
    async def runs():
        async with SandboxClient(workflow_sandbox.url, request_timeout_s=600, deadline_s=900) as sandbox:
            designs = [fixed_design(name) for name in FIXED]
            return await asyncio.gather(
                *(run_design(sandbox, d, ADD, SETTINGS, hidden=True, retries=1, seed=3) for d in designs)
            )

    results = dict(zip(FIXED, asyncio.run(runs())))
    for name, run in results.items():
        assert run.failure is None, (name, run.failure)
        assert run.solution and len(run.hidden.tests) == 2 and 0.0 <= run.hidden.pass_rate <= 1.0, name
        assert run.operator_calls == EXPECTED_CALLS[name], name
        asked = sum(EXPECTED_CALLS[name].values()) - EXPECTED_CALLS[name].get("Test", 0)  # Test asks on failures only
        assert run.worker.calls >= asked and run.worker.completion_tokens > 0, name
    # sc asked each candidate in its own words: the run's worker calls share one sampling seed
    prompts = [c.worker_calls[0].prompt for c in results["sc"].trace if c.operator == "CustomCodeGenerate"]
    assert len(set(prompts)) == 3


def test_fixed_designs_are_grammar_points():
    assert render(WorkflowSpec()) == (fixed_design("io").graph, fixed_design("io").prompt)
    assert [count_operator_calls(fixed_design(name).graph) for name in FIXED] == [1, 1, 2, 2]
    assert "5 candidates" in fixed_design("sc", samples=5).modification
    assert fixed_design("sc", samples=5).graph.count("range(5)") == 1
    assert BASELINES[-1] == "best_fixed"
    with pytest.raises(ValueError, match="unknown fixed baseline 'best_fixed'.*load_best_fixed"):
        fixed_design("best_fixed")
    with pytest.raises(ValueError, match="sc needs at least 2 samples"):
        fixed_design("sc", samples=1)


def rounds(*designs):
    """A rounds.jsonl query's rounds: (graph, score) pairs, prompt empty."""
    return [
        {"modification": f"m-{graph}", "graph": graph, "prompt": "", "score": score, "format_error": None}
        for graph, score in designs
    ]


def test_best_fixed_completes_the_leaders_and_picks_the_best_mean():
    queries = [
        {"task_id": "q1", "rounds": rounds(("A", 0.5), ("B", 1.0))},
        {"task_id": "q2", "rounds": rounds(("A", 0.0), ("C", 0.5), ("C", 1.0))},  # C tried twice here: mean 0.75
    ]
    queries[1]["rounds"].append({**rounds(("D", 1.0))[0], "format_error": "no <graph>"})  # never a candidate
    # where tried: B 1.0 (q1), C 0.75 (q2), A 0.25 (both); B and C lead and are run where they were not tried
    asked = []
    missing = {("q2", "B"): 0.0, ("q1", "C"): 1.0}

    async def validate(task_id, design: ParsedDesign):
        asked.append((task_id, design.graph))
        return missing[task_id, design.graph]

    choice = asyncio.run(best_fixed(queries, validate, candidates=2))
    assert sorted(asked) == [("q1", "C"), ("q2", "B")]
    # B: (1.0 + 0.0) / 2 = 0.5; C: (1.0 + 0.75) / 2 = 0.875
    assert choice["design"] == {"modification": "m-C", "graph": "C", "prompt": ""}
    assert (choice["score"], choice["scores"]) == (0.875, {"q1": 1.0, "q2": 0.75})
    assert choice["candidates"] == [
        {"modification": "m-B", "score": 0.5, "tried_on": 1},
        {"modification": "m-C", "score": 0.875, "tried_on": 1},
    ]
    asked.clear()
    # A was tried everywhere: nothing to run for it, and it does not win
    assert asyncio.run(best_fixed(queries, validate, candidates=3))["candidates"][2] == {
        "modification": "m-A",
        "score": 0.25,
        "tried_on": 2,
    }
    assert len(asked) == 2
    with pytest.raises(ValueError, match="at least one query"):
        asyncio.run(best_fixed([], validate))


def test_load_best_fixed(tmp_path):
    io = fixed_design("io")
    path = tmp_path / "best_fixed.json"
    with pytest.raises(FileNotFoundError, match="--best-fixed"):
        load_best_fixed(path)
    design = {"modification": io.modification, "graph": io.graph, "prompt": io.prompt}
    path.write_text(json.dumps({"design": design}))
    assert load_best_fixed(path) == io
    path.write_text(json.dumps({"design": {**design, "graph": "class Nothing: pass\n"}}))
    with pytest.raises(ValueError, match="does not define class Workflow"):
        load_best_fixed(path)

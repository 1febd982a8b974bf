"""The operator grammar (fr_jax/flow/grammar.py): its root is the seed workflow, every spec renders a design the
parser accepts, with as many call sites as the reward counts, and reads back to itself."""

import itertools

import pytest

from fr_jax.flow.grammar import MAX_SAMPLES, STRATEGIES, WorkflowSpec, render, spec_of
from fr_jax.flow.prompt import SEED_GRAPH, SEED_PROMPT, design_text, operator_outline, parse_design
from fr_jax.rl.reward import count_operator_calls
from sandbox_service.operators import OPERATORS

SPECS = [
    WorkflowSpec(strategy, analysis, samples, test)
    for strategy, analysis, samples, test in itertools.product(STRATEGIES, (False, True), (1, 2, 3, 5), (False, True))
]


def test_the_root_is_the_seed_workflow():
    assert render(WorkflowSpec()) == (SEED_GRAPH, SEED_PROMPT)
    assert spec_of(SEED_GRAPH, SEED_PROMPT) == WorkflowSpec()
    assert operator_outline(SEED_GRAPH) == "CustomCodeGenerate"


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_every_spec_is_a_design_that_reads_back(spec):
    graph, prompt = render(spec)
    parsed = parse_design(design_text("m", graph, prompt))
    assert parsed.ok and parsed.warnings == () and (parsed.graph, parsed.prompt) == (graph, prompt)
    assert spec_of(graph, prompt) == spec
    assert count_operator_calls(graph) == spec.call_sites
    steps = ["Custom"] * spec.analysis + ["CustomCodeGenerate"] + ["ScEnsemble"] * (spec.samples > 1)
    steps += ["Test"] * spec.test
    assert operator_outline(graph) == " -> ".join(steps) and set(steps) <= set(OPERATORS)


def test_counts_hand_computed():
    full = WorkflowSpec("plan_first", analysis=True, samples=3, test=True)
    assert (full.call_sites, full.operator_calls) == (4, 6)  # analysis + 3 generations + ScEnsemble + Test
    assert (WorkflowSpec().call_sites, WorkflowSpec().operator_calls) == (1, 1)
    assert full.describe() == (
        "a Custom analysis call, then 3 CustomCodeGenerate candidates (plan-first instruction) picked by ScEnsemble, "
        "then a Test-and-repair step"
    )


def test_outside_the_grammar():
    assert spec_of(SEED_GRAPH.replace("solution", "answer"), SEED_PROMPT) is None
    with pytest.raises(ValueError, match="unknown strategy 'haiku'"):
        WorkflowSpec(strategy="haiku")
    with pytest.raises(ValueError, match=rf"samples must be in \[1, {MAX_SAMPLES}\]"):
        WorkflowSpec(samples=MAX_SAMPLES + 1)
    assert operator_outline("not python (") == ""

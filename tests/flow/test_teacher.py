"""The search teacher (fr_jax/flow/teacher.py) on hand-made feedback: its moves, how the feedback weighs them, its
seeded choice and the reasoning it writes. Its designs running for real, and its replay from a real run's rounds,
are in test_distil.py."""

import asyncio
import dataclasses

import numpy as np
import pytest

from fr_jax.flow.feedback import RunRecord, common_failures, failure_kinds, feedback_text
from fr_jax.flow.grammar import WorkflowSpec, render
from fr_jax.flow.prompt import Experience, parse_design
from fr_jax.flow.teacher import DesignRequest, SearchDesigner, Signals, choose, moves, weigh
from fr_jax.sandbox.client import Evaluation, LoadError, TestOutcome

EMPTY_FAILS = "assert count_zeros([]) == 0: Failed (AssertionError: )"


def run(pass_rate, *failed, failure=None, message=None, kinds=()):
    return RunRecord(pass_rate, failure, message, 1, 1, 100, 1.0, failed_tests=tuple(failed), failure_kinds=kinds)


HALF = (run(0.0, EMPTY_FAILS, kinds=("a wrong answer",)), run(1.0))  # the runs disagree; the failing test has
# an empty input


def test_moves_of_the_seed_and_the_limits():
    seed = WorkflowSpec()
    swaps = ["strategy:step_by_step", "strategy:plan_first", "strategy:edge_cases", "strategy:restate_examples"]
    assert [m.name for m in moves(seed, max_call_sites=10, max_operator_calls=20)] == [
        "ensemble",
        "add_test",
        "add_analysis",
        *swaps,
    ]
    # 3 candidates + ScEnsemble are 4 operator calls: over a budget of 3
    assert "ensemble" not in [m.name for m in moves(seed, max_call_sites=10, max_operator_calls=3)]
    assert [m.name for m in moves(seed, max_call_sites=1, max_operator_calls=20)] == swaps  # each add is a call site
    full = WorkflowSpec("plan_first", analysis=True, samples=3, test=True)
    names = [m.name for m in moves(full, max_call_sites=10, max_operator_calls=20)]
    assert names[-3:] == ["remove_ensemble", "remove_test", "remove_analysis"] and "strategy:plan_first" not in names
    ensemble = moves(seed, max_call_sites=10, max_operator_calls=20)[0]
    assert ensemble.child == WorkflowSpec(samples=3)
    assert ensemble.modification == "Generate 3 candidates at once and pick one with ScEnsemble."


def test_signals_and_weights_hand_computed():
    signals = Signals.of(0.5, HALF)
    assert (signals.failing, signals.disagree, signals.edge) == (True, True, True)
    assert (signals.perfect, signals.not_loading, signals.broken, signals.over_budget) == (False,) * 4
    weights = {m.name: weigh(m, signals)[0] for m in moves(WorkflowSpec(), max_call_sites=10, max_operator_calls=20)}
    assert weights == {
        "ensemble": 3.0,
        "add_test": 4.0,
        "add_analysis": 1.0,
        "strategy:step_by_step": 1.0,
        "strategy:plan_first": 1.0,
        "strategy:edge_cases": 3.0,
        "strategy:restate_examples": 2.0,
    }
    assert not Signals.of(0.0, (run(0.0, "assert f(10) == 11: Failed (AssertionError: )"),)).edge  # 10 is not 0
    full = WorkflowSpec(analysis=True, samples=3, test=True)
    over = Signals.of(0.0, (run(0.0, failure="budget_exceeded", message="more than 4 calls"),))
    perfect = Signals.of(1.0, (run(1.0), run(1.0)))
    for move in moves(full, max_call_sites=10, max_operator_calls=20):
        removal = move.name.startswith("remove_")
        assert weigh(move, over)[0] == (4.0 if removal else 1.0)
        assert weigh(move, perfect)[0] == (4.0 if removal else 0.5)
    loading = Signals.of(0.0, (run(0.0, "the solution did not load: SyntaxError: bad"),))
    assert loading.not_loading and not loading.failing


def test_feedback_text_counts_runs():
    assert common_failures(HALF) == [(EMPTY_FAILS, 1)]
    assert feedback_text(0.5, HALF) == (
        f"public pass rate 0.500 over 2 runs (0.000, 1.000); failing: {EMPTY_FAILS} in 1 of 2 runs"
    )
    crashed = run(0.0, failure="workflow_exception", message="RuntimeError: x")
    assert feedback_text(0.0, [crashed]) == (
        "public pass rate 0.000 over 1 run (0.000); failing: the workflow ended with workflow_exception: "
        "RuntimeError: x in 1 of 1 runs"
    )


def test_failures_by_kind_quote_no_test_source():
    def outcome(status, error_type=None, message=None):
        return TestOutcome("assert f([1, 2, 3] * 40) == 7", False, status, error_type, message)

    tests = (
        outcome("Failed", "AssertionError", "f([1, 2, 3, 1, 2, 3, ...]) returned 6"),
        outcome("Failed", "AssertionError", "another wrong value"),
        outcome("Error", "NameError", "name 'math' is not defined"),
        outcome("TimeLimitExceeded"),
        TestOutcome("assert f([]) == 0", True, "Passed"),
    )
    assert failure_kinds(Evaluation("Finished", tests)) == (
        "a wrong answer",
        "NameError: name 'math' is not defined",
        "TimeLimitExceeded",
    )
    unloaded = Evaluation("Finished", tests[:1], LoadError("SyntaxError", "'(' was never closed " + "x" * 99, "s"))
    [kind] = failure_kinds(unloaded)  # its tests were not run: one kind, clipped
    assert kind.startswith("the solution did not load (SyntaxError: '(' was never closed xxx")
    assert kind.endswith("x...") and len(kind) == 80
    assert feedback_text(0.5, HALF, short=True) == (
        "public pass rate 0.500 over 2 runs (0.000, 1.000); failing: a wrong answer in 1 of 2 runs"
    )


def test_choice_is_seeded_and_prefers_untried_designs():
    def draw(seed, tried=()):
        return choose(
            WorkflowSpec(),
            0.5,
            HALF,
            list(tried),
            np.random.default_rng(seed),
            max_call_sites=10,
            max_operator_calls=20,
        )

    assert all(draw(seed) == draw(seed) for seed in range(20))
    assert len({draw(seed)[0].name for seed in range(20)}) >= 3  # weights 4:3:3:2:1:1:1, not a fixed answer
    every = [m.child for m in moves(WorkflowSpec(), max_call_sites=10, max_operator_calls=20)]
    only_test_left = [child for child in every if child != WorkflowSpec(test=True)]
    assert all(draw(seed, only_test_left)[0].name == "add_test" for seed in range(10))
    move, _, repeated = draw(0, every)
    assert repeated and move.child in every
    with pytest.raises(ValueError, match="no move of the search grammar fits max_operator_calls=0"):
        choose(WorkflowSpec(), 0.5, HALF, [], np.random.default_rng(0), max_call_sites=0, max_operator_calls=0)


def request(seed, **changes):
    graph, prompt = render(WorkflowSpec())
    fields = dict(
        messages=[{"role": "user", "content": "design"}],
        parent_round=1,
        parent_graph=graph,
        parent_prompt=prompt,
        parent_score=0.5,
        parent_runs=HALF,
        experience=(Experience("Remove the Test step.", 0.5, 0.25),),
        tried=((graph, prompt),),
        seed=seed,
    )
    return DesignRequest(**{**fields, **changes})


def test_search_designer_answers_like_a_chat_model():
    teacher = SearchDesigner(max_call_sites=10, max_operator_calls=20)
    reply = asyncio.run(teacher.design(request(7)))
    assert reply == dataclasses.replace(asyncio.run(teacher.design(request(7))), latency_s=reply.latency_s)
    design = parse_design(reply.content)
    assert design.ok and reply.prompt_tokens is None and reply.finish_reason == "stop"
    [move] = [
        m
        for m in moves(WorkflowSpec(), max_call_sites=10, max_operator_calls=20)
        if render(m.child) == (design.graph, design.prompt)
    ]
    assert design.modification == move.modification
    lines = reply.reasoning.splitlines()
    assert lines[0] == "Round 1 is one CustomCodeGenerate call (direct instruction); it scored 0.500 (0.000, 1.000)."
    assert lines[1] == "The main problem: a wrong answer (1 of 2 runs)."  # by kind: no test source to copy
    assert lines[2] == 'Earlier changes of it: "Remove the Test step." took 0.500 to 0.250.'
    assert lines[3] == weigh(move, Signals.of(0.5, HALF))[1]
    assert lines[-1] == f"Change: {move.modification[0].lower()}{move.modification[1:]}"
    outsider = request(7, parent_graph="class Workflow:\n    async def __call__(self, problem, entry_point): ...\n")
    with pytest.raises(ValueError, match="refines designs of its grammar only"):
        asyncio.run(teacher.design(outsider))

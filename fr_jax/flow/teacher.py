"""The designers the refinement loop asks for a child design: a chat model, or the search teacher that runs offline.

Both answer a `DesignRequest` with a `ChatReply` (reasoning, and content holding the three tags), so the rounds log
and the SFT records are the same whichever wrote them.

- `ChatDesigner`: any OpenAI-compatible endpoint (DeepSeek-R1, o1-mini, fr_jax.serve) reading the design prompt.
- `SearchDesigner`: a search over the operator grammar (fr_jax.flow.grammar), NOT an LLM. Each round it edits the
  parent by one move: generate 3 candidates and pick with ScEnsemble, add a Test-and-repair step, swap the
  generation instruction (think step by step, plan first, handle edge cases, restate the examples), add an analysis
  call whose notes feed generation, or remove one of those steps. It weighs the moves by what the parent's
  validation runs showed (failing tests favour a Test step, runs that disagree favour an ensemble, failures on empty
  or zero inputs the edge-case instruction, a design that passes everything or overran its budget a removal), never
  proposes a design the query already tried while another is left, keeps the graph within the prompt's limit on
  call sites and the run's operator-call budget, and draws the move with a generator seeded by the request's seed:
  the same request gives the same design and the same reasoning. Its reasoning is written from that feedback.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from fr_jax.flow.chat import ChatClient, ChatReply
from fr_jax.flow.feedback import RunRecord, common_failures
from fr_jax.flow.grammar import STRATEGIES, STRATEGY_NAMES, WorkflowSpec, render, spec_of
from fr_jax.flow.prompt import Experience, design_text

ENSEMBLE_SAMPLES = 3  # candidates the ensemble move generates


@dataclasses.dataclass(frozen=True)
class DesignRequest:
    """One round's question: refine `parent_graph`/`parent_prompt` (round `parent_round`, validated by
    `parent_runs`), knowing what earlier children of it did and which designs the query has already tried."""

    messages: list[dict[str, str]]  # the design prompt, as a chat designer reads it
    parent_round: int
    parent_graph: str
    parent_prompt: str
    parent_score: float
    parent_runs: tuple[RunRecord, ...]
    experience: tuple[Experience, ...]
    tried: tuple[tuple[str, str], ...]  # (graph, prompt) of every earlier round of the query
    seed: int


class Designer(Protocol):
    async def design(self, request: DesignRequest) -> ChatReply: ...

    async def aclose(self) -> None: ...


class ChatDesigner:
    """A chat model reading the design prompt, with the loop's sampling settings."""

    def __init__(self, client: ChatClient, *, temperature: float, top_p: float, max_tokens: int):
        self.client, self.temperature, self.top_p, self.max_tokens = client, temperature, top_p, max_tokens

    async def design(self, request: DesignRequest) -> ChatReply:
        return await self.client.complete(
            request.messages,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            seed=request.seed,
        )

    async def aclose(self) -> None:
        await self.client.aclose()


# ------------------------------------------------------------------------------------------------- moves (pure)


@dataclasses.dataclass(frozen=True)
class Move:
    name: str  # ensemble | add_test | add_analysis | strategy:NAME | remove_ensemble | remove_test | remove_analysis
    modification: str  # the <modification> line
    child: WorkflowSpec


def moves(spec: WorkflowSpec, *, max_call_sites: int, max_operator_calls: int) -> list[Move]:
    """Every one-step edit of `spec` whose graph stays within both limits, in a fixed order."""
    edits = [  # (applies, name, modification, change)
        (
            spec.samples == 1,
            "ensemble",
            f"Generate {ENSEMBLE_SAMPLES} candidates at once and pick one with ScEnsemble.",
            {"samples": ENSEMBLE_SAMPLES},
        ),
        (
            not spec.test,
            "add_test",
            "Add a Test step that runs the public tests and has the worker repair the solution.",
            {"test": True},
        ),
        (
            not spec.analysis,
            "add_analysis",
            "Add a Custom analysis call whose notes feed code generation.",
            {"analysis": True},
        ),
        *(
            (
                strategy != spec.strategy,
                f"strategy:{strategy}",
                f"Generate with {STRATEGY_NAMES[strategy]} instead of {STRATEGY_NAMES[spec.strategy]}.",
                {"strategy": strategy},
            )
            for strategy in STRATEGIES
        ),
        (spec.samples > 1, "remove_ensemble", "Remove the ensemble: generate one solution.", {"samples": 1}),
        (spec.test, "remove_test", "Remove the Test step.", {"test": False}),
        (spec.analysis, "remove_analysis", "Remove the analysis call.", {"analysis": False}),
    ]
    found = [Move(name, text, dataclasses.replace(spec, **change)) for applies, name, text, change in edits if applies]
    return [m for m in found if m.child.call_sites <= max_call_sites and m.child.operator_calls <= max_operator_calls]


# an input a function often gets wrong: an empty container or string, zero, a negative number
_EDGE_INPUT = re.compile(r"\(\s*\)|\[\s*\]|\{\s*\}|''|\"\"|(?<![\w.])0(?![\w.])|(?<![\w.])-\d")
_BUDGET_FAILURES = ("budget_exceeded", "timeout")
_BROKEN_CODE = ("workflow_exception", "no_solution")


@dataclasses.dataclass(frozen=True)
class Signals:
    """What the parent's validation runs showed, as the move weights read it."""

    perfect: bool  # every run passed every public test
    failing: bool  # some public test failed
    not_loading: bool  # a solution did not load (syntax error, missing function)
    broken: bool  # the workflow raised or returned nothing
    over_budget: bool  # a run spent its budget or its time
    disagree: bool  # the runs' pass rates differ
    edge: bool  # a failing test involves an empty, zero or negative value
    nothing_passes: bool

    @classmethod
    def of(cls, score: float, runs: Sequence[RunRecord]) -> Signals:
        tests = [line for run in runs for line in run.failed_tests]
        rates = [run.pass_rate for run in runs]
        return cls(
            perfect=bool(runs) and all(rate == 1.0 for rate in rates),
            failing=any(not line.startswith("the solution did not load") for line in tests),
            not_loading=any(line.startswith("the solution did not load") for line in tests),
            broken=any(run.failure in _BROKEN_CODE for run in runs),
            over_budget=any(run.failure in _BUDGET_FAILURES for run in runs),
            disagree=len(set(rates)) > 1,
            edge=any(_EDGE_INPUT.search(line.split(": ", 1)[0]) for line in tests),
            nothing_passes=score == 0.0,
        )


def weigh(move: Move, signals: Signals) -> tuple[float, str]:
    """How strongly the feedback argues for `move` (1 is no argument either way), and the argument."""
    name = move.name
    if signals.over_budget and name.startswith("remove_"):
        return 4.0, "A run spent its budget or its time, so the workflow must get smaller."
    if signals.perfect:
        if name.startswith("remove_"):
            return 4.0, "Every public test already passes, so a smaller workflow is worth trying: fewer worker calls."
        return 0.5, "Every public test already passes; the hidden tests may still need more care."
    if name == "add_test" and (signals.failing or signals.not_loading):
        return 4.0, (
            "The solution fails public tests and nothing checks it before it is returned: a Test step runs the "
            "public tests and shows the failures to the worker to repair."
        )
    if name == "ensemble" and signals.disagree:
        return 3.0, "The runs disagree, so one sample is luck: generate several and let ScEnsemble pick."
    if name == "strategy:edge_cases" and signals.edge:
        return 3.0, "A failing test involves an empty, zero or negative value: ask for the edge cases first."
    if name in ("strategy:plan_first", "strategy:step_by_step") and (signals.not_loading or signals.broken):
        return 2.0, "The worker's code does not even run: asking it to think before coding may give working code."
    if name == "strategy:restate_examples" and signals.failing:
        return 2.0, "The outputs differ from the expected ones: have the worker restate the examples first."
    if name == "add_analysis" and signals.nothing_passes:
        return 2.0, "Nothing passes: an analysis of the problem first may put generation on the right track."
    if name.startswith("remove_"):
        return 0.5, "Removing a step makes the workflow cheaper; the feedback does not ask for it."
    return 1.0, "The feedback gives no strong reason for any move, so this one is explored."


def choose(
    parent: WorkflowSpec,
    score: float,
    runs: Sequence[RunRecord],
    tried: Sequence[WorkflowSpec],
    rng: np.random.Generator,
    *,
    max_call_sites: int,
    max_operator_calls: int,
) -> tuple[Move, str, bool]:
    """The move to make (drawn with probability proportional to its weight among the moves to designs not tried
    yet, or among all moves when every one was tried), its argument, and whether it repeats a tried design."""
    candidates = moves(parent, max_call_sites=max_call_sites, max_operator_calls=max_operator_calls)
    if not candidates:
        raise ValueError(
            f"no move of the search grammar fits max_operator_calls={max_operator_calls} and "
            f"{max_call_sites} call sites: raise the budget"
        )
    fresh = [m for m in candidates if m.child not in tried]
    pool = fresh or candidates
    signals = Signals.of(score, runs)
    weighed = [weigh(m, signals) for m in pool]
    weights = np.array([w for w, _ in weighed])
    pick = int(rng.choice(len(pool), p=weights / weights.sum()))
    return pool[pick], weighed[pick][1], not fresh


def reasoning_text(request: DesignRequest, parent: WorkflowSpec, move: Move, argument: str, repeated: bool) -> str:
    """The teacher's reasoning, from the parent's feedback to the move."""
    runs = request.parent_runs
    rates = ", ".join(f"{run.pass_rate:.3f}" for run in runs)
    lines = [f"Round {request.parent_round} is {parent.describe()}; it scored {request.parent_score:.3f} ({rates})."]
    worst = common_failures(runs, short=True)
    if worst:
        what, count = worst[0]
        lines.append(f"The main problem: {what} ({count} of {len(runs)} runs).")
    if request.experience:
        lines.append(
            "Earlier changes of it: "
            + "; ".join(f'"{e.modification}" took {e.before:.3f} to {e.after:.3f}' for e in request.experience)
            + "."
        )
    lines.append(argument)
    if repeated:
        lines.append("Every one-step change of it has been tried already, so one is tried again with new runs.")
    lines.append(f"Change: {move.modification[0].lower()}{move.modification[1:]}")
    return "\n".join(lines)


class SearchDesigner:
    """The offline teacher (module docstring). `max_call_sites` is the prompt's complexity limit,
    `max_operator_calls` the run's budget."""

    def __init__(self, *, max_call_sites: int, max_operator_calls: int):
        self.max_call_sites, self.max_operator_calls = max_call_sites, max_operator_calls

    async def design(self, request: DesignRequest) -> ChatReply:
        started = time.perf_counter()
        parent = spec_of(request.parent_graph, request.parent_prompt)
        if parent is None:
            raise ValueError(
                f"the search teacher refines designs of its grammar only (fr_jax.flow.grammar), and round "
                f"{request.parent_round}'s design is not one: use it on runs it designed from the seed"
            )
        tried = [spec for spec in (spec_of(g, p) for g, p in request.tried) if spec is not None]
        move, argument, repeated = choose(
            parent,
            request.parent_score,
            request.parent_runs,
            tried,
            np.random.default_rng(request.seed),
            max_call_sites=self.max_call_sites,
            max_operator_calls=self.max_operator_calls,
        )
        graph, prompt = render(move.child)
        return ChatReply(
            content=design_text(move.modification, graph, prompt),
            reasoning=reasoning_text(request, parent, move, argument, repeated),
            prompt_tokens=None,
            completion_tokens=None,
            finish_reason="stop",
            latency_s=time.perf_counter() - started,
        )

    async def aclose(self) -> None:
        return None
